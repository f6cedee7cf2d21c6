"""MetaSemi: meta-gradient pseudo-labels with cross-domain mixup (Zhang et al., AISTATS 2021).

Per step, from the current parameters in eval mode, the pseudo-labels ``yhat`` of the
unlabeled batch are :func:`ggr_jax.meta_labels.meta_pseudo_labels` (``meta=True``) or
the eval-mode predictions ``p`` themselves (``meta=False``, the ablation without meta),
with no gradient. Then, in train mode, as officially, two separate forwards (each with
its own BatchNorm batch statistics, running-statistic update and dropout masks):

    mixup:   lam_i ~ Beta(a, a) per sample, x_i = lam_i x_l,i + (1 - lam_i) x_u,i,
             y_i = lam_i onehot(y_l,i) + (1 - lam_i) yhat_i,
             L_cls = KL(y || softmax f(x)) (batch mean)                 [forward 1]
    no mixup: L_cls = CE(f(x_l), y_l)                                   [forward 1]
    L_cons = mean_i || softmax f(x_u,i) - yhat_i ||^2                   [forward 2]
    L = L_cls + w_t L_cons,  w_t = weight * min(1, t / ramp_steps)

``L_cls`` is the supervised term (``cls``, the anchor), ``w_t L_cons`` the auxiliary one
(``cons``), so GGR rectifies the consistency gradient against the labeled one. The
anchor is the train-mode gradient of ``L_cls``; the meta pass's ``g`` is an eval-mode
gradient used only to move the pseudo-labels. The meta learning rate is
``meta_lr_scale`` times the optimizer's current learning rate (officially 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy.special import xlogy

from ggr_jax import meta_labels
from ggr_jax.ssl import common
from ggr_jax.ssl.interface import Algorithm, LossContext, Losses

VIEWS = {"labeled": {"x_lb": "weak"}, "unlabeled": {"x_ulb": "weak"}}
LABELED_VIEWS = ("x_lb",)


def default_config() -> ml_collections.ConfigDict:
  """The official CIFAR settings: meta pseudo-labels by JVP, mixup Beta(1, 1), the
  consistency weight 1 ramped over 4,000 steps."""
  return ml_collections.ConfigDict(dict(
      meta=True, method="jvp", epsilon=0.01, meta_lr_scale=1.0,
      mixup=True, mixup_alpha=1.0, weight=1.0, ramp_steps=4000))


def supervised_loss(labeled: list[dict], batch: dict, cfg) -> jnp.ndarray:
  """``CE(x_lb)`` (the anchor from a forward of the labeled views alone)."""
  del cfg
  return common.cross_entropy(labeled[0]["logits"], batch["y_lb"])


class TrainTerms(NamedTuple):
  """The two train-mode forwards: their losses, statistics and outputs."""

  cls: jax.Array  # L_cls (KL with mixup, else CE)
  cons_terms: jax.Array  # (B_u,) ||softmax f(x_u) - yhat||^2 / B_u, summing to L_cons
  model_state_mid: Any  # BatchNorm statistics after the first forward
  model_state: Any  # ... and after the second
  logits_first: jax.Array  # f(x_mix), or f(x_l) without mixup
  logits_u: jax.Array
  x_mix: jax.Array | None
  y_mix: jax.Array | None


def train_terms(apply_fn, params, model_state, x_l: jax.Array, y_l: jax.Array,
                x_u: jax.Array, yhat: jax.Array, lam: jax.Array | None,
                rngs: tuple[jax.Array | None, jax.Array | None] = (None, None)) -> TrainTerms:
  """The training losses for given pseudo-labels ``yhat`` and mixup coefficients ``lam``
  (``(B, 1)``; None: no mixup), the forwards' dropout keys ``rngs``."""
  num_classes = yhat.shape[-1]
  if lam is None:
    out, mid = apply_fn(params, model_state, x_l, True, rngs[0])
    cls, x_mix, y_mix = common.cross_entropy(out["logits"], y_l), None, None
  else:
    lam = lam.astype(x_l.dtype)
    x_mix = lam.reshape(-1, *([1] * (x_l.ndim - 1))) * x_l + \
        (1.0 - lam.reshape(-1, *([1] * (x_l.ndim - 1)))) * x_u
    y_mix = lam * jax.nn.one_hot(y_l, num_classes, dtype=yhat.dtype) + (1.0 - lam) * yhat
    out, mid = apply_fn(params, model_state, x_mix, True, rngs[0])
    log_q = jax.nn.log_softmax(out["logits"], axis=-1)
    cls = jnp.sum(xlogy(y_mix, y_mix) - y_mix * log_q) / x_mix.shape[0]
  out_u, end = apply_fn(params, mid, x_u, True, rngs[1])
  q = jax.nn.softmax(out_u["logits"], axis=-1)
  cons_terms = jnp.sum(jnp.square(q - yhat), axis=-1) / q.shape[0]
  return TrainTerms(cls, cons_terms, mid, end, out["logits"], out_u["logits"], x_mix, y_mix)


def pseudo_labels(ctx: LossContext) -> meta_labels.MetaLabels | jax.Array:
  """The step's pseudo-labels: the meta pass (``meta=True``) or the eval predictions."""
  cfg, batch = ctx.cfg, ctx.batch
  if not cfg.meta:
    logits = ctx.apply_fn(jax.lax.stop_gradient(ctx.params), ctx.model_state, batch["x_ulb"],
                          False)[0]["logits"]
    return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
  if ctx.learning_rate is None:
    raise ValueError("metasemi ties its meta learning rate to the optimizer's: the "
                     "LossContext needs learning_rate (the train step passes it).")
  return meta_labels.meta_pseudo_labels(
      ctx.apply_fn, ctx.params, ctx.model_state, batch["x_lb"], batch["y_lb"], batch["x_ulb"],
      cfg.meta_lr_scale * ctx.learning_rate, method=cfg.method, epsilon=cfg.epsilon)


def losses(ctx: LossContext) -> Losses:
  """The meta pass, then the two train-mode forwards (see the module docstring)."""
  cfg, batch = ctx.cfg, ctx.batch
  meta = pseudo_labels(ctx)
  yhat = meta.yhat if isinstance(meta, meta_labels.MetaLabels) else meta
  x_l, x_u = batch["x_lb"], batch["x_ulb"]
  key_lam, key_1, key_2 = jax.random.split(ctx.rng, 3)
  lam = None
  if cfg.mixup:
    if x_l.shape[0] != x_u.shape[0]:
      raise ValueError(f"metasemi mixup pairs labeled and unlabeled images one to one: got "
                       f"{x_l.shape[0]} and {x_u.shape[0]} rows; set train.uratio=1.")
    lam = jax.random.beta(key_lam, cfg.mixup_alpha, cfg.mixup_alpha, (x_l.shape[0], 1),
                          dtype=jnp.float32)
  terms = train_terms(ctx.apply_fn, ctx.params, ctx.model_state, x_l, batch["y_lb"], x_u,
                      yhat, lam, (key_1, key_2))
  weight = cfg.weight * common.ramp(ctx.step, 0, cfg.ramp_steps)
  sample_aux = weight.astype(terms.cons_terms.dtype) * terms.cons_terms
  metrics = {"monitors/pseudo_label_max": jnp.mean(jnp.max(yhat, axis=-1))}
  if isinstance(meta, meta_labels.MetaLabels):
    metrics.update({
        "monitors/meta_clipped": meta.clipped / meta.p.size,
        "monitors/meta_shift": jnp.mean(jnp.sum(jnp.abs(meta.yhat - meta.p), axis=-1)),
        "monitors/meta_argmax_changed": jnp.mean(
            (jnp.argmax(meta.yhat, -1) != jnp.argmax(meta.p, -1)).astype(jnp.float32))})
  return Losses(supervised={"cls": terms.cls}, auxiliary={"cons": jnp.sum(sample_aux)},
                model_state=terms.model_state, metrics=metrics, sample_aux=sample_aux,
                sample_is_id=batch.get("ulb_is_id"))


def validate(cfg: ml_collections.ConfigDict, fail) -> None:
  if cfg.method not in meta_labels.METHODS:
    fail("method", cfg.method, f"choose one of {', '.join(meta_labels.METHODS)}")
  for field in ("meta", "mixup"):
    if not isinstance(cfg[field], bool):
      fail(field, cfg[field], "must be True or False")
  if not (isinstance(cfg.epsilon, (int, float)) and cfg.epsilon > 0):
    fail("epsilon", cfg.epsilon, "must be > 0 (the finite-difference step, official 0.01)")
  if not (isinstance(cfg.mixup_alpha, (int, float)) and cfg.mixup_alpha > 0):
    fail("mixup_alpha", cfg.mixup_alpha, "must be > 0 (the Beta concentration; official 1.0, "
         "0.1 on SVHN)")
  if not (isinstance(cfg.meta_lr_scale, (int, float)) and cfg.meta_lr_scale >= 0):
    fail("meta_lr_scale", cfg.meta_lr_scale, "must be >= 0 (meta lr = scale x current lr)")
  if not (isinstance(cfg.weight, (int, float)) and cfg.weight >= 0):
    fail("weight", cfg.weight, "must be >= 0 (the consistency weight)")
  ramp = cfg.ramp_steps
  if not isinstance(ramp, int) or isinstance(ramp, bool) or ramp < 0:
    fail("ramp_steps", ramp, "must be an integer >= 0 (0: the full weight at once)")


def check_run(cfg: ml_collections.ConfigDict, counts, fail) -> None:
  """Mixup pairs the batches one to one; a labeled batch must fit in the labeled set."""
  name = cfg.algorithm  # metasemi, or a composition of it (metasemi_ggcr)
  if cfg[name].mixup and cfg.train.uratio != 1:
    fail("train.uratio", cfg.train.uratio, f"{name}'s mixup pairs each labeled image with "
         f"one unlabeled image: use 1 (or {name}.mixup=False)")
  if counts is not None and cfg.train.batch_size > counts["labeled"]:
    fail("train.batch_size", cfg.train.batch_size,
         f"the labeled set has {counts['labeled']} images, fewer than one labeled batch: "
         "lower the batch size or raise dataset.labels_per_class")


ALGORITHM = Algorithm(
    name="metasemi", default_config=default_config, losses=losses, views=VIEWS,
    labeled_views=LABELED_VIEWS, supervised_loss=supervised_loss, ood_score="msp",
    protocols=("closed", "openset"), validate=validate, check_run=check_run)
