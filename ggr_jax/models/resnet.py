"""ImageNet-style ResNets, NHWC: BasicBlock ResNet-18, the official ``resnet18``, ResNet-50.

The official GGR ``resnet18`` (``nets/resnet/resnet.py``) is the torchvision ResNet
layout with ``Bottleneck`` blocks and layers ``[2, 2, 2, 2]`` (a bottleneck
ResNet-26, 2048 features); :func:`resnet18_official` builds it. :func:`resnet18`
is the standard BasicBlock ResNet-18 (512 features).

Submodule names follow the official PyTorch names with ``.`` replaced by ``/`` and
an index joined to its parent (``backbone.layer2.0.downsample.1`` is
``layer2_0/downsample_1`` here), the rule of :mod:`ggr_jax.models.convert`.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax.numpy as jnp
from flax import linen as nn

from ggr_jax.models import inits
from ggr_jax.models.layers import BatchNorm, FeatureTap, max_pool

BlockKind = Literal["basic", "bottleneck"]
_EXPANSION = {"basic": 1, "bottleneck": 4}
_STAGE_WIDTHS = (64, 128, 256, 512)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  """A bias-free conv, padding ``kernel // 2`` on every side, kaiming-normal (fan_out, relu).

  Explicit symmetric padding matches PyTorch also at stride 2 (``'SAME'`` would pad
  (0, 1) or (2, 3) there).
  """
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=inits.conv_kaiming_fan_out, name=name)


class ResidualBlock(nn.Module):
  """A post-activation residual block (torchvision v1.5), ReLU after the sum.

  ``basic``: conv3x3(stride)-BN-ReLU-conv3x3-BN, output width ``planes``.
  ``bottleneck``: conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, output width
  ``4 * planes``. The skip connection is ``downsample`` (conv1x1(stride) + BN) when
  the stride or width changes, else the identity.
  """

  kind: BlockKind
  planes: int
  stride: int
  bn_momentum: float
  bn_eps: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    out_features = self.planes * _EXPANSION[self.kind]

    def bn(h, name):
      return BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_eps, name=name)(h)

    if self.kind == "basic":
      out = nn.relu(bn(_conv(self.planes, 3, self.stride, "conv1")(x), "bn1"))
      out = bn(_conv(self.planes, 3, 1, "conv2")(out), "bn2")
    else:
      out = nn.relu(bn(_conv(self.planes, 1, 1, "conv1")(x), "bn1"))
      out = nn.relu(bn(_conv(self.planes, 3, self.stride, "conv2")(out), "bn2"))
      out = bn(_conv(out_features, 1, 1, "conv3")(out), "bn3")
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_features:
      shortcut = bn(_conv(out_features, 1, self.stride, "downsample_0")(x), "downsample_1")
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """torchvision-layout ResNet for NHWC images (224x224 on ImageNet-30).

  Stem: conv7x7/2 (64) - BN - ReLU - maxpool3x3/2 (padding 1), i.e. stride 4; then
  four stages ``layer1..layer4`` of ``layers[i]`` blocks with widths 64, 128, 256,
  512 (times the block expansion) and strides 1, 2, 2, 2, i.e. stride 32 overall;
  global average pool (``feat``, width ``512 * expansion``) and the linear
  classifier ``fc`` (``logits``) with PyTorch's default Linear init, as the official
  code leaves it. BatchNorm: ``bn_momentum`` in the PyTorch convention (PyTorch's
  default 0.1) and eps 1e-5; BN scale 1, bias 0 (torchvision's ``zero_init_residual``
  is off, as in the official code); convs kaiming-normal (fan_out).
  """

  num_classes: int
  block: BlockKind = "basic"
  layers: Sequence[int] = (2, 2, 2, 2)
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    if self.block not in _EXPANSION:
      raise ValueError(f"ResNet block must be 'basic' or 'bottleneck', got {self.block!r}.")
    if len(self.layers) != 4 or min(self.layers) < 1:
      raise ValueError(f"ResNet layers must be 4 positive block counts, got {self.layers!r}.")
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC images, got shape {x.shape}.")
    h = _conv(64, 7, 2, "conv1")(x)
    h = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                  epsilon=self.bn_eps, name="bn1")(h)
    h = max_pool(nn.relu(h), 3, 2, padding=1)
    for stage, (planes, count) in enumerate(zip(_STAGE_WIDTHS, self.layers)):
      for i in range(count):
        stride = 2 if stage > 0 and i == 0 else 1
        h = ResidualBlock(self.block, planes, stride, self.bn_momentum, self.bn_eps,
                          name=f"layer{stage + 1}_{i}")(h, train)
    feat = jnp.mean(h, axis=(1, 2))
    feat = FeatureTap(name="feature")(feat)
    width = feat.shape[-1]
    logits = nn.Dense(self.num_classes, kernel_init=inits.torch_default_kernel,
                      bias_init=inits.torch_default_bias(width), name="fc")(feat)
    return {"feat": feat, "logits": logits}


def resnet18(num_classes: int, bn_momentum: float = 0.1, **kwargs) -> ResNet:
  """The standard BasicBlock ResNet-18 (512 features; 11,689,512 parameters at 1000 classes)."""
  return ResNet(num_classes, block="basic", layers=(2, 2, 2, 2), bn_momentum=bn_momentum,
                **kwargs)


def resnet18_official(num_classes: int, bn_momentum: float = 0.1, **kwargs) -> ResNet:
  """The official GGR ``resnet18``: Bottleneck blocks, layers [2, 2, 2, 2], 2048 features."""
  return ResNet(num_classes, block="bottleneck", layers=(2, 2, 2, 2), bn_momentum=bn_momentum,
                **kwargs)


def resnet50(num_classes: int, bn_momentum: float = 0.1, **kwargs) -> ResNet:
  """The standard ResNet-50: Bottleneck blocks, layers [3, 4, 6, 3], 2048 features
  (25,557,032 parameters at 1000 classes, as torchvision's)."""
  return ResNet(num_classes, block="bottleneck", layers=(3, 4, 6, 3), bn_momentum=bn_momentum,
                **kwargs)
