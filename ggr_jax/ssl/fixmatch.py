"""FixMatch: confidence-thresholded pseudo-labels from the weak view on the strong view.

``sup = CE(x_lb)``, ``aux = lambda_u * mean_b[mask_b * CE(strong_b, target_b)]`` with
``mask_b = [max p_w >= p_cutoff]``. The official open-set configs use soft targets
(``hard_label=False``: the weak-view probabilities, unsharpened); ``hard_label=True``
uses the argmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ggr_jax.ssl import common
from ggr_jax.ssl.interface import Algorithm, LossContext, Losses, ViewPair

VIEWS = {"labeled": {"x_lb": "weak"}, "unlabeled": {"x_ulb_w": "weak", "x_ulb_s": "strong"}}
LABELED_VIEWS = ("x_lb",)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      p_cutoff=0.95, lambda_u=1.0, hard_label=False, unsup_warmup_steps=0))


def supervised_loss(labeled: list[dict], batch: dict, cfg) -> jnp.ndarray:
  """``CE(x_lb)`` from the outputs of :data:`LABELED_VIEWS`."""
  del cfg
  return common.cross_entropy(labeled[0]["logits"], batch["y_lb"])


def losses(ctx: LossContext) -> Losses:
  """One forward on labeled, weak and strong views; ``sup = CE``, ``aux = lambda_u * unsup``."""
  cfg, batch = ctx.cfg, ctx.batch
  (lb, ulb_w, ulb_s), new_state = common.forward_concat(
      ctx.apply_fn, ctx.params, ctx.model_state, [batch["x_lb"], batch["x_ulb_w"], batch["x_ulb_s"]],
      labeled=(True, False, False),
      known=(None, batch.get("ulb_is_id"), batch.get("ulb_is_id")))
  sup = supervised_loss([lb], batch, cfg)
  probs = jax.nn.softmax(jax.lax.stop_gradient(ulb_w["logits"]))
  mask = (jnp.max(probs, axis=-1) >= cfg.p_cutoff).astype(probs.dtype)
  targets = jax.nn.one_hot(jnp.argmax(probs, -1), probs.shape[-1], dtype=probs.dtype) \
      if cfg.hard_label else probs
  terms = common.soft_cross_entropy_terms(ulb_s["logits"], targets, mask)
  lambda_u = cfg.lambda_u * common.ramp(ctx.step, 0, cfg.unsup_warmup_steps)
  return Losses(
      supervised={"ce": sup}, auxiliary={"unsup": lambda_u * jnp.sum(terms)},
      model_state=new_state, metrics=common.accepted_ood_fraction(mask, batch.get("ulb_is_id")),
      sample_aux=lambda_u * terms, sample_is_id=batch.get("ulb_is_id"))


def validate(cfg: ml_collections.ConfigDict, fail) -> None:
  if not 0.0 <= cfg.p_cutoff <= 1.0:
    fail("p_cutoff", cfg.p_cutoff, "must be a number in [0, 1]")


ALGORITHM = Algorithm(
    name="fixmatch", default_config=default_config, losses=losses, views=VIEWS,
    labeled_views=LABELED_VIEWS, supervised_loss=supervised_loss, ood_score="msp",
    validate=validate,
    view_pair=ViewPair("x_ulb_w", "x_ulb_s", forward=("x_lb", "x_ulb_w", "x_ulb_s")))
