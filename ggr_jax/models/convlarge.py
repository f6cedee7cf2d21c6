"""ConvLarge, the 13-layer network of the SSL benchmarks (SemiMeta's ``convlarge``), NHWC.

Three 3x3 convolutions of 128 channels, 2x2 max-pool, channel dropout; three of 256,
max-pool, channel dropout; a valid 3x3 convolution of 512, 1x1 convolutions of 256 and
128; global average pool; a linear classifier. Every convolution is bias-free and
followed by BatchNorm (PyTorch semantics: eps 1e-5, running variance from the unbiased
batch variance) and LeakyReLU(0.1). 3.1 M parameters at 10 classes. Initialised as the
official model (PyTorch's defaults: U(+-1/sqrt(fan_in)) for every weight and bias).

Submodule names follow the official ``model.py`` by the rule of
:mod:`ggr_jax.models.convert` (``block4.1`` is ``block4_1``), except the classifier
(official ``classifier.0``), which is ``fc`` as in every ggr_jax backbone so that the
``encoder``/``backbone`` scopes mean the same thing here:
:func:`ggr_jax.models.convert.semimeta_to_flax` maps the names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from ggr_jax.models import inits
from ggr_jax.models.layers import BatchNorm, FeatureTap, max_pool

# (output channels, kernel, padding) of block1..block9; None marks pool + dropout
_LAYOUT = ((128, 3, "SAME"), (128, 3, "SAME"), (128, 3, "SAME"), None,
           (256, 3, "SAME"), (256, 3, "SAME"), (256, 3, "SAME"), None,
           (512, 3, "VALID"), (256, 1, "VALID"), (128, 1, "VALID"))


class ChannelDropout(nn.Module):
  """Dropout of whole channels (``torch.nn.Dropout2d``): each (sample, channel) map is
  kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``.

  The keep-mask comes from :meth:`keep_mask`, a method of its own so that a parity test
  can inject a reference run's masks (``flax.linen.intercept_methods``).
  """

  rate: float = 0.5

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    if deterministic or self.rate == 0.0:
      return x
    keep = self.keep_mask((x.shape[0], x.shape[-1]))
    scale = jnp.asarray(1.0 / (1.0 - self.rate), x.dtype)
    return x * (keep.astype(x.dtype) * scale)[:, None, None, :]

  def keep_mask(self, shape: tuple[int, int]) -> jnp.ndarray:
    """``(N, C)`` booleans, True with probability ``1 - rate`` (rng stream ``dropout``)."""
    return jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, shape)


class ConvLarge(nn.Module):
  """ConvLarge; returns ``{"feat": (N, 128), "logits": (N, num_classes)}``.

  A train-mode forward needs the ``dropout`` rng stream (``rngs={"dropout": key}``).
  """

  num_classes: int
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  leaky_slope: float = 0.1
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    h, block = x, 0
    for layer in _LAYOUT:
      if layer is None:
        h = max_pool(h, 2, 2)
        h = ChannelDropout(self.dropout)(h, deterministic=not train)
        continue
      block += 1
      width, kernel, padding = layer
      h = nn.Conv(width, (kernel, kernel), padding=padding, use_bias=False,
                  kernel_init=inits.torch_default_kernel, name=f"block{block}_0")(h)
      h = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                    epsilon=self.bn_eps, name=f"block{block}_1")(h)
      h = nn.leaky_relu(h, self.leaky_slope)
    feat = jnp.mean(h, axis=(1, 2))
    feat = FeatureTap(name="feature")(feat)
    logits = nn.Dense(self.num_classes, kernel_init=inits.torch_default_kernel,
                      bias_init=inits.torch_default_bias(feat.shape[-1]), name="fc")(feat)
    return {"feat": feat, "logits": logits}
