"""Properties of EAGC's coordinator (:mod:`ggr_jax.coordinator`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax import coordinator


def features(seed: int, n: int = 30, d: int = 8, rank: int = 3) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("aperture", [0.5, 2.0, 50.0])
def test_conceptor_is_symmetric_with_eigenvalues_lambda_over_lambda_plus_aperture_power(
    aperture, x64):
  f = features(0)
  c = np.asarray(coordinator.conceptor(jnp.asarray(f), aperture))
  lam = np.linalg.eigvalsh(f.T @ f / len(f))
  np.testing.assert_allclose(c, c.T, atol=1e-5)
  np.testing.assert_allclose(np.linalg.eigvalsh((c + c.T) / 2),
                             np.sort(lam / (lam + aperture**-2)), atol=1e-5)


def test_energy_is_one_inside_and_zero_outside_a_sharp_subspace(x64):
  basis = np.linalg.qr(np.random.default_rng(1).standard_normal((8, 8)))[0]
  inside, outside = basis[:, :3], basis[:, 3:]
  c = coordinator.conceptor(jnp.asarray(np.random.default_rng(2).standard_normal((50, 3))
                                        @ inside.T), aperture=1e3)
  z = jnp.asarray(np.concatenate([inside.T, outside.T, np.zeros((1, 8))]))
  e = np.asarray(coordinator.known_energy(z, c))
  np.testing.assert_allclose(e[:3], 1.0, atol=1e-4)
  np.testing.assert_allclose(e[3:], 0.0, atol=1e-4)  # a zero row has energy 0, not NaN


def test_a_batch_without_labeled_rows_leaves_mu_and_turns_aga_off():
  z = jnp.asarray(features(3, n=6))
  c = coordinator.conceptor(jnp.asarray(features(4)), 2.0)
  step = coordinator.coordinator_step(z, z + 1.0, jnp.zeros(6, bool), c, 0.42, beta=0.5,
                                      aga_weight=0.7)
  assert float(step.mu) == pytest.approx(0.42) and np.isnan(float(step.batch_energy))
  assert float(step.edit.aga_coef) == 0.0


def test_mu_is_updated_before_tau_and_labeled_rows_are_never_projected():
  z = jnp.asarray(features(5, n=8))
  labeled = jnp.array([True, False] * 4)
  c = coordinator.conceptor(jnp.asarray(features(6)), 2.0)
  step = coordinator.coordinator_step(z, z, labeled, c, 0.9, beta=3.0, aga_weight=0.1)
  e = np.asarray(step.energy)
  mu = 0.95 * 0.9 + 0.05 * e[::2].mean()
  assert float(step.mu) == pytest.approx(mu, rel=1e-6)
  tau = np.asarray(step.tau)
  assert np.all(tau[::2] == 0.0)
  np.testing.assert_allclose(tau[1::2], 3.0 * np.clip(1 - e[1::2] / (mu + 1e-6), 0, 1),
                             rtol=1e-5)


def test_aga_is_the_gradient_of_the_anchoring_loss():
  rng = np.random.default_rng(7)
  z, zhat = (jnp.asarray(rng.standard_normal((6, 5))) for _ in range(2))
  labeled = jnp.array([True, True, False, True, False, False])
  c = coordinator.conceptor(jnp.asarray(features(8, d=5)), 2.0)
  step = coordinator.coordinator_step(z, zhat, labeled, c, 0.5, beta=0.5, aga_weight=0.7,
                                      eep=False)
  got = jax.grad(lambda z: coordinator.coordinate(z, step.edit).sum())(z)

  def anchoring(z):
    sq = jnp.sum(jnp.where(labeled[:, None], (z - zhat) ** 2, 0.0))
    return z.sum() + 0.7 / (2 * 3 * 5) * sq

  np.testing.assert_allclose(got, jax.grad(anchoring)(z), rtol=1e-5, atol=1e-6)


def test_eep_with_beta_one_removes_the_known_component_of_novel_rows(x64):
  basis = np.linalg.qr(np.random.default_rng(9).standard_normal((6, 6)))[0]
  known = basis[:, :2]
  c = coordinator.conceptor(jnp.asarray(np.random.default_rng(10).standard_normal((40, 2))
                                        @ known.T), aperture=1e3)
  z = jnp.asarray(basis[:, 4:].T)  # two novel rows: energy 0, tau = beta
  step = coordinator.coordinator_step(z, z, jnp.zeros(2, bool), c, 0.8, beta=1.0,
                                      aga_weight=0.0)
  g = jnp.asarray(np.random.default_rng(11).standard_normal((2, 6)))
  _, vjp = jax.vjp(lambda z: coordinator.coordinate(z, step.edit), z)
  np.testing.assert_allclose(np.asarray(vjp(g)[0]) @ known, 0.0, atol=1e-3)


def test_heads_keep_their_gradient_and_only_the_backbone_sees_the_edit():
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.standard_normal((4, 3)))
  params = {"backbone": jnp.asarray(rng.standard_normal((3, 5))),
            "head": jnp.asarray(rng.standard_normal((5, 2)))}
  c = coordinator.conceptor(jnp.asarray(features(13, d=5)), 2.0)
  labeled = jnp.array([True, False, False, True])

  def loss(params, coordinated):
    z = jnp.tanh(x @ params["backbone"])
    if coordinated:
      step = coordinator.coordinator_step(z, z * 0.5, labeled, c, 0.5, beta=2.0,
                                          aga_weight=1.0)
      z = coordinator.coordinate(z, step.edit)
    return jnp.sum(jnp.sin(z @ params["head"]))

  plain, edited = (jax.jit(jax.grad(loss), static_argnums=1)(params, flag)
                   for flag in (False, True))
  np.testing.assert_array_equal(plain["head"], edited["head"])
  assert not np.allclose(plain["backbone"], edited["backbone"])
  assert float(loss(params, True)) == float(loss(params, False))  # the forward is unchanged


def test_bad_shapes_name_the_problem():
  c = jnp.eye(4)
  with pytest.raises(ValueError, match="z and zhat of one shape"):
    coordinator.coordinator_step(jnp.ones((3, 4)), jnp.ones((2, 4)), jnp.ones(3, bool), c,
                                 0.5, beta=0.5, aga_weight=0.1)
  with pytest.raises(ValueError, match="aperture must be > 0"):
    coordinator.conceptor(jnp.ones((3, 4)), 0.0)


def test_gdc_is_zero_without_unlabeled_gradient_two_when_it_reverses_and_masks_leaves():
  g = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
  zero = jax.tree.map(jnp.zeros_like, g)
  assert float(coordinator.gradient_deviation(g, zero)) == pytest.approx(0.0, abs=1e-7)
  reverse = jax.tree.map(lambda x: -2.0 * x, g)
  assert float(coordinator.gradient_deviation(g, reverse)) == pytest.approx(2.0)
  # orthogonal, equal norm: the sum is 45 degrees off
  ortho = {"a": jnp.array([2.0, -1.0]), "b": jnp.array([0.0])}
  sup = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.0])}
  assert float(coordinator.gradient_deviation(sup, ortho)) == pytest.approx(1 - 2**-0.5)
  # a leaf outside the mask does not count, whatever it holds
  noisy = {**ortho, "b": jnp.array([100.0])}
  masked = coordinator.gradient_deviation(sup, noisy, {"a": True, "b": False})
  assert float(masked) == pytest.approx(1 - 2**-0.5)
  assert float(coordinator.gradient_deviation(zero, g)) == 0.0


def test_soc_is_one_inside_the_old_subspace_zero_outside_and_blind_to_row_scale():
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(12, 12)))[0]
  angles = 2 * np.pi * np.arange(8) / 8  # unit Old features on a circle: mean 0, rank 2
  old = np.cos(angles)[:, None] * basis[0] + np.sin(angles)[:, None] * basis[1]
  inside = rng.normal(size=(5, 2)) @ basis[:2]
  outside = rng.normal(size=(5, 3)) @ basis[4:7]
  mixed = basis[0] + basis[5]
  assert coordinator.subspace_overlap(old, inside) == pytest.approx(1.0)
  assert coordinator.subspace_overlap(old, outside) == pytest.approx(0.0, abs=1e-12)
  assert coordinator.subspace_overlap(old, mixed[None]) == pytest.approx(0.5)
  scaled = rng.uniform(0.1, 10, size=(5, 1))
  assert coordinator.subspace_overlap(old * 3, outside * scaled) == pytest.approx(
      coordinator.subspace_overlap(old, outside), abs=1e-12)
  assert coordinator.subspace_overlap(old * 3, inside * scaled) == pytest.approx(1.0)
  assert np.isnan(coordinator.subspace_overlap(old, old[:0]))
