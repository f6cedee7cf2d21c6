"""Per-sample gradient geometry: JVP vs materialised rows, per-sample rectification."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ggr_jax
from ggr_jax import geometry, per_sample
from ggr_jax.models import build_model
from tests.conftest import with_optimized_code


def _model_loss_vector(backbone, image_shape, batch, seed=0):
  """A per-sample auxiliary loss vector through a train-mode BatchNorm model."""
  model = build_model(backbone, 6)
  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, (batch, *image_shape))
  targets = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (batch, 6)))
  variables = model.init(key, x[:2], train=False)

  def loss_vector(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy(out["logits"], targets) / batch

  return loss_vector, variables["params"]


def _directions(params, key, m):
  """m random directions, one of them the batch gradient direction scale."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, (m, *p.shape)) for k, p in zip(keys, leaves)])


@pytest.mark.parametrize("backbone,shape,batch", [("cnn", (8, 8, 1), 16)])  # BN included
def test_jvp_and_materialised_rows_agree(backbone, shape, batch):
  loss_vector, params = _model_loss_vector(backbone, shape, batch)

  def both_ways(params):
    grad = jax.grad(lambda p: jnp.sum(loss_vector(p)))(params)
    dirs = jax.tree.map(lambda g, r: jnp.concatenate([g[None], r]), grad,
                        _directions(params, jax.random.PRNGKey(3), 2))
    return (per_sample.sample_dots(loss_vector, params, dirs),
            per_sample.sample_dots_with("materialize", loss_vector, params, dirs, microbatch=2))

  by_jvp, by_rows = with_optimized_code(jax.jit(both_ways))(params)
  assert by_jvp.shape == (batch, 3)
  scale = float(jnp.max(jnp.abs(by_rows)))
  np.testing.assert_allclose(by_jvp, by_rows, rtol=1e-5, atol=1e-5 * scale)


def test_rows_sum_to_the_batch_gradient_and_microbatching_changes_nothing():
  loss_vector, params = _model_loss_vector("cnn", (8, 8, 1), 8)
  rows = per_sample.jacobian_rows(loss_vector, params)
  rows_mb = per_sample.jacobian_rows(loss_vector, params, microbatch=4)
  grad = jax.grad(lambda p: jnp.sum(loss_vector(p)))(params)
  jax.tree.map(lambda r, g: np.testing.assert_allclose(r.sum(0), g, rtol=1e-4, atol=1e-6), rows, grad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), rows, rows_mb)
  with pytest.raises(ValueError, match="must divide the batch size 8"):
    per_sample.jacobian_rows(loss_vector, params, microbatch=3)


def test_rows_equal_one_sample_gradients_without_cross_sample_coupling():
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(rng.standard_normal((5, 4))), jnp.asarray(rng.standard_normal((4, 3)))
  loss_vector = lambda w: jnp.sum(jnp.tanh(x @ w) ** 2, axis=1)  # no batch statistics
  rows = per_sample.jacobian_rows(loss_vector, w)
  one = jax.vmap(jax.grad(lambda w, xi: jnp.sum(jnp.tanh(xi @ w) ** 2)), (None, 0))(w, x)
  np.testing.assert_allclose(rows, one, rtol=1e-6)


def _linear_batch(x):
  """f_i(w) = <x_i, w>: the per-sample gradients are exactly the rows of x."""
  return lambda w: x @ w


def _rectify_per_sample(mode, g_sup, x, **kw):
  tx = ggr_jax.rectify(mode, granularity="per_sample", **kw)
  w0 = jnp.zeros(x.shape[1])
  dots = lambda d: per_sample.sample_dots(_linear_batch(x), w0, d)
  return tx.update(g_sup, tx.init(g_sup), aux_grads=x.sum(0), aux_sample_dots=dots)


def test_a_conflicting_sample_hidden_in_an_aligned_batch_is_rectified():
  g_sup = jnp.array([1.0, 0.0, 0.0])
  x = jnp.array([[3.0, 1.0, 0.0], [2.0, 0.0, 1.0], [-1.0, 2.0, 0.0]])  # batch dot = +4
  out_batch, _ = ggr_jax.rectify("vlr").update(g_sup, ggr_jax.rectify("vlr").init(g_sup),
                                              aux_grads=x.sum(0))
  out, state = _rectify_per_sample("vlr", g_sup, x)
  np.testing.assert_allclose(out_batch, g_sup + x.sum(0))  # batch vlr sees no conflict
  np.testing.assert_allclose(out, g_sup + x.sum(0) + jnp.array([1.0, 0, 0]), rtol=1e-6)
  assert float(state.conflict) == pytest.approx(1 / 3)


@pytest.mark.parametrize("alpha,aux_weight", [(1.0, 1.0), (0.5, 2.0)])
def test_per_sample_vlr_is_the_sum_of_rectified_rows(alpha, aux_weight):
  rng = np.random.default_rng(1)
  g_sup, x = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal((7, 6)))
  out, _ = _rectify_per_sample("vlr", g_sup, x, alpha=alpha, aux_weight=aux_weight)
  expected = g_sup + sum(geometry.halfspace_project(aux_weight * row, g_sup, alpha) for row in x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_per_sample_vlr_on_one_sample_equals_batch_vlr():
  rng = np.random.default_rng(2)
  g_sup, x = jnp.asarray(rng.standard_normal(5)), jnp.asarray(rng.standard_normal((1, 5)))
  x = x.at[0].set(x[0] - 3 * g_sup)  # conflicting
  out, _ = _rectify_per_sample("vlr", g_sup, x)
  tx = ggr_jax.rectify("vlr")
  out_batch, _ = tx.update(g_sup, tx.init(g_sup), aux_grads=x[0])
  np.testing.assert_allclose(out, out_batch, rtol=1e-6, atol=1e-6)


def test_per_sample_csr_is_the_sum_of_conic_projections_on_the_tracked_basis():
  rng = np.random.default_rng(3)
  tx = ggr_jax.rectify("csr", subspace_dim=3, granularity="per_sample")
  state = tx.init(jnp.zeros(6))
  for _ in range(3):
    g_sup, x = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal((5, 6)))
    dots = lambda d, x=x: per_sample.sample_dots(_linear_batch(x), jnp.zeros(6), d)
    out, state = tx.update(g_sup, state, aux_grads=x.sum(0), aux_sample_dots=dots)
    expected = g_sup + sum(geometry.conic_project(row, state.basis) for row in x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_per_sample_scope_restricts_the_inner_products():
  g_sup = {"body": jnp.array([1.0, 0.0]), "head": jnp.array([5.0])}
  x = {"body": jnp.array([[-1.0, 1.0], [2.0, 0.0]]), "head": jnp.array([[-3.0], [1.0]])}
  params = jax.tree.map(lambda g: jnp.zeros_like(g), g_sup)
  loss_vector = lambda p: x["body"] @ p["body"] + x["head"] @ p["head"]
  tx = ggr_jax.rectify("vlr", granularity="per_sample", scope={"body": True, "head": False})
  out, _ = tx.update(g_sup, tx.init(g_sup), aux_grads=jax.tree.map(lambda r: r.sum(0), x),
                     aux_sample_dots=lambda d: per_sample.sample_dots(loss_vector, params, d))
  np.testing.assert_allclose(out["body"], [1.0 + 1.0 + 1.0, 1.0])  # sample 0 loses -1 on e1
  np.testing.assert_allclose(out["head"], [5.0 - 2.0])  # unscoped: plain sum


def test_per_sample_needs_the_dots_and_a_supported_mode():
  with pytest.raises(ValueError, match="supports modes"):
    ggr_jax.rectify("conflict_drop", granularity="per_sample")
  tx = ggr_jax.rectify("vlr", granularity="per_sample")
  with pytest.raises(TypeError, match="aux_sample_dots=fn"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), aux_grads=jnp.ones(2))


def test_conflict_diagnostics_on_a_crafted_batch():
  coeffs = jnp.array([2.0, -1.0, 1.0, -3.0, -1.0, 0.0])
  is_id = jnp.array([True, True, True, False, False, False])
  diag = per_sample.conflict_diagnostics(coeffs, is_id)
  assert float(diag["ggr/sample_conflict"]) == pytest.approx(3 / 6)
  assert float(diag["ggr/sample_conflict_id"]) == pytest.approx(1 / 3)
  assert float(diag["ggr/sample_conflict_ood"]) == pytest.approx(2 / 3)
  assert float(diag["ggr/anchor_share_ood"]) == pytest.approx(4 / 8)
  assert float(diag["ggr/conflict_share_ood"]) == pytest.approx(4 / 5)
  masked = per_sample.conflict_diagnostics(coeffs, is_id, weight=jnp.array([1, 1, 0, 1, 0, 0]))
  assert float(masked["ggr/sample_conflict_ood"]) == pytest.approx(1.0)
  assert float(masked["ggr/sample_conflict_id"]) == pytest.approx(1 / 2)
