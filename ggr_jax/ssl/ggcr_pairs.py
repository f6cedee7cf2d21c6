"""The per-pair geometry GGCR differentiates, on the views' forward (:mod:`ggr_jax.ssl.ggcr`).

:func:`gradient_consistency` measures ``L_g``'s per-pair terms in one of three ways: on the
base algorithm's own forward (:func:`shares_the_forward`, batch statistics "through"),
on a forward of the pairs of its own (:func:`pair_losses`: every pair, or every ``k``-th
normalised with the joint forward's replayed statistics), or in chunks of pairs one
after the other (``pair_chunks``).
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
from ggr_jax.ssl.interface import LossContext, ViewPair

# consistency.remat -> view_geometry(remat=): "auto" rebuilds patches except on the CPU
REMAT = {"auto": None, "on": True, "off": False}

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
  sample_fn: Callable | None  # (params, (x_w, x_s, yhat, masks)) -> one sample's two losses
  samples: tuple | None  # (x_w, x_s, yhat, dropout masks), one per row


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
  normalised with the batch statistics of that joint forward and dropping what its
  dropout dropped for the sample's rows (both recorded in one more forward with the
  same dropout key, then replayed), so that both give the same per-sample losses. With
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
    outputs, stats, masks = _joint_statistics(ctx, x, statistics)
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
  strong_rows = slice(start_s, start_s + size, every)
  yhat = jnp.argmax(jax.lax.stop_gradient(outputs["logits"][weak_rows]), axis=-1)
  # each sample's two rows of the joint forward's dropout masks: (pairs, 2, ...)
  sample_masks = {key: jnp.stack([m[weak_rows], m[strong_rows]], axis=1)
                  for key, m in masks.items()}

  def sample_fn(params, sample):
    x_w, x_s, label, drop = sample
    with consistency.replayed_batch_statistics(stats, statistics), \
        consistency.replayed_dropout_masks(drop):
      out = ctx.apply_fn(params, ctx.model_state, jnp.stack([x_w, x_s]), True)[0]["logits"]
    return ce(out[0], label), ce(out[1], label)

  return PairLosses(losses_fn, (rows_w, rows_s), sample_fn,
                    (batch[pair.weak][::every], batch[pair.strong][::every], yhat,
                     sample_masks))


def _joint_statistics(ctx: LossContext, x: jax.Array, statistics: str):
  """The outputs, the recorded batch statistics and dropout masks of a train-mode
  forward of ``x`` (a recording forward of its own; without gradient unless
  ``statistics="through"``)."""
  params = ctx.params if statistics == "through" else jax.lax.stop_gradient(ctx.params)
  ((outputs, _), stats), masks = consistency.recorded_dropout_masks(
      consistency.recorded_batch_statistics, ctx.apply_fn, params, ctx.model_state, x, True)
  return outputs, stats, masks


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
    _, stats, _ = _joint_statistics(
        ctx, jnp.concatenate([ctx.batch[n] for n in pair.forward]), cfg.statistics)
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
  measure its geometry on that forward and differentiate both in one backward pass.
  The rows are taken in ``pair.forward``'s order, as :class:`ViewPair` promises."""
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
