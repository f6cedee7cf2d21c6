"""WideResNet (WRN-28-2 by default) as in the official GGR/USB code, NHWC.

Submodule names follow the official PyTorch names with ``.`` replaced by ``/``
and ``layer.<i>`` by ``layer_<i>`` (``backbone.block2.layer.0.convShortcut`` is
``block2/layer_0/convShortcut`` here), so :mod:`ggr_jax.models.convert` maps them
one to one.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from ggr_jax.models import inits
from ggr_jax.models.layers import BatchNorm, FeatureTap

_PAD3 = ((1, 1), (1, 1))  # symmetric, also at stride 2 ('SAME' would pad (0, 1))


def _conv(features: int, in_features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  """A conv with bias, kaiming-normal (fan_out) kernel and PyTorch's default bias init."""
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=_PAD3 if kernel == 3 else ((0, 0), (0, 0)),
      kernel_init=inits.conv_kaiming_fan_out,
      bias_init=inits.torch_default_bias(in_features * kernel * kernel), name=name)


class BasicBlock(nn.Module):
  """Pre-activation residual block: BN-LReLU-conv3x3-BN-LReLU-conv3x3.

  When the channel count changes, the block's input is activated first and both
  the residual branch and the 1x1 ``convShortcut`` take the activated input;
  otherwise the skip connection carries the raw input.
  """

  in_features: int
  features: int
  stride: int
  bn_momentum: float
  bn_eps: float
  leaky_slope: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    def bn_act(h, name):
      h = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                    epsilon=self.bn_eps, name=name)(h)
      return nn.leaky_relu(h, self.leaky_slope)

    act = bn_act(x, "bn1")
    out = _conv(self.features, self.in_features, 3, self.stride, "conv1")(act)
    out = bn_act(out, "bn2")
    out = _conv(self.features, self.features, 3, 1, "conv2")(out)
    if self.in_features == self.features:
      return x + out
    shortcut = _conv(self.features, self.in_features, 1, self.stride, "convShortcut")(act)
    return shortcut + out


class NetworkBlock(nn.Module):
  """A stage of ``num_layers`` BasicBlocks; the first one changes width and stride."""

  num_layers: int
  in_features: int
  features: int
  stride: int
  bn_momentum: float
  bn_eps: float
  leaky_slope: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    for i in range(self.num_layers):
      x = BasicBlock(
          self.in_features if i == 0 else self.features, self.features,
          self.stride if i == 0 else 1, self.bn_momentum, self.bn_eps, self.leaky_slope,
          name=f"layer_{i}")(x, train)
    return x


class WideResNet(nn.Module):
  """WideResNet-depth-widen_factor for 32x32 NHWC images.

  Stem conv3x3 (16), three stages of ``(depth - 4) / 6`` BasicBlocks with widths
  ``16k, 32k, 64k`` and strides 1, 2, 2, then BN, LeakyReLU, global average pool
  (``feat``) and the linear classifier ``fc`` (``logits``). ``bn_momentum`` uses
  the PyTorch convention. WRN-28-2 with 6 classes has 1,469,126 parameters.
  """

  num_classes: int
  depth: int = 28
  widen_factor: int = 2
  bn_momentum: float = 0.001
  bn_eps: float = 1e-3
  leaky_slope: float = 0.1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    if (self.depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}.")
    n = (self.depth - 4) // 6
    widths = [16, 16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    h = _conv(widths[0], x.shape[-1], 3, 1, "conv1")(x)
    for stage, stride in enumerate((1, 2, 2)):
      h = NetworkBlock(n, widths[stage], widths[stage + 1], stride, self.bn_momentum,
                       self.bn_eps, self.leaky_slope, name=f"block{stage + 1}")(h, train)
    h = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                  epsilon=self.bn_eps, name="bn1")(h)
    feat = jnp.mean(nn.leaky_relu(h, self.leaky_slope), axis=(1, 2))
    feat = FeatureTap(name="feature")(feat)
    logits = nn.Dense(self.num_classes, kernel_init=inits.xavier_normal, name="fc")(feat)
    return {"feat": feat, "logits": logits}
