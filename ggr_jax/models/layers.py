"""Layers with PyTorch semantics that Flax does not provide as such."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class BatchNorm(nn.Module):
  """Batch normalisation over every axis but the last, with PyTorch's semantics.

  In train mode (``use_running_average=False``) it normalises with the biased
  batch variance and updates the running statistics as PyTorch does::

      mean <- (1 - momentum) * mean + momentum * batch_mean
      var  <- (1 - momentum) * var  + momentum * batch_var * n / (n - 1)

  with ``n`` the number of reduced elements per channel. ``momentum`` follows the
  PyTorch convention (0.001 keeps 0.999 of the old value). ``flax.linen.BatchNorm``
  puts the *biased* variance into its running variance; that differs from the
  official PyTorch models by ``momentum * var / (n - 1)`` per step and fails the
  parity check with the official training step (shared/parity/README.md, 5.7),
  which is why this layer exists. Statistics are computed in at least float32.
  ``batch_statistics`` and ``normalize`` are methods so that per-sample gradient code
  can intercept them (:mod:`ggr_jax.consistency`).

  Variables: ``params/{scale, bias}`` (initialised to 1 and 0) and
  ``batch_stats/{mean, var}`` (0 and 1). The running statistics are not updated
  during ``init``.
  """

  use_running_average: bool | None = None
  momentum: float = 0.001
  epsilon: float = 1e-3
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None) -> jnp.ndarray:
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    channels = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(channels, stat_dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(channels, stat_dtype))
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)

    xs = x.astype(stat_dtype)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var = self.batch_statistics(xs)
      if not self.is_initializing():
        n = 1
        for a in axes:
          n *= x.shape[a]
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
    y = self.normalize(xs, mean, var) * scale + bias
    return y.astype(jnp.promote_types(x.dtype, scale.dtype))

  def batch_statistics(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The batch mean and biased variance over every axis but the last.

    A method of its own so that :func:`ggr_jax.consistency.frozen_batch_statistics`
    can hold the statistics constant (per-sample gradients of a batch forward).
    """
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.mean(jnp.square(x - mean), axis=axes)

  def normalize(self, x: jnp.ndarray, mean: jnp.ndarray, var: jnp.ndarray) -> jnp.ndarray:
    """``(x - mean) / sqrt(var + epsilon)``, the input of the affine ``scale, bias``.

    One ``rsqrt``: ``1 / sqrt`` gave other bits where the statistics are differentiated
    (XLA keeps ``sqrt`` for the derivative) than where they are held, which kept XLA
    from merging the exact GGCR geometry's forward with the loss's own.
    """
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


class FeatureTap(nn.Module):
  """The identity at a backbone's output feature (before its classifier and the heads).

  It has no parameters; it marks the one point where every consumer of the feature
  branches off, so a gradient control (EAGC's coordinator) can wrap the feature there
  with ``flax.linen.intercept_methods`` and edit the whole cotangent of ``feat``.
  """

  @nn.compact
  def __call__(self, feat: jnp.ndarray) -> jnp.ndarray:
    return feat


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
  """Max pooling over the two spatial axes of NHWC ``x`` (square ``window``, ``stride``,
  ``padding`` on each side by -inf), the same values as ``flax.linen.max_pool``.

  Written as a selection by the window's argmax instead of XLA's ``reduce_window``, whose
  gradient, ``select_and_scatter``, runs about 5x slower on the CPU backend (the digits
  CNN's pool: 47 ms against 8.6 ms for 960 rows; ``experiments/README.md``). The
  gradient goes to the first maximum of each window in row-major order, as PyTorch's
  and ``select_and_scatter``'s do; unlike ``jnp.max``'s own rule (which divides among
  the positions equal to the max) it cannot turn into 0/0 when XLA recomputes the
  input with other rounding than the max saw.
  """
  if padding:
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    x = jnp.pad(x, pad, constant_values=-jnp.inf)
  n, height, width, channels = x.shape
  out_h, out_w = (height - window) // stride + 1, (width - window) // stride + 1
  if window == stride:  # non-overlapping: the windows are a reshape away
    x = x[:, :out_h * window, :out_w * window]
    windows = x.reshape(n, out_h, window, out_w, window, channels).transpose(0, 1, 3, 5, 2, 4)
    windows = windows.reshape(n, out_h, out_w, channels, window * window)
  else:
    windows = jnp.stack([x[:, i:i + stride * (out_h - 1) + 1:stride,
                           j:j + stride * (out_w - 1) + 1:stride]
                         for i in range(window) for j in range(window)], axis=-1)
  first = jax.lax.stop_gradient(jnp.argmax(windows, axis=-1))
  chosen = jnp.arange(window * window) == first[..., None]
  return jnp.sum(jnp.where(chosen, windows, 0.0), axis=-1)
