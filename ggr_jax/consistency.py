"""Per-sample gradient geometry between two views of the same samples.

For sample ``i`` with a weak-view loss ``l^w_i(theta)`` and a strong-view loss
``l^s_i(theta)``, and their gradients restricted to a scope (a subset of the parameters),
``g^w_i`` and ``g^s_i``, this module computes

    dot_i = <g^w_i, g^s_i>,   sq_w_i = ||g^w_i||^2,   sq_s_i = ||g^s_i||^2,
    cos_i = dot_i / sqrt(sq_w_i * sq_s_i),

three ways to the same numbers, each differentiable, so that ``jax.grad`` of a loss built
on them (GGCR's ``1 - cos``) carries the second-order term through the per-sample
gradients:

* ``"vmap"``: the reference definition. Every per-sample gradient is materialised:
  ``jax.vmap(jax.grad(...))`` of a one-sample loss function (``sample_fn``, normalised
  with the batch's statistics and dropped with its dropout masks, both replayed) or, for
  any batch function, one vmapped VJP per row of the batch Jacobian; ``microbatch`` at a
  time, ``2B x P`` memory.
* ``"exact"``: no per-sample gradient is materialised. A layer's per-sample gradient
  is a sum of outer products of its inputs ``a`` and output cotangents ``d`` over
  positions ``p``, ``G_i = sum_p a_ip d_ip^T``, so ``<G^w_i, G^s_i> =
  sum_pq <a^w_ip, a^s_iq> <d^w_ip, d^s_iq>``: a Gram-matrix product (the "ghost" inner
  product), or ``G_i`` itself where that is smaller (per layer, whichever costs less).
  Biases and normalisation scales are per-channel sums. One forward and one backward
  of the batch give every ``a`` and ``d``.
* ``"sketch"``: a random-projection estimate from ``k`` random directions ``v_j``
  (``N(0, I/k)`` on the scope): the sketches ``<g_i, v_j>`` come from one linearised
  forward (JVPs), and their inner products estimate the exact ones (unbiased for
  ``dot``; the cosine of the sketches has an error of order ``1/sqrt(k)``).

``losses_fn(params) -> (loss_w, loss_s)`` returns the ``(B,)`` per-sample losses of one
batch forward. Per-sample gradients need independent rows: a BatchNorm layer in train
mode couples them through its batch statistics, so every method evaluates ``losses_fn``
under :func:`frozen_batch_statistics`, which holds the batch mean and variance constant:
``g_i`` is then the gradient of sample ``i``'s own loss with the batch's statistics
fixed, what ``jax.vmap(jax.grad(one_sample_loss))`` computes over a forward that
normalises with the batch statistics. ``statistics`` says what a gradient of the
geometry (the second-order term) does with them: ``"held"`` keeps them constant there
too (``stop_gradient``); ``"through"`` differentiates them (the geometry is a function
of the parameters through the batch statistics as well, and its gradient is the total
derivative, as a loss's on the same forward is). Both give the same ``g_i`` and values.

The exact method reads the layers of Flax modules called inside ``losses_fn``:
``nn.Dense``, ``nn.Conv`` (any strides, padding given as a string or pairs, dilation;
one feature group) and normalisation layers exposing ``batch_statistics`` and
``normalize`` methods (:class:`ggr_jax.models.layers.BatchNorm`). Their parameters must
sit in ``params`` at the module's path (``params`` is the ``"params"`` collection of the
top module); every scoped parameter must belong to such a layer, called once, or the
method says which one is not and that ``"vmap"`` handles any model.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from ggr_jax import layer_geometry, per_sample

PyTree = Any
LossesFn = Callable[[PyTree], tuple[jax.Array, jax.Array]]
SampleFn = Callable[[PyTree, PyTree], tuple[jax.Array, jax.Array]]
METHODS = ("exact", "vmap", "sketch")
STATISTICS = ("held", "through")
# inside replayed_batch_statistics: the replayed statistics are already held as it says
_REPLAYING = contextvars.ContextVar("replaying_batch_statistics", default=False)


class ViewGeometry(NamedTuple):
  """Per-sample inner product and squared norms of the two views' gradients, ``(B,)`` each."""

  dot: jax.Array
  sq_w: jax.Array
  sq_s: jax.Array

  @property
  def cos(self) -> jax.Array:
    """``dot / sqrt(sq_w * sq_s)``; 0 where a gradient vanishes."""
    product = self.sq_w * self.sq_s
    positive = product > 0  # guarded twice, so that no inf or NaN enters a gradient
    return jnp.where(positive, self.dot / jnp.sqrt(jnp.where(positive, product, 1.0)), 0.0)


def _is_normalization(module: nn.Module) -> bool:
  return callable(getattr(module, "batch_statistics", None)) and callable(
      getattr(module, "normalize", None))


@jax.custom_jvp
def held_for_first_derivative(x: PyTree) -> PyTree:
  """The identity, whose innermost derivative is zero and whose higher ones are the
  identity's: inside one more differentiation (a per-sample gradient's), the enclosing
  one (the step's gradient) still differentiates ``x``.

  "Innermost" is the innermost differentiation that ``x`` depends on: a value that does
  not depend on the inner variable gets a zero derivative from the enclosing one (use
  the identity there: the inner derivative does not reach it anyway).
  """
  return x


@held_for_first_derivative.defjvp
def _held_jvp(primals, tangents):
  del tangents
  (x,) = primals
  return x, jax.tree.map(jnp.zeros_like, x)


def _holder(statistics: str) -> Callable[[PyTree], PyTree]:
  if statistics not in STATISTICS:
    raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}.")
  if statistics == "held":
    return lambda tree: jax.tree.map(jax.lax.stop_gradient, tree)
  return held_for_first_derivative


@contextlib.contextmanager
def frozen_batch_statistics(statistics: str = "held"):
  """Inside, normalisation layers hold their batch statistics constant.

  The forward values are unchanged; the first derivative through the batch mean and
  variance is cut, which makes the rows of a batch forward independent. ``"held"`` cuts
  every derivative through them (``stop_gradient``); ``"through"`` only the innermost
  (:func:`held_for_first_derivative`), so that the gradient of a function of the rows'
  gradients still reaches the statistics.
  """
  hold = _holder(statistics)

  def freeze(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == "batch_statistics" and _is_normalization(context.module)
        and not _REPLAYING.get()):
      return hold(out)
    return out

  with nn.intercept_methods(freeze):
    yield


def _recorded(fn: Callable[..., Any], args, kwargs) -> tuple[Any, dict, dict]:
  """``fn``'s output, its normalisation layers' statistics and their inputs' row counts."""
  stats: dict[tuple, Any] = {}
  rows: dict[tuple, int | None] = {}

  def record(next_fun, args_, kwargs_, context):
    out = next_fun(*args_, **kwargs_)
    if context.method_name == "batch_statistics" and _is_normalization(context.module):
      path = tuple(context.module.path)
      key = (path, sum(k[0] == path for k in stats))
      stats[key] = out
      rows[key] = jnp.shape(args_[0])[0] if args_ else None  # unknown if passed by name
    return out

  with nn.intercept_methods(record):
    out = fn(*args, **kwargs)
  return out, stats, rows


def recorded_batch_statistics(fn: Callable[..., Any], *args, **kwargs
                              ) -> tuple[Any, dict[tuple, Any]]:
  """``fn(*args, **kwargs)`` and the batch statistics its normalisation layers computed,
  keyed by ``(module path, call number)``, for :func:`replayed_batch_statistics`."""
  out, stats, _ = _recorded(fn, args, kwargs)
  return out, stats


def single_forward_statistics(fn: Callable[..., Any], rows: int, *args, **kwargs
                              ) -> tuple[Any, dict[tuple, Any] | None]:
  """``fn(*args, **kwargs)`` and, if it ran each normalisation layer once on ``rows``
  rows (one forward of a batch of that size), their statistics for
  :func:`replayed_batch_statistics`; None otherwise (or with no such layer)."""
  out, stats, counts = _recorded(fn, args, kwargs)
  one_forward = stats and all(number == 0 for _, number in stats) and all(
      count == rows for count in counts.values())
  return out, stats if one_forward else None


def recorded_dropout_masks(fn: Callable[..., Any], *args, **kwargs
                           ) -> tuple[Any, dict[tuple, jax.Array]]:
  """``fn(*args, **kwargs)`` and the dropout masks its modules drew, keyed by ``(module
  path, call number)``: the outputs of every module method named ``keep_mask`` (the
  convention of :class:`ggr_jax.models.convlarge.ChannelDropout`, rows first), for
  :func:`replayed_dropout_masks`."""
  masks: dict[tuple, jax.Array] = {}

  def record(next_fun, args_, kwargs_, context):
    out = next_fun(*args_, **kwargs_)
    if context.method_name == "keep_mask":
      path = tuple(context.module.path)
      masks[(path, sum(k[0] == path for k in masks))] = out
    return out

  with nn.intercept_methods(record):
    out = fn(*args, **kwargs)
  return out, masks


@contextlib.contextmanager
def replayed_dropout_masks(masks: dict[tuple, jax.Array]):
  """Inside, each ``keep_mask`` returns ``masks`` (rows of those recorded by
  :func:`recorded_dropout_masks`) instead of drawing, so that a forward of one sample
  drops what the recorded batch forward dropped for its rows."""
  calls: dict[tuple, int] = {}

  def replay(next_fun, args, kwargs, context):
    if context.method_name != "keep_mask":
      return next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    number = calls.get(path, 0)
    calls[path] = number + 1
    mask = masks.get((path, number))
    shape = tuple(args[0]) if args else tuple(kwargs.get("shape", ()))
    if mask is None or tuple(mask.shape) != shape:
      raise ValueError(f"replayed dropout masks: {'/'.join(path)} call {number} asks for a "
                       f"mask of shape {shape}, recorded: "
                       f"{None if mask is None else tuple(mask.shape)}; replay rows of the "
                       "recorded forward, one per row of this one.")
    return mask

  with nn.intercept_methods(replay):
    yield


@contextlib.contextmanager
def replayed_batch_statistics(stats: dict[tuple, Any], statistics: str = "held"):
  """Inside, normalisation layers use ``stats`` (from :func:`recorded_batch_statistics`)
  in place of their own batch's statistics, so that a forward of one sample normalises
  it exactly as the recorded batch forward did. They come from another forward, so no
  per-sample derivative reaches them; ``"held"`` also cuts every other
  (``stop_gradient``), ``"through"`` none."""
  hold = (lambda tree: tree) if statistics == "through" else _holder(statistics)
  calls: dict[tuple, int] = {}

  def replay(next_fun, args, kwargs, context):
    if context.method_name != "batch_statistics" or not _is_normalization(context.module):
      return next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    number = calls.get(path, 0)
    calls[path] = number + 1
    if (path, number) not in stats:
      raise ValueError(f"replayed batch statistics: {'/'.join(path)} call {number} was not "
                       "recorded; record the same forward that is replayed.")
    return hold(stats[(path, number)])

  token = _REPLAYING.set(True)
  try:
    with nn.intercept_methods(replay):
      yield
  finally:
    _REPLAYING.reset(token)


def view_geometry(losses_fn: LossesFn, params: PyTree, *, method: str = "exact",
                  scope: PyTree | Callable[[PyTree], PyTree] | None = None,
                  view_rows: tuple[jax.Array | slice, jax.Array | slice] | None = None,
                  microbatch: int | None = None, key: jax.Array | None = None,
                  sketch_dim: int = 64, sketch_chunk: int | None = None,
                  remat: bool | None = None, statistics: str = "held",
                  sample_fn: SampleFn | None = None,
                  samples: PyTree = None, has_aux: bool = False
                  ) -> ViewGeometry | tuple[ViewGeometry, Any]:
  """:class:`ViewGeometry` of the two views' per-sample gradients over ``scope``.

  Args:
    losses_fn: ``params -> (loss_w, loss_s)``, ``(B,)`` per-sample losses of one batch
      forward (see the module docstring).
    params: the parameters (for ``"exact"``, the top module's ``"params"`` collection).
    method: ``"exact"``, ``"vmap"`` or ``"sketch"``.
    scope: ``None`` (every parameter), a params-shaped tree of bools, or
      ``params -> bools``.
    view_rows: ``"exact"`` only: the rows of the weak and the strong view of each
      sample in the layers' batch (``(B,)`` int arrays, or static slices, which are
      cheaper to differentiate; default: the batch is ``[weak views; strong
      views]``). Other rows (e.g. labeled images sharing the forward) are ignored.
    microbatch: ``"vmap"`` only: samples (with ``sample_fn``) or rows (without) per
      vmapped step (must divide their number).
    key: ``"sketch"`` only: the PRNG key of the random directions.
    sketch_dim: ``"sketch"`` only: the number ``k`` of random directions.
    sketch_chunk: ``"sketch"`` only: directions per pass of the linearised forward
      (None: all ``k`` at once; fewer hold fewer tangent activations, same result).
    remat: ``"exact"`` only: rebuild each convolution's patches (``kh * kw`` times its
      input, for the views' rows) in the backward rather than keep them for it (None:
      everywhere but on the CPU). WRN-28-2 at the paper batch on an H200: 29% less
      memory for 15% more time; on the CPU it saves nothing and costs about 7%
      (experiments/README.md). Same numbers either way.
    statistics: ``"held"`` or ``"through"``: whether a gradient of the result
      differentiates the normalisation layers' batch statistics (the module docstring);
      ``sample_fn`` must replay them in the same way.
    sample_fn: ``"vmap"`` only: ``(params, sample) -> (loss_w, loss_s)``, the two scalar
      losses of ONE sample, normalised as in the batch forward (e.g. under
      :func:`replayed_batch_statistics`); with it the per-sample gradients are
      ``jax.vmap(jax.grad(...))`` over ``samples`` (a pytree with a leading sample
      axis): the reference definition at the cost of one batch backward. Without it,
      each gradient is a row of the batch Jacobian of ``losses_fn`` (a backward pass
      of the whole batch per row: any function, quadratic in the batch size).
    has_aux: ``losses_fn`` returns ``((loss_w, loss_s), aux)``, and the result is
      ``(geometry, aux)``: values of the same forward (e.g. the pseudo-labels'
      probabilities), at no extra cost for ``"exact"`` and ``"sketch"``; ``"vmap"``
      evaluates ``losses_fn`` once more for them.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import linen as nn
    >>> net = nn.Dense(2)
    >>> params = net.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
    >>> x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    >>> def losses(p):
    ...   out = net.apply({"params": p}, jnp.concatenate([x, 2 * x]))
    ...   return out[:4, 0] ** 2, out[4:, 0] ** 2
    >>> exact = view_geometry(losses, params)
    >>> rows = view_geometry(losses, params, method="vmap")
    >>> bool(jnp.allclose(exact.cos, rows.cos, atol=1e-5))
    True
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  _holder(statistics)
  mask = _scope_mask(scope, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError("view_geometry: the scope selects no parameter; per-sample gradients "
                     "over an empty scope have no direction (check the scope's prefix).")

  if method == "sketch" and key is None:
    raise ValueError("method='sketch' needs key=PRNGKey for its random directions.")
  if method == "sketch" and (not isinstance(sketch_dim, int) or sketch_dim < 1):
    raise ValueError(f"sketch_dim must be a positive integer, got {sketch_dim!r}.")

  def frozen(p):  # -> ((loss_w, loss_s), aux)
    with frozen_batch_statistics(statistics):
      out = losses_fn(p)
    return out if has_aux else (out, None)

  if method == "vmap":
    geometry = _by_samples(sample_fn, params, mask, samples, microbatch) \
        if sample_fn is not None else _by_rows(lambda p: frozen(p)[0], params, mask, microbatch)
    aux = frozen(params)[1] if has_aux else None
  elif method == "sketch":
    geometry, aux = _by_sketch(frozen, params, mask, key, sketch_dim, sketch_chunk)
  else:
    *sums, aux = layer_geometry.view_geometry_from_layers(
        frozen, params, mask, view_rows,
        jax.default_backend() != "cpu" if remat is None else remat)
    geometry = ViewGeometry(*sums)
  return (geometry, aux) if has_aux else geometry


def _scope_mask(scope, params: PyTree) -> PyTree:
  if scope is None:
    return jax.tree.map(lambda _: True, params)
  mask = scope(params) if callable(scope) else scope
  try:
    jax.tree.structure(params).flatten_up_to(mask)
  except (ValueError, TypeError) as err:
    raise ValueError("view_geometry: scope must be a pytree of bools with the structure of "
                     f"params (or a callable returning one): {err}") from None
  return jax.tree.map(bool, mask)


def _masked(tree: PyTree, mask: PyTree) -> list:
  return [leaf for leaf, keep in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if keep]


def _by_rows(losses_fn: LossesFn, params: PyTree, mask: PyTree,
             microbatch: int | None) -> ViewGeometry:
  stacked = lambda p: jnp.concatenate(losses_fn(p))
  rows = per_sample.jacobian_rows(stacked, params, microbatch=microbatch)
  leaves = [r.reshape(r.shape[0], -1) for r in _masked(rows, mask)]
  flat = jnp.concatenate(leaves, axis=1)
  g_w, g_s = jnp.split(flat, 2)
  return ViewGeometry(dot=jnp.sum(g_w * g_s, 1), sq_w=jnp.sum(g_w * g_w, 1),
                      sq_s=jnp.sum(g_s * g_s, 1))


def _by_samples(sample_fn: SampleFn, params: PyTree, mask: PyTree, samples: PyTree,
                microbatch: int | None) -> ViewGeometry:
  def one(sample):
    g_w = jax.grad(lambda p: sample_fn(p, sample)[0])(params)
    g_s = jax.grad(lambda p: sample_fn(p, sample)[1])(params)
    pairs = list(zip(_masked(g_w, mask), _masked(g_s, mask)))
    return (sum(jnp.vdot(a, b) for a, b in pairs), sum(jnp.vdot(a, a) for a, _ in pairs),
            sum(jnp.vdot(b, b) for _, b in pairs))

  count = jax.tree.leaves(samples)[0].shape[0]
  if not microbatch or microbatch >= count:
    return ViewGeometry(*jax.vmap(one)(samples))
  if count % microbatch:
    raise ValueError(f"microbatch={microbatch} must divide the {count} samples.")
  chunks = jax.tree.map(lambda a: a.reshape(count // microbatch, microbatch, *a.shape[1:]),
                        samples)
  return ViewGeometry(*(v.reshape(count) for v in jax.lax.map(jax.vmap(one), chunks)))


def _by_sketch(losses_fn: Callable, params: PyTree, mask: PyTree, key: jax.Array,
               k: int, chunk: int | None) -> tuple[ViewGeometry, Any]:
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  directions = treedef.unflatten([
      jax.random.normal(kk, (k, *p.shape), jnp.promote_types(p.dtype, jnp.float32))
      / jnp.sqrt(k) * m for kk, p, m in zip(keys, leaves, jax.tree.leaves(mask))])
  stacked = lambda p: (lambda out: (jnp.concatenate(out[0]), out[1]))(losses_fn(p))
  sketches, aux = per_sample.sample_dots(stacked, params, directions, has_aux=True,
                                         chunk=chunk)  # (2B, k)
  s_w, s_s = jnp.split(sketches, 2)
  return ViewGeometry(dot=jnp.sum(s_w * s_s, 1), sq_w=jnp.sum(s_w * s_w, 1),
                      sq_s=jnp.sum(s_s * s_s, 1)), aux
