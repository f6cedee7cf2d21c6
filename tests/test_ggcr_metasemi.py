"""L_g on MetaSemi, which trains on weak views only: a strong view drawn for it alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax import consistency, ssl
from ggr_jax.configs import metasemi as metasemi_config
from ggr_jax.configs import metasemi_ggcr as metasemi_ggcr_config
from ggr_jax.ssl import ggcr
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop
from tests.test_ggcr import _context
from tests.test_train import _equal_params, _one_step, tiny_config


def _config(algorithm="metasemi_ggcr", **consistency):
  cfg = tiny_config(algorithm, "vlr")
  cfg.dataset.update(protocol="closed", labels_per_class=4)
  cfg.train.uratio = 1
  cfg[algorithm].ramp_steps = 0
  if "consistency" in cfg[algorithm]:
    cfg[algorithm].consistency.update({"warmup_steps": 0, "mask": "all", **consistency})
  return cfg


@pytest.fixture(scope="module")
def closed_split():
  return loop.load_split(_config())


def test_the_strong_view_is_drawn_beside_the_weak_one_and_paired_with_it():
  base, composed = ssl.get("metasemi"), ssl.get("metasemi_ggcr")
  assert composed.views["unlabeled"] == {"x_ulb": "weak", "x_ulb_s": "strong"}
  assert base.views["unlabeled"] == {"x_ulb": "weak"}  # the base draws no strong view
  pair = composed.view_pair
  assert (pair.weak, pair.strong, pair.forward) == ("x_ulb", "x_ulb_s", ("x_ulb", "x_ulb_s"))
  assert ggcr.COMPOSITIONS["metasemi"] == "metasemi_ggcr"


def test_a_strong_view_is_added_only_to_a_weak_only_algorithm():
  with pytest.raises(ValueError, match="has a view pair already"):
    ggcr.with_strong_view(ssl.get("fixmatch"))
  with pytest.raises(ValueError, match="must be a weak unlabeled view"):
    ggcr.with_strong_view(ssl.get("metasemi"), weak="x_lb")


def test_metasemi_ggcr_trains_as_metasemi_until_its_term_starts(closed_split):
  """The extra view takes its own augmentation key and the geometry's forward touches
  neither MetaSemi's statistics nor its draws: before the warm-up, the same step; after
  it, L_g moves the parameters."""
  base_state, base_metrics = _one_step(_config("metasemi"), closed_split)
  waiting_state, waiting = _one_step(_config(warmup_steps=10), closed_split)
  _equal_params(waiting_state.params, base_state.params)
  assert float(waiting["losses/gc"]) == 0.0 and float(waiting["ggcr/gc_on"]) == 0.0
  np.testing.assert_allclose(float(waiting["losses/cons"]), float(base_metrics["losses/cons"]),
                             rtol=1e-6)
  on_state, on = _one_step(_config(), closed_split)
  assert float(on["losses/gc"]) > 0.0 and float(on["ggcr/gc_on"]) == 1.0
  moved = [float(np.max(np.abs(a - b))) for a, b in
           zip(jax.tree.leaves(on_state.params), jax.tree.leaves(base_state.params))]
  assert max(moved) > 1e-6


def test_exact_and_vmap_agree_on_the_composed_algorithm(closed_split):
  """MetaSemi's losses and L_g's own forward of the pair: exact and the reference
  per-sample gradients give the same terms and gradient (digits CNN, no dropout)."""
  out = {}
  for method in ("exact", "vmap"):
    ctx = _context(closed_split, "metasemi_ggcr", method=method)
    fn = lambda p: ssl.get("metasemi_ggcr").losses(dataclasses.replace(ctx, params=p))
    terms = lambda p: fn(p).auxiliary["gc"]
    out[method] = jax.jit(jax.value_and_grad(terms))(ctx.params)
  assert float(out["exact"][0]) > 0
  np.testing.assert_allclose(float(out["vmap"][0]), float(out["exact"][0]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(out["vmap"][1]), jax.tree.leaves(out["exact"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mixup_with_a_ratio_other_than_one_names_the_composed_block():
  cfg = _config()
  cfg.train.uratio = 2
  with pytest.raises(config_lib.ConfigError, match="metasemi_ggcr.mixup"):
    config_lib.validate(cfg, num_devices=1)


def test_the_packaged_config_is_metasemi_with_the_term():
  cfg, base = metasemi_ggcr_config.get_config(), ssl.get("metasemi")
  config_lib.validate(cfg)
  plain = metasemi_config.get_config()
  for field in base.default_config():
    assert cfg.metasemi_ggcr[field] == plain.metasemi[field], field
  assert cfg.train == plain.train and cfg.optim == plain.optim
  assert cfg.metasemi_ggcr.consistency.warmup_steps == cfg.train.steps // 10


def test_on_a_dropout_network_vmap_replays_the_pair_forwards_masks():
  """ConvLarge drops whole channels in train mode. The exact method differentiates the
  pair forward with its masks; the vmap reference forwards each sample alone, with
  that forward's masks of the sample's rows replayed: the same cosines and norms."""
  from ggr_jax.models import build_model
  from ggr_jax.ssl import ggcr_pairs
  from ggr_jax.ssl.interface import LossContext, ViewPair
  from ggr_jax.train.state import make_apply_fn
  model = build_model("convlarge", 10, "none")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 12, 12, 3))
  variables = model.init(jax.random.PRNGKey(1), x[0], train=False)
  apply_fn = make_apply_fn(model, dropout_key=jax.random.PRNGKey(2))
  ctx = LossContext(apply_fn, variables["params"], variables["batch_stats"],
                    {"w": x[0], "s": x[1]}, None, 0, None)
  pair = ViewPair(weak="w", strong="s", forward=("w", "s"))
  full = apply_fn(variables["params"], variables["batch_stats"], jnp.concatenate(x), True)[0]
  rows = apply_fn(variables["params"], variables["batch_stats"], x[:, 0], True)[0]
  assert not np.allclose(full["logits"][::2], rows["logits"], atol=1e-3)  # other masks
  geometry = {}
  for method in ("exact", "vmap"):
    pl = ggcr_pairs.pair_losses(ctx, pair, one_sample=method == "vmap")
    geometry[method], _ = consistency.view_geometry(
        pl.losses_fn, ctx.params, method=method, scope=ggcr.encoder_scope, view_rows=pl.rows,
        sample_fn=pl.sample_fn, samples=pl.samples, has_aux=True)
  assert len(pl.samples[3]) == 2  # two dropout layers, a mask each
  for name in ("cos", "sq_w", "sq_s"):
    np.testing.assert_allclose(getattr(geometry["vmap"], name), getattr(geometry["exact"], name),
                               rtol=1e-4)
