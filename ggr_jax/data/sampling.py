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


# Each source of a batch reads these rows of the split (``unlabeled`` and ``selected``
# both draw from the unlabeled set) and returns them under these names.
SOURCE_ROWS = {"labeled": ("x_labeled", {"y_lb": "y_labeled"}),
               "unlabeled": ("x_unlabeled", {"ulb_is_id": "unlabeled_is_id"}),
               "selected": ("x_unlabeled", {"sel_is_id": "unlabeled_is_id"})}


def batch_indices(key: jax.Array, step, sizes: dict[str, int], counts: dict[str, int],
                  selected: jax.Array | None, stream=epoch_stream_indices,
                  masked=masked_indices) -> dict[str, jax.Array]:
  """The row indices of batch ``step`` for every source in ``sizes`` (in its order).

  ``labeled`` and ``unlabeled`` read their epoch streams (``stream`` is
  :func:`epoch_stream_indices` or a function equal to it); ``selected`` draws from the
  positions of ``selected`` with a key that changes every step (``masked`` is
  :func:`masked_indices` or a function equal to it). ``counts`` gives the
  number of rows of ``x_labeled`` and ``x_unlabeled`` by table name. The same function
  runs inside the jitted step and on the host (``ggr_jax.data.stream``), so both feed
  the same batches.
  """
  stream_key = jax.random.fold_in(key, 0)
  step_key = jax.random.fold_in(jax.random.fold_in(key, 1), step)
  out = {}
  for s, (source, size) in enumerate(sizes.items()):
    if source == "selected":
      out[source] = masked(jax.random.fold_in(step_key, 100 + s), selected, size)
    else:
      table = SOURCE_ROWS[source][0]
      out[source] = stream(jax.random.fold_in(stream_key, s), step, size, counts[table])
  return out


def gather_rows(data: dict, indices: dict) -> dict:
  """The raw batch: uint8 images under each source's name, plus its label rows.

  Works on numpy and jax arrays alike (``data`` holds ``x_labeled``, ``y_labeled``,
  ``x_unlabeled``, ``unlabeled_is_id``).
  """
  raw = {}
  for source, idx in indices.items():
    images, labels = SOURCE_ROWS[source]
    raw[source] = data[images][idx]
    raw.update({name: data[table][idx] for name, table in labels.items()})
  return raw
