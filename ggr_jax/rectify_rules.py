"""One block's rectification for :func:`ggr_jax.rectify`: a rule per mode.

Every rule acts on one block: ``g_s`` and ``a`` are the block's supervised and
weighted auxiliary leaves (lists of arrays, >= float32), ``basis`` the block's
basis leaves (leading axis ``k``) or None, and it returns ``(g_s', a')``.
:data:`RULES` holds the batch rules, :data:`SAMPLE_RULES` the per-sample ones
(``granularity="per_sample"``), which also receive the per-sample coefficients.
:func:`rectify_block` applies a rule with the non-finite guard and returns the
sums the diagnostics need.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ggr_jax import geometry

Leaves = list  # one block's leaves, in tree order


def sum_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, *, alpha: Any, eps: Any,
             conflict: jax.Array) -> tuple[Leaves, Leaves]:
  """``a' = a``."""
  del basis, alpha, eps, conflict
  return g_s, a


def vlr_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, *, alpha: Any, eps: Any,
             conflict: jax.Array) -> tuple[Leaves, Leaves]:
  """``a' = a - alpha * min(d, 0) / max(||g_s||^2, eps) * g_s``."""
  del basis, conflict
  return g_s, geometry.halfspace_project(a, g_s, alpha, eps)


def osr_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, *, alpha: Any, eps: Any,
             conflict: jax.Array) -> tuple[Leaves, Leaves]:
  """``a' = a - U U^T a``."""
  del alpha, eps, conflict
  return g_s, geometry.orthogonal_project(a, basis)


def csr_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, *, alpha: Any, eps: Any,
             conflict: jax.Array) -> tuple[Leaves, Leaves]:
  """``a' = a - U min(U^T a, 0)``."""
  del alpha, eps, conflict
  return g_s, geometry.conic_project(a, basis)


def pcgrad_sym_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, *, alpha: Any, eps: Any,
                    conflict: jax.Array) -> tuple[Leaves, Leaves]:
  """Each of ``g_s`` and ``a`` projected by the vlr rule against the other's original."""
  del basis, conflict
  return (geometry.halfspace_project(g_s, a, alpha, eps),
          geometry.halfspace_project(a, g_s, alpha, eps))


def conflict_drop_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, *, alpha: Any,
                       eps: Any, conflict: jax.Array) -> tuple[Leaves, Leaves]:
  """``a' = 0`` on conflict, else ``a``."""
  del basis, alpha, eps
  return g_s, [jnp.where(conflict, jnp.zeros_like(x), x) for x in a]


Rule = Callable[..., tuple[Leaves, Leaves]]

RULES: dict[str, Rule] = {
    "sum": sum_rule,
    "vlr": vlr_rule,
    "osr": osr_rule,
    "csr": csr_rule,
    "pcgrad_sym": pcgrad_sym_rule,
    "conflict_drop": conflict_drop_rule,
}

# Per-sample rules, for ``a = weight * sum_i g_i``: ``coeffs`` is (B, m), column 0 the
# ``<weight * g_i, g_s>`` and, for a rule with ``basis_dots``, columns 1.. the
# ``<weight * g_i, u_j>``.


def sample_sum_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, coeffs: jax.Array, *,
                    alpha: Any, eps: Any, s_sq: jax.Array) -> tuple[Leaves, Leaves]:
  """``a' = a``."""
  del basis, coeffs, alpha, eps, s_sq
  return g_s, a


def sample_vlr_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, coeffs: jax.Array, *,
                    alpha: Any, eps: Any, s_sq: jax.Array) -> tuple[Leaves, Leaves]:
  """``a' = a - alpha * sum_i min(c_i, 0) / max(||g_s||^2, eps) * g_s``."""
  del basis
  coef = alpha * jnp.sum(jnp.minimum(coeffs[:, 0], 0)) / jnp.maximum(s_sq, eps)
  return g_s, geometry.tree_axpy(-coef, g_s, a)


def sample_osr_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, coeffs: jax.Array, *,
                    alpha: Any, eps: Any, s_sq: jax.Array) -> tuple[Leaves, Leaves]:
  """The batch rule: a linear projection of the sum is the sum of the projections."""
  del coeffs, alpha, eps, s_sq
  return g_s, geometry.orthogonal_project(a, basis)


def sample_csr_rule(g_s: Leaves, a: Leaves, basis: Leaves | None, coeffs: jax.Array, *,
                    alpha: Any, eps: Any, s_sq: jax.Array) -> tuple[Leaves, Leaves]:
  """``a' = a - U sum_i min(U^T g_i, 0)``."""
  del alpha, eps, s_sq
  removed = geometry.basis_combination(jnp.sum(jnp.minimum(coeffs[:, 1:], 0), 0), basis, a)
  return g_s, [x - r for x, r in zip(a, removed)]


class SampleRule(NamedTuple):
  """A per-sample rule and whether it needs the samples' inner products with ``U``."""

  apply: Callable[..., tuple[Leaves, Leaves]]
  basis_dots: bool


SAMPLE_RULES: dict[str, SampleRule] = {
    "sum": SampleRule(sample_sum_rule, basis_dots=False),
    "vlr": SampleRule(sample_vlr_rule, basis_dots=False),
    "osr": SampleRule(sample_osr_rule, basis_dots=False),
    "csr": SampleRule(sample_csr_rule, basis_dots=True),
}


def sample_directions(g_s: Leaves, basis: Leaves | None, basis_dots: bool) -> Leaves:
  """The directions the samples are measured against: ``g_s``, then the basis if asked."""
  if basis is None or not basis_dots:
    return [g[None] for g in g_s]
  return [jnp.concatenate([g[None].astype(b.dtype), b], axis=0) for g, b in zip(g_s, basis)]


class Block(NamedTuple):
  """One block's contribution: rectified pieces and the sums diagnostics need."""

  sup: Leaves
  aux: Leaves
  dot_before: jax.Array
  dot_after: jax.Array
  sup_sq: jax.Array
  aux_sq: jax.Array
  sup_sq_after: jax.Array
  aux_sq_after: jax.Array
  conflict: jax.Array


def rectify_block(mode: str, g_s: Leaves, a: Leaves, basis: Leaves | None, weight: jax.Array,
                  sample_dots: Callable[[Leaves], jax.Array] | None = None, *, alpha: Any,
                  eps: Any) -> Block:
  """Applies the rule of ``mode`` to one block; a non-finite block keeps ``g_s`` and ``a``.

  ``sample_dots`` (per-sample granularity) maps directions given on the block's
  leaves to the ``(B, m)`` inner products of the unweighted samples with them.
  """
  d = geometry.tree_vdot(a, g_s)
  s_sq, a_sq = geometry.tree_sq_norm(g_s), geometry.tree_sq_norm(a)
  finite = jnp.isfinite(d) & jnp.isfinite(s_sq) & jnp.isfinite(a_sq)
  if sample_dots is None:
    conflict = d < 0
    new_s, new_a = RULES[mode](g_s, a, basis, alpha=alpha, eps=eps, conflict=conflict)
  else:  # a = weight * sum_i g_i, each g_i rectified before the sum
    rule = SAMPLE_RULES[mode]
    coeffs = weight * sample_dots(sample_directions(g_s, basis, rule.basis_dots))
    finite = finite & jnp.all(jnp.isfinite(coeffs))
    conflict = jnp.mean(coeffs[:, 0] < 0)
    new_s, new_a = rule.apply(g_s, a, basis, coeffs, alpha=alpha, eps=eps, s_sq=s_sq)

  def guard(new, old):
    return [jnp.where(finite, n, o) for n, o in zip(new, old)]

  new_s, new_a = guard(new_s, g_s), guard(new_a, a)
  if mode == "sum" and sample_dots is None:  # nothing moved: the same sums, bit for bit
    return Block(sup=new_s, aux=new_a, dot_before=d, dot_after=d, sup_sq=s_sq, aux_sq=a_sq,
                 sup_sq_after=s_sq, aux_sq_after=a_sq,
                 conflict=jnp.where(finite, conflict, False).astype(jnp.float32))
  return Block(
      sup=new_s, aux=new_a, dot_before=d, dot_after=geometry.tree_vdot(new_a, new_s),
      sup_sq=s_sq, aux_sq=a_sq, sup_sq_after=geometry.tree_sq_norm(new_s),
      aux_sq_after=geometry.tree_sq_norm(new_a),
      conflict=jnp.where(finite, conflict, False).astype(jnp.float32))
