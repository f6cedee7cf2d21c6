"""Per-sample gradient geometry without materialising per-sample gradients.

Let ``f(params) -> (B,)`` be the vector of per-sample auxiliary losses of one batch,
scaled so that the auxiliary loss is ``sum_i f_i`` (fold the ``1/B`` and any sample
weights into ``f``). The per-sample gradient ``g_i`` is row ``i`` of the Jacobian
``J = df/dparams``, so the batch auxiliary gradient is ``sum_i g_i`` and, for any
direction ``v``, the ``B`` inner products ``<g_i, v>`` are the Jacobian-vector
product ``J v``: one linearised forward pass, no ``B x P`` array in memory.

With BatchNorm in train mode the samples are coupled (batch statistics), so ``g_i``
here is the row of the *joint* Jacobian: the effect of sample ``i``'s loss through the
whole batch, not ``grad`` of a one-sample forward. ``vmap(grad(one_sample_loss))``
computes the latter and equals these rows only for models without cross-sample
coupling (no train-mode BatchNorm).

Two implementations of the same quantities:

* :func:`sample_dots` (``method="jvp"``): ``jax.linearize`` once, then one JVP per
  direction (vmapped), ``O(forward)`` memory.
* :func:`jacobian_rows` + :func:`dots_from_rows` (``method="materialize"``): every
  row through a vmapped VJP (``microbatch`` rows at a time), ``B x P`` memory.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ggr_jax import geometry

PyTree = Any
LossVectorFn = Callable[[PyTree], jax.Array]


def jacobian_rows(loss_vector_fn: LossVectorFn, params: PyTree, *,
                  microbatch: int | None = None) -> PyTree:
  """Per-sample gradients: a params-shaped pytree whose leaves have a leading axis ``B``.

  ``microbatch`` bounds memory by computing that many rows per vmapped VJP (it must
  divide ``B``); ``None`` computes all rows at once.

  Example:
    >>> import jax.numpy as jnp
    >>> rows = jacobian_rows(lambda w: jnp.array([1.0, 2.0]) * w.sum(), jnp.ones(3))
    >>> rows
    Array([[1., 1., 1.],
           [2., 2., 2.]], dtype=float32)
  """
  losses, vjp_fn = jax.vjp(loss_vector_fn, params)
  return rows_from_pullback(lambda e: vjp_fn(e)[0], losses.shape[0], losses.dtype, microbatch)


def rows_from_pullback(pullback: Callable[[jax.Array], PyTree], batch: int, dtype: Any,
                       microbatch: int | None = None) -> PyTree:
  """Rows ``pullback(e_i)`` for the ``batch`` unit cotangents, ``microbatch`` at a time."""
  eye = jnp.eye(batch, dtype=dtype)
  pull = jax.vmap(pullback)
  if microbatch is None or microbatch >= batch:
    return pull(eye)
  if batch % microbatch:
    raise ValueError(f"microbatch={microbatch} must divide the batch size {batch}.")
  rows = jax.lax.map(pull, eye.reshape(batch // microbatch, microbatch, batch))
  return jax.tree.map(lambda r: r.reshape(batch, *r.shape[2:]), rows)


def sample_dots(loss_vector_fn: LossVectorFn, params: PyTree, directions: PyTree,
                has_aux: bool = False, chunk: int | None = None
                ) -> jax.Array | tuple[jax.Array, Any]:
  """``<g_i, v_j>`` for every sample ``i`` and direction ``j``, shape ``(B, m)``, by JVP.

  ``directions`` is params-shaped with a leading axis ``m`` on every leaf (a basis);
  zero entries outside a scope restrict the inner products to the scope. With
  ``has_aux``, ``loss_vector_fn`` returns ``(losses, aux)`` and so does this.
  ``chunk`` pushes that many directions at a time through the linearised function (a
  ``lax.map``, each chunk rematerialised under differentiation), so that the tangent
  activations held at once are ``chunk`` (not ``m``) copies of the forward's; the
  result is the same.

  Example:
    >>> import jax.numpy as jnp
    >>> f = lambda w: jnp.array([1.0, -2.0]) * w.sum()
    >>> sample_dots(f, jnp.ones(3), jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    Array([[ 1.,  3.],
           [-2., -6.]], dtype=float32)
  """
  _, jvp_fn, *aux = jax.linearize(loss_vector_fn, params, has_aux=has_aux)
  tangents = jax.tree.map(lambda d, p: d.astype(p.dtype), directions,
                          jax.tree.map(lambda p: p[None], params))
  if chunk and chunk < jax.tree.leaves(tangents)[0].shape[0]:
    dots = jax.lax.map(jax.checkpoint(jvp_fn), tangents, batch_size=chunk).T
  else:
    dots = jax.vmap(jvp_fn)(tangents).T
  return (dots, aux[0]) if has_aux else dots


def dots_from_rows(rows: PyTree, directions: PyTree) -> jax.Array:
  """``(B, m)`` inner products of materialised rows with each direction."""
  return jax.vmap(lambda row: geometry.basis_coefficients(row, directions))(rows)


def sample_dots_with(method: str, loss_vector_fn: LossVectorFn, params: PyTree,
                     directions: PyTree, microbatch: int | None = None) -> jax.Array:
  """:func:`sample_dots` (``"jvp"``) or materialised rows (``"materialize"``)."""
  if method == "jvp":
    return sample_dots(loss_vector_fn, params, directions)
  if method == "materialize":
    return dots_from_rows(jacobian_rows(loss_vector_fn, params, microbatch=microbatch),
                          directions)
  raise ValueError(f"method must be 'jvp' or 'materialize', got {method!r}.")


def conflict_diagnostics(coeffs: jax.Array, is_id: jax.Array,
                         weight: jax.Array | None = None) -> dict[str, jax.Array]:
  """Where conflict comes from, from the anchor coefficients ``c_i = <g_i, g_sup>``.

  Returns the fraction of ID and of OOD samples with ``c_i < 0`` (among samples with
  nonzero ``weight``, e.g. accepted pseudo-labels, when given), and each group's
  share of the auxiliary gradient's component along the anchor,
  ``sum_{i in G} |c_i| / sum_i |c_i|``, and of its conflicting part,
  ``sum_{i in G} min(c_i, 0) / sum_i min(c_i, 0)``.
  """
  is_id = is_id.astype(bool)
  active = jnp.ones_like(coeffs, bool) if weight is None else weight != 0
  conflict = (coeffs < 0) & active
  tiny = jnp.finfo(jnp.float32).tiny

  def frac(group):
    return jnp.sum(conflict & group) / jnp.maximum(jnp.sum(active & group), 1)

  total_abs = jnp.maximum(jnp.sum(jnp.abs(coeffs)), tiny)
  total_neg = jnp.minimum(jnp.sum(jnp.minimum(coeffs, 0)), -tiny)
  return {
      "ggr/sample_conflict": jnp.sum(conflict) / jnp.maximum(jnp.sum(active), 1),
      "ggr/sample_conflict_id": frac(is_id),
      "ggr/sample_conflict_ood": frac(~is_id),
      "ggr/anchor_share_ood": jnp.sum(jnp.where(is_id, 0.0, jnp.abs(coeffs))) / total_abs,
      "ggr/conflict_share_ood": jnp.sum(jnp.where(is_id, 0.0, jnp.minimum(coeffs, 0)))
                                / total_neg,
  }
