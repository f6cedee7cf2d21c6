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


def losses(apply_fn: common.ApplyFn, params: Any, model_state: Any,
           batch: dict[str, jnp.ndarray], rng: jax.Array | None, step: Any, cfg: Any
           ) -> tuple[jnp.ndarray, jnp.ndarray, Any, dict[str, jnp.ndarray]]:
  """IOMatch supervised and auxiliary losses from one forward on all three views.

  Args:
    apply_fn: ``(params, model_state, x, train) -> (outputs, new_model_state)``;
      outputs hold ``logits``, ``logits_open`` and ``logits_mb`` (``(N, 2, K)``).
    params, model_state: the model's parameters and its other state.
    batch: ``x_lb`` ``(B, ...)``, ``y_lb`` ``(B,)``, ``x_ulb_w`` and ``x_ulb_s``
      ``(uB, ...)``; optional ``ulb_is_id`` ``(uB,)`` for the OOD monitor.
    rng: unused (IOMatch draws nothing at train time).
    step: the global step; the op loss counts from ``cfg.op_warmup_steps`` on.
    cfg: ``p_cutoff``, ``q_cutoff``, ``lambda_u``, ``lambda_mb``, ``lambda_op``,
      ``op_warmup_steps`` (see :func:`default_config`).

  Returns:
    ``(sup_loss, aux_loss, new_model_state, metrics)``, ``sup = CE +
    lambda_mb * mb`` and ``aux = lambda_u * ui + lambda_op * op``.
  """
  del rng
  (lb, ulb_w, ulb_s), new_model_state = common.forward_concat(
      apply_fn, params, model_state, [batch["x_lb"], batch["x_ulb_w"], batch["x_ulb_s"]])
  sup, sup_closed, sup_mb = supervised_parts([lb], batch, cfg)

  t = iomatch_targets(ulb_w["logits"], ulb_w["logits_mb"], p_cutoff=cfg.p_cutoff,
                      q_cutoff=cfg.q_cutoff)
  ui_terms = common.soft_cross_entropy_terms(ulb_s["logits"], t["p"], t["ui_weight"])
  op_on = (jnp.asarray(step) >= cfg.op_warmup_steps).astype(ui_terms.dtype)
  op_terms = op_on * common.soft_cross_entropy_terms(ulb_s["logits_open"], t["q"],
                                                      t["op_weight"])
  ui, op = jnp.sum(ui_terms), jnp.sum(op_terms)
  aux = cfg.lambda_u * ui + cfg.lambda_op * op

  metrics = {
      "losses/sup_closed": sup_closed,
      "losses/sup_mb": sup_mb,
      "losses/sup": sup,
      "losses/ui": ui,
      "losses/op": op,
      "losses/aux": aux,
      "monitors/in_mask": jnp.mean(t["in_mask"]),
      "monitors/p_mask": jnp.mean(t["p_mask"]),
      "monitors/q_mask": jnp.mean(t["q_mask"]),
      "monitors/ui_weight": jnp.mean(t["ui_weight"]),
      "monitors/op_on": op_on,
      **common.accepted_ood_fraction(t["ui_weight"], batch.get("ulb_is_id")),
      **common.per_sample_outputs(cfg.lambda_u * ui_terms + cfg.lambda_op * op_terms,
                                  batch.get("ulb_is_id")),
  }
  return sup, aux, new_model_state, metrics
