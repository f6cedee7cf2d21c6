"""Parity with one training step of the official GGR-IOMatch code (float64).

The reference (``shared/parity/official_step_public.npz``, or the file named by
``GGR_OFFICIAL_STEP``) holds the official WRN-28-2 + IOMatch weights, one batch,
and everything the official step computed from them. This test converts the
weights, runs ggr_jax's IOMatch losses, one ``jax.vjp`` for both gradients,
``rectify("vlr")`` and coupled-L2 Nesterov SGD in float64, and checks every
stored family with the reference's own ``compare_ref.check(tier="f64")``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
import pytest

import ggr_jax
from ggr_jax.models import convert
from ggr_jax.ssl import LossContext, iomatch
from tests.conftest import float64_convolutions_by_matmul, parity_checker, parity_reference

VARIANTS = {"v95_": (0.95, 0.5), "v0_": (0.0, 0.0)}
LR, MOMENTUM, WEIGHT_DECAY = 0.03, 0.9, 5e-4
BN_MOMENTUM = 0.001
STEP = 1024  # official epoch 1: the op loss is on
CHECKED_FAMILIES = ("fwd", "bn_batch", "target", "mask", "loss", "loss64", "grad_sup",
                    "grad_aux", "grad_final", "rect", "new_param", "new_buffer")


@pytest.fixture(scope="module")
def reference():
  path = parity_reference("GGR_OFFICIAL_STEP", "official_step_public.npz")
  compare_ref = parity_checker("compare_ref")
  return compare_ref, compare_ref.load_ref(str(path))


def _variant_cfg(p_cutoff: float, q_cutoff: float):
  cfg = iomatch.default_config()
  cfg.p_cutoff, cfg.q_cutoff = p_cutoff, q_cutoff
  return cfg


def _optimizer():
  rect = ggr_jax.rectify("vlr", scope=ggr_jax.scope_from_prefix("backbone"))
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.chain(rect, optax.add_decayed_weights(WEIGHT_DECAY, mask=decay_mask),
                   optax.sgd(LR, momentum=MOMENTUM, nesterov=True))
  return rect, tx


def _make_step(model, base_cfg):
  """The jitted step: forward, both gradients, rectifier, optimizer, diagnostics; the
  cutoffs are arguments, so that both variants share one (slow, float64) compile."""
  rect, tx = _optimizer()
  scope = ggr_jax.scope_from_prefix("backbone")

  def apply_fn(params, state, x, train):
    out, mutated = model.apply({"params": params, **state}, x, train=train,
                               mutable=["batch_stats"] if train else False)
    return out, (mutated if train else state)

  def step(params, batch_stats, batch, cutoffs):
    state = {"batch_stats": batch_stats}
    cfg = ml_collections.ConfigDict(base_cfg.to_dict(), type_safe=False)
    cfg.p_cutoff, cfg.q_cutoff = cutoffs

    def loss_fn(p):
      out = iomatch.losses(LossContext(apply_fn, p, state, batch, None, STEP, cfg))
      # the named terms carry their weights, which are 1 in the official config
      metrics = {**out.metrics, **{f"losses/{k}": v for k, v in
                                   {**out.supervised, **out.auxiliary}.items()}}
      return (out.sup, out.aux), (out.model_state, metrics)

    (sup, aux), vjp_fn, (new_state, metrics) = jax.vjp(loss_fn, params, has_aux=True)
    (g_sup,) = vjp_fn((jnp.ones_like(sup), jnp.zeros_like(aux)))
    (g_aux,) = vjp_fn((jnp.zeros_like(sup), jnp.ones_like(aux)))

    opt_state = tx.init(params)
    updates, opt_state = tx.update(g_sup, opt_state, params, aux_grads=g_aux)
    new_params = optax.apply_updates(params, updates)
    g_final, rect_state = rect.update(g_sup, rect.init(params), params, aux_grads=g_aux)

    # The same train forward the losses saw, for fwd/* and the targets.
    x = jnp.concatenate([batch["x_lb"], batch["x_ulb_w"], batch["x_ulb_s"]])
    out, _ = apply_fn(params, state, x, True)
    n_lb, n_ulb = batch["x_lb"].shape[0], batch["x_ulb_w"].shape[0]
    w = slice(n_lb, n_lb + n_ulb)
    targets = iomatch.iomatch_targets(out["logits"][w], out["logits_mb"][w],
                                      p_cutoff=cfg.p_cutoff, q_cutoff=cfg.q_cutoff)

    sel = jax.tree.leaves(scope(params))
    pick = lambda tree: [leaf for leaf, m in zip(jax.tree.leaves(tree), sel) if m]
    s_leaves, a_leaves, f_leaves = pick(g_sup), pick(g_aux), pick(g_final)
    vdot = lambda xs, ys: sum(jnp.vdot(x, y) for x, y in zip(xs, ys))
    aux_after = [f - s for f, s in zip(f_leaves, s_leaves)]
    removed = [a - b for a, b in zip(a_leaves, aux_after)]
    sup_sq = vdot(s_leaves, s_leaves)
    rect_info = {
        "dot_aux_sup": vdot(a_leaves, s_leaves),
        "sup_sq_norm": sup_sq,
        "aux_sq_norm": vdot(a_leaves, a_leaves),
        "coef": vdot(removed, s_leaves) / jnp.maximum(sup_sq, 1e-12),
        "dot_after": vdot(aux_after, s_leaves),
        "projected": rect_state.conflict,
        "n_selected": sum(leaf.size for leaf in pick(params)),
    }
    return dict(sup=sup, aux=aux, metrics=metrics, new_batch_stats=new_state["batch_stats"],
                g_sup=g_sup, g_aux=g_aux, g_final=g_final, new_params=new_params,
                steps=opt_state[0].count, out=out, targets=targets, rect=rect_info)

  return jax.jit(step)


def _bn_batch(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Batch statistics implied by the running-stat update, per official BN module."""
  cand = {}
  for name, value in new.items():
    module, _, leaf = name.rpartition(".")
    key = {"running_mean": "mean", "running_var": "var_unbiased"}[leaf]
    cand[f"bn_batch/{module}.{key}"] = (value - (1 - BN_MOMENTUM) * old[name]) / BN_MOMENTUM
  return cand


def _candidate(res: dict, variant: str, cfg, old_buffers: dict) -> dict[str, np.ndarray]:
  v = variant
  res = jax.tree.map(np.asarray, res)
  cand = {}
  out = res["out"]
  n = out["logits"].shape[0]
  cand.update({
      "fwd/logits": out["logits"], "fwd/logits_open": out["logits_open"],
      "fwd/logits_mb": out["logits_mb"].reshape(n, -1), "fwd/feat": out["feat"],
      "fwd/feat_proj": out["feat_proj"]})
  new_buffers = convert.flax_to_official(res["new_batch_stats"], "batch_stats")
  cand.update(_bn_batch(old_buffers, new_buffers))

  t = res["targets"]
  for k in ("p", "r", "out_scores", "q"):
    cand[f"{v}target/{k}"] = t[k]
  for k in ("in_mask", "p_mask", "q_mask", "ui_weight", "op_weight"):
    cand[f"{v}mask/{k}"] = t[k]

  m = res["metrics"]
  # the terms carry their weights: unweight them for the official raw losses
  ui, op = m["losses/ui"] / cfg.lambda_u, m["losses/op"] / cfg.lambda_op
  losses = {
      "sup_closed_loss": m["losses/sup_closed"], "sup_mb_loss": m["losses/sup_mb"] / cfg.lambda_mb,
      "sup_loss": res["sup"], "ui_loss": ui, "op_loss": op,
      "unsup_loss": m["losses/ui"], "op_loss_w": m["losses/op"],
      # ggr_jax's IOMatch has no graph or rotation loss (both off in the official run).
      "graph_loss": np.float64(0.0), "rot_loss": np.float64(0.0),
      "aux_loss": res["aux"], "total_loss": res["sup"] + res["aux"]}
  for k, val in losses.items():
    cand[f"{v}loss/{k}"] = cand[f"{v}loss64/{k}"] = np.asarray(val)
  cand[f"{v}loss/lambda_u_t"] = np.asarray(cfg.lambda_u)

  for fam, key in (("grad_sup", "g_sup"), ("grad_aux", "g_aux"), ("grad_final", "g_final")):
    for name, g in convert.flax_to_official(res[key]).items():
      cand[f"{v}{fam}/{name}"] = g
  for name, p in convert.flax_to_official(res["new_params"]).items():
    cand[f"{v}new_param/{name}"] = p
  for name, b in new_buffers.items():
    cand[f"{v}new_buffer/{name}"] = b
    module = name.rpartition(".")[0]
    cand[f"{v}new_buffer/{module}.num_batches_tracked"] = np.asarray(res["steps"], np.int64)

  rect = res["rect"]
  for k in ("dot_aux_sup", "sup_sq_norm", "aux_sq_norm", "coef", "dot_after"):
    cand[f"{v}rect/{k}"] = rect[k]
  cand[f"{v}rect/projected"] = np.asarray(rect["projected"], np.int64)
  cand[f"{v}rect/n_selected"] = np.asarray(rect["n_selected"], np.int64)
  return cand


@pytest.fixture(scope="module")
def candidates(reference):
  _, ref = reference
  arrays = {k: ref[k] for k in ref if k.startswith((convert.PARAM_PREFIX, convert.BUFFER_PREFIX))}
  old_buffers = {k[len(convert.BUFFER_PREFIX):]: ref[k].astype(np.float64)
                 for k in arrays if k.startswith(convert.BUFFER_PREFIX)}
  out = {}
  with jax.enable_x64(True), float64_convolutions_by_matmul():
    variables = convert.official_to_flax(arrays, dtype=np.float64)
    model = convert.default_model(int(ref["param/backbone.fc.weight"].shape[0]))
    nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1), jnp.float64)
    batch = {"x_lb": nhwc(ref["x_lb"]), "y_lb": jnp.asarray(ref["y_lb"]),
             "x_ulb_w": nhwc(ref["x_ulb_w"]), "x_ulb_s": nhwc(ref["x_ulb_s"])}
    step = _make_step(model, iomatch.default_config())
    for variant, cutoffs in VARIANTS.items():
      res = step(variables["params"], variables["batch_stats"], batch,
                 jnp.asarray(cutoffs, jnp.float64))
      out[variant] = _candidate(res, variant, _variant_cfg(*cutoffs), old_buffers)
  return out


def test_name_map_matches_official_scope_and_decay_rule(reference):
  _, ref = reference
  with jax.enable_x64(True):
    arrays = {k: ref[k] for k in ref if k.startswith(("param/", "buffer/"))}
    params = convert.official_to_flax(arrays, dtype=np.float64)["params"]
  scope = convert.flax_to_official(ggr_jax.scope_from_prefix("backbone")(params))
  assert sorted(n for n, m in scope.items() if m) == sorted(map(str, ref["meta_surgery_selected"]))
  no_decay = [n for n, p in convert.flax_to_official(params).items() if p.ndim <= 1]
  assert sorted(no_decay) == sorted(map(str, ref["meta_no_decay_names"]))
  assert sorted(convert.flax_to_official(params)) == sorted(map(str, ref["meta_param_names"]))


def _summary(compare_ref, ref, cand) -> list[str]:
  """Per key family, the worst max|a - r| / max|r| over its keys.

  The BN-invariant conv biases (true gradient 0) are reported as max|a| over the
  family's max|r|, and ``rect/dot_after`` (about 0 when projected) is left out.
  """
  zero = set(compare_ref.zero_grad_params([str(n) for n in ref["meta_param_names"]]))
  worst: dict[str, tuple[float, str]] = {}
  fam_max: dict[str, float] = {}
  for k, a in cand.items():
    fam, _, name = k.partition("/")
    r = ref[k].astype(np.float64)
    fam_max[fam] = max(fam_max.get(fam, 0.0), float(np.max(np.abs(r), initial=0.0)))
  for k, a in cand.items():
    fam, _, name = k.partition("/")
    if name == "dot_after":
      continue
    a, r = np.asarray(a, np.float64), ref[k].astype(np.float64)
    if name in zero and fam.endswith(compare_ref.GRAD_FAMS):
      fam, rel = fam + " (zero-grad biases)", float(np.max(np.abs(a))) / fam_max[k.partition("/")[0]]
    else:
      scale = float(np.max(np.abs(r), initial=0.0))
      err = float(np.max(np.abs(a - r), initial=0.0))
      rel = err / scale if scale > 0 else err
    if rel >= worst.get(fam, (-1.0, ""))[0]:
      worst[fam] = (rel, k)
  return [f"{fam:>34}: worst {e:.2e} ({k})" for fam, (e, k) in sorted(worst.items())]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_step_parity_f64(reference, candidates, variant):
  compare_ref, ref = reference
  cand = dict(candidates[variant])
  expected = {k for k in ref if k.partition("/")[0] in {variant + f for f in CHECKED_FAMILIES}
              or k.partition("/")[0] in ("fwd", "bn_batch")}
  missing = sorted(expected - set(cand))
  assert not missing, f"candidate lacks reference keys: {missing[:10]} ..."
  ok, rows = compare_ref.check(ref, cand, tier="f64")
  print("\n".join(rows + _summary(compare_ref, ref, cand)))
  assert ok, "\n".join(r for r in rows if not r.startswith("info"))
