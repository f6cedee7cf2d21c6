"""WRN-28-2, the PyTorch-semantics BatchNorm, the weight converter and the IOMatch losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ggr_jax.models import convert, wrn
from ggr_jax.models.heads import OpenSetNet
from ggr_jax.models.layers import BatchNorm
from ggr_jax.models.wrn import WideResNet
from ggr_jax.ssl import LossContext, iomatch


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def wrn_variables():
  model = WideResNet(6)
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  return model, init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))


def test_wrn_28_2_parameter_count_and_layout(wrn_variables):
  _, variables = wrn_variables
  assert _count(variables["params"]) == 1_469_126
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  assert len(stats) == 2 * 25  # mean and var of 25 BatchNorms
  blocks = variables["params"]["block2"]
  assert set(blocks) == {"layer_0", "layer_1", "layer_2", "layer_3"}
  assert "convShortcut" in blocks["layer_0"] and "convShortcut" not in blocks["layer_1"]
  assert "convShortcut" in variables["params"]["block1"]["layer_0"]  # 16 -> 32
  full = jax.eval_shape(convert.default_model(6).init, jax.random.key(0),
                        jnp.zeros((2, 32, 32, 3)))
  assert _count(full["params"]) == 1_504_589  # official GGRIOMatchNet element count


def test_wrn_init_follows_pytorch(wrn_variables):
  _, variables = wrn_variables
  p = variables["params"]
  stem = p["conv1"]
  # kaiming normal with fan_out = 128 * 3 * 3
  assert np.std(np.asarray(p["block3"]["layer_1"]["conv1"]["kernel"])) == pytest.approx(
      np.sqrt(2.0 / (128 * 9)), rel=0.05)
  bias_bound = 1.0 / np.sqrt(3 * 3 * 3)
  assert 0 < np.max(np.abs(stem["bias"])) <= bias_bound
  np.testing.assert_array_equal(p["fc"]["bias"], 0.0)
  np.testing.assert_array_equal(p["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], 1.0)


def test_wrn_and_heads_output_shapes(wrn_variables):
  model, variables = wrn_variables
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert out["feat"].shape == (3, 128) and out["logits"].shape == (3, 6)
  out_train, mutated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert out_train["logits"].shape == (3, 6)
  assert not np.allclose(mutated["batch_stats"]["bn1"]["mean"], 0.0)
  net = OpenSetNet(model, 6, head="iomatch")
  outs = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x)[0])
  assert {k: v.shape for k, v in outs.items()} == {
      "feat": (3, 128), "logits": (3, 6), "feat_proj": (3, 128), "logits_open": (3, 7),
      "logits_mb": (3, 2, 6)}


def test_stride_two_conv_pads_symmetrically():
  # 4x4 input, 3x3 ones kernel, stride 2, padding (1, 1): output (i, j) sums input rows
  # and columns 2i-1..2i+1 (clipped); 'SAME' would pad (0, 1) and sum 2i..2i+2.
  x = np.arange(16.0).reshape(1, 4, 4, 1)
  conv = wrn._conv(1, 1, 3, 2, "probe")
  y = conv.apply({"params": {"kernel": jnp.ones((3, 3, 1, 1)), "bias": jnp.zeros(1)}}, x)
  want = [[x[0, max(2 * i - 1, 0):2 * i + 2, max(2 * j - 1, 0):2 * j + 2].sum()
           for j in range(2)] for i in range(2)]
  np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], want)


def test_batchnorm_train_mode_matches_pytorch_formulas():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 3, 2, 5)).astype(np.float32) * 3 + 1
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)  # init does not update
  y, mutated = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  x64 = x.astype(np.float64).reshape(-1, 5)
  mean, var_b, var_u = x64.mean(0), x64.var(0), x64.var(0, ddof=1)
  np.testing.assert_allclose(y, ((x64 - mean) / np.sqrt(var_b + 1e-3)).reshape(x.shape),
                             rtol=1e-5, atol=1e-5)
  stats = mutated["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.001 * mean, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(stats["var"], 0.999 + 0.001 * var_u, rtol=1e-7, atol=1e-9)
  # the biased variance (flax's nn.BatchNorm) is measurably different: n = 24
  assert not np.allclose(stats["var"], 0.999 + 0.001 * var_b, rtol=1e-7, atol=1e-9)
  y_eval = bn.apply({"params": variables["params"], **mutated}, x, use_running_average=True)
  np.testing.assert_allclose(
      y_eval, ((x64 - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-3)).reshape(x.shape),
      rtol=1e-5, atol=1e-5)


def test_batchnorm_statistics_are_float32_for_bfloat16_inputs():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4)), jnp.bfloat16)
  variables = BatchNorm().init(jax.random.key(0), x, use_running_average=False)
  assert variables["batch_stats"]["var"].dtype == jnp.float32
  _, mutated = BatchNorm().apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert mutated["batch_stats"]["mean"].dtype == jnp.float32


@pytest.fixture(scope="module")
def official_arrays():
  """Random arrays under every official name of GGRIOMatchNet(wrn_28_2(6)), official layout."""
  shapes = jax.eval_shape(convert.default_model(6).init, jax.random.key(0),
                          jnp.zeros((2, 32, 32, 3)))
  rng = np.random.default_rng(0)
  arrays = {}
  for collection, prefix in (("params", "param/"), ("batch_stats", "buffer/")):
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes[collection])
    for name, z in convert.flax_to_official(zeros, collection).items():
      arrays[prefix + name] = rng.standard_normal(z.shape).astype(np.float32)
  for name in list(arrays):
    if name.endswith(".running_mean"):
      arrays[name.replace("running_mean", "num_batches_tracked")] = np.array(0, np.int64)
  return arrays


def test_converter_layouts_and_round_trip(official_arrays):
  variables = convert.official_to_flax(official_arrays)
  p = variables["params"]
  w = official_arrays["param/backbone.block2.layer.0.conv1.weight"]  # OIHW
  assert w.shape == (64, 32, 3, 3)
  k = p["backbone"]["block2"]["layer_0"]["conv1"]["kernel"]
  assert k.shape == (3, 3, 32, 64) and k[2, 1, 5, 7] == w[7, 5, 2, 1]
  fc = official_arrays["param/backbone.fc.weight"]
  np.testing.assert_array_equal(p["backbone"]["fc"]["kernel"], fc.T)
  np.testing.assert_array_equal(p["mlp_proj_2"]["bias"], official_arrays["param/mlp_proj.2.bias"])
  np.testing.assert_array_equal(p["backbone"]["block1"]["layer_3"]["bn2"]["scale"],
                                official_arrays["param/backbone.block1.layer.3.bn2.weight"])
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["bn1"]["var"],
                                official_arrays["buffer/backbone.bn1.running_var"])
  back = {"param/" + n: a for n, a in convert.flax_to_official(p).items()}
  back.update({"buffer/" + n: a for n, a in
               convert.flax_to_official(variables["batch_stats"], "batch_stats").items()})
  expected = {k: v for k, v in official_arrays.items() if not k.endswith("num_batches_tracked")}
  assert set(back) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  bare = {k.partition("/")[2]: v for k, v in official_arrays.items()}
  bare_vars = convert.official_to_flax(bare, dtype=np.float64)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), bare_vars, variables))
  assert jax.tree.leaves(bare_vars)[0].dtype == np.float64
  model = convert.default_model(6)
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3)))
  assert out["logits_mb"].shape == (2, 2, 6)


def test_converter_names_missing_and_unexpected_keys(official_arrays):
  arrays = dict(official_arrays)
  del arrays["param/mb_classifiers.weight"]
  arrays["param/backbone.fc2.weight"] = np.zeros((6, 128), np.float32)
  arrays["fwd/logits"] = np.zeros((2, 6), np.float32)
  with pytest.raises(KeyError) as err:
    convert.official_to_flax(arrays)
  msg = str(err.value)
  assert "mb_classifiers.weight" in msg and "backbone.fc2.weight" in msg and "fwd/logits" in msg
  arrays = dict(official_arrays)
  arrays["param/mlp_proj.0.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match="mlp_proj.0.bias"):
    convert.official_to_flax(arrays)


def _np_softmax(z, axis=-1):
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def test_iomatch_targets_and_masks_by_hand():
  # sample 0: p = (.5, .5), r_out = .5 everywhere -> s = .5 exactly: not inlier (strict <);
  #   max p = .5 >= p_cutoff .5 -> p_mask 1; q = (.25, .25, .5) -> q_mask 1 (>= .5).
  # sample 1: confident closed prediction, outlier head says inlier.
  logits_w = np.array([[0.0, 0.0], [4.0, -4.0]])
  logits_mb = np.array([[[0.0, 0.0], [0.0, 0.0]], [[-3.0, 1.0], [3.0, -1.0]]])
  t = iomatch.iomatch_targets(jnp.asarray(logits_w), jnp.asarray(logits_mb),
                              p_cutoff=0.5, q_cutoff=0.5)
  p, r = _np_softmax(logits_w), _np_softmax(logits_mb, axis=1)
  s = (p * r[:, 0]).sum(-1)
  np.testing.assert_allclose(t["p"], p, rtol=1e-6)
  np.testing.assert_allclose(t["r"], r, rtol=1e-6)
  np.testing.assert_allclose(t["q"], np.concatenate([p * r[:, 1], s[:, None]], -1), rtol=1e-6)
  assert float(t["out_scores"][0]) == 0.5
  np.testing.assert_array_equal(t["in_mask"], [0.0, 1.0])
  np.testing.assert_array_equal(t["p_mask"], [1.0, 1.0])
  np.testing.assert_array_equal(t["ui_weight"], [0.0, 1.0])
  np.testing.assert_array_equal(t["q_mask"], [1.0, float((p[1] * r[1, 1]).max() >= 0.5)])
  np.testing.assert_array_equal(t["op_weight"], t["q_mask"])


def _toy_problem(seed=0, k=3, n_lb=2, n_ulb=4, dim=5):
  rng = np.random.default_rng(seed)
  params = {name: jnp.asarray(rng.standard_normal(shape), jnp.float32) for name, shape in
            (("closed", (dim, k)), ("open", (dim, k + 1)), ("mb", (dim, 2 * k)))}
  batch = {"x_lb": jnp.asarray(rng.standard_normal((n_lb, dim)), jnp.float32),
           "y_lb": jnp.asarray(rng.integers(0, k, n_lb)),
           "x_ulb_w": jnp.asarray(rng.standard_normal((n_ulb, dim)), jnp.float32),
           "x_ulb_s": jnp.asarray(rng.standard_normal((n_ulb, dim)), jnp.float32)}

  def apply_fn(params, state, x, train):
    assert train
    mb = x @ params["mb"]
    return ({"logits": x @ params["closed"], "logits_open": x @ params["open"],
             "logits_mb": mb.reshape(x.shape[0], 2, k)}, {"calls": state["calls"] + 1})

  return params, batch, apply_fn


def _np_losses(params, batch, cfg, step):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x_lb, y = np.asarray(batch["x_lb"], np.float64), np.asarray(batch["y_lb"])
  x_w, x_s = np.asarray(batch["x_ulb_w"], np.float64), np.asarray(batch["x_ulb_s"], np.float64)
  k = p["closed"].shape[1]
  n_ulb = x_w.shape[0]
  rows = np.arange(len(y))
  ce = -np.log(_np_softmax(x_lb @ p["closed"]))[rows, y].mean()
  pm = _np_softmax((x_lb @ p["mb"]).reshape(-1, 2, k), axis=1)
  onehot = np.eye(k)[y]
  mb = (-np.log(pm[rows, 1, y] + 1e-8)).mean() + (
      -np.log(pm[:, 0] + 1e-8) * (1 - onehot)).max(-1).mean()
  pw = _np_softmax(x_w @ p["closed"])
  rw = _np_softmax((x_w @ p["mb"]).reshape(-1, 2, k), axis=1)
  s = (pw * rw[:, 0]).sum(-1)
  q = np.concatenate([pw * rw[:, 1], s[:, None]], -1)
  ui_w = (s < 0.5) * (pw.max(-1) >= cfg.p_cutoff)
  op_w = q.max(-1) >= cfg.q_cutoff
  ui = (ui_w * -(pw * np.log(_np_softmax(x_s @ p["closed"]))).sum(-1)).sum() / n_ulb
  op = (op_w * -(q * np.log(_np_softmax(x_s @ p["open"]))).sum(-1)).sum() / n_ulb
  op *= float(step >= cfg.op_warmup_steps)
  return ce + cfg.lambda_mb * mb, cfg.lambda_u * ui + cfg.lambda_op * op, ce, mb, ui, op, ui_w, op_w


@pytest.mark.parametrize("seed,p_cutoff,q_cutoff", [(0, 0.0, 0.0), (1, 0.6, 0.3), (2, 0.5, 0.4)])
def test_iomatch_losses_match_numpy(seed, p_cutoff, q_cutoff):
  params, batch, apply_fn = _toy_problem(seed)
  cfg = iomatch.default_config()
  cfg.p_cutoff, cfg.q_cutoff, cfg.lambda_mb, cfg.lambda_op = p_cutoff, q_cutoff, 0.7, 1.3
  fn = jax.jit(lambda p, step: iomatch.losses(
      LossContext(apply_fn, p, {"calls": 0}, batch, None, step, cfg)))
  for step in (0, 5000):
    out = fn(params, step)
    sup, aux, state, metrics = out.sup, out.aux, out.model_state, out.metrics
    want = _np_losses(params, batch, cfg, step)
    np.testing.assert_allclose([sup, aux], want[:2], rtol=1e-5, atol=1e-6)
    terms = {**out.supervised, **out.auxiliary}
    weights = (1.0, cfg.lambda_mb, cfg.lambda_u, cfg.lambda_op)  # terms carry their weights
    np.testing.assert_allclose(
        [terms[k] for k in ("sup_closed", "sup_mb", "ui", "op")],
        [w * x for w, x in zip(weights, want[2:6])], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["monitors/ui_weight"], want[6].mean())
    np.testing.assert_allclose(metrics["monitors/q_mask"], want[7].mean())
    assert int(state["calls"]) == 1  # one forward
  assert float(_np_losses(params, batch, cfg, 5000)[5]) > 0  # op is really switched on


def test_iomatch_gradients_skip_detached_heads_and_run_in_float64():
  with jax.enable_x64(True):
    params, batch, apply_fn = _toy_problem(3)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    batch = {k: (v.astype(jnp.float64) if k != "y_lb" else v) for k, v in batch.items()}
    cfg = iomatch.default_config()
    cfg.p_cutoff = cfg.q_cutoff = 0.0

    def both(p):
      out = iomatch.losses(LossContext(apply_fn, p, {"calls": 0}, batch, None, 2000, cfg))
      return out.sup, out.aux

    @jax.jit
    def grads(p):
      (sup, aux), vjp_fn = jax.vjp(both, p)
      (g_sup,) = vjp_fn((jnp.ones_like(sup), jnp.zeros_like(aux)))
      (g_aux,) = vjp_fn((jnp.zeros_like(sup), jnp.ones_like(aux)))
      return sup, aux, g_sup, g_aux

    sup, aux, g_sup, g_aux = grads(params)
    assert sup.dtype == jnp.float64
    np.testing.assert_array_equal(g_sup["open"], 0.0)  # open head: aux only
    np.testing.assert_array_equal(g_aux["mb"], 0.0)  # targets are detached
    assert np.abs(g_aux["open"]).max() > 0 and np.abs(g_sup["mb"]).max() > 0
    want = _np_losses(params, batch, cfg, 2000)
    np.testing.assert_allclose([sup, aux], want[:2], rtol=1e-12)


@pytest.mark.parametrize("window,stride,padding,size,tied", [
    (2, 2, 0, 8, True), (2, 2, 0, 7, False), (3, 2, 1, 9, True), (3, 2, 1, 8, False)])
def test_max_pool_gives_flax_values_and_gradients_ties_included(window, stride, padding, size,
                                                                tied):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from ggr_jax.models.layers import max_pool  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(size), (3, size, size, 4))
  if tied:  # few distinct values: most windows hold their maximum more than once
    x = jnp.round(x)
  ours = lambda h: max_pool(h, window, stride, padding)
  theirs = lambda h: nn.max_pool(h, (window, window), strides=(stride, stride),
                                 padding=((padding, padding),) * 2)
  np.testing.assert_array_equal(ours(x), theirs(x))
  loss = lambda f: jax.grad(lambda h: jnp.sum(jnp.sin(f(h)) * jnp.arange(f(h).size).reshape(
      f(h).shape)))(x)
  np.testing.assert_allclose(loss(ours), loss(theirs), rtol=1e-6, atol=1e-6)
