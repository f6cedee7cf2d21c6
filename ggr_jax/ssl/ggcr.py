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
constant (:func:`ggr_jax.consistency.frozen_batch_statistics`). ``statistics``: in the
gradient of ``L_g``, ``"through"`` (the default) differentiates those statistics (the
total derivative, as the base loss's gradient is), which lets the geometry be measured
on the base loss's own forward when the algorithm runs one (FixMatch, IOMatch;
:func:`shares_the_forward`): one forward and one backward pass serve both (WRN-28-2:
18% fewer FLOPs per step than ``"held"``, which keeps the statistics constant there too
and gives the geometry a forward and backward pass of its own: the same values, another
gradient).

:func:`with_gradient_consistency` adds ``lambda * L_g`` (after ``warmup_steps``) to any
algorithm with a :class:`~ggr_jax.ssl.interface.ViewPair`, as the auxiliary term ``gc``
(rectified with the rest of the auxiliary loss when GGR is on; ``role="supervised"``
puts it on the anchor side). Its settings are the block's ``consistency`` sub-block.
Registered: ``ggcr`` (FixMatch with hard pseudo-labels, the unlabeled weight ramped
linearly over 5,000 steps, the paper's method), ``iomatch_ggcr`` and ``openmatch_ggcr``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from ggr_jax import consistency
from ggr_jax.ssl import fixmatch, iomatch, openmatch
from ggr_jax.ssl.interface import Algorithm, LossContext, Losses, ViewPair

MASKS = ("confident", "all")
PENALTIES = ("cosine", "grad_norm")
ROLES = ("auxiliary", "supervised")
# consistency.remat -> view_geometry(remat=): "auto" rebuilds patches except on the CPU
REMAT = {"auto": None, "on": True, "off": False}
SCOPES = ("encoder", "backbone", "all")
STATISTICS = consistency.STATISTICS


def consistency_config() -> ml_collections.ConfigDict:
  """The ``consistency`` sub-block: the paper's values (lambda 0.1, 1,000 warm-up steps)."""
  return ml_collections.ConfigDict(dict(
      weight=0.1, warmup_steps=1000, tau=0.95, mask="confident", penalty="cosine",
      method="exact", statistics="through", pair_fraction=1.0, pair_chunks=1,
      scope="encoder", sketch_dim=64, sketch_chunk=0, remat="auto", microbatch=0,
      role="auxiliary"))


def encoder_scope(params: Any) -> Any:
  """The shared encoder: ``backbone/*`` without the backbone's classifier ``fc``."""
  def select(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    return len(keys) > 1 and keys[0] == "backbone" and keys[1] != "fc"
  return jax.tree_util.tree_map_with_path(select, params)


def _scope(name: str):
  if name == "encoder":
    return encoder_scope
  if name == "backbone":
    return lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[0], "key", path[0])) == "backbone", p)
  return None


class PairLosses(NamedTuple):
  """What :func:`pair_losses` gives :func:`ggr_jax.consistency.view_geometry`."""

  losses_fn: Callable  # params -> ((CE(weak, yhat), CE(strong, yhat)), probs), (B,) each
  rows: tuple[slice, slice]  # the two views' rows in that forward
  sample_fn: Callable | None  # (params, (x_w, x_s, yhat)) -> the two losses of one sample
  samples: tuple[jax.Array, jax.Array, jax.Array] | None  # (x_w, x_s, yhat), one per row


def pair_stride(fraction: float) -> int | None:
  """``k`` of a ``pair_fraction`` of ``1 / k`` (every ``k``-th pair), None if it is not one."""
  k = round(1.0 / fraction) if fraction > 0 else 0
  return k if k >= 1 and abs(k * fraction - 1.0) < 1e-3 else None


def pair_losses(ctx: LossContext, pair: ViewPair, one_sample: bool = False,
                stride: int = 1, forward_stats: dict | None = None,
                statistics: str = "held") -> PairLosses:
  """The per-sample losses GGCR differentiates, and the pseudo-labels they use.

  ``losses_fn`` is one train-mode forward of the views ``pair.forward``; the hard
  pseudo-labels are the argmax of its own weak-view probabilities (no gradient),
  which it returns as the auxiliary value, so that no other forward is needed. With
  ``one_sample``, ``sample_fn`` is the forward of one sample's two views alone,
  normalised with the batch statistics of that joint forward (recorded in one more
  forward, then replayed), so that both give the same per-sample losses. With
  ``stride`` k > 1, ``losses_fn`` is the forward of every k-th image's two views alone
  (a strided slice: a data-parallel batch keeps each device's share), normalised with
  the joint forward's statistics (replayed in the same way): each of their losses is
  the one the joint forward gives. ``forward_stats``, the statistics of the base loss's
  own forward of ``pair.forward`` (:func:`~ggr_jax.consistency.single_forward_statistics`),
  spare the subset the recording forward. Replayed statistics are held as
  ``statistics`` says (:func:`ggr_jax.consistency.frozen_batch_statistics`).
  """
  batch = ctx.batch
  parts = [batch[name] for name in pair.forward]
  starts = [sum(p.shape[0] for p in parts[:i]) for i in range(len(parts))]
  size = batch[pair.weak].shape[0]
  # static slices: their transposes are pads, where index arrays' would be scatters
  start_w, start_s = (starts[pair.forward.index(name)] for name in (pair.weak, pair.strong))
  rows_w, rows_s = slice(start_w, start_w + size), slice(start_s, start_s + size)
  x = jnp.concatenate(parts)
  ce = optax.softmax_cross_entropy_with_integer_labels
  subset = stride > 1 and size > 1
  stats = None
  if subset and not one_sample and forward_stats is not None:
    stats = forward_stats
  elif one_sample or subset:
    outputs, stats = _joint_statistics(ctx, x, statistics)
  if subset:
    losses_fn, (rows_w, rows_s) = _replayed_losses(ctx, stats, batch[pair.weak][::stride],
                                                   batch[pair.strong][::stride], statistics)
  else:
    def losses_fn(params):
      out = ctx.apply_fn(params, ctx.model_state, x, True)[0]["logits"]
      return _view_losses(out, rows_w, rows_s)

  if not one_sample:
    return PairLosses(losses_fn, (rows_w, rows_s), None, None)
  every = stride if subset else 1
  weak_rows = slice(start_w, start_w + size, every)
  yhat = jnp.argmax(jax.lax.stop_gradient(outputs["logits"][weak_rows]), axis=-1)

  def sample_fn(params, sample):
    x_w, x_s, label = sample
    with consistency.replayed_batch_statistics(stats, statistics):
      out = ctx.apply_fn(params, ctx.model_state, jnp.stack([x_w, x_s]), True)[0]["logits"]
    return ce(out[0], label), ce(out[1], label)

  return PairLosses(losses_fn, (rows_w, rows_s), sample_fn,
                    (batch[pair.weak][::every], batch[pair.strong][::every], yhat))


def _joint_statistics(ctx: LossContext, x: jax.Array, statistics: str):
  """The outputs and the recorded batch statistics of a train-mode forward of ``x`` (a
  recording forward of its own; without gradient unless ``statistics="through"``)."""
  params = ctx.params if statistics == "through" else jax.lax.stop_gradient(ctx.params)
  (outputs, _), stats = consistency.recorded_batch_statistics(
      ctx.apply_fn, params, ctx.model_state, x, True)
  return outputs, stats


def _view_losses(logits: jax.Array, rows_w: slice, rows_s: slice):
  ce = optax.softmax_cross_entropy_with_integer_labels
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits[rows_w]))
  yhat = jnp.argmax(probs, axis=-1)
  return (ce(logits[rows_w], yhat), ce(logits[rows_s], yhat)), probs


def _replayed_losses(ctx: LossContext, stats: dict, weak: jax.Array, strong: jax.Array,
                     statistics: str):
  """``losses_fn`` of the pairs ``(weak, strong)`` forwarded alone, normalised with the
  joint forward's replayed ``stats``, and the two views' rows in that forward."""
  x, n = jnp.concatenate([weak, strong]), weak.shape[0]
  rows = (slice(0, n), slice(n, 2 * n))

  def losses_fn(params):
    with consistency.replayed_batch_statistics(stats, statistics):
      out = ctx.apply_fn(params, ctx.model_state, x, True)[0]["logits"]
    return _view_losses(out, *rows)

  return losses_fn, rows


def _chunked_exact_geometry(ctx: LossContext, pair: ViewPair, cfg: ml_collections.ConfigDict,
                            stride: int, forward_stats: dict | None):
  """The exact geometry of the measured pairs in ``cfg.pair_chunks`` chunks, one after the
  other (``jax.lax.map``), each rebuilt in the backward pass (``jax.checkpoint``), so that
  only one chunk's intermediates are alive at a time; ``(cos, sq_w, sq_s, probs)`` in the
  pairs' order."""
  chunks = cfg.pair_chunks
  stats = forward_stats
  if stats is None:
    _, stats = _joint_statistics(ctx, jnp.concatenate([ctx.batch[n] for n in pair.forward]),
                                 cfg.statistics)
  weak, strong = ctx.batch[pair.weak][::stride], ctx.batch[pair.strong][::stride]
  pairs = weak.shape[0]
  if pairs % chunks:
    raise ValueError(f"consistency.pair_chunks = {chunks} does not divide the {pairs} "
                     "measured unlabeled pairs of a batch; choose a divisor of it.")
  scope = scope_of(cfg, ctx.params)

  @jax.checkpoint
  def one_chunk(params, views):
    losses_fn, rows = _replayed_losses(ctx, stats, *views, cfg.statistics)
    geometry, probs = consistency.view_geometry(
        losses_fn, params, method="exact", scope=scope, view_rows=rows,
        remat=REMAT[cfg.remat], statistics=cfg.statistics, has_aux=True)
    return geometry.cos, geometry.sq_w, geometry.sq_s, probs

  # chunk j holds pairs j, j + chunks, ...: a strided split, as pair_fraction's
  split = lambda a: a.reshape(pairs // chunks, chunks, *a.shape[1:]).swapaxes(0, 1)
  merge = lambda a: a.swapaxes(0, 1).reshape(pairs, *a.shape[2:])
  out = jax.lax.map(lambda views: one_chunk(ctx.params, views), (split(weak), split(strong)))
  return tuple(merge(a) for a in out)


def scope_of(cfg: ml_collections.ConfigDict, params: Any):
  """The ``consistency.scope`` as a scope callable (None: every parameter), checked."""
  scope = _scope(cfg.scope)
  if scope is not None and not any(jax.tree.leaves(scope(params))):
    raise ValueError(f"consistency.scope = {cfg.scope!r} selects no parameter of this model "
                     "(it needs a 'backbone' with layers besides its classifier 'fc'); set "
                     "consistency.scope='all' or use a backbone model.")
  return scope


def gradient_consistency(ctx: LossContext, pair: ViewPair, cfg: ml_collections.ConfigDict,
                         forward_stats: dict | None = None, base_losses: Callable | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """``(terms, GC, confident, base)``, the first three ``(P,)``: ``terms = m_u (1 - GC(u))
  / P`` (or ``m_u (||g_w(u)||^2 + ||g_s(u)||^2) / (2 P)`` with ``penalty="grad_norm"``),
  over every ``k``-th image of the batch for ``pair_fraction = 1 / k``
  (:func:`pair_stride`; all by default), ``P`` of them. The sampler draws the batch at
  random, so ``k > 1`` gives an unbiased estimate of ``L_g`` and of its gradient, at about
  ``1 / k`` of the geometry's cost.

  With ``base_losses`` (``ctx -> Losses``, one forward of ``pair.forward``: see
  :func:`shares_the_forward`) the geometry is measured on that forward itself and
  ``base`` is its result; otherwise ``base`` is None."""
  stride = pair_stride(cfg.pair_fraction) or 1
  key = jax.random.fold_in(ctx.rng, 17) if ctx.rng is not None else jax.random.PRNGKey(0)
  options = dict(method=cfg.method, scope=scope_of(cfg, ctx.params),
                 microbatch=cfg.microbatch or None, key=key, sketch_dim=cfg.sketch_dim,
                 sketch_chunk=cfg.sketch_chunk or None, remat=REMAT[cfg.remat],
                 statistics=cfg.statistics, has_aux=True)
  base = None
  if base_losses is not None:
    rows = _view_rows(ctx, pair)

    def losses_fn(params):
      out, logits = _with_logits(base_losses, dataclasses.replace(ctx, params=params))
      view_losses, probs = _view_losses(logits[0], *rows)
      return view_losses, (probs, out)

    geometry, (probs, base) = consistency.view_geometry(losses_fn, ctx.params,
                                                        view_rows=rows, **options)
    gc, sq_w, sq_s = geometry.cos, geometry.sq_w, geometry.sq_s
  elif cfg.pair_chunks > 1:
    gc, sq_w, sq_s, probs = _chunked_exact_geometry(ctx, pair, cfg, stride, forward_stats)
  else:
    pl = pair_losses(ctx, pair, one_sample=cfg.method == "vmap", stride=stride,
                     forward_stats=forward_stats, statistics=cfg.statistics)
    geometry, probs = consistency.view_geometry(
        pl.losses_fn, ctx.params, view_rows=pl.rows, sample_fn=pl.sample_fn,
        samples=pl.samples, **options)
    gc, sq_w, sq_s = geometry.cos, geometry.sq_w, geometry.sq_s
  confident = jnp.max(probs, axis=-1) > cfg.tau
  weight = confident.astype(gc.dtype) if cfg.mask == "confident" else jnp.ones_like(gc)
  per_sample = (1.0 - gc) if cfg.penalty == "cosine" else (sq_w + sq_s) / 2
  return weight * per_sample / gc.shape[0], gc, confident, base


def _with_logits(losses: Callable, ctx: LossContext):
  """``losses(ctx)`` and the logits of every call of the top module in it."""
  logits = []

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and not tuple(context.module.path):
      logits.append(out["logits"] if isinstance(out, dict) and "logits" in out else None)
    return out

  with nn.intercept_methods(capture):
    result = losses(ctx)
  return result, logits


def _view_rows(ctx: LossContext, pair: ViewPair) -> tuple[slice, slice]:
  """The weak and the strong view's rows in the joint forward of ``pair.forward``."""
  sizes = [ctx.batch[name].shape[0] for name in pair.forward]
  starts = {name: sum(sizes[:i]) for i, name in enumerate(pair.forward)}
  size = ctx.batch[pair.weak].shape[0]
  return tuple(slice(starts[name], starts[name] + size) for name in (pair.weak, pair.strong))


def shares_the_forward(losses: Callable, ctx: LossContext, pair: ViewPair) -> bool:
  """Whether ``losses(ctx)`` is one forward of ``pair.forward`` (the top module called
  once, on those rows, returning logits, and no layer called twice), so that GGCR can
  measure its geometry on that forward and differentiate both in one backward pass."""
  rows = sum(ctx.batch[name].shape[0] for name in pair.forward)
  calls: dict[tuple, int] = {}
  top_rows: list = []

  def count(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      path = tuple(context.module.path)
      calls[path] = calls.get(path, 0) + 1
      if not path:
        top_rows.append(jnp.shape(args[0])[0] if args else None)
    return next_fun(*args, **kwargs)

  def probe(params):
    with nn.intercept_methods(count):
      result, logits = _with_logits(losses, dataclasses.replace(ctx, params=params))
    return result, [l for l in logits if l is not None]

  _, logits = jax.eval_shape(probe, ctx.params)
  return top_rows == [rows] and len(logits) == 1 and max(calls.values()) == 1


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
    if shared:
      pass
    elif (stride > 1 or ccfg.pair_chunks > 1) and ccfg.method != "vmap":
      # a subset or a chunk reuses the base forward's statistics
      rows = sum(ctx.batch[name].shape[0] for name in pair.forward)
      out, forward_stats = consistency.single_forward_statistics(base.losses, rows, ctx)
    else:
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
ALGORITHM = GGCR
COMPOSITIONS = {"fixmatch": GGCR.name, "iomatch": IOMATCH_GGCR.name,
                "openmatch": OPENMATCH_GGCR.name}  # base algorithm -> its GGCR composition
