"""A small CNN for 8x8 inputs (the bundled digits), same interface as WRN-28-2."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from ggr_jax.models import inits
from ggr_jax.models.layers import BatchNorm, FeatureTap, max_pool


class SmallCNN(nn.Module):
  """conv(32)-BN-LReLU x2, 2x2 pool, conv(64)-BN-LReLU x2, global pool, fc.

  About 60k parameters; returns ``{"feat": (N, 64), "logits": (N, num_classes)}``.
  """

  num_classes: int
  width: int = 32
  bn_momentum: float = 0.01  # PyTorch convention (share of the batch in the running stats)
  bn_eps: float = 1e-3
  leaky_slope: float = 0.1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    def conv_bn(h, channels, name):
      h = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)),
                  kernel_init=inits.conv_kaiming_fan_out, name=f"{name}_conv")(h)
      h = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                    epsilon=self.bn_eps, name=f"{name}_bn")(h)
      return nn.leaky_relu(h, self.leaky_slope)

    h = conv_bn(x, self.width, "block1a")
    h = conv_bn(h, self.width, "block1b")
    h = max_pool(h, 2, 2)
    h = conv_bn(h, 2 * self.width, "block2a")
    h = conv_bn(h, 2 * self.width, "block2b")
    feat = jnp.mean(h, axis=(1, 2))
    feat = FeatureTap(name="feature")(feat)
    logits = nn.Dense(self.num_classes, kernel_init=inits.xavier_normal, name="fc")(feat)
    return {"feat": feat, "logits": logits}
