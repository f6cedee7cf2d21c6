"""Per-sample gradient geometry of two views: the exact, vmap and sketch methods agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ggr_jax import consistency
from ggr_jax.models import build_model
from ggr_jax.models.layers import BatchNorm
from ggr_jax.ssl.ggcr import encoder_scope
from ggr_jax.train.state import make_apply_fn
from tests.conftest import float64_convolutions_by_matmul

# (backbone, image side, channels, labeled rows, pairs)
MODELS = {"cnn": ("cnn", 8, 1, 2, 4), "wrn28_2": ("wrn28_2", 32, 3, 1, 2)}


def _problem(name, dtype):
  """A model in train mode (BatchNorm) on [labeled; weak; strong] rows, CE to the weak argmax."""
  backbone, side, channels, n_lb, n = MODELS[name]
  model = build_model(backbone, 6, "none")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, side, side, channels)), train=False)
  params = jax.tree.map(lambda a: a.astype(dtype), variables["params"])
  stats, apply_fn = variables["batch_stats"], make_apply_fn(model)
  x = jax.random.normal(jax.random.PRNGKey(1), (n_lb + 2 * n, side, side, channels), dtype)
  x = x.at[n_lb + n:].multiply(1.5)  # the "strong" views differ
  rows = (n_lb + jnp.arange(n), n_lb + n + jnp.arange(n))

  def losses(p):
    logits = apply_fn(p, stats, x, True)[0]["logits"]
    yhat = jnp.argmax(jax.lax.stop_gradient(logits[rows[0]]), -1)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return ce(logits[rows[0]], yhat), ce(logits[rows[1]], yhat)

  return losses, params, rows


def _one_sample_problem(name, dtype, statistics="held"):
  """The same losses as ``_problem``, one sample at a time with the batch statistics replayed.

  The last value, ``params -> (sample_fn, samples)``, records the statistics from the
  forward at those parameters, so that a gradient through it reaches them (as
  ``statistics="through"`` says) unless they are replayed ``"held"``.
  """
  backbone, side, channels, n_lb, n = MODELS[name]
  losses, params, rows = _problem(name, dtype)
  model = build_model(backbone, 6, "none")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, side, side, channels)), train=False)
  stats, apply_fn = variables["batch_stats"], make_apply_fn(model)
  x = jax.random.normal(jax.random.PRNGKey(1), (n_lb + 2 * n, side, side, channels), dtype)
  x = x.at[n_lb + n:].multiply(1.5)
  ce = optax.softmax_cross_entropy_with_integer_labels

  def at(params_):
    (out, _), recorded = consistency.recorded_batch_statistics(apply_fn, params_, stats, x, True)
    yhat = jnp.argmax(jax.lax.stop_gradient(out["logits"][rows[0]]), -1)

    def sample_fn(p, sample):
      x_w, x_s, label = sample
      with consistency.replayed_batch_statistics(recorded, statistics):
        logits = apply_fn(p, stats, jnp.stack([x_w, x_s]), True)[0]["logits"]
      return ce(logits[0], label), ce(logits[1], label)

    return sample_fn, (x[rows[0]], x[rows[1]], yhat)

  return losses, params, rows, at


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  if request.param == "float64":
    jax.config.update("jax_enable_x64", True)
    with float64_convolutions_by_matmul():
      yield jnp.float64
    jax.config.update("jax_enable_x64", False)
  else:
    yield jnp.float32


# float64 on the CNN proves the identity to 1e-10; the WRN (float32) covers a deep BN net
CASES = [("cnn", "float32"), ("cnn", "float64"), ("wrn28_2", "float32")]


@pytest.mark.parametrize("name, dtype", CASES, indirect=["dtype"])
def test_exact_equals_the_vmap_definition(name, dtype):
  losses, params, rows = _problem(name, dtype)
  exact = jax.jit(lambda p: consistency.view_geometry(losses, p, scope=encoder_scope,
                                                      view_rows=rows))(params)
  ref = jax.jit(lambda p: consistency.view_geometry(losses, p, scope=encoder_scope,
                                                    method="vmap"))(params)
  rtol = 1e-4 if dtype == jnp.float32 else 1e-10
  for field in ("dot", "sq_w", "sq_s"):
    np.testing.assert_allclose(getattr(exact, field), getattr(ref, field), rtol=rtol)
  assert np.all(np.abs(ref.cos) <= 1.0) and np.ptp(np.asarray(ref.cos)) > 0


@pytest.mark.parametrize("name, dtype", CASES, indirect=["dtype"])
def test_vmap_of_one_sample_gradients_with_replayed_statistics_equals_exact(name, dtype):
  losses, params, rows, at = _one_sample_problem(name, dtype)
  sample_fn, samples = at(params)
  exact = jax.jit(lambda p: consistency.view_geometry(losses, p, scope=encoder_scope,
                                                      view_rows=rows))(params)
  per_sample = jax.jit(lambda p: consistency.view_geometry(
      losses, p, scope=encoder_scope, method="vmap", sample_fn=sample_fn, samples=samples,
      microbatch=2))(params)
  rtol = 1e-4 if dtype == jnp.float32 else 1e-10
  for field in ("dot", "sq_w", "sq_s"):
    np.testing.assert_allclose(getattr(per_sample, field), getattr(exact, field), rtol=rtol)


def test_replaying_statistics_of_another_forward_is_refused():
  model = build_model("cnn", 6, "none")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
  apply_fn = make_apply_fn(model)
  with pytest.raises(ValueError, match="was not recorded"):
    with consistency.replayed_batch_statistics({}):
      apply_fn(variables["params"], variables["batch_stats"], jnp.zeros((2, 8, 8, 1)), True)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("dtype", ["float64"], indirect=True)
@pytest.mark.parametrize("statistics", consistency.STATISTICS)
def test_second_order_gradients_agree_between_exact_and_vmap(dtype, statistics):
  """With the statistics ``"through"``, the one-sample reference records them from the
  differentiated parameters and replays them plainly: ``jax.grad`` reaches them by
  itself, with no rule for the innermost derivative, and the others must agree."""
  losses, params, rows, at = _one_sample_problem("cnn", dtype, statistics)

  def grad(method, **kw):
    def objective(p):
      extra = dict(zip(("sample_fn", "samples"), at(p))) if kw.pop("one", False) else {}
      cos = consistency.view_geometry(losses, p, scope=encoder_scope, method=method,
                                      statistics=statistics, **kw, **extra).cos
      return jnp.mean(1.0 - cos)
    return jax.jit(jax.grad(objective))(params)

  exact, ref = grad("exact", view_rows=rows), grad("vmap", microbatch=4)
  one = grad("vmap", one=True)
  rtol = 1e-9
  for other in (exact, one):
    np.testing.assert_allclose(_flat(other), _flat(ref), rtol=rtol,
                               atol=rtol * np.abs(_flat(ref)).max())
  assert np.abs(_flat(ref)).max() > 0  # the regulariser has a gradient only through 2nd order


@pytest.mark.parametrize("dtype", ["float64"], indirect=True)
def test_statistics_through_differ_from_held_only_by_the_statistics_path(dtype):
  """On a BatchNorm network the two second-order terms differ; on the same network
  evaluated with fixed (running) statistics, where nothing depends on the batch, they
  are equal: the difference is the statistics' dependence on the parameters."""
  losses, params, rows = _problem("cnn", dtype)

  def grad(losses_fn, statistics):
    objective = lambda p: jnp.mean(1.0 - consistency.view_geometry(
        losses_fn, p, scope=encoder_scope, view_rows=rows, statistics=statistics).cos)
    return _flat(jax.jit(jax.grad(objective))(params))

  held, through = grad(losses, "held"), grad(losses, "through")
  assert np.abs(held - through).max() > 1e-3 * np.abs(held).max()
  np.testing.assert_allclose(jnp.mean(jnp.abs(held)), jnp.mean(jnp.abs(through)), rtol=0.5)

  backbone, side, channels, n_lb, n = MODELS["cnn"]
  model = build_model(backbone, 6, "none")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, side, side, channels)), train=False)
  apply_fn = make_apply_fn(model)
  x = jax.random.normal(jax.random.PRNGKey(1), (n_lb + 2 * n, side, side, channels), dtype)
  ce = optax.softmax_cross_entropy_with_integer_labels

  def running(p):  # eval mode: the running statistics, the same for every batch
    logits = apply_fn(p, variables["batch_stats"], x, False)[0]["logits"]
    yhat = jnp.argmax(jax.lax.stop_gradient(logits[rows[0]]), -1)
    return ce(logits[rows[0]], yhat), ce(logits[rows[1]], yhat)

  np.testing.assert_array_equal(grad(running, "held"), grad(running, "through"))


@pytest.mark.parametrize("dtype", ["float64"], indirect=True)
def test_rematerialised_patches_and_rows_by_slice_change_no_value_or_gradient(dtype):
  losses, params, rows = _problem("cnn", dtype)
  slices = tuple(slice(int(r[0]), int(r[-1]) + 1) for r in rows)

  def value_and_grad(**kw):
    def objective(p):
      return jnp.mean(1.0 - consistency.view_geometry(losses, p, scope=encoder_scope,
                                                      **kw).cos)
    return jax.jit(jax.value_and_grad(objective))(params)

  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  ref_value, ref_grad = value_and_grad(view_rows=rows, remat=False)
  for kw in (dict(view_rows=rows, remat=True), dict(view_rows=slices, remat=False),
             dict(view_rows=slices)):
    value, grad = value_and_grad(**kw)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(flat(grad), flat(ref_grad), rtol=1e-9,
                               atol=1e-9 * np.abs(flat(ref_grad)).max())
  assert np.abs(flat(ref_grad)).max() > 0


@pytest.mark.parametrize("name, dims, keys", [("cnn", (16, 64, 256), 4)])
def test_sketch_error_shrinks_like_one_over_root_k(name, dims, keys):
  losses, params, _ = _problem(name, jnp.float32)
  exact = np.asarray(jax.jit(lambda p: consistency.view_geometry(
      losses, p, scope=encoder_scope, method="vmap").cos)(params))
  errors = {}
  for k in dims:
    sketch = jax.jit(lambda p, key, k=k: consistency.view_geometry(
        losses, p, scope=encoder_scope, method="sketch", key=key, sketch_dim=k).cos)
    per_key = [np.asarray(sketch(params, jax.random.PRNGKey(s))) - exact for s in range(keys)]
    errors[k] = float(np.sqrt(np.mean(np.square(per_key))))
    # the cosine of two k-dimensional Gaussian sketches: std about (1 - cos^2) / sqrt(k)
    assert errors[k] < 3.0 * np.max(1.0 - exact ** 2) / np.sqrt(k) + 1e-3, errors
  assert errors[dims[-1]] <= errors[dims[0]]


@pytest.mark.parametrize("chunk", [4, 5])  # 5: a last chunk of 2 of the 12 directions
def test_sketch_in_chunks_is_the_same_sketch_and_the_same_gradient(chunk):
  losses, params, _ = _problem("cnn", jnp.float32)
  key = jax.random.PRNGKey(3)

  def objective(p, sketch_chunk):
    geometry = consistency.view_geometry(losses, p, scope=encoder_scope, method="sketch",
                                         key=key, sketch_dim=12, sketch_chunk=sketch_chunk)
    return jnp.sum(1.0 - geometry.cos), geometry

  (value, whole), grad = jax.jit(jax.value_and_grad(
      lambda p: objective(p, None), has_aux=True))(params)
  (value_c, chunked), grad_c = jax.jit(jax.value_and_grad(
      lambda p: objective(p, chunk), has_aux=True))(params)
  for a, b in zip(whole, chunked):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(value_c, value, rtol=1e-6)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  np.testing.assert_allclose(flat(grad_c), flat(grad), rtol=1e-4,
                             atol=1e-5 * np.abs(flat(grad)).max())
  assert np.abs(flat(grad)).max() > 0


def test_frozen_statistics_change_no_value_and_decouple_rows():
  model = build_model("cnn", 6, "none")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
  apply_fn = make_apply_fn(model)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))

  def row0_loss(images):
    logits = apply_fn(variables["params"], variables["batch_stats"], images, True)[0]["logits"]
    return jax.nn.logsumexp(logits[0])

  with consistency.frozen_batch_statistics():
    frozen_value, frozen = jax.value_and_grad(row0_loss)(x)
  value, coupled = jax.value_and_grad(row0_loss)(x)
  np.testing.assert_allclose(frozen_value, value, rtol=1e-6)  # same forward
  assert float(jnp.abs(coupled[1:]).max()) > 0  # BatchNorm couples the rows ...
  assert float(jnp.abs(frozen[1:]).max()) == 0.0  # ... unless its statistics are held
  assert float(jnp.abs(frozen[0]).max()) > 0


def test_frozen_statistics_normalise_to_the_same_bits_as_differentiated_ones():
  """XLA merges the exact geometry's forward (statistics held) with the loss's own
  (statistics differentiated) only if both compute the same bits; with ``1 / sqrt`` it
  rewrote the held one to ``rsqrt`` and ran every layer after the first twice."""
  bn = BatchNorm()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 512)) * jax.random.uniform(
      jax.random.PRNGKey(1), (512,), minval=0.01, maxval=30.0)
  variables = bn.init(jax.random.PRNGKey(2), x, use_running_average=True)
  forward = lambda images: bn.apply(variables, images, use_running_average=False,
                                    mutable=["batch_stats"])[0]

  @jax.jit
  def both(images):
    held = lambda images: _frozen(forward, images)
    (y, back), (y_held, back_held) = jax.vjp(forward, images), jax.vjp(held, images)
    return y, y_held, back(jnp.ones_like(y))[0], back_held(jnp.ones_like(y))[0]

  y, y_held, grad, grad_held = both(x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_held))
  assert float(jnp.abs(grad - grad_held).max()) > 0  # the derivatives do differ


def _frozen(fn, *args):
  with consistency.frozen_batch_statistics():
    return fn(*args)


def test_empty_scope_and_unsupported_layers_are_named():
  losses, params, rows = _problem("cnn", jnp.float32)
  nothing = jax.tree.map(lambda _: False, params)
  with pytest.raises(ValueError, match="selects no parameter"):
    consistency.view_geometry(losses, params, scope=nothing)
  with pytest.raises(ValueError, match="method must be one of"):
    consistency.view_geometry(losses, params, method="fast")
  with pytest.raises(ValueError, match="needs key"):
    consistency.view_geometry(losses, params, method="sketch")

  class Scaled(nn.Module):  # a bare parameter: no layer the exact method knows
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="dense")(x) * self.param("gain", nn.initializers.ones, ())

  net = Scaled()
  p = net.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
  x = jnp.ones((4, 3))
  fn = lambda q: tuple(jnp.split(net.apply({"params": q}, x)[:, 0], 2))
  with pytest.raises(ValueError, match="gain"):
    consistency.view_geometry(fn, p)
  ok = consistency.view_geometry(fn, p, method="vmap")
  assert ok.cos.shape == (2,)


def test_single_forward_statistics_are_the_recorded_ones_of_one_forward_only():
  model = build_model("cnn", 6, "none")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
  apply_fn, stats = make_apply_fn(model), variables["batch_stats"]
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))
  once = lambda p: apply_fn(p, stats, x, True)[0]["logits"]
  twice = lambda p: once(p) + apply_fn(p, stats, x[:3], True)[0]["logits"][:1]
  out, single = consistency.single_forward_statistics(once, 6, variables["params"])
  _, recorded = consistency.recorded_batch_statistics(once, variables["params"])
  np.testing.assert_array_equal(out, once(variables["params"]))
  assert single is not None and single.keys() == recorded.keys()
  jax.tree.map(np.testing.assert_array_equal, single, recorded)
  assert consistency.single_forward_statistics(once, 5, variables["params"])[1] is None
  assert consistency.single_forward_statistics(twice, 6, variables["params"])[1] is None
