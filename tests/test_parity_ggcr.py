"""GGCR against the independent float64 PyTorch golden values (``ggcr_public.npz``).

The reference (``shared/parity/ggcr_public.npz``, or the file named by ``GGR_GGCR_REF``)
holds a tiny BN-free network (conv-ReLU-conv-ReLU-mean pool, linear head), one batch,
and the GGCR quantities of both mask variants and two lambdas: per-sample gradients,
cosines, the loss terms and the total gradients with the second-order term. This test
runs ggr_jax's ``ggcr`` losses (``ssl.get("ggcr")``) and :func:`view_geometry` with each
exact method, and checks them with the shared checker ``compare_meta.check``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ggr_jax import consistency, per_sample, ssl
from ggr_jax.models.heads import OpenSetNet
from ggr_jax.ssl import LossContext, ggcr
from tests.conftest import parity_checker, parity_reference

EXACT_METHODS = ("exact", "vmap")


def _reference() -> dict:
  path = parity_reference("GGR_GGCR_REF", "ggcr_public.npz")
  checker = parity_checker("compare_meta")
  return checker, checker.load(str(path))


class _Encoder(nn.Module):
  """The reference network: conv3x3-ReLU-conv3x3-ReLU-global mean, linear ``fc``."""

  c1: int
  c2: int
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    for name, width in (("conv1", self.c1), ("conv2", self.c2)):
      x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), name=name)(x))
    feat = jnp.mean(x, axis=(1, 2))
    return {"feat": feat, "logits": nn.Dense(self.num_classes, name="fc")(feat)}


TORCH_NAMES = {"conv1": "conv1", "conv2": "conv2", "fc": "head"}


def _params(ref: dict) -> dict:
  """The reference weights in the Flax layout, under ``backbone`` (fc = the head)."""
  layers = {}
  for flax_name, torch_name in TORCH_NAMES.items():
    w = ref[f"param/{torch_name}.weight"]
    kernel = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    layers[flax_name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(ref[
        f"param/{torch_name}.bias"])}
  return {"backbone": layers}


def _torch_named(tree: dict, prefix: str) -> dict:
  """``{prefix/conv1.weight: ...}`` in the Flax layout (``from_jax_layout`` converts)."""
  out = {}
  for flax_name, torch_name in TORCH_NAMES.items():
    leaf = tree["backbone"][flax_name]
    out[f"{prefix}/{torch_name}.weight"] = np.asarray(leaf["kernel"])
    out[f"{prefix}/{torch_name}.bias"] = np.asarray(leaf["bias"])
  return out


def _context(ref, params, variant, weight):
  model = OpenSetNet(backbone=_Encoder(int(ref["cfg/c1"]), int(ref["cfg/c2"]), int(ref["cfg/K"])),
                     num_classes=int(ref["cfg/K"]))
  apply_fn = lambda p, state, x, train: (model.apply({"params": p}, x, train), state)
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  batch = {"x_lb": nhwc(ref["x_l"]), "y_lb": jnp.asarray(ref["y_l"]),
           "x_ulb_w": nhwc(ref["u_w"]), "x_ulb_s": nhwc(ref["u_s"])}
  cfg = ssl.get("ggcr").default_config()
  tau = float(ref["cfg/tau"])
  cfg.update(p_cutoff=tau, unsup_warmup_steps=0)  # mu = 1 at step 0
  cfg.consistency.update(weight=weight, warmup_steps=0, tau=tau,
                         mask="all" if variant == "all" else "confident")
  return LossContext(apply_fn, params, {}, batch, None, 0, cfg)


@pytest.fixture(scope="module")
def golden():
  jax.config.update("jax_enable_x64", True)
  try:
    checker, ref = _reference()
    yield checker, ref
  finally:
    jax.config.update("jax_enable_x64", False)


def _total_fn(ref, variant, weight, method, part="total"):
  def fn(p):
    ctx = _context(ref, p, variant, weight)
    ctx.cfg.consistency.method = method
    out = ssl.get("ggcr").losses(ctx)
    terms = {"total": out.sup + out.aux, "Ls": out.supervised["ce"],
             "Lu": out.auxiliary["unsup"], "Lg": out.auxiliary["gc"]}
    return terms[part]
  return fn


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_ggcr_reproduces_the_golden_values(golden, method):
  checker, ref = golden
  params = _params(ref)
  ctx = _context(ref, params, "mask", 1.0)
  cand = {}
  pair = ggcr.pair_losses(ctx, ssl.get("ggcr").view_pair, one_sample=True)
  losses_fn = lambda p: pair.losses_fn(p)[0]
  rows, probs = pair.rows, pair.losses_fn(params)[1]
  cand["fwd/q_w"], cand["fwd/maxprob"] = probs, jnp.max(probs, -1)
  cand["yhat"] = np.asarray(jnp.argmax(probs, -1)).astype(np.int64)
  cand["mask"] = np.asarray(jnp.max(probs, -1) > float(ref["cfg/tau"])).astype(np.uint8)
  cand["ps/loss_w"], cand["ps/loss_s"] = losses_fn(params)
  geometry = consistency.view_geometry(losses_fn, params, method=method,
                                       scope=ggcr.encoder_scope, view_rows=rows,
                                       sample_fn=pair.sample_fn, samples=pair.samples)
  cand["ps/dot"], cand["ps/cos"] = geometry.dot, geometry.cos
  cand["ps/norm_w"], cand["ps/norm_s"] = jnp.sqrt(geometry.sq_w), jnp.sqrt(geometry.sq_s)
  rows_tree = per_sample.jacobian_rows(lambda p: jnp.concatenate(losses_fn(p)), params)
  size = cand["ps/loss_w"].shape[0]
  for view, part in (("gw", slice(0, size)), ("gs", slice(size, 2 * size))):
    for name in ("conv1", "conv2"):
      leaf = rows_tree["backbone"][name]
      cand[f"ps/{view}/{name}.weight"] = np.asarray(leaf["kernel"][part])
      cand[f"ps/{view}/{name}.bias"] = np.asarray(leaf["bias"][part])
  def value_and_grad(variant, weight, part, loss_key, grad_key):
    fn = jax.jit(jax.value_and_grad(_total_fn(ref, variant, weight, method, part)))
    cand[loss_key], grad = fn(params)
    cand.update(_torch_named(grad, grad_key))

  for variant in ("all", "mask"):
    value_and_grad(variant, 1.0, "Lg", f"loss/Lg_{variant}", f"grad/Lg_{variant}")
    for lam in np.asarray(ref["cfg/lambdas"]):
      key = f"{variant}/lam{float(lam)}"
      value_and_grad(variant, float(lam), "total", f"loss/total/{key}", f"grad/total/{key}")
  for part in ("Ls", "Lu"):
    value_and_grad("mask", 1.0, part, f"loss/{part}", f"grad/{part}")
  cand = checker.from_jax_layout({k: np.asarray(v) for k, v in cand.items()})
  required = ["fwd/q_w", "fwd/maxprob", "yhat", "mask", "ps/*", "loss/*", "grad/Ls/*",
              "grad/Lu/*", "grad/Lg_*", "grad/total/*"]
  ok, rows_report = checker.check(ref, cand, keys=required, required=required)
  assert ok, checker.format_rows(rows_report, only_fail=True)


def test_the_second_order_term_is_in_the_gradient(golden):
  # Without it (per-sample gradients detached) the gradient is that of L_s + mu L_u
  # alone; the golden ``first_order`` gradient must be far from the total one.
  checker, ref = golden
  params = _params(ref)
  total = jax.jit(jax.grad(_total_fn(ref, "all", 1.0, "exact")))(params)
  cand = checker.from_jax_layout(_torch_named(total, "grad/first_order"))
  ok, _ = checker.check(ref, cand, keys=["grad/first_order/*"])
  assert not ok
  cand = checker.from_jax_layout(_torch_named(total, "grad/total/all/lam1.0"))
  ok, report = checker.check(ref, cand, keys=["grad/total/all/lam1.0/*"])
  assert ok, checker.format_rows(report, only_fail=True)
