"""PyTorch-equivalent initialisers, so ggr_jax models start where the official ones do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu") with a=0: gain^2 = 2.
conv_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.init.xavier_normal_.
xavier_normal = nn.initializers.glorot_normal()


def torch_default_kernel(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """PyTorch's default Linear/Conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  fan_in = 1
  for dim in shape[:-1]:
    fan_in *= dim
  bound = 1.0 / jnp.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias(fan_in: int):
  """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for a known fan-in."""

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
