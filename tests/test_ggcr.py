"""GGCR as an algorithm and as a regulariser of others, composed with GGR."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax import ssl
from ggr_jax.models import build_model
from ggr_jax.ssl import LossContext, ggcr
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop, step as step_lib
from tests.test_train import _equal_params, _one_step, losses_at_init, tiny_config

COMPOSED = ("ggcr", "iomatch_ggcr", "openmatch_ggcr", "metasemi_ggcr")


@pytest.fixture(scope="module")
def split():
  return loop.load_split(tiny_config())


def _config(algorithm, mode="vlr", **consistency):
  cfg = tiny_config(algorithm, mode)
  block = cfg[algorithm]
  block.consistency.update({"warmup_steps": 0, "mask": "all", **consistency})
  if "p_cutoff" in block:
    block.p_cutoff = 0.0
  if "start_fix_steps" in block:
    block.start_fix_steps = 0
  if "mixup" in block:  # MetaSemi pairs labeled and unlabeled images one to one
    cfg.train.uratio = 1
  return cfg


@pytest.mark.parametrize("algorithm", COMPOSED)
def test_one_rectified_step_with_the_consistency_term(algorithm, split):
  state, metrics = _one_step(_config(algorithm), split)
  gc = float(metrics["losses/gc"])
  assert 0.0 < gc <= 2 * 0.1 and float(metrics["ggcr/gc_on"]) == 1.0  # weight * mean(1 - cos)
  assert -1.0 <= float(metrics["ggcr/gc_mean"]) <= 1.0
  assert np.isfinite(float(metrics["losses/aux"])) and np.isfinite(float(metrics["ggr/cos_before"]))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_before_its_warm_up_ggcr_is_fixmatch_with_hard_labels(split):
  cfg = _config("ggcr", "vlr", warmup_steps=10)
  cfg.ggcr.unsup_warmup_steps = 0  # the unlabeled loss live from the first step
  base = tiny_config("fixmatch", "vlr")
  base.fixmatch.update({k: v for k, v in cfg.ggcr.items() if k != "consistency"})
  ggcr_state, ggcr_metrics = _one_step(cfg, split)
  base_state, _ = _one_step(base, split)
  _equal_params(ggcr_state.params, base_state.params)
  assert float(ggcr_metrics["losses/gc"]) == 0.0 and float(ggcr_metrics["ggcr/gc_on"]) == 0.0
  assert np.isnan(float(ggcr_metrics["ggcr/gc_mean"]))  # not measured during the warm-up


def _losses(algorithm, split, **consistency):
  return losses_at_init(_config(algorithm, **consistency), split, jax.random.PRNGKey(2))


def test_the_term_is_auxiliary_by_default_and_can_be_the_anchor(split):
  aux = _losses("ggcr", split)
  assert "gc" in aux.auxiliary and "gc" not in aux.supervised
  # per-sample terms still sum to the auxiliary loss, the consistency terms included
  np.testing.assert_allclose(float(jnp.sum(aux.sample_aux)), float(aux.aux), rtol=1e-5)
  assert aux.sample_is_id.shape == aux.sample_aux.shape
  sup = _losses("ggcr", split, role="supervised")
  assert "gc" in sup.supervised and "gc" not in sup.auxiliary
  np.testing.assert_allclose(float(sup.supervised["gc"]), float(aux.auxiliary["gc"]), rtol=1e-6)


def test_the_confident_mask_drops_unconfident_samples(split):
  every = _losses("ggcr", split)
  none_confident = _losses("ggcr", split, mask="confident", tau=1.0)
  assert float(every.auxiliary["gc"]) > 0.0
  assert float(none_confident.auxiliary["gc"]) == 0.0
  for name in ("ggcr/gc_confident", "ggcr/gc_unconfident", "ggcr/gc_id", "ggcr/gc_ood"):
    assert name in every.metrics


@pytest.mark.parametrize("field, value, message", [
    ("weight", -0.1, "ggcr.consistency.weight"),
    ("sketch_dim", 0, "ggcr.consistency.sketch_dim"),
    ("sketch_chunk", -1, "ggcr.consistency.sketch_chunk"),
    ("microbatch", -1, "ggcr.consistency.microbatch"),
    ("mask", "some", "ggcr.consistency.mask"),
    ("penalty", "l1", "ggcr.consistency.penalty"),
    ("method", "fast", "ggcr.consistency.method"),
    ("remat", "yes", "ggcr.consistency.remat"),
    ("scope", "head", "ggcr.consistency.scope"),
    ("pair_fraction", 0.0, "ggcr.consistency.pair_fraction"),
    ("pair_fraction", 1.5, "ggcr.consistency.pair_fraction"),
    ("pair_fraction", 0.3, "ggcr.consistency.pair_fraction"),
    ("pair_chunks", 0, "ggcr.consistency.pair_chunks"),
    ("statistics", "frozen", "ggcr.consistency.statistics"),
    ("pair_chunks", -1, "ggcr.consistency.pair_chunks"),
])
def test_bad_settings_name_the_field(field, value, message):
  cfg = _config("ggcr")
  cfg.ggcr.consistency[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg, num_devices=1)


def test_chunks_are_for_the_exact_method():
  cfg = _config("ggcr")
  cfg.ggcr.consistency.update(dict(method="sketch", pair_chunks=2))
  with pytest.raises(config_lib.ConfigError, match="ggcr.consistency.pair_chunks"):
    config_lib.validate(cfg, num_devices=1)


def test_an_algorithm_without_a_view_pair_cannot_take_the_term():
  with pytest.raises(ValueError, match="no weak/strong view pair"):
    ggcr.with_gradient_consistency(ssl.get("supervised"), "supervised_ggcr")


def test_a_model_without_an_encoder_is_refused_before_compiling(split):
  cfg = _config("ggcr")
  algo = ssl.get("ggcr")
  ctx_cfg = step_lib.algorithm_config(cfg)
  params = {"fc": {"kernel": jnp.ones((3, 6))}}
  fake_apply = lambda p, s, x, train: ({"logits": x.reshape(x.shape[0], -1)[:, :6]}, s)
  batch = {"x_lb": jnp.ones((2, 8, 8, 1)), "y_lb": jnp.zeros((2,), jnp.int32),
           "x_ulb_w": jnp.ones((4, 8, 8, 1)), "x_ulb_s": jnp.ones((4, 8, 8, 1))}
  with pytest.raises(ValueError, match="consistency.scope = 'encoder' selects no parameter"):
    jax.eval_shape(lambda: algo.losses(LossContext(fake_apply, params, {}, batch, None, 0,
                                                   ctx_cfg)))


def test_the_gradient_norm_penalty_is_half_the_views_squared_norms(split):
  """The ablation's penalty from the same per-sample geometry: exact and vmap agree, it
  is linear in lambda, and it is not the cosine term."""
  norm = {m: _losses("ggcr", split, method=m, penalty="grad_norm") for m in ("exact", "vmap")}
  term = float(norm["exact"].auxiliary["gc"])
  np.testing.assert_allclose(float(norm["vmap"].auxiliary["gc"]), term, rtol=1e-4)
  doubled = _losses("ggcr", split, penalty="grad_norm", weight=0.2)
  np.testing.assert_allclose(float(doubled.auxiliary["gc"]), 2 * term, rtol=1e-5)
  cosine = _losses("ggcr", split)
  assert term > 0 and abs(term - float(cosine.auxiliary["gc"])) > 1e-3 * term
  # GC is logged as before: the same per-sample geometry
  np.testing.assert_allclose(float(norm["exact"].metrics["ggcr/gc_mean"]),
                             float(cosine.metrics["ggcr/gc_mean"]), rtol=1e-5)


def test_every_method_gives_the_same_consistency_through_the_algorithm(split):
  """The exact and vmap terms agree, and the sketch estimates them: the exact and sketch
  methods read their pseudo-labels from their own forward, vmap from a recorded one, and
  the cosines depend on those labels."""
  out = {method: _losses("ggcr", split, method=method, sketch_dim=256, mask="confident",
                         tau=0.1)
         for method in ("exact", "vmap", "sketch")}
  gc = {m: float(o.metrics["ggcr/gc_mean"]) for m, o in out.items()}
  confident = {m: float(o.metrics["ggcr/gc_confident"]) for m, o in out.items()}
  assert abs(gc["exact"] - gc["vmap"]) < 1e-5 and abs(confident["exact"] - confident["vmap"]) < 1e-5
  assert abs(gc["sketch"] - gc["exact"]) < 0.2  # k = 256: errors of order 1/16 per sample
  np.testing.assert_allclose(float(out["exact"].auxiliary["gc"]),
                             float(out["vmap"].auxiliary["gc"]), rtol=1e-4, atol=1e-7)


def _context(split, algorithm="ggcr", **consistency):
  """The :class:`LossContext` of ``algorithm`` on one augmented digits batch at init."""
  cfg = _config(algorithm, **consistency)
  model = build_model("cnn", split.num_classes, ssl.head(algorithm))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
  views = step_lib.make_views(cfg, split.mean, split.std, None)
  data = {"x_labeled": split.x_labeled, "y_labeled": split.y_labeled.astype(np.int32),
          "x_unlabeled": split.x_unlabeled, "unlabeled_is_id": split.unlabeled_is_id}
  batch = views(jax.random.PRNGKey(1), 0, data, jnp.ones(split.x_unlabeled.shape[0], bool))
  return LossContext(step_lib.make_apply_fn(model), variables["params"],
                     variables["batch_stats"], batch, jax.random.PRNGKey(2), 0,
                     step_lib.algorithm_config(cfg), learning_rate=jnp.float32(0.03))


def _ggcr_losses_fn(split, algorithm="ggcr", **consistency):
  """``params -> Losses`` of GGCR on one augmented digits batch, and the initial params."""
  ctx = _context(split, algorithm, **consistency)
  fn = lambda p: ssl.get(algorithm).losses(dataclasses.replace(ctx, params=p))
  return fn, ctx.params, ctx.batch["x_ulb_w"].shape[0]


@pytest.mark.parametrize("method, statistics",
                         [("exact", "through"), ("vmap", "through"), ("exact", "held")])
def test_a_pair_fraction_measures_its_pairs_as_the_whole_batch_does(split, method, statistics):
  """Every k-th pair, forwarded alone with the joint forward's statistics, gives the
  same per-pair terms and gradients as in the whole batch; L_g is their mean."""
  full_fn, params, size = _ggcr_losses_fn(split, method=method, statistics=statistics)
  part_fn, _, _ = _ggcr_losses_fn(split, method=method, pair_fraction=0.25,
                                  statistics=statistics)
  assert ggcr.pair_stride(0.25) == 4 and ggcr.pair_stride(1 / 3) == 3
  pairs = len(range(0, size, 4))
  assert 1 < pairs < size

  def terms_and_gradient(terms_fn):
    return jax.jit(lambda p: (terms_fn(p), jax.grad(lambda q: jnp.sum(terms_fn(q)))(p)))(params)

  full_terms, full_grad = terms_and_gradient(
      lambda p: full_fn(p).sample_aux[-size:][::4] * size / pairs)
  part_terms, part_grad = terms_and_gradient(lambda p: part_fn(p).sample_aux[-pairs:])
  np.testing.assert_allclose(part_terms, full_terms, rtol=1e-5, atol=1e-8)
  for a, b in zip(jax.tree.leaves(part_grad), jax.tree.leaves(full_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  part = jax.jit(part_fn)(params)
  np.testing.assert_allclose(float(part.auxiliary["gc"]), float(jnp.sum(part_terms)), rtol=1e-6)
  assert part.sample_is_id.shape == part.sample_aux.shape  # the measured pairs' labels


@pytest.mark.parametrize("fraction, chunks", [(1.0, 4), (0.5, 2)])
def test_pairs_in_chunks_give_the_same_terms_and_gradient(split, fraction, chunks):
  """Chunks one after the other, each rebuilt in the backward pass, measure the same
  pairs as one pass: the same per-pair terms, diagnostics and gradient."""
  one_fn, params, size = _ggcr_losses_fn(split, pair_fraction=fraction)
  chunk_fn, _, _ = _ggcr_losses_fn(split, pair_fraction=fraction, pair_chunks=chunks)
  pairs = len(range(0, size, ggcr.pair_stride(fraction)))
  assert pairs % chunks == 0 and pairs // chunks > 1

  def terms_and_gradient(fn):
    terms = lambda p: fn(p).sample_aux[-pairs:]
    return jax.jit(lambda p: (terms(p), fn(p).metrics["ggcr/gc_mean"],
                              jax.grad(lambda q: jnp.sum(terms(q)))(p)))(params)

  one_terms, one_gc, one_grad = terms_and_gradient(one_fn)
  chunk_terms, chunk_gc, chunk_grad = terms_and_gradient(chunk_fn)
  assert float(jnp.max(jnp.abs(one_terms))) > 0
  np.testing.assert_allclose(chunk_terms, one_terms, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(chunk_gc, one_gc, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(chunk_grad), jax.tree.leaves(one_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_chunks_that_do_not_divide_the_pairs_are_refused(split):
  fn, params, size = _ggcr_losses_fn(split, pair_chunks=5)
  assert size % 5
  with pytest.raises(ValueError, match="consistency.pair_chunks"):
    jax.eval_shape(fn, params)


@pytest.mark.parametrize("algorithm", ["ggcr", "iomatch_ggcr"])
def test_the_geometry_on_the_loss_forward_gives_the_step_of_separate_forwards(
    split, monkeypatch, algorithm):
  """With the statistics "through", GGCR measures its geometry on the base algorithm's
  own forward (one forward, one backward pass for both): the same losses, new BatchNorm
  statistics and gradient as a forward of its own, and fewer FLOPs (XLA's count)."""
  def step(fn, params):
    total = lambda p: (lambda out: (out.sup + out.aux, out))(fn(p))
    return jax.jit(jax.value_and_grad(total, has_aux=True)).lower(params)

  shared_fn, params, _ = _ggcr_losses_fn(split, algorithm)
  shared = step(shared_fn, params)
  monkeypatch.setattr(ggcr, "shares_the_forward", lambda *args: False)
  separate = step(shared_fn, params)
  monkeypatch.undo()
  held_fn, _, _ = _ggcr_losses_fn(split, algorithm, statistics="held")
  held = step(held_fn, params)
  flops = {name: s.compile().cost_analysis()["flops"]
           for name, s in (("shared", shared), ("separate", separate), ("held", held))}
  assert flops["shared"] < 0.9 * min(flops["separate"], flops["held"])

  (value, out), grad = shared.compile()(params)
  (value_sep, out_sep), grad_sep = separate.compile()(params)
  assert float(out.auxiliary["gc"]) > 0
  np.testing.assert_allclose(value, value_sep, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((out.model_state, out.sample_aux)),
                  jax.tree.leaves((out_sep.model_state, out_sep.sample_aux))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # float32 rounding of entries that are zero in exact arithmetic (a bias before
  # BatchNorm) is relative to the gradient's scale, not to the entry
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad))
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_sep)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def test_the_forward_is_shared_only_when_the_algorithm_runs_one(split):
  """FixMatch and IOMatch forward the pair once; OpenMatch forwards more than once, and
  MetaSemi never forwards the strong view (the pair is GGCR's own forward)."""
  shared = {}
  for base, name in ggcr.COMPOSITIONS.items():
    shared[name] = ggcr.shares_the_forward(ssl.get(base).losses, _context(split, name),
                                           ssl.get(name).view_pair)
  assert shared == {"ggcr": True, "iomatch_ggcr": True, "openmatch_ggcr": False,
                    "metasemi_ggcr": False}
