"""ImageNet ResNets: BasicBlock ResNet-18, the official Bottleneck ``resnet18``, ResNet-50."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ggr_jax.models import BACKBONES, build_model
from ggr_jax.models.resnet import ResNet, resnet18, resnet18_official, resnet50


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _expected_count(block: str, num_classes: int, layers=(2, 2, 2, 2)) -> int:
  """Parameters of the torchvision layout with ``layers``, counted by hand."""
  expansion = 4 if block == "bottleneck" else 1
  total = 7 * 7 * 3 * 64 + 2 * 64  # stem conv + BN
  width = 64
  for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
    for i in range(count):
      out = planes * expansion
      if block == "bottleneck":
        total += width * planes + 9 * planes * planes + planes * out + 2 * (2 * planes + out)
      else:
        total += 9 * width * planes + 9 * planes * planes + 2 * 2 * planes
      if (stage > 0 and i == 0) or width != out:
        total += width * out + 2 * out  # downsample conv1x1 + BN
      width = out
  return total + width * num_classes + num_classes


def _shapes(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)


def test_basic_resnet18_parameter_count_matches_torchvision():
  x = jnp.zeros((2, 64, 64, 3))
  assert _count(_shapes(resnet18(1000), x)["params"]) == 11_689_512  # torchvision resnet18
  assert _expected_count("basic", 1000) == 11_689_512
  assert _count(_shapes(resnet18(20), x)["params"]) == _expected_count("basic", 20)


def test_resnet50_parameter_count_matches_torchvision():
  x = jnp.zeros((1, 32, 32, 3))
  assert _count(_shapes(resnet50(1000), x)["params"]) == 25_557_032  # torchvision resnet50
  assert _expected_count("bottleneck", 1000, (3, 4, 6, 3)) == 25_557_032


def test_official_resnet18_is_a_bottleneck_net_of_13_99m_parameters_at_20_classes():
  x = jnp.zeros((2, 64, 64, 3))
  variables = _shapes(resnet18_official(20), x)
  count = _count(variables["params"])
  assert count == _expected_count("bottleneck", 20) == 13_987_156
  assert round(count / 1e6, 2) == 13.99  # the official measurement (IN30: 20 known classes)
  p = variables["params"]
  assert set(p["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                "downsample_0", "downsample_1"}  # 64 -> 256 channels
  assert "downsample_0" not in p["layer1_1"] and "downsample_0" in p["layer4_0"]
  assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert p["fc"]["kernel"].shape == (2048, 20)
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  assert len(stats) == 2 * (1 + 8 * 3 + 4)  # stem, 3 per block, 4 downsample BNs
  basic = _shapes(resnet18(20), x)["params"]
  assert "downsample_0" not in basic["layer1_0"] and "downsample_0" in basic["layer2_0"]


@pytest.mark.parametrize("factory,width", [(resnet18, 512), (resnet18_official, 2048)])
def test_stem_strides_by_4_and_network_by_32(factory, width):
  model = factory(20)
  x = jnp.zeros((1, 224, 224, 3))

  def run(x):
    variables = model.init(jax.random.key(0), x)
    return model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])

  out, state = jax.eval_shape(run, x)
  inter = state["intermediates"]
  assert inter["layer1_0"]["__call__"][0].shape == (1, 56, 56, width // 8)
  assert inter["layer4_1"]["__call__"][0].shape == (1, 7, 7, width)
  assert out["feat"].shape == (1, width) and out["logits"].shape == (1, 20)


def test_init_follows_pytorch():
  # One bottleneck block per stage covers every init path (stem, blocks, downsample,
  # fc) at half the compile time; the rbg key compiles faster than threefry on CPU.
  model = ResNet(20, block="bottleneck", layers=(1, 1, 1, 1))
  x = jnp.zeros((1, 32, 32, 3))
  p = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x)["params"]
  fan_out = 9 * 512  # layer4 conv3x3 kernel (3, 3, 512, 512)
  assert np.std(np.asarray(p["layer4_0"]["conv2"]["kernel"])) == pytest.approx(
      np.sqrt(2.0 / fan_out), rel=0.05)
  assert "bias" not in p["conv1"] and "bias" not in p["layer1_0"]["conv2"]
  bound = 1.0 / np.sqrt(2048)  # nn.Linear default: U(-1/sqrt(in), 1/sqrt(in))
  fc_kernel = np.asarray(p["fc"]["kernel"])
  assert np.max(np.abs(fc_kernel)) <= bound and np.std(fc_kernel) == pytest.approx(
      bound / np.sqrt(3.0), rel=0.05)
  assert 0 < np.max(np.abs(p["fc"]["bias"])) <= bound
  for path, leaf in traverse_util.flatten_dict(p).items():
    if path[-2].startswith("bn") or path[-2] == "downsample_1":
      np.testing.assert_array_equal(leaf, 1.0 if path[-1] == "scale" else 0.0)


def _numpy_variables(shapes, seed: int = 0) -> dict:
  """Variables with the init's distributions drawn by numpy (no RNG compile)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in traverse_util.flatten_dict(shapes).items():
    if path[-1] == "kernel" and len(s.shape) == 4:
      value = rng.standard_normal(s.shape) * np.sqrt(2.0 / (np.prod(s.shape[:2]) * s.shape[3]))
    elif path[-1] in ("kernel", "bias") and path[-2] == "fc":
      value = rng.uniform(-1, 1, s.shape) / np.sqrt(2048)
    else:
      value = np.ones(s.shape) if path[-1] in ("scale", "var") else np.zeros(s.shape)
    out[path] = jnp.asarray(value, s.dtype)
  return traverse_util.unflatten_dict(out)


def test_train_mode_updates_batch_stats_with_momentum_and_eval_mode_does_not():
  model = resnet18_official(20)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _numpy_variables(_shapes(model, x))

  @jax.jit
  def forward(variables, x):
    train_out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                     capture_intermediates=lambda m, _: m.name in ("conv1", "bn1"))
    eval_out, unchanged = model.apply(variables, x, train=False, mutable=["batch_stats"])
    return train_out, mutated, eval_out, unchanged

  train_out, mutated, eval_out, unchanged = forward(variables, x)
  old = traverse_util.flatten_dict(variables["batch_stats"])
  new = traverse_util.flatten_dict(mutated["batch_stats"])
  assert set(new) == set(old)
  assert all(not np.allclose(new[k], old[k]) for k in new)
  stem = np.asarray(mutated["intermediates"]["conv1"]["__call__"][0], np.float64)
  n = stem.size // stem.shape[-1]
  normalised = (stem - stem.mean((0, 1, 2))) / np.sqrt(stem.reshape(n, -1).var(0) + 1e-5)
  np.testing.assert_allclose(mutated["intermediates"]["bn1"]["__call__"][0], normalised,
                             rtol=1e-4, atol=1e-5)  # batch statistics, eps 1e-5
  np.testing.assert_allclose(new[("bn1", "mean")], 0.1 * stem.mean((0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(new[("bn1", "var")],
                             0.9 + 0.1 * stem.reshape(n, -1).var(0, ddof=1), rtol=1e-4)
  for k, v in traverse_util.flatten_dict(unchanged["batch_stats"]).items():
    np.testing.assert_array_equal(v, old[k])
  assert train_out["feat"].shape == eval_out["feat"].shape == (2, 2048)
  assert not np.allclose(train_out["logits"], eval_out["logits"])
  # eval mode normalises with the running statistics: a sample's output ignores its batch
  train_other, _, eval_other, _ = forward(variables, x.at[1].set(-x[1]))
  np.testing.assert_allclose(eval_other["logits"][0], eval_out["logits"][0], rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(train_other["logits"][0], train_out["logits"][0], rtol=1e-3)


@pytest.mark.parametrize("head,extra", [
    ("iomatch", {"feat_proj": (2, 128), "logits_open": (2, 21), "logits_mb": (2, 2, 20)}),
    ("openmatch", {"logits_ova": (2, 2, 20)}),
])
def test_official_resnet_in_open_set_net_via_build_model(head, extra):
  assert {"resnet18", "resnet18_official"} <= set(BACKBONES)
  net = build_model("resnet18_official", 20, head, bn_momentum=0.1)
  x = jnp.zeros((2, 64, 64, 3))
  outs, variables = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x))
  assert {k: v.shape for k, v in outs.items()} == {"feat": (2, 2048), "logits": (2, 20), **extra}
  assert net.backbone.bn_momentum == 0.1
  heads = 2048 * 2048 + 2048 + 2048 * 128 + 128 + 128 * 21 + 21 + 128 * 40 \
      if head == "iomatch" else 2048 * 40
  assert _count(variables["params"]) == _expected_count("bottleneck", 20) + heads
  assert _count(variables["params"]["backbone"]) == 13_987_156


def test_bad_configuration_is_a_clear_error():
  x = jnp.zeros((2, 32, 32, 3))
  with pytest.raises(ValueError, match="block must be"):
    _shapes(ResNet(20, block="wide"), x)
  with pytest.raises(ValueError, match="4 positive block counts"):
    _shapes(ResNet(20, layers=(2, 2, 2)), x)
  with pytest.raises(ValueError, match="NHWC"):
    _shapes(resnet18(20), jnp.zeros((32, 32, 3)))
