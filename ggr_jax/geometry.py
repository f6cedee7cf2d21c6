"""Pure pytree geometry for gradient rectification.

Everything here acts on arrays or on pytrees of arrays, treating a whole pytree as
one vector (the concatenation of its leaves). Nothing here imports optax.

A *basis* is a pytree whose leaves carry a leading axis ``k``: slot ``j`` of every
leaf together forms the ``j``-th direction. A flat basis is an array of shape
``(k, D)``. Unused slots are all-zero and contribute nothing to any projection.

Inner products are accumulated in at least float32 (bfloat16 and float16 inputs are
upcast) at ``Precision.HIGHEST``; outputs keep the dtype of the input they replace.

Example:
  >>> import jax.numpy as jnp
  >>> from ggr_jax import geometry
  >>> g_aux, g_sup = jnp.array([-1.0, 1.0]), jnp.array([1.0, 0.0])
  >>> geometry.halfspace_project(g_aux, g_sup)
  Array([0., 1.], dtype=float32)
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
BasisSigns = Literal["oriented", "qr"]

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(tree: PyTree) -> jnp.dtype:
  """The float dtype the geometry of ``tree`` is computed in (>= float32)."""
  dtypes = [leaf.dtype for leaf in jax.tree.leaves(tree)]
  return jnp.result_type(jnp.float32, *dtypes)


def _upcast(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """``<a, b>``: the inner product of two same-structured pytrees, a scalar."""
  leaves_a, treedef = jax.tree.flatten(a)
  leaves_b = treedef.flatten_up_to(b)
  dtype = jnp.result_type(compute_dtype(a), compute_dtype(b))
  total = jnp.zeros((), dtype)
  for x, y in zip(leaves_a, leaves_b):
    total = total + jnp.vdot(_upcast(x).ravel(), _upcast(y).ravel(), precision=_HIGHEST)
  return total


def tree_sq_norm(a: PyTree) -> jax.Array:
  """``||a||^2`` over all leaves of ``a``."""
  return tree_vdot(a, a)


def tree_norm(a: PyTree) -> jax.Array:
  """``||a||`` over all leaves of ``a``."""
  return jnp.sqrt(tree_sq_norm(a))


def tree_axpy(scale: jax.Array, x: PyTree, y: PyTree) -> PyTree:
  """``y + scale * x`` computed in >= float32 and returned in the dtypes of ``y``."""
  return jax.tree.map(lambda xi, yi: (_upcast(yi) + scale * _upcast(xi)).astype(yi.dtype), x, y)


def halfspace_project(src: PyTree, ref: PyTree, alpha: Any = 1.0, eps: float = 1e-12) -> PyTree:
  """Moves ``src`` towards the half-space ``{x : <x, ref> >= 0}``.

  .. math::
    d = \\langle s, r \\rangle,\\qquad
    s' = s - \\alpha\\,\\frac{\\min(d, 0)}{\\max(\\lVert r\\rVert^2, \\epsilon)}\\, r

  The conflict test is strict: ``d == 0`` (orthogonal or zero inputs) leaves ``src``
  unchanged. With ``alpha=1`` and ``||ref||^2 >= eps`` the result is orthogonal to
  ``ref``; with ``alpha < 1`` the conflict is reduced to ``(1 - alpha) d``. A NaN or
  Inf in either input yields a non-finite result, never a finite one.

  Args:
    src: the vector (array or pytree) to rectify.
    ref: the anchor direction, same structure as ``src``.
    alpha: step scale of the projection.
    eps: lower clamp of ``||ref||^2``.

  Returns:
    The rectified ``src``, with its dtypes.

  Example:
    >>> import jax.numpy as jnp
    >>> halfspace_project({"w": jnp.array([-2.0, 1.0])}, {"w": jnp.array([1.0, 1.0])})
    {'w': Array([-1.5,  1.5], dtype=float32)}
  """
  d = tree_vdot(src, ref)
  ref_sq = tree_sq_norm(ref)
  coef = jnp.where(d < 0, alpha * d / jnp.maximum(ref_sq, eps), jnp.zeros_like(d))
  return tree_axpy(-coef, ref, src)


def basis_coefficients(g: PyTree, basis: PyTree) -> jax.Array:
  """``U^T g``: the coefficients of ``g`` on every basis slot, shape ``(k,)``."""
  leaves_g, treedef = jax.tree.flatten(g)
  leaves_u = treedef.flatten_up_to(basis)
  dtype = jnp.result_type(compute_dtype(g), compute_dtype(basis))
  k = leaves_u[0].shape[0]
  total = jnp.zeros((k,), dtype)
  for gl, ul in zip(leaves_g, leaves_u):
    total = total + jnp.matmul(_upcast(ul).reshape(k, -1), _upcast(gl).ravel(), precision=_HIGHEST)
  return total


def basis_combination(coeffs: jax.Array, basis: PyTree, like: PyTree) -> PyTree:
  """``U c``: the vector ``sum_j c_j u_j``, shaped like ``like`` (>= float32)."""

  def combine(ul, gl):
    flat = jnp.matmul(coeffs, _upcast(ul).reshape(ul.shape[0], -1), precision=_HIGHEST)
    return flat.reshape(gl.shape)

  leaves_g, treedef = jax.tree.flatten(like)
  leaves_u = treedef.flatten_up_to(basis)
  return treedef.unflatten([combine(ul, gl) for ul, gl in zip(leaves_u, leaves_g)])


def _subtract(g: PyTree, v: PyTree) -> PyTree:
  return jax.tree.map(lambda gi, vi: (_upcast(gi) - vi).astype(gi.dtype), g, v)


def orthogonal_project(g: PyTree, basis: PyTree) -> PyTree:
  """Removes the span of an orthonormal basis: ``g - U U^T g``.

  Example:
    >>> import jax.numpy as jnp
    >>> orthogonal_project(jnp.array([3.0, -2.0, 1.0]), jnp.array([[1.0, 0.0, 0.0]]))
    Array([ 0., -2.,  1.], dtype=float32)
  """
  return _subtract(g, basis_combination(basis_coefficients(g, basis), basis, g))


def conic_project(g: PyTree, basis: PyTree) -> PyTree:
  """Removes only the negative basis components: ``g - U min(U^T g, 0)``.

  For an orthonormal basis the result has non-negative coefficients on every
  direction (it is the projection onto the cone ``{x : U^T x >= 0}``), so it never
  opposes any basis direction. The result depends on the signs of the directions.

  Example:
    >>> import jax.numpy as jnp
    >>> basis = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> conic_project(jnp.array([3.0, -2.0, 1.0]), basis)
    Array([3., 0., 1.], dtype=float32)
  """
  coeffs = basis_coefficients(g, basis)
  return _subtract(g, basis_combination(jnp.minimum(coeffs, 0), basis, g))


# ----------------------------------------------------------------------------------
# Subspace tracker


class SubspaceUpdate(NamedTuple):
  """Result of :func:`subspace_update`."""

  basis: PyTree  # the new basis (same structure and shapes as the old one)
  size: jax.Array  # int32, number of valid slots (the newest is at ``size - 1``)
  accepted: jax.Array  # bool, False when the input was degenerate and skipped


def empty_basis(like: PyTree, k: int, dtype: Any = None) -> PyTree:
  """An all-zero basis of ``k`` slots for vectors shaped like ``like``."""

  def zeros(leaf):
    return jnp.zeros((k, *jnp.shape(leaf)), dtype or jnp.promote_types(leaf.dtype, jnp.float32))

  return jax.tree.map(zeros, like)


def _flatten_basis(basis: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(basis)
  k = leaves[0].shape[0]
  return jnp.concatenate([leaf.reshape(k, -1) for leaf in leaves], axis=1)


def _unflatten_basis(flat: jax.Array, like_basis: PyTree) -> PyTree:
  leaves, treedef = jax.tree.flatten(like_basis)
  out, start = [], 0
  for leaf in leaves:
    size = leaf[0].size
    out.append(flat[:, start:start + size].reshape(leaf.shape).astype(leaf.dtype))
    start += size
  return treedef.unflatten(out)


def _householder_requalify(basis: PyTree, size: jax.Array) -> PyTree:
  """Replaces the valid slots by Q of a Householder QR (LAPACK signs), in slot order."""
  flat = _flatten_basis(basis)  # (k, D)
  k, dim = flat.shape
  q = jnp.linalg.qr(flat.T, mode="reduced")[0].T  # (min(k, D), D)
  if q.shape[0] < k:
    q = jnp.concatenate([q, jnp.zeros((k - q.shape[0], dim), q.dtype)], axis=0)
  valid = (jnp.arange(k) < size)[:, None]
  return _unflatten_basis(jnp.where(valid, q, 0), basis)


def _residual(v_hat: PyTree, basis: PyTree, passes: int) -> PyTree:
  w = v_hat
  for _ in range(passes):
    w = jax.tree.map(jnp.subtract, w, basis_combination(basis_coefficients(w, basis), basis, w))
  return w


def default_span_tol(dtype: Any) -> float:
  """Residual norm (of a unit vector) below which it counts as inside the span."""
  return float(np.sqrt(np.finfo(dtype).eps))


def subspace_update(
    basis: PyTree,
    size: jax.Array,
    v: PyTree,
    *,
    signs: BasisSigns = "oriented",
    eps: float = 1e-12,
    span_tol: float | None = None,
) -> SubspaceUpdate:
  """Adds the direction of ``v`` to a sliding window of ``k`` orthonormal directions.

  With ``v_hat = v / ||v||`` and ``U`` the current valid directions (oldest first):

  1. the residual ``w = v_hat - U U^T v_hat`` is normalised and appended as the
     newest direction (the first direction is ``v_hat`` itself);
  2. when all ``k`` slots are full, the oldest direction is dropped first, so the
     window holds the newest ``k`` *residuals* (not the span of the last ``k``
     inputs), exactly like the official tracker.

  ``signs`` picks how directions are kept orthonormal and signed:

  * ``"oriented"`` (default): the residual is taken twice (classical Gram-Schmidt
    with re-orthogonalisation), so every direction is orthonormal to working
    precision and keeps a positive inner product with the residual that created it,
    on every backend. No QR is needed.
  * ``"qr"``: the official recipe. One Gram-Schmidt pass, then every update after
    the first replaces the valid directions by ``Q`` of a Householder QR. ``Q`` has
    LAPACK's column signs (numpy, and jax on CPU, match the official PyTorch CPU
    numbers), which flip directions in about half of the updates.

  Degenerate input is skipped, not stored: a non-finite ``v``, a ``v`` with
  ``||v|| < eps``, or a ``v`` whose unit residual against the current span is below
  ``span_tol`` (default ``sqrt(finfo(dtype).eps)``: 3.5e-4 in float32, 1.5e-8 in
  float64). The official tracker instead stores a zero or rounding-noise column
  that QR turns into an arbitrary direction. ``accepted`` reports the decision.

  Every branch is traced (``jnp.where``), so this is safe under ``jax.jit``.

  Args:
    basis: pytree whose leaves have a leading axis ``k`` (flat: ``(k, D)``).
    size: number of valid slots, an int32 scalar in ``[0, k]``.
    v: the new vector, shaped like one slot of ``basis``.
    signs: ``"oriented"`` or ``"qr"``.
    eps: norm clamp; also the threshold under which ``v`` counts as zero.
    span_tol: residual threshold under which ``v`` counts as inside the span.

  Returns:
    :class:`SubspaceUpdate` ``(basis, size, accepted)``.

  Example:
    >>> import jax.numpy as jnp
    >>> basis, size = jnp.zeros((2, 3)), jnp.int32(0)
    >>> basis, size, ok = subspace_update(basis, size, jnp.array([2.0, 0.0, 0.0]))
    >>> basis, size, ok = subspace_update(basis, size, jnp.array([1.0, 1.0, 0.0]))
    >>> basis.round(6), int(size), bool(ok)
    (Array([[1., 0., 0.],
           [0., 1., 0.]], dtype=float32), 2, True)
  """
  if signs not in ("oriented", "qr"):
    raise ValueError(f"signs must be 'oriented' or 'qr', got {signs!r}.")
  leaves = jax.tree.leaves(basis)
  k = leaves[0].shape[0]
  dtype = compute_dtype(basis)
  tol = default_span_tol(dtype) if span_tol is None else span_tol
  size = jnp.asarray(size, jnp.int32)

  v = jax.tree.map(lambda x: _upcast(x).astype(dtype), v)
  v_norm = tree_norm(v)
  v_hat = jax.tree.map(lambda x: x / jnp.maximum(v_norm, eps), v)
  w = _residual(v_hat, basis, passes=2 if signs == "oriented" else 1)
  w_norm = tree_norm(w)
  first = size == 0
  new_dir = jax.tree.map(lambda a, b: jnp.where(first, a, b / jnp.maximum(w_norm, eps)), v_hat, w)
  accepted = jnp.isfinite(v_norm) & (v_norm >= eps) & (first | (w_norm >= tol))

  full = size >= k
  slot = jnp.where(full, k - 1, size)

  def append(u, d):
    shifted = jnp.where(full, jnp.roll(u, -1, axis=0), u)
    return jax.lax.dynamic_update_index_in_dim(shifted, d.astype(u.dtype), slot, axis=0)

  new_basis = jax.tree.map(append, basis, new_dir)
  new_size = jnp.minimum(size + 1, k)
  if signs == "qr":
    requalified = _householder_requalify(new_basis, new_size)
    new_basis = jax.tree.map(lambda a, b: jnp.where(first, b, a), requalified, new_basis)

  out_basis = jax.tree.map(lambda new, old: jnp.where(accepted, new, old), new_basis, basis)
  return SubspaceUpdate(out_basis, jnp.where(accepted, new_size, size), accepted)
