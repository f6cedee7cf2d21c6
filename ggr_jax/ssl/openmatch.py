"""OpenMatch: one-vs-all heads, soft open-set consistency, and FixMatch on selected inliers.

Supervised: cross-entropy and the OVA loss on two weak views of each labeled image.
Auxiliary: ``lambda_em * EM + lambda_socr * SOCR`` on two weak views of the unlabeled
batch, plus, from ``start_fix_steps`` on, ``lambda_fix * CE(strong, argmax weak)`` on a
batch drawn from the inliers the EMA model selected (``p_cutoff = 0``: every selected
sample counts). The selection itself (:func:`select_inliers`) runs at epoch boundaries.

One forward serves everything (the DESIGN rule), so the selected batch shares the
BatchNorm statistics of the rest; the official code runs it through a second forward.
Before ``start_fix_steps`` the selected views are still in the forward (fixed shapes
under jit) with zero loss weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ggr_jax.ssl import common

VIEWS = {
    "labeled": {"x_lb_w0": "weak", "x_lb_w1": "weak"},
    "unlabeled": {"x_ulb_w0": "weak", "x_ulb_w1": "weak"},
    "selected": {"x_sel_w": "weak", "x_sel_s": "strong"},
}
LABELED_VIEWS = ("x_lb_w0", "x_lb_w1")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lambda_em=0.1, lambda_socr=0.5, lambda_fix=1.0, p_cutoff=0.0, start_fix_steps=10240,
      fix_uratio=2, inlier_threshold=0.5))


def supervised_parts(labeled: list[dict], batch: dict) -> tuple[jax.Array, jax.Array]:
  """``(closed CE, OVA)`` over the two weak views of each labeled image."""
  (lb0, lb1), y = labeled, batch["y_lb"]
  closed = 0.5 * (common.cross_entropy(lb0["logits"], y) + common.cross_entropy(lb1["logits"], y))
  ova = common.ova_loss(jnp.concatenate([lb0["logits_ova"], lb1["logits_ova"]]),
                        jnp.concatenate([y, y]))
  return closed, ova


def supervised_loss(labeled: list[dict], batch: dict, cfg) -> jax.Array:
  """``closed + OVA`` from the outputs of :data:`LABELED_VIEWS`."""
  del cfg
  return sum(supervised_parts(labeled, batch))


def losses(apply_fn, params, model_state, batch, rng, step, cfg):
  """``(sup, aux, new_model_state, metrics)`` of OpenMatch."""
  del rng
  parts = [batch[k] for k in ("x_lb_w0", "x_lb_w1", "x_ulb_w0", "x_ulb_w1", "x_sel_w", "x_sel_s")]
  (lb0, lb1, u0, u1, sel_w, sel_s), new_state = common.forward_concat(
      apply_fn, params, model_state, parts)
  closed, ova = supervised_parts([lb0, lb1], batch)
  em_terms = 0.5 * (common.ova_entropy_terms(u0["logits_ova"])
                    + common.ova_entropy_terms(u1["logits_ova"]))
  socr_terms = common.ova_consistency_terms(u0["logits_ova"], u1["logits_ova"])
  em, socr = jnp.sum(em_terms), jnp.sum(socr_terms)

  probs = jax.nn.softmax(jax.lax.stop_gradient(sel_w["logits"]))
  mask = (jnp.max(probs, -1) >= cfg.p_cutoff).astype(probs.dtype)
  pseudo = jax.nn.one_hot(jnp.argmax(probs, -1), probs.shape[-1], dtype=probs.dtype)
  fix_terms = common.soft_cross_entropy_terms(sel_s["logits"], pseudo, mask)
  fix = jnp.sum(fix_terms)
  fix_on = (jnp.asarray(step) >= cfg.start_fix_steps).astype(fix.dtype)
  # per-sample terms over the unlabeled batch, then the selected batch
  terms = jnp.concatenate([cfg.lambda_em * em_terms + cfg.lambda_socr * socr_terms,
                           fix_on * cfg.lambda_fix * fix_terms])
  is_id = None
  if "ulb_is_id" in batch and "sel_is_id" in batch:
    is_id = jnp.concatenate([batch["ulb_is_id"], batch["sel_is_id"]])

  sup = closed + ova
  aux = cfg.lambda_em * em + cfg.lambda_socr * socr + fix_on * cfg.lambda_fix * fix
  metrics = {"losses/sup_closed": closed, "losses/sup_ova": ova, "losses/em": em,
             "losses/socr": socr, "losses/fix": fix, "monitors/fix_on": fix_on,
             **common.accepted_ood_fraction(mask * fix_on, batch.get("sel_is_id")),
             **common.per_sample_outputs(terms, is_id)}
  return sup, aux, new_state, metrics


def inlier_score(outputs: dict) -> jax.Array:
  """Outlier probability of the predicted closed class (``p_out``), the OpenMatch score."""
  pred = jnp.argmax(outputs["logits"], axis=-1)
  p_out = common.ova_probs(outputs["logits_ova"])[:, 0, :]
  return jnp.take_along_axis(p_out, pred[:, None], axis=1)[:, 0]


def select_inliers(outputs: dict, threshold: float) -> jax.Array:
  """Boolean mask of unlabeled samples kept for the FixMatch stage (``p_out < threshold``)."""
  return inlier_score(outputs) < threshold
