"""Mathematical properties of ggr_jax.geometry over a shared suite of random pytrees."""

from __future__ import annotations

import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax import geometry
from tests.conftest import TREE_SHAPES, random_tree

SEEDS = range(6)
SUITE = list(itertools.product(range(len(TREE_SHAPES)), SEEDS))
TOL = 1e-5


def _pair(shape_id, seed):
  rng = np.random.default_rng(seed)
  shapes = TREE_SHAPES[shape_id]
  return random_tree(rng, shapes), random_tree(rng, shapes), rng


def _orthonormal_basis(rng, like, k):
  """A random orthonormal basis (k slots) for vectors shaped like ``like``."""
  flat_like, unravel = jax.flatten_util.ravel_pytree(like)
  q, _ = np.linalg.qr(rng.standard_normal((flat_like.size, k)))
  return jax.vmap(unravel)(jnp.asarray(q.T, jnp.float32))


def _flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_halfspace_alpha1_is_non_opposing(shape_id, seed):
  src, ref, _ = _pair(shape_id, seed)
  src = jax.tree.map(lambda s, r: s - 2 * r, src, ref)  # make most cases conflict
  out = geometry.halfspace_project(src, ref)
  scale = np.linalg.norm(_flat(src)) * np.linalg.norm(_flat(ref))
  assert float(geometry.tree_vdot(out, ref)) >= -TOL * scale


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_halfspace_is_idempotent(shape_id, seed):
  src, ref, _ = _pair(shape_id, seed)
  once = geometry.halfspace_project(src, ref)
  twice = geometry.halfspace_project(once, ref)
  np.testing.assert_allclose(_flat(twice), _flat(once), atol=TOL)


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_halfspace_alpha_scales_the_remaining_conflict(shape_id, seed):
  src, ref, _ = _pair(shape_id, seed)
  src = jax.tree.map(lambda s, r: s - 2 * r, src, ref)
  d = float(geometry.tree_vdot(src, ref))
  out = geometry.halfspace_project(src, ref, alpha=0.25)
  expected = 0.75 * d if d < 0 else d
  assert float(geometry.tree_vdot(out, ref)) == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_halfspace_is_positively_homogeneous(shape_id, seed):
  src, ref, _ = _pair(shape_id, seed)
  out = geometry.halfspace_project(src, ref)
  scaled = geometry.halfspace_project(jax.tree.map(lambda x: 3.0 * x, src),
                                      jax.tree.map(lambda x: 0.5 * x, ref))
  np.testing.assert_allclose(_flat(scaled), 3.0 * _flat(out), rtol=1e-5, atol=1e-5)


def test_halfspace_strict_test_leaves_orthogonal_and_zero_inputs_unchanged():
  src = jnp.array([0.0, 2.0])
  assert np.array_equal(geometry.halfspace_project(src, jnp.array([1.0, 0.0])), src)
  assert np.array_equal(geometry.halfspace_project(src, jnp.zeros(2)), src)
  assert np.array_equal(geometry.halfspace_project(jnp.zeros(2), src), jnp.zeros(2))


def test_halfspace_clamp_applies_below_eps():
  ref = jnp.array([1e-7, 0.0])  # ||ref||^2 = 1e-14 < eps = 1e-12
  out = geometry.halfspace_project(jnp.array([-1.0, 0.0]), ref)
  # d = -1e-7, step d / 1e-12 = -1e5, times ref: +1e-2. Not orthogonal, as officially.
  np.testing.assert_allclose(out, [-1.0 + 1e-2, 0.0], rtol=1e-5)


@pytest.mark.parametrize("shape_id,seed", SUITE)
@pytest.mark.parametrize("project", [geometry.orthogonal_project, geometry.conic_project])
def test_subspace_projections_are_idempotent(project, shape_id, seed):
  g, _, rng = _pair(shape_id, seed)
  basis = _orthonormal_basis(rng, g, k=3)
  once = project(g, basis)
  np.testing.assert_allclose(_flat(project(once, basis)), _flat(once), atol=TOL)


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_orthogonal_projection_is_orthogonal_to_every_direction(shape_id, seed):
  g, _, rng = _pair(shape_id, seed)
  basis = _orthonormal_basis(rng, g, k=3)
  coeffs = geometry.basis_coefficients(geometry.orthogonal_project(g, basis), basis)
  np.testing.assert_allclose(coeffs, 0.0, atol=TOL * np.linalg.norm(_flat(g)))


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_conic_projection_keeps_non_negative_coefficients(shape_id, seed):
  g, _, rng = _pair(shape_id, seed)
  basis = _orthonormal_basis(rng, g, k=3)
  before = np.asarray(geometry.basis_coefficients(g, basis))
  after = np.asarray(geometry.basis_coefficients(geometry.conic_project(g, basis), basis))
  assert np.all(after >= -TOL)
  np.testing.assert_allclose(after, np.maximum(before, 0.0), atol=TOL)


def test_zero_slots_of_a_basis_change_nothing():
  g = jnp.array([1.0, -2.0, 3.0])
  basis = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(geometry.orthogonal_project(g, basis), [1.0, 0.0, 3.0])
  np.testing.assert_allclose(geometry.conic_project(g, basis), [1.0, 0.0, 3.0])


def _track(vectors, k, signs):
  basis, size = geometry.empty_basis(vectors[0], k), jnp.int32(0)
  history = []
  for v in vectors:
    basis, size, accepted = geometry.subspace_update(basis, size, v, signs=signs)
    history.append((basis, int(size), bool(accepted)))
  return history


@pytest.mark.parametrize("seed", range(8))
def test_oriented_tracker_is_orthonormal_and_oriented(seed):
  rng = np.random.default_rng(seed)
  vectors = [random_tree(rng, {"a": (6, 2), "b": (5,)}) for _ in range(9)]
  for v, (basis, size, accepted) in zip(vectors, _track(vectors, k=4, signs="oriented")):
    assert accepted
    flat = np.stack([_flat(jax.tree.map(lambda x: x[j], basis)) for j in range(size)])
    np.testing.assert_allclose(flat @ flat.T, np.eye(size), atol=1e-5)
    assert flat[-1] @ _flat(v) > 0  # the newest direction points along its input


def test_qr_signs_flip_directions_against_their_input():
  """The official defect that 'oriented' fixes: some newest directions oppose their input."""
  rng = np.random.default_rng(0)
  vectors = [jnp.asarray(rng.standard_normal(17)) for _ in range(12)]
  signs = [float(basis[size - 1] @ v) > 0 for v, (basis, size, _) in
           zip(vectors, _track(vectors, k=3, signs="qr"))]
  assert not all(signs) and any(signs)


def test_window_keeps_the_newest_residuals():
  e = np.eye(4, dtype=np.float32)
  vectors = [jnp.asarray(e[0]), jnp.asarray(e[0] + e[1]), jnp.asarray(e[1] + e[2])]
  basis, size, _ = _track(vectors, k=2, signs="oriented")[-1]
  assert size == 2
  # residual of e1+e2 against {e0, e1} is e2; the oldest direction e0 was dropped.
  np.testing.assert_allclose(basis, [e[1], e[2]], atol=1e-6)


@pytest.mark.parametrize("signs", ["oriented", "qr"])
def test_degenerate_tracker_input_is_skipped(signs):
  v = jnp.array([1.0, 2.0, 0.0, 0.0])
  for bad in (jnp.zeros(4), 3.0 * v, jnp.array([jnp.nan, 0, 0, 0]), jnp.array([jnp.inf, 0, 0, 0])):
    history = _track([v, bad], k=3, signs=signs)
    (b1, s1, _), (b2, s2, accepted) = history
    assert not accepted and s2 == s1 == 1
    np.testing.assert_array_equal(b2, b1)
  _, size, accepted = _track([jnp.zeros(4)], k=3, signs=signs)[0]
  assert not accepted and size == 0


def test_tracker_is_jittable_with_fixed_shapes():
  update = jax.jit(geometry.subspace_update, static_argnames=("signs",))
  basis, size = jnp.zeros((3, 5)), jnp.int32(0)
  for i in range(5):
    basis, size, _ = update(basis, size, jnp.arange(5.0) ** i, signs="qr")
  assert basis.shape == (3, 5) and int(size) == 3
  assert update._cache_size() == 1
