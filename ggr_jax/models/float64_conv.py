"""Float64 convolutions as shifted windows and one matmul, for checks on the CPU.

XLA's CPU backend has no float64 convolution kernel: it emits plain loops (about 2.5
GFLOP/s on a 2-core CPU), while its float64 matmul is Eigen's. Inside
:func:`float64_convolutions_by_matmul`, float64 NHWC/HWIO 2-D convolutions traced
through ``jax.lax.conv_general_dilated`` (Flax's ``nn.Conv``) are built from the
input's shifted (strided, dilated) windows concatenated along channels and one matmul
with the reshaped kernel; the two agree to float64 rounding, and both are
differentiable to any order. Anything else (other dtypes, layouts, groups, input
dilation) goes to XLA's convolution unchanged.

>>> import jax, jax.numpy as jnp
>>> with jax.enable_x64(True), float64_convolutions_by_matmul():
...   x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5))
...   y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
...                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
>>> float(y[0, 1, 1, 0]), float(y[0, 0, 0, 0])
(18.0, 8.0)
"""

from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

import jax
import jax.numpy as jnp

_LAX_CONV = jax.lax.conv_general_dilated


def _conv_by_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                    precision=None, preferred_element_type=None, **kwargs):
  plain = (lhs.dtype == jnp.float64 and lhs.ndim == 4 and feature_group_count == 1
           and not any(v is not None for v in kwargs.values())
           and batch_group_count == 1 and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and preferred_element_type in (None, jnp.float64)
           and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if not plain:
    return _LAX_CONV(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count, precision,
                     preferred_element_type, **kwargs)
  (kh, kw, cin, cout), strides = rhs.shape, tuple(window_strides)
  dilation = tuple(rhs_dilation or (1, 1))
  window = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
  pads = jax.lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding) \
      if isinstance(padding, str) else padding
  xp = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  out = [(xp.shape[1 + a] - window[a]) // strides[a] + 1 for a in range(2)]
  windows = [xp[:, i * dilation[0]:i * dilation[0] + (out[0] - 1) * strides[0] + 1:strides[0],
                j * dilation[1]:j * dilation[1] + (out[1] - 1) * strides[1] + 1:strides[1]]
             for i in range(kh) for j in range(kw)]
  return jnp.concatenate(windows, axis=-1) @ rhs.reshape(kh * kw * cin, cout)


@contextlib.contextmanager
def float64_convolutions_by_matmul() -> Iterator[None]:
  """While inside, float64 2-D convolutions traced through ``jax.lax.conv_general_dilated``
  are shifted windows and one matmul (see the module's docstring). Affects tracing only:
  trace (``jax.jit(...).lower`` or the first call) inside the block."""
  with mock.patch.object(jax.lax, "conv_general_dilated", _conv_by_matmul):
    yield
