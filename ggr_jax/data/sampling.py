"""On-device index sampling, a pure function of (key, step): resumable by construction.

Each source is read as an endless stream of per-epoch permutations (the official
samplers reshuffle every epoch and draw exactly the samples needed), so batch ``t`` is
the slice ``[t*B, (t+1)*B)`` of that stream and needs no sampler state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def epoch_stream_indices(key: jax.Array, step: jax.Array, batch: int, n: int) -> jax.Array:
  """Indices of batch ``step`` in the stream of per-epoch permutations of ``range(n)``.

  Example:
    >>> import jax, numpy as np
    >>> key = jax.random.PRNGKey(0)
    >>> idx = [epoch_stream_indices(key, t, 2, 4) for t in range(2)]
    >>> sorted(np.concatenate(idx).tolist())  # one epoch covers every sample once
    [0, 1, 2, 3]
  """
  start = jnp.asarray(step, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32) * batch
  epoch, offset = start // n, start % n
  spans = math.ceil(batch / n) + 1  # epochs a batch can touch
  perms = [jax.random.permutation(jax.random.fold_in(key, epoch + i), n) for i in range(spans)]
  return jax.lax.dynamic_slice_in_dim(jnp.concatenate(perms), offset, batch)


def masked_indices(key: jax.Array, mask: jax.Array, batch: int) -> jax.Array:
  """``batch`` indices drawn uniformly from the positions where ``mask`` is True.

  Without replacement while enough positions are selected, cycling otherwise; with an
  empty mask it falls back to every position.
  """
  n = mask.shape[0]
  mask = jnp.where(jnp.any(mask), mask, jnp.ones_like(mask))
  order = jnp.argsort(jax.random.uniform(key, (n,)) + jnp.where(mask, 0.0, 2.0))
  count = jnp.sum(mask)
  return order[jnp.arange(batch) % count]
