"""OpenMatch: one-vs-all heads, soft open-set consistency, and FixMatch on selected inliers.

Supervised: cross-entropy and the OVA loss on two weak views of each labeled image.
Auxiliary: ``lambda_em * EM + lambda_socr * SOCR`` on two weak views of the unlabeled
batch, plus, from ``start_fix_steps`` on, ``lambda_fix * CE(strong, argmax weak)`` on a
batch drawn from the inliers the EMA model selected (``p_cutoff = 0``: every selected
sample counts). The selection itself (:func:`select_inliers`) runs at epoch boundaries.

The forwards follow the official code (``selected_forward="separate"``, the default):
one forward of the labeled and unlabeled views, then, from ``start_fix_steps`` on only,
a second forward of the selected batch, which normalises with its own BatchNorm
statistics and updates the running averages a second time (a ``lax.cond`` on the step:
before the FixMatch stage the selected views cost nothing and touch no statistics).
``"joint"`` runs all six views through one forward (one launch, shared statistics; the
selected views enter it before ``start_fix_steps`` too, at zero loss weight).

The algorithm state is the selection mask ``{"selected": bool (num_unlabeled,)}`` (all
True until the first selection); the ``selected`` source draws its rows from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ggr_jax.ssl import common
from ggr_jax.ssl.interface import Algorithm, EpochContext, LossContext, Losses, ViewPair

VIEWS = {
    "labeled": {"x_lb_w0": "weak", "x_lb_w1": "weak"},
    "unlabeled": {"x_ulb_w0": "weak", "x_ulb_w1": "weak"},
    "selected": {"x_sel_w": "weak", "x_sel_s": "strong"},
}
LABELED_VIEWS = ("x_lb_w0", "x_lb_w1")
SELECTED_VIEWS = ("x_sel_w", "x_sel_s")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lambda_em=0.1, lambda_socr=0.5, lambda_fix=1.0, p_cutoff=0.0, start_fix_steps=10240,
      fix_uratio=2, inlier_threshold=0.5, selected_forward="separate"))


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


def losses(ctx: LossContext) -> Losses:
  """Terms: supervised ``sup_closed``, ``sup_ova``; auxiliary ``em``, ``socr``, ``fix``
  (each weighted; ``fix`` is 0 before ``start_fix_steps``)."""
  cfg, batch = ctx.cfg, ctx.batch
  fix_on = (jnp.asarray(ctx.step) >= cfg.start_fix_steps).astype(jnp.float32)
  (lb0, lb1, u0, u1, sel_w, sel_s), new_state = _forwards(ctx, fix_on > 0)
  closed, ova = supervised_parts([lb0, lb1], batch)
  em_terms = 0.5 * (common.ova_entropy_terms(u0["logits_ova"])
                    + common.ova_entropy_terms(u1["logits_ova"]))
  socr_terms = common.ova_consistency_terms(u0["logits_ova"], u1["logits_ova"])

  probs = jax.nn.softmax(jax.lax.stop_gradient(sel_w["logits"]))
  mask = (jnp.max(probs, -1) >= cfg.p_cutoff).astype(probs.dtype)
  pseudo = jax.nn.one_hot(jnp.argmax(probs, -1), probs.shape[-1], dtype=probs.dtype)
  fix_terms = common.soft_cross_entropy_terms(sel_s["logits"], pseudo, mask)
  fix_on = fix_on.astype(fix_terms.dtype)
  # per-sample terms over the unlabeled batch, then the selected batch
  terms = jnp.concatenate([cfg.lambda_em * em_terms + cfg.lambda_socr * socr_terms,
                           fix_on * cfg.lambda_fix * fix_terms])
  is_id = None
  if "ulb_is_id" in batch and "sel_is_id" in batch:
    is_id = jnp.concatenate([batch["ulb_is_id"], batch["sel_is_id"]])
  return Losses(
      supervised={"sup_closed": closed, "sup_ova": ova},
      auxiliary={"em": cfg.lambda_em * jnp.sum(em_terms),
                 "socr": cfg.lambda_socr * jnp.sum(socr_terms),
                 "fix": fix_on * cfg.lambda_fix * jnp.sum(fix_terms)},
      model_state=new_state,
      metrics={"monitors/fix_on": fix_on,
               **common.accepted_ood_fraction(mask * fix_on, batch.get("sel_is_id"))},
      sample_aux=terms, sample_is_id=is_id)


def _forwards(ctx: LossContext, fix_on: jax.Array) -> tuple[list[dict], object]:
  """Outputs of the six views and the new BatchNorm state (see the module docstring)."""
  batch = ctx.batch
  main = [batch[k] for k in ("x_lb_w0", "x_lb_w1", "x_ulb_w0", "x_ulb_w1")]
  selected = [batch[k] for k in SELECTED_VIEWS]
  if ctx.cfg.selected_forward == "joint":
    return common.forward_concat(ctx.apply_fn, ctx.params, ctx.model_state, main + selected,
                                 labeled=(True, True, False, False) + (False,) * len(selected))
  outputs, state = common.forward_concat(ctx.apply_fn, ctx.params, ctx.model_state, main,
                                         labeled=(True, True, False, False))

  def second(state):
    return common.forward_concat(ctx.apply_fn, ctx.params, state, selected)

  def skipped(state):
    shapes = jax.eval_shape(second, state)[0]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state

  sel_outputs, state = jax.lax.cond(fix_on, second, skipped, state)
  return outputs + sel_outputs, state


def inlier_score(outputs: dict) -> jax.Array:
  """Outlier probability of the predicted closed class (``p_out``), the OpenMatch score."""
  pred = jnp.argmax(outputs["logits"], axis=-1)
  p_out = common.ova_probs(outputs["logits_ova"])[:, 0, :]
  return jnp.take_along_axis(p_out, pred[:, None], axis=1)[:, 0]


def select_inliers(outputs: dict, threshold: float) -> jax.Array:
  """Boolean mask of unlabeled samples kept for the FixMatch stage (``p_out < threshold``)."""
  return inlier_score(outputs) < threshold


def batch_sizes(train: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Labeled ``B``, unlabeled ``B * uratio``, selected inliers ``B * fix_uratio``."""
  b = train.batch_size
  return {"labeled": b, "unlabeled": b * train.uratio, "selected": b * cfg.fix_uratio}


def init_state(num_unlabeled: int, cfg: ml_collections.ConfigDict) -> dict:
  del cfg
  return {"selected": jnp.ones((num_unlabeled,), bool)}


def reselect(ctx: EpochContext) -> dict | None:
  """From ``start_fix_steps`` on, the EMA model re-selects the inliers at every epoch
  boundary (each image's weak view, eval mode)."""
  if ctx.step < ctx.cfg.start_fix_steps:
    return None
  state = ctx.train_state
  selected = ctx.predict_unlabeled(state.ema_params, state.batch_stats, ctx.key,
                                   select_inliers, ctx.cfg.inlier_threshold)
  return {"selected": selected}


def validate(cfg: ml_collections.ConfigDict, fail) -> None:
  for field in ("p_cutoff", "inlier_threshold"):
    if not 0.0 <= cfg[field] <= 1.0:
      fail(field, cfg[field], "must be a number in [0, 1]")
  if not isinstance(cfg.fix_uratio, int) or cfg.fix_uratio < 1:
    fail("fix_uratio", cfg.fix_uratio, "must be a positive integer")
  if cfg.selected_forward not in ("separate", "joint"):
    fail("selected_forward", cfg.selected_forward, "choose 'separate' (official: a second "
         "forward from start_fix_steps on) or 'joint' (one forward of all views)")


ALGORITHM = Algorithm(
    name="openmatch", default_config=default_config, losses=losses, views=VIEWS,
    labeled_views=LABELED_VIEWS, supervised_loss=supervised_loss, head="openmatch",
    batch_sizes=batch_sizes, init_state=init_state, source_mask=lambda s: s["selected"],
    epoch_hook=reselect, ood_score="ova", validate=validate,
    view_pair=ViewPair("x_sel_w", "x_sel_s", forward=SELECTED_VIEWS, source="selected"))
