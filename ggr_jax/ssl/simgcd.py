"""SimGCD's losses (Wen et al., ICCV 2023), as EAGC's official code computes them.

Rows come as ``[view 0 of the B images; view 1 of the same images]`` (``R = 2B``);
``labeled`` marks labeled images. With ``logits`` the cosine prototype outputs and
``proj`` the bottleneck features of :class:`ggr_jax.models.gcd_head.GCDHead`:

    cls      = CE(logits / 0.1, y) over the labeled rows (both views)
    supcon   = supervised contrastive (temperature 0.07) over the labeled rows
    distill  = cross-view self-distillation: student softmax(logits / 0.1) of one view
               against the detached teacher softmax(logits / t_teacher) of the other
    me_max   = log K - H(mean_rows softmax(logits / 0.1))        (mean-entropy penalty)
    cluster  = distill + memax_weight * me_max
    contrast = InfoNCE over all rows (temperature 1.0), the other view the positive
    total    = (1 - w) (cluster + contrast) + w (cls + supcon),  w = 0.35

The teacher temperature falls linearly from 0.07 to 0.04 over the first 30 epochs
(``np.linspace(0.07, 0.04, 30)[epoch]``, 0.04 from epoch 29 on). Every loss is written
with masks over fixed-size arrays, so a jitted step takes any number of labeled rows;
with no labeled row ``cls`` and ``supcon`` are 0 (the official code would give NaN).

As an algorithm (``simgcd``, protocol ``gcd``) the supervised side ``w (cls + supcon)``
is the anchor and the unsupervised side ``(1 - w) (cluster + contrast)`` the auxiliary
loss, so GGR can rectify the latter against the former. A batch holds two weak views of
``batch_size`` labeled and ``batch_size * uratio`` unlabeled images (``uratio = 1``: the
official sampler's 50/50 on average, here exactly).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ggr_jax.ssl import common
from ggr_jax.ssl.interface import Algorithm, LossContext, Losses

STUDENT_TEMPERATURE = 0.1
SUPCON_TEMPERATURE = 0.07
INFONCE_TEMPERATURE = 1.0


def teacher_temperature(epoch: jax.Array | int, warmup_epochs: int = 30,
                        start: float = 0.07, end: float = 0.04) -> jax.Array:
  """``np.linspace(start, end, warmup_epochs)[epoch]``, then ``end``."""
  frac = jnp.minimum(jnp.asarray(epoch) / max(warmup_epochs - 1, 1), 1.0)
  return start + (end - start) * frac


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def labeled_cross_entropy(logits: jax.Array, labels: jax.Array, labeled: jax.Array,
                          temperature: float = STUDENT_TEMPERATURE) -> jax.Array:
  """Mean cross-entropy of ``logits / temperature`` over the labeled rows."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits / temperature,
                                                       jnp.maximum(labels, 0))
  return _masked_mean(ce, labeled)


def distillation(logits: jax.Array, teacher_temp: jax.Array, n_views: int = 2,
                 student_temp: float = STUDENT_TEMPERATURE) -> jax.Array:
  """Cross-view self-distillation, the teacher the detached output of the same rows."""
  student = jnp.split(jax.nn.log_softmax(logits / student_temp, axis=-1), n_views)
  teacher = jnp.split(jax.nn.softmax(jax.lax.stop_gradient(logits) / teacher_temp, axis=-1),
                      n_views)
  terms = [jnp.mean(jnp.sum(-q * student[v], axis=-1))
           for i, q in enumerate(teacher) for v in range(n_views) if v != i]
  return sum(terms) / len(terms)


def mean_entropy_penalty(logits: jax.Array,
                         temperature: float = STUDENT_TEMPERATURE) -> jax.Array:
  """``log K - H(p_mean)``, ``p_mean`` the mean of ``softmax(logits / temperature)``."""
  p = jnp.mean(jax.nn.softmax(logits / temperature, axis=-1), axis=0)
  return jnp.sum(jax.scipy.special.xlogy(p, p)) + jnp.log(p.shape[-1])


def _partner(rows: int, n_views: int) -> jax.Array:
  if n_views != 2:
    raise ValueError(f"SimGCD's contrastive losses take 2 views, got n_views={n_views}")
  return (jnp.arange(rows) + rows // 2) % rows


def info_nce(proj: jax.Array, n_views: int = 2,
             temperature: float = INFONCE_TEMPERATURE) -> jax.Array:
  """InfoNCE over all rows: each row's other view is its positive, every other row but
  itself a negative; cosine similarities divided by ``temperature``."""
  rows = proj.shape[0]
  f = _l2_normalize(proj)
  sim = f @ f.T / temperature
  off_diagonal = ~jnp.eye(rows, dtype=bool)
  lse = _masked_logsumexp(sim, off_diagonal)[:, 0]
  positive = sim[jnp.arange(rows), _partner(rows, n_views)]
  return jnp.mean(lse - positive)


def supervised_contrastive(proj: jax.Array, labels: jax.Array, labeled: jax.Array,
                           temperature: float = SUPCON_TEMPERATURE,
                           base_temperature: float = SUPCON_TEMPERATURE) -> jax.Array:
  """SupCon over the labeled rows (both views), L2-normalised ``proj``: for each labeled
  anchor the mean log-probability of its same-class rows among all other labeled rows,
  times ``-temperature / base_temperature``, averaged over anchors."""
  rows = proj.shape[0]
  f = _l2_normalize(proj)
  logits = f @ f.T / temperature
  valid = labeled[:, None] & labeled[None, :] & ~jnp.eye(rows, dtype=bool)
  log_prob = logits - _masked_logsumexp(logits, valid)
  positive = valid & (labels[:, None] == labels[None, :])
  mean_pos = (jnp.sum(jnp.where(positive, log_prob, 0.0), axis=-1)
              / jnp.maximum(jnp.sum(positive, axis=-1), 1))
  return -(temperature / base_temperature) * _masked_mean(mean_pos, labeled)


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Row-wise logsumexp over ``mask``; a row with no entry gives a finite value and
  finite gradients (its result is never used)."""
  return jax.nn.logsumexp(jnp.where(mask, x, jnp.finfo(x.dtype).min), axis=-1,
                          keepdims=True)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def simgcd_terms(logits: jax.Array, proj: jax.Array, labels: jax.Array,
                 labeled: jax.Array, teacher_temp: jax.Array, *, memax_weight: float,
                 sup_weight: float = 0.35, n_views: int = 2) -> Mapping[str, jax.Array]:
  """Every SimGCD term, unweighted, and ``total``.

  Args:
    logits: ``(R, K)`` prototype outputs (no temperature), ``proj``: ``(R, d)``.
    labels: ``(B,)`` class ids (any value on unlabeled images), ``labeled``: ``(B,)``.
  """
  rows_labels = jnp.tile(labels, n_views)
  rows_labeled = jnp.tile(labeled, n_views)
  terms = {
      "cls": labeled_cross_entropy(logits, rows_labels, rows_labeled),
      "supcon": supervised_contrastive(proj, rows_labels, rows_labeled),
      "distill": distillation(logits, teacher_temp, n_views),
      "me_max": mean_entropy_penalty(logits),
      "contrastive": info_nce(proj, n_views),
  }
  terms["cluster"] = terms["distill"] + memax_weight * terms["me_max"]
  terms["total"] = ((1 - sup_weight) * (terms["cluster"] + terms["contrastive"])
                    + sup_weight * (terms["cls"] + terms["supcon"]))
  return terms


VIEWS = {"labeled": {"x_lb_0": "weak", "x_lb_1": "weak"},
         "unlabeled": {"x_ulb_0": "weak", "x_ulb_1": "weak"}}
LABELED_VIEWS = ("x_lb_0", "x_lb_1")


def default_config() -> ml_collections.ConfigDict:
  """SimGCD's released settings (DINO head 2048 -> 256; memax 2 as CIFAR-100's)."""
  return ml_collections.ConfigDict(dict(
      sup_weight=0.35, memax_weight=2.0, teacher_temp=0.04, warmup_teacher_temp=0.07,
      teacher_warmup_epochs=30, hidden_dim=2048, bottleneck_dim=256))


def _teacher_temp(cfg: ml_collections.ConfigDict, epoch) -> jax.Array:
  return teacher_temperature(0 if epoch is None else epoch, cfg.teacher_warmup_epochs,
                             cfg.warmup_teacher_temp, cfg.teacher_temp)


def _terms(cfg: ml_collections.ConfigDict, outputs: list[dict], labels: jax.Array,
           labeled: jax.Array, epoch) -> Mapping[str, jax.Array]:
  """``outputs``: view 0 then view 1 of the same images."""
  logits = jnp.concatenate([o["logits"] for o in outputs])
  proj = jnp.concatenate([o["proj"] for o in outputs])
  return simgcd_terms(logits, proj, labels, labeled, _teacher_temp(cfg, epoch),
                      memax_weight=cfg.memax_weight, sup_weight=cfg.sup_weight)


def supervised_loss(labeled: list[dict], batch: dict, cfg) -> jax.Array:
  """``w (cls + supcon)`` from the two labeled views alone."""
  y = batch["y_lb"]
  terms = _terms(cfg, labeled, y, jnp.ones(y.shape, bool), None)
  return cfg.sup_weight * (terms["cls"] + terms["supcon"])


def losses(ctx: LossContext) -> Losses:
  """One forward on both views of the labeled and unlabeled images; rows ordered as the
  official ``[view 0 of every image; view 1 of every image]``."""
  cfg, batch = ctx.cfg, ctx.batch
  (lb0, ulb0, lb1, ulb1), new_state = common.forward_concat(
      ctx.apply_fn, ctx.params, ctx.model_state,
      [batch["x_lb_0"], batch["x_ulb_0"], batch["x_lb_1"], batch["x_ulb_1"]],
      labeled=(True, False, True, False),
      known=(None, batch.get("ulb_is_id"), None, batch.get("ulb_is_id")))
  n_ulb = batch["x_ulb_0"].shape[0]
  labels = jnp.concatenate([batch["y_lb"], jnp.zeros((n_ulb,), batch["y_lb"].dtype)])
  labeled = jnp.concatenate([jnp.ones(batch["y_lb"].shape, bool), jnp.zeros((n_ulb,), bool)])
  view0 = {k: jnp.concatenate([lb0[k], ulb0[k]]) for k in ("logits", "proj")}
  view1 = {k: jnp.concatenate([lb1[k], ulb1[k]]) for k in ("logits", "proj")}
  terms = _terms(cfg, [view0, view1], labels, labeled, ctx.epoch)
  w = cfg.sup_weight
  return Losses(
      supervised={"cls": w * terms["cls"], "supcon": w * terms["supcon"]},
      auxiliary={"cluster": (1 - w) * terms["cluster"],
                 "contrastive": (1 - w) * terms["contrastive"]},
      model_state=new_state,
      metrics={"losses/distill": terms["distill"], "losses/me_max": terms["me_max"],
               "monitors/teacher_temp": _teacher_temp(cfg, ctx.epoch)})


def validate(cfg: ml_collections.ConfigDict, fail) -> None:
  if not 0.0 <= cfg.sup_weight <= 1.0:
    fail("sup_weight", cfg.sup_weight, "must be a number in [0, 1]")
  for name in ("teacher_temp", "warmup_teacher_temp"):
    if not cfg[name] > 0:
      fail(name, cfg[name], "must be a temperature > 0")
  for name in ("hidden_dim", "bottleneck_dim", "teacher_warmup_epochs"):
    if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] < 1:
      fail(name, cfg[name], "must be an integer >= 1")


ALGORITHM = Algorithm(
    name="simgcd", default_config=default_config, losses=losses, views=VIEWS,
    labeled_views=LABELED_VIEWS, supervised_loss=supervised_loss, head="gcd",
    head_sizes=lambda cfg: {"gcd_hidden": cfg.hidden_dim, "gcd_bottleneck": cfg.bottleneck_dim},
    protocols=("gcd",), validate=validate)
