"""The input feed protocol: what the jitted step reads as its ``data`` argument.

``train.input="device"``: :class:`ResidentFeed`, the whole split on device, the step
samples its batch. ``"stream"``: :class:`StreamFeed`, the host pipeline's raw batch of
each step from a Grain pipeline (:class:`ggr_jax.data.stream.HostStream`). The trainer and the bench use
:func:`make_feed`; both feeds give the step the same batches.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ggr_jax.data.openset import OpenSetSplit
from ggr_jax.data.stream import HostStream
from ggr_jax.ssl.interface import Algorithm

SPLIT_ARRAYS = ("x_labeled", "y_labeled", "x_unlabeled", "unlabeled_is_id")


class Feed(Protocol):
  """``next(step)``: the step's data; ``restart(step, algo_state)``: continue from ``step``
  after the algorithm state changed (a new row mask); ``state()``: what a checkpoint
  stores to resume the feed (None: nothing); ``close()``."""

  def next(self, step: int) -> Any: ...

  def state(self) -> dict[str, Any] | None: ...

  def restart(self, step: int, algo_state: Any) -> None: ...

  def close(self) -> None: ...


def split_arrays(split: OpenSetSplit) -> dict[str, np.ndarray]:
  """The training arrays of a split, as the samplers read them."""
  return {"x_labeled": split.x_labeled, "y_labeled": split.y_labeled.astype(np.int32),
          "x_unlabeled": split.x_unlabeled, "unlabeled_is_id": split.unlabeled_is_id}


def host_copy(array: jax.Array) -> np.ndarray:
  """This process's copy of a replicated array (also in a multi-process run)."""
  return np.asarray(array.addressable_data(0))


class ResidentFeed:
  """The whole split on device, replicated; the step samples its batch."""

  def __init__(self, arrays: dict[str, np.ndarray], mesh: Mesh):
    self.data = jax.device_put(arrays, NamedSharding(mesh, P()))

  def next(self, step: int) -> dict[str, jax.Array]:  # pylint: disable=unused-argument
    return self.data

  def restart(self, step: int, algo_state: Any) -> None:
    pass

  def state(self) -> None:
    return None

  def close(self) -> None:
    pass


class StreamFeed:
  """Raw batches gathered on the host and prefetched to device."""

  def __init__(self, algorithm: Algorithm, stream_args: dict[str, Any]):
    self.algorithm = algorithm
    self.stream = HostStream(**stream_args)

  def _mask(self, algo_state: Any) -> np.ndarray | None:
    if self.algorithm.source_mask is None:
      return None
    return host_copy(self.algorithm.source_mask(algo_state))

  def next(self, step: int) -> dict[str, jax.Array]:
    return self.stream.next(step)

  def restart(self, step: int, algo_state: Any) -> None:
    self.stream.restart(step, self._mask(algo_state))

  def state(self) -> dict[str, Any]:
    return self.stream.state()

  def close(self) -> None:
    self.stream.close()


def make_feed(input_kind: str, algorithm: Algorithm, sizes: dict[str, int],
              arrays: dict[str, np.ndarray], state: Any, mesh: Mesh, start: int,
              prefetch: int = 2, workers: int = 0,
              saved: dict[str, Any] | None = None) -> Feed:
  """The feed of ``train.input = input_kind`` for a run at ``state`` (step ``start``);
  ``saved``: the feed state a checkpoint of that step stored."""
  if input_kind == "device":
    lazy = [name for name, value in arrays.items() if getattr(value, "read_on_demand", False)]
    if lazy:
      raise ValueError(f"the split's {', '.join(lazy)} are read on demand and cannot be put on "
                       "device whole; set --config.train.input=stream.")
    return ResidentFeed(arrays, mesh)
  if input_kind != "stream":
    raise ValueError(f"train.input = {input_kind!r}; use 'device' or 'stream'.")
  mask = None
  if algorithm.source_mask is not None:
    mask = host_copy(algorithm.source_mask(state.algo_state))
  key = jax.random.fold_in(host_copy(state.key), 0)
  if saved is not None and saved.get("next_step") != start:
    saved = None  # from another step: the step alone determines the batches
  return StreamFeed(algorithm, dict(split=arrays, key=key, sizes=sizes, mesh=mesh,
                                    start_step=start, selected=mask, prefetch=prefetch,
                                    workers=workers, state=saved))
