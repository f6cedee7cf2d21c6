"""ggr_jax.rectify inside the JAX ecosystem: optax wrappers, Flax, dtypes, jit, sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ggr_jax
from ggr_jax import geometry


def _problem(seed=0, n=32):
  """A linear model with a supervised and a (conflicting) auxiliary loss."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(0.01 * rng.standard_normal((4, 3)), jnp.float32),
            "b": jnp.zeros(3, jnp.float32)}
  x, y = rng.standard_normal((n, 4)), rng.standard_normal((n, 3))
  y = y + x[:, :3]  # learnable
  y_aux = y + 0.3 * rng.standard_normal((n, 3))  # the aux loss pulls towards -y_aux
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32),
           "y_aux": jnp.asarray(y_aux, jnp.float32)}
  return params, batch


def _losses(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2), jnp.mean((pred + batch["y_aux"]) ** 2)


def _grads(params, batch):
  g_sup = jax.grad(lambda p: _losses(p, batch)[0])(params)
  g_aux = jax.grad(lambda p: _losses(p, batch)[1])(params)
  return g_sup, g_aux


def _reference_vlr(g_sup, g_aux):
  return jax.tree.map(jnp.add, g_sup, geometry.halfspace_project(g_aux, g_sup))


@pytest.mark.parametrize("optimizer", [
    optax.sgd(0.03, momentum=0.9, nesterov=True),
    optax.adamw(1e-3, weight_decay=5e-4),
    optax.contrib.muon(0.02),
], ids=["sgd_nesterov", "adamw", "muon"])
def test_chain_first_position_under_jit(optimizer):
  params, batch = _problem()
  tx = optax.chain(ggr_jax.rectify("vlr"), optimizer)
  ref_tx = optimizer
  state, ref_state = tx.init(params), ref_tx.init(params)

  @jax.jit
  def step(params, state, batch):
    g_sup, g_aux = _grads(params, batch)
    updates, state = tx.update(g_sup, state, params, aux_grads=g_aux)
    return optax.apply_updates(params, updates), state

  ref_params = params
  for _ in range(3):
    g_sup, g_aux = _grads(ref_params, batch)
    upd, ref_state = ref_tx.update(_reference_vlr(g_sup, g_aux), ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, upd)
    params, state = step(params, state, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params, ref_params)
  assert float(optax.tree.get(state, "cos_before")) < 0


def test_chain_later_position_rectifies_what_it_receives():
  params, batch = _problem()
  g_sup, g_aux = _grads(params, batch)
  tx = optax.chain(optax.add_decayed_weights(0.1), ggr_jax.rectify("vlr"), optax.sgd(0.1))
  updates, _ = jax.jit(lambda g, s, p, a: tx.update(g, s, p, aux_grads=a))(
      g_sup, tx.init(params), params, g_aux)
  anchor = jax.tree.map(lambda g, p: g + 0.1 * p, g_sup, params)
  expected = jax.tree.map(lambda u: -0.1 * u, _reference_vlr(anchor, g_aux))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               updates, expected)


def test_inject_hyperparams_schedules_alpha_and_aux_weight():
  tx = optax.inject_hyperparams(ggr_jax.rectify)(
      "vlr", alpha=lambda count: jnp.where(count == 0, 1.0, 0.5),
      aux_weight=lambda count: 1.0 + count)
  g_sup, g_aux = jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])
  update = jax.jit(lambda s: tx.update(g_sup, s, aux_grads=g_aux))
  out0, state = update(tx.init(g_sup))
  out1, state = update(state)
  np.testing.assert_allclose(out0, [1.0, 1.0])  # a=(-1,1), full projection
  np.testing.assert_allclose(out1, [0.0, 2.0])  # a=(-2,2), half projection: (-1, 2)
  assert float(state.hyperparams["aux_weight"]) == 2.0


def test_inject_hyperparams_needs_static_subspace_dim():
  tx = optax.inject_hyperparams(ggr_jax.rectify, static_args=("subspace_dim",))(
      "osr", subspace_dim=2, alpha=0.5)
  out, _ = jax.jit(lambda s: tx.update(jnp.ones(3), s, aux_grads=-jnp.ones(3)))(
      tx.init(jnp.ones(3)))
  np.testing.assert_allclose(out, jnp.ones(3), atol=1e-6)
  bad = optax.inject_hyperparams(ggr_jax.rectify)("osr", subspace_dim=2)
  with pytest.raises(TypeError, match="static_args=\\('subspace_dim',\\)"):
    jax.jit(lambda s: bad.update(jnp.ones(3), s, aux_grads=jnp.ones(3)))(bad.init(jnp.ones(3)))


def test_masked_with_compatible_extra_args():
  g_sup = {"body": jnp.array([1.0, 0.0]), "head": jnp.array([1.0, 0.0])}
  g_aux = {"body": jnp.array([-1.0, 1.0]), "head": jnp.array([-1.0, 1.0])}
  mask = {"body": True, "head": False}
  tx = optax.masked(ggr_jax.rectify("vlr"), mask, mask_compatible_extra_args=True)
  out, state = jax.jit(lambda s: tx.update(g_sup, s, aux_grads=g_aux))(tx.init(g_sup))
  np.testing.assert_allclose(out["body"], [1.0, 1.0])
  np.testing.assert_allclose(out["head"], [1.0, 0.0])  # masked out: optax passes g_sup on
  assert float(optax.tree.get(state, "conflict")) == 1.0
  plain = optax.masked(ggr_jax.rectify("vlr"), mask)
  with pytest.raises(ValueError, match="mask_compatible_extra_args=True"):
    plain.update(g_sup, plain.init(g_sup), aux_grads=g_aux)


def test_nnx_optimizer_forwards_aux_grads():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

  model = Model(nnx.Rngs(0))
  _, batch = _problem()
  opt = nnx.Optimizer(model, optax.chain(ggr_jax.rectify("vlr"), optax.sgd(0.1)), wrt=nnx.Param)

  def losses(m):
    pred = m(batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2), jnp.mean((pred + batch["y_aux"]) ** 2)

  g_sup = nnx.grad(lambda m: losses(m)[0])(model)
  g_aux = nnx.grad(lambda m: losses(m)[1])(model)
  before = nnx.state(model, nnx.Param)
  expected = jax.tree.map(lambda p, u: p - 0.1 * u, before, _reference_vlr(g_sup, g_aux))
  opt.update(model, g_sup, aux_grads=g_aux)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               nnx.state(model, nnx.Param), expected)


def test_linen_train_state_adapter():
  model = nn.Dense(3)
  _, batch = _problem()
  params = model.init(jax.random.key(0), batch["x"])
  state = ggr_jax.RectifiedTrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax.chain(ggr_jax.rectify("vlr"), optax.sgd(0.1)))

  @jax.jit
  def step(state):
    def loss(p, target, sign):
      return jnp.mean((state.apply_fn(p, batch["x"]) - sign * target) ** 2)
    g_sup = jax.grad(loss)(state.params, batch["y"], 1.0)
    g_aux = jax.grad(loss)(state.params, batch["y_aux"], -1.0)
    return state.apply_gradients(grads=g_sup, aux_grads=g_aux), (g_sup, g_aux)

  new_state, (g_sup, g_aux) = step(state)
  expected = jax.tree.map(lambda p, u: p - 0.1 * u, params, _reference_vlr(g_sup, g_aux))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state.params, expected)
  assert int(new_state.step) == 1


@pytest.mark.parametrize("mode", ["vlr", "csr"])
def test_bf16_gradients_keep_their_dtype_and_use_f32_math(mode):
  params, batch = _problem()
  g_sup, g_aux = _grads(params, batch)
  kw = dict(subspace_dim=2) if mode == "csr" else {}
  tx = ggr_jax.rectify(mode, **kw)
  to_bf16 = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)
  out16, state = tx.update(to_bf16(g_sup), tx.init(to_bf16(params)), aux_grads=to_bf16(g_aux))
  out32, _ = tx.update(*(jax.tree.map(lambda x: x.astype(jnp.float32), t)
                         for t in (to_bf16(g_sup),)), tx.init(params),
                       aux_grads=jax.tree.map(lambda x: x.astype(jnp.float32), to_bf16(g_aux)))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out16))
  assert state.cos_before.dtype == jnp.float32
  if mode == "csr":
    assert jax.tree.leaves(state.basis)[0].dtype == jnp.float32
  # f32 math then one rounding: equal to the f32 result rounded to bf16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32)), out16, out32)


@pytest.mark.parametrize("mode", ggr_jax.MODES)
def test_no_recompilation_on_later_calls(mode):
  params, batch = _problem()
  kw = dict(subspace_dim=3) if mode in ("osr", "csr") else {}
  tx = optax.chain(ggr_jax.rectify(mode, **kw), optax.sgd(0.1, momentum=0.9))
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    g_sup, g_aux = _grads(params, batch)
    updates, state = tx.update(g_sup, state, params, aux_grads=g_aux)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(4):
    params, state = step(params, state)
  assert len(traces) == 1 and step._cache_size() == 1


@pytest.mark.parametrize("mode,kw", [("vlr", {}), ("csr", dict(subspace_dim=3))])
def test_sharded_batch_over_8_devices_matches_one_device(mode, kw):
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts")
  params, _ = _problem(n=64)
  # A fresh batch per step keeps successive anchors well apart, so the subspace
  # tracker is well conditioned and only summation order differs between layouts.
  batches = [_problem(seed=s, n=64)[1] for s in range(1, 4)]
  tx = optax.chain(ggr_jax.rectify(mode, **kw), optax.sgd(0.05, momentum=0.9, nesterov=True))

  def step(params, state, batch):
    g_sup, g_aux = _grads(params, batch)
    updates, state = tx.update(g_sup, state, params, aux_grads=g_aux)
    return optax.apply_updates(params, updates), state

  def run(params, batches, jitted):
    state = tx.init(params)
    for batch in batches:
      params, state = jitted(params, state, batch)
    return params, state

  single = run(params, batches, jax.jit(step))
  mesh = Mesh(np.array(devices[:8]), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  multi = run(jax.device_put(params, replicated), jax.device_put(batches, sharded),
              jax.jit(step, out_shardings=(replicated, replicated)))
  assert len(multi[0]["w"].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               multi[0], single[0])
  # optimizer state, basis and diagnostics (cosines near 0 only to float tolerance)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               multi[1], single[1])
