"""IOMatch losses (Li et al., ICCV 2023) split into supervised and auxiliary parts.

Supervised: closed-set cross-entropy plus the multi-binary loss on the labeled
batch. Auxiliary: unlabeled inlier (``ui``) consistency of the closed head and
open-set (``op``) consistency of the (K+1)-way head on the strong view, with
targets, masks and weights from the weak view (no gradient). Both unlabeled
losses are normalised by the unlabeled batch size, as the official
``norm_mode="mean"``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ggr_jax.ssl import common
from ggr_jax.ssl.interface import Algorithm, LossContext, Losses, ViewPair

VIEWS = {"labeled": {"x_lb": "weak"}, "unlabeled": {"x_ulb_w": "weak", "x_ulb_s": "strong"}}
LABELED_VIEWS = ("x_lb",)


def default_config() -> ml_collections.ConfigDict:
  """IOMatch hyperparameters of the official CIFAR configs."""
  cfg = ml_collections.ConfigDict()
  cfg.p_cutoff = 0.95
  cfg.q_cutoff = 0.5
  cfg.lambda_u = 1.0
  cfg.lambda_mb = 1.0
  cfg.lambda_op = 1.0
  cfg.op_warmup_steps = 1024  # the op loss is off during the official epoch 0
  return cfg


def iomatch_targets(logits_w: jnp.ndarray, logits_mb_w: jnp.ndarray, *, p_cutoff: Any,
                    q_cutoff: Any) -> dict[str, jnp.ndarray]:
  """Targets and masks from the weak view's closed ``(N, K)`` and multi-binary ``(N, 2, K)`` logits.

  Returns ``p`` (closed softmax), ``r`` (softmax over the outlier/inlier axis),
  ``out_scores`` (``s = sum_k p_k r_out,k``), ``q`` (``(N, K+1)``: ``p_k r_in,k``
  then ``s``), ``in_mask`` (``s < 0.5``), ``p_mask`` (``max p >= p_cutoff``),
  ``q_mask`` (``max q >= q_cutoff``), ``ui_weight = in_mask * p_mask`` and
  ``op_weight = q_mask``; masks are 0/1 floats. No gradient flows through any.
  """
  logits_w = jax.lax.stop_gradient(logits_w)
  logits_mb_w = jax.lax.stop_gradient(logits_mb_w)
  p = jax.nn.softmax(logits_w, axis=-1)
  r = common.ova_probs(logits_mb_w)
  out_scores = jnp.sum(p * r[:, 0, :], axis=-1)
  q = jnp.concatenate([p * r[:, 1, :], out_scores[:, None]], axis=-1)
  dtype = p.dtype
  in_mask = (out_scores < 0.5).astype(dtype)
  p_mask = (jnp.max(p, axis=-1) >= p_cutoff).astype(dtype)
  q_mask = (jnp.max(q, axis=-1) >= q_cutoff).astype(dtype)
  return {"p": p, "r": r, "out_scores": out_scores, "q": q, "in_mask": in_mask,
          "p_mask": p_mask, "q_mask": q_mask, "ui_weight": in_mask * p_mask,
          "op_weight": q_mask}


def supervised_parts(labeled: list[dict], batch: dict, cfg: Any
                     ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """``(sup, CE, mb)`` with ``sup = CE + lambda_mb * mb`` on the labeled outputs."""
  closed = common.cross_entropy(labeled[0]["logits"], batch["y_lb"])
  mb = common.ova_loss(labeled[0]["logits_mb"], batch["y_lb"])
  return closed + cfg.lambda_mb * mb, closed, mb


def supervised_loss(labeled: list[dict], batch: dict, cfg: Any) -> jnp.ndarray:
  """The supervised loss from the outputs of :data:`LABELED_VIEWS`."""
  return supervised_parts(labeled, batch, cfg)[0]


def losses(ctx: LossContext) -> Losses:
  """IOMatch supervised and auxiliary losses from one forward on all three views.

  ``ctx.batch`` holds ``x_lb`` ``(B, ...)``, ``y_lb`` ``(B,)``, ``x_ulb_w`` and ``x_ulb_s``
  ``(uB, ...)`` and optionally ``ulb_is_id`` ``(uB,)`` for the OOD monitor; the model's
  outputs hold ``logits``, ``logits_open`` and ``logits_mb`` (``(N, 2, K)``). The op
  loss counts from ``cfg.op_warmup_steps`` on. Terms: supervised ``sup_closed`` (CE) and
  ``sup_mb`` (``lambda_mb * mb``); auxiliary ``ui`` (``lambda_u * ui``) and ``op``
  (``lambda_op * op``).
  """
  cfg, batch = ctx.cfg, ctx.batch
  (lb, ulb_w, ulb_s), new_model_state = common.forward_concat(
      ctx.apply_fn, ctx.params, ctx.model_state, [batch["x_lb"], batch["x_ulb_w"], batch["x_ulb_s"]],
      labeled=(True, False, False))
  _, sup_closed, sup_mb = supervised_parts([lb], batch, cfg)

  t = iomatch_targets(ulb_w["logits"], ulb_w["logits_mb"], p_cutoff=cfg.p_cutoff,
                      q_cutoff=cfg.q_cutoff)
  ui_terms = common.soft_cross_entropy_terms(ulb_s["logits"], t["p"], t["ui_weight"])
  op_on = (jnp.asarray(ctx.step) >= cfg.op_warmup_steps).astype(ui_terms.dtype)
  op_terms = op_on * common.soft_cross_entropy_terms(ulb_s["logits_open"], t["q"],
                                                      t["op_weight"])
  metrics = {
      "monitors/in_mask": jnp.mean(t["in_mask"]),
      "monitors/p_mask": jnp.mean(t["p_mask"]),
      "monitors/q_mask": jnp.mean(t["q_mask"]),
      "monitors/ui_weight": jnp.mean(t["ui_weight"]),
      "monitors/op_on": op_on,
      **common.accepted_ood_fraction(t["ui_weight"], batch.get("ulb_is_id")),
  }
  return Losses(
      supervised={"sup_closed": sup_closed, "sup_mb": cfg.lambda_mb * sup_mb},
      auxiliary={"ui": cfg.lambda_u * jnp.sum(ui_terms), "op": cfg.lambda_op * jnp.sum(op_terms)},
      model_state=new_model_state, metrics=metrics,
      sample_aux=cfg.lambda_u * ui_terms + cfg.lambda_op * op_terms,
      sample_is_id=batch.get("ulb_is_id"))


def validate(cfg: ml_collections.ConfigDict, fail) -> None:
  for field in ("p_cutoff", "q_cutoff"):
    if not 0.0 <= cfg[field] <= 1.0:
      fail(field, cfg[field], "must be a number in [0, 1]")


ALGORITHM = Algorithm(
    name="iomatch", default_config=default_config, losses=losses, views=VIEWS,
    labeled_views=LABELED_VIEWS, supervised_loss=supervised_loss, head="iomatch",
    ood_score="iomatch", validate=validate,
    view_pair=ViewPair("x_ulb_w", "x_ulb_s", forward=("x_lb", "x_ulb_w", "x_ulb_s")))
