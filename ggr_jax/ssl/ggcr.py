"""GGCR: gradient-consistency regularisation across a weak and a strong view.

For an unlabeled image ``u`` with the hard pseudo-label ``yhat = argmax p(weak)``
(no gradient), ``g_w(u)`` and ``g_s(u)`` are the gradients of ``CE(f(weak), yhat)`` and
``CE(f(strong), yhat)`` with respect to the shared encoder (the backbone without its
classifier), and ``GC(u) = cos(g_w(u), g_s(u))``. The regulariser is

    L_g = (1 / |B_u|) * sum_u m_u * (1 - GC(u)),

with ``m_u = [max p(weak) > tau]`` (``mask="confident"``, the default: an unconfident
pseudo-label is noise) or ``m_u = 1`` (``"all"``), still divided by the batch size.
``pair_fraction = 1 / k`` measures every ``k``-th pair of the (randomly drawn) batch only
and divides by their number ``P``: an unbiased estimate at about ``1 / k`` of the
geometry's cost. ``pair_chunks = c`` (exact method) measures every pair, in ``c`` chunks
one after the other (every ``c``-th measured pair per chunk), each chunk's geometry
rebuilt in the backward pass (``jax.checkpoint``): the same ``L_g`` and gradient in about
``1 / c`` of the geometry's memory, for one more pass of its forward part.
``penalty="grad_norm"`` replaces ``1 - GC(u)`` by ``(||g_w(u)||^2 + ||g_s(u)||^2) / 2``,
the paper's ablation "a gradient-norm penalty instead" (decision: the paper does not
define it; this one penalises the same per-sample gradients' size rather than their
directions, at no extra cost, and its scale, unlike the cosine's, depends on the model,
so ``lambda`` does not carry over). Its
gradient includes the second-order term through the per-sample gradients (``jax.grad``
through :func:`ggr_jax.consistency.view_geometry`), without which it would contribute
nothing. Per-sample gradients hold the BatchNorm batch statistics of the pair's forward
constant (:func:`ggr_jax.consistency.frozen_batch_statistics`); a model with dropout
(ConvLarge) draws its masks once for that forward, and ``vmap``, which forwards each
sample alone, replays that forward's masks of the sample's rows
(:func:`ggr_jax.consistency.replayed_dropout_masks`), so every method differentiates the
same network. (A pair fraction or chunks forward their pairs alone and draw masks of
their own.) ``statistics``: in the
gradient of ``L_g``, ``"through"`` (the default) differentiates those statistics (the
total derivative, as the base loss's gradient is), which lets the geometry be measured
on the base loss's own forward when the algorithm runs one (FixMatch, IOMatch;
:func:`~ggr_jax.ssl.ggcr_pairs.shares_the_forward`): one forward and one backward pass
serve both (WRN-28-2: 18% fewer FLOPs per step than ``"held"``, which keeps the
statistics constant there too and gives the geometry a forward and backward pass of its
own: the same values, another gradient).

:func:`with_gradient_consistency` adds ``lambda * L_g`` (after ``warmup_steps``) to any
algorithm with a :class:`~ggr_jax.ssl.interface.ViewPair`, as the auxiliary term ``gc``
(rectified with the rest of the auxiliary loss when GGR is on; ``role="supervised"``
puts it on the anchor side). Its settings are the block's ``consistency`` sub-block.
Registered: ``ggcr`` (FixMatch with hard pseudo-labels, the unlabeled weight ramped
linearly over 5,000 steps, the paper's method), ``iomatch_ggcr``, ``openmatch_ggcr`` and
``metasemi_ggcr``. MetaSemi trains on weak views only; :func:`with_strong_view` draws a
strong view of its unlabeled images beside them for ``L_g`` alone (the pair is forwarded
by the regulariser, MetaSemi's own losses and batch statistics are unchanged), and the
pseudo-label of ``L_g`` is, as for every base, the argmax of the pair forward's weak-view
prediction, not MetaSemi's meta pseudo-label (decision: one definition of ``L_g`` for
every base, the issue's ``yhat = argmax p(weak)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ggr_jax import consistency
from ggr_jax.ssl import fixmatch, iomatch, metasemi, openmatch
# the pair geometry's public names, importable from here as well
from ggr_jax.ssl.ggcr_pairs import (REMAT, PairLosses, encoder_scope, gradient_consistency,
                                    pair_losses, pair_stride, scope_of, shares_the_forward)
from ggr_jax.ssl.interface import Algorithm, LossContext, Losses, ViewPair

MASKS = ("confident", "all")
PENALTIES = ("cosine", "grad_norm")
ROLES = ("auxiliary", "supervised")
SCOPES = ("encoder", "backbone", "all")
STATISTICS = consistency.STATISTICS


def consistency_config() -> ml_collections.ConfigDict:
  """The ``consistency`` sub-block: the paper's values (lambda 0.1, 1,000 warm-up steps)."""
  return ml_collections.ConfigDict(dict(
      weight=0.1, warmup_steps=1000, tau=0.95, mask="confident", penalty="cosine",
      method="exact", statistics="through", pair_fraction=1.0, pair_chunks=1,
      scope="encoder", sketch_dim=64, sketch_chunk=0, remat="auto", microbatch=0,
      role="auxiliary"))



def diagnostics(gc: jax.Array, confident: jax.Array, is_id: jax.Array | None) -> dict:
  """Mean ``GC`` of confident and unconfident samples, and of ID and OOD ones (analysis
  labels); NaN for an empty group."""
  out = {"ggcr/gc_mean": jnp.mean(gc), "ggcr/gc_confident": _mean_where(gc, confident),
         "ggcr/gc_unconfident": _mean_where(gc, ~confident)}
  if is_id is not None:
    is_id = is_id.astype(bool)
    out.update({"ggcr/gc_id": _mean_where(gc, is_id), "ggcr/gc_ood": _mean_where(gc, ~is_id)})
  return out


def _mean_where(values: jax.Array, where: jax.Array) -> jax.Array:
  """Mean over ``where`` (NaN when empty: the logger's per-interval mean skips nothing)."""
  count = jnp.sum(where)
  return jnp.where(count > 0, jnp.sum(jnp.where(where, values, 0.0)) / jnp.maximum(count, 1),
                   jnp.nan)


def with_strong_view(base: Algorithm, weak: str = "x_ulb", strong: str = "x_ulb_s") -> Algorithm:
  """``base``, which trains on its unlabeled images' weak view ``weak`` only, also drawing
  a strong view ``strong`` of the same images, paired with it (``view_pair``) and
  forwarded with it by a regulariser alone: ``base.losses`` never reads ``strong``.

  >>> from ggr_jax import ssl
  >>> with_strong_view(ssl.get("metasemi")).views["unlabeled"]
  {'x_ulb': 'weak', 'x_ulb_s': 'strong'}
  """
  unlabeled = dict(base.views.get("unlabeled", {}))
  if base.view_pair is not None:
    raise ValueError(f"algorithm {base.name!r} has a view pair already "
                     f"({base.view_pair.weak}, {base.view_pair.strong}).")
  if unlabeled.get(weak) != "weak" or strong in unlabeled:
    raise ValueError(f"algorithm {base.name!r}: {weak!r} must be a weak unlabeled view and "
                     f"{strong!r} a new name; its unlabeled views are {unlabeled}.")
  views = {**base.views, "unlabeled": {**unlabeled, strong: "strong"}}
  return dataclasses.replace(base, views=views,
                             view_pair=ViewPair(weak=weak, strong=strong,
                                                forward=(weak, strong)))


def with_gradient_consistency(base: Algorithm, name: str,
                              **overrides: Any) -> Algorithm:
  """``base`` plus ``lambda * L_g`` on its view pair, under the name ``name``.

  ``overrides`` change the base block's defaults (e.g. ``hard_label=True``).
  """
  if base.view_pair is None:
    raise ValueError(f"algorithm {base.name!r} has no weak/strong view pair (view_pair) for "
                     "gradient consistency.")
  pair = base.view_pair

  def default_config() -> ml_collections.ConfigDict:
    cfg = base.default_config()
    cfg.update(overrides)
    cfg.consistency = consistency_config()
    return cfg

  def losses(ctx: LossContext) -> Losses:
    ccfg = ctx.cfg.consistency
    stride = pair_stride(ccfg.pair_fraction) or 1
    forward_stats, out = None, None
    # one forward for the base loss and the geometry, differentiated in one backward pass
    shared = (ccfg.statistics == "through" and stride == 1 and ccfg.pair_chunks == 1
              and ccfg.method != "vmap" and shares_the_forward(base.losses, ctx, pair))
    if not shared and (stride > 1 or ccfg.pair_chunks > 1) and ccfg.method != "vmap":
      # a subset or a chunk reuses the base forward's statistics
      rows = sum(ctx.batch[name].shape[0] for name in pair.forward)
      out, forward_stats = consistency.single_forward_statistics(base.losses, rows, ctx)
    elif not shared:
      out = base.losses(ctx)
    on = jnp.asarray(ctx.step) >= ccfg.warmup_steps
    # Computed at every step and switched off by a factor: under the step's jax.vjp a
    # lax.cond around the second-order computation runs ~15x slower on CPU (measured),
    # and the warm-up is 0.1% of the paper's schedule.
    terms, gc, confident, shared_out = gradient_consistency(
        ctx, pair, ccfg, forward_stats, base.losses if shared else None)
    out = shared_out if shared else out
    pair_id = ctx.batch.get(pair.is_id_key)
    pair_id = None if pair_id is None else pair_id[::stride]  # the measured pairs
    terms = jnp.where(on, terms, 0.0)
    terms = ccfg.weight * terms
    term = {"gc": jnp.sum(terms)}
    role = {"supervised": {**out.supervised, **term}} if ccfg.role == "supervised" else \
        {"auxiliary": {**out.auxiliary, **term}}
    sample_aux, is_id = out.sample_aux, out.sample_is_id
    if ccfg.role == "auxiliary" and sample_aux is not None:
      sample_aux = jnp.concatenate([sample_aux, terms.astype(sample_aux.dtype)])
      if is_id is not None and pair_id is not None:
        is_id = jnp.concatenate([is_id, pair_id])
      elif is_id is not None:
        is_id = None
    shown = diagnostics(gc, confident, pair_id)
    metrics = {**out.metrics, **{k: jnp.where(on, v, jnp.nan) for k, v in shown.items()},
               "ggcr/gc_on": on.astype(jnp.float32)}
    return dataclasses.replace(out, **role, metrics=metrics, sample_aux=sample_aux,
                               sample_is_id=is_id)

  def validate(cfg: ml_collections.ConfigDict, fail) -> None:
    if base.validate is not None:
      base.validate(cfg, fail)
    ccfg = cfg.consistency
    for field, allowed in (("mask", MASKS), ("penalty", PENALTIES), ("role", ROLES),
                           ("scope", SCOPES), ("method", consistency.METHODS),
                           ("statistics", STATISTICS),
                           ("remat", tuple(REMAT))):
      if ccfg[field] not in allowed:
        fail(f"consistency.{field}", ccfg[field], f"choose one of {', '.join(allowed)}")
    if not ccfg.weight >= 0:
      fail("consistency.weight", ccfg.weight, "must be >= 0 (lambda of L_g)")
    if not 0.0 <= ccfg.tau <= 1.0:
      fail("consistency.tau", ccfg.tau, "must be a number in [0, 1]")
    if pair_stride(ccfg.pair_fraction) is None:
      fail("consistency.pair_fraction", ccfg.pair_fraction,
           "must be 1/k for an integer k >= 1 (1, 0.5, 0.25, ...): L_g measures every k-th "
           "unlabeled pair, so that each device of a data-parallel batch keeps its share")
    for field in ("sketch_dim", "sketch_chunk", "microbatch", "warmup_steps", "pair_chunks"):
      value = ccfg[field]
      low = 1 if field in ("sketch_dim", "pair_chunks") else 0
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        fail(f"consistency.{field}", value, f"must be an integer >= {low}")
    if ccfg.pair_chunks != 1 and ccfg.method != "exact":
      fail("consistency.pair_chunks", ccfg.pair_chunks,
           f"chunks are for method='exact' (here {ccfg.method!r}); the vmap method has "
           "consistency.microbatch and the sketch consistency.sketch_chunk")

  return dataclasses.replace(base, name=name, default_config=default_config, losses=losses,
                             validate=validate)


GGCR = with_gradient_consistency(fixmatch.ALGORITHM, "ggcr", hard_label=True,
                                 unsup_warmup_steps=5000)
IOMATCH_GGCR = with_gradient_consistency(iomatch.ALGORITHM, "iomatch_ggcr")
OPENMATCH_GGCR = with_gradient_consistency(openmatch.ALGORITHM, "openmatch_ggcr")
METASEMI_GGCR = with_gradient_consistency(with_strong_view(metasemi.ALGORITHM), "metasemi_ggcr")
ALGORITHM = GGCR
COMPOSITIONS = {"fixmatch": GGCR.name, "iomatch": IOMATCH_GGCR.name,  # base -> composition
                "openmatch": OPENMATCH_GGCR.name, "metasemi": METASEMI_GGCR.name}
