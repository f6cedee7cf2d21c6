"""The host input pipeline on Grain: uint8 batches gathered on the host, streamed to device.

With ``train.input="stream"`` the split stays on the host (in memory, or as tables that
read and decode rows on demand: ImageNet from tfds ``array_record`` files, image
folders) and a `Grain <https://github.com/google/grain>`_ pipeline prepares each step's
raw batch ahead of the step that consumes it:

1. a random-access source whose element ``i`` is the raw batch of step ``origin + i``:
   the batch's row indices by :func:`ggr_jax.data.sampling.batch_indices` (the per-epoch
   permutations computed once per epoch on the host CPU with the same JAX functions the
   device path runs, so both paths feed bit-identical batches), of which this process
   gathers only its own devices' rows (numpy indexing, or the tables' reads and
   decodes);
2. Grain runs that source in ``workers`` processes (``mp_prefetch``; each computes its
   own steps' indices and decodes their images), or in a reader thread when
   ``workers=0``;
3. a Grain prefetch thread puts each batch on this process's devices and assembles one
   global array sharded over the ``("data",)`` mesh, ``prefetch`` batches ahead.

What Grain does not do is here: the sampling that equals the device path's, the
per-device gather, and the placement on the mesh. Augmentation stays inside the jitted
step. Indices depend only on ``(key, step, selected)``; :meth:`HostStream.state` is
Grain's iterator state (with the step the pipeline started at), which the checkpoint
stores so that a resumed run continues from the same batch (:meth:`HostStream.restart`
with ``state=``). Worker processes are spawned: a script that streams with ``workers > 0``
needs the ``if __name__ == "__main__":`` guard (``ggr-jax`` has it).

Example:
  >>> import jax, numpy as np
  >>> from jax.sharding import Mesh
  >>> rng = np.random.default_rng(0)
  >>> split = {"x_labeled": rng.integers(0, 255, (12, 8, 8, 1), dtype=np.uint8),
  ...          "y_labeled": np.arange(12, dtype=np.int32) % 3,
  ...          "x_unlabeled": rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8),
  ...          "unlabeled_is_id": np.arange(40) % 2 == 0}
  >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  >>> with HostStream(split, jax.random.PRNGKey(0), {"labeled": 4, "unlabeled": 8},
  ...                 mesh, start_step=0) as stream:
  ...   raw = stream.next(0)
  >>> raw["labeled"].shape, raw["unlabeled"].dtype, sorted(raw)
  ((4, 8, 8, 1), dtype('uint8'), ['labeled', 'ulb_is_id', 'unlabeled', 'y_lb'])
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import grain
from absl import flags
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ggr_jax.data import sampling

SPLIT_NAMES = ("x_labeled", "y_labeled", "x_unlabeled", "unlabeled_is_id")
_STEP = "_step"  # each element carries its step, to check the order it arrives in
_ENDLESS = 2**40  # steps a pipeline can stream (a run stops long before)


class _EpochStreams:
  """:func:`sampling.epoch_stream_indices` on the host, one permutation per epoch."""

  def __init__(self):
    self._perms: dict[tuple, np.ndarray] = {}
    self._permute = jax.jit(lambda key, epoch, n: jax.random.permutation(
        jax.random.fold_in(key, epoch), n), static_argnums=2)

  def _perm(self, key: jax.Array, epoch: int, n: int) -> np.ndarray:
    name = (tuple(np.asarray(key).ravel().tolist()), epoch, n)  # raw uint32 keys
    if name not in self._perms:
      if len(self._perms) > 64:  # older epochs are never read again
        self._perms.clear()
      self._perms[name] = np.asarray(self._permute(key, np.int32(epoch), n))
    return self._perms[name]

  def __call__(self, key: jax.Array, step, batch: int, n: int) -> np.ndarray:
    start = int(step) * batch
    epoch, offset = divmod(start, n)
    spans = math.ceil(batch / n) + 1
    perms = [self._perm(key, epoch + i, n) for i in range(spans)]
    return np.concatenate(perms)[offset:offset + batch]


class StepBatches:
  """Grain's random-access source: element ``i`` is this process's raw batch of step
  ``origin + i`` (its rows of every source, in device order), with the step under
  ``"_step"``. Picklable: each Grain worker builds its own JAX functions on first use."""

  def __init__(self, split: dict[str, Any], key: np.ndarray, sizes: dict[str, int],
               rows: dict[str, np.ndarray], selected: np.ndarray | None, origin: int):
    self.split, self.key, self.sizes, self.rows = split, np.asarray(key), dict(sizes), rows
    self.selected, self.origin = selected, int(origin)
    self.counts = {name: split[name].shape[0] for name in ("x_labeled", "x_unlabeled")}
    self._lock = threading.Lock()
    self._functions: tuple | None = None

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_functions")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _lock=threading.Lock(), _functions=None)

  def __len__(self) -> int:
    return _ENDLESS

  def indices(self, step: int) -> dict[str, np.ndarray]:
    """The global row indices of batch ``step`` (host numpy), as the device path draws them."""
    with self._lock:
      if self._functions is None:
        self._functions = (_EpochStreams(), jax.jit(sampling.masked_indices, static_argnums=2),
                           jax.local_devices(backend="cpu")[0])
      streams, masked, cpu = self._functions
      with jax.default_device(cpu):
        out = sampling.batch_indices(jax.device_put(self.key, cpu), step, self.sizes,
                                     self.counts, self.selected, stream=streams, masked=masked)
        return {source: np.asarray(idx) for source, idx in out.items()}

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    step = self.origin + int(i)
    local = {source: idx[self.rows[source]] for source, idx in self.indices(step).items()}
    batch = sampling.gather_rows(self.split, local)
    return {**{name: np.asarray(value) for name, value in batch.items()},
            _STEP: np.int64(step)}


def _cpu_only_worker(worker_index: int = 0, worker_count: int = 1) -> None:  # pylint: disable=unused-argument
  """In a Grain worker, before anything runs: JAX on the CPU only (no accelerator memory)."""
  jax.config.update("jax_platforms", "cpu")


class HostStream:
  """Prefetched raw batches for consecutive steps through a Grain pipeline.

  Args:
    split: host arrays (or read-on-demand tables) ``x_labeled``, ``y_labeled``,
      ``x_unlabeled``, ``unlabeled_is_id``.
    key: the run's key as the step sees it (``fold_in(state.key, 0)``).
    sizes: rows per source, in the algorithm's source order (``step.source_sizes``).
    mesh: the ``("data",)`` mesh the step shards its batch over.
    start_step: the first step to stream.
    selected: OpenMatch's inlier mask (host bool array), or None.
    prefetch: batches prepared ahead on device (at least 1), and per worker.
    workers: Grain worker processes that compute indices and gather or decode rows
      (0: a reader thread of this process).
    state: a :meth:`state` from a checkpoint of step ``start_step``, to resume from.
  """

  def __init__(self, split: dict[str, Any], key: jax.Array, sizes: dict[str, int],
               mesh: Mesh, start_step: int, selected: np.ndarray | None = None,
               prefetch: int = 2, workers: int = 0, state: dict[str, Any] | None = None):
    if prefetch < 1:
      raise ValueError(f"prefetch = {prefetch}: at least one batch must be prepared ahead.")
    if workers < 0:
      raise ValueError(f"workers = {workers}: give 0 (a thread) or a number of processes.")
    for source, size in sizes.items():
      if size % mesh.size:
        raise ValueError(f"{source} batch of {size} rows does not split over the {mesh.size} "
                         "devices of the mesh; choose a batch size divisible by it.")
    if "selected" in sizes and selected is None:
      raise ValueError("the 'selected' source needs the inlier mask: pass selected=...")
    # tables read on demand (ImageNet) are indexed as they are, never converted
    self._split = {name: split[name] if getattr(split[name], "read_on_demand", False)
                   else np.asarray(split[name]) for name in SPLIT_NAMES}
    self._counts = {name: self._split[name].shape[0] for name in ("x_labeled", "x_unlabeled")}
    self._key = np.asarray(jax.device_get(key))
    self._sizes = dict(sizes)
    self._sharding = NamedSharding(mesh, P("data"))
    self._devices = sorted(self._sharding.addressable_devices, key=lambda d: d.id)
    index_map = {source: self._sharding.addressable_devices_indices_map((size,))
                 for source, size in sizes.items()}
    # this process's rows of each source, device after device
    self._device_rows = {source: [np.arange(size)[index_map[source][d][0]] for d in self._devices]
                         for source, size in sizes.items()}
    self._rows = {source: np.concatenate(parts) for source, parts in self._device_rows.items()}
    # each gathered array (images under the source's name, its label rows) -> its source
    self._array_sources = {name: source for source in sizes for name in
                           (source, *sampling.SOURCE_ROWS[source][1])}
    self._prefetch, self._workers = prefetch, workers
    self._iterator: Any = None
    self._indexer: StepBatches | None = None
    self._selected: np.ndarray | None = None
    self._origin = start_step
    self.restart(start_step, selected, state=state)

  def _source(self, selected: np.ndarray | None, origin: int) -> StepBatches:
    return StepBatches(self._split, self._key, self._sizes, self._rows, selected, origin)

  def indices(self, step: int, selected: np.ndarray | None) -> dict[str, np.ndarray]:
    """The global row indices of batch ``step`` (host numpy), as the device path draws them."""
    if self._indexer is None:  # one source (and one set of jitted functions) for queries
      self._indexer = self._source(None, 0)
    self._indexer.selected = selected
    return self._indexer.indices(step)

  def _to_mesh(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """This process's rows on its devices, as global arrays over the mesh."""
    out: dict[str, Any] = {_STEP: int(batch[_STEP])}
    for name, source in self._array_sources.items():
      value, start, shards = batch[name], 0, []
      for device, rows in zip(self._devices, self._device_rows[source]):
        shards.append(jax.device_put(value[start:start + len(rows)], device))
        start += len(rows)
      out[name] = jax.make_array_from_single_device_arrays(
          (self._sizes[source], *value.shape[1:]), self._sharding, shards)
    return out

  # -- the pipeline ------------------------------------------------------------------
  def restart(self, step: int, selected: np.ndarray | None = None,
              state: dict[str, Any] | None = None) -> None:
    """Drops prefetched batches and streams again from ``step`` (with a new inlier mask,
    or the previous one when ``selected`` is None); ``state`` resumes a saved pipeline."""
    self.close()
    if selected is None:
      selected = self._selected
    else:
      selected = np.asarray(selected, bool)
      if selected.shape != (self._counts["x_unlabeled"],):
        raise ValueError(f"selected mask has shape {selected.shape}; expected "
                         f"({self._counts['x_unlabeled']},), one flag per unlabeled image.")
    self._selected = selected
    origin = step if state is None else int(state["origin"])
    dataset = grain.MapDataset.source(self._source(selected, origin)).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._prefetch))
    if self._workers:
      if not flags.FLAGS.is_parsed():  # Grain reads its absl flags (defaults) when it starts
        flags.FLAGS.mark_as_parsed()    # workers; ggr_jax parses its own into other FlagValues
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._workers, per_worker_buffer_size=self._prefetch),
          worker_init_fn=_cpu_only_worker)
    dataset = grain.experimental.ThreadPrefetchIterDataset(dataset.map(self._to_mesh),
                                                           prefetch_buffer_size=self._prefetch)
    self._iterator, self._origin, self._next_step = iter(dataset), origin, step
    if state is not None:
      self._iterator.set_state(json.loads(state["iterator"]))

  def state(self) -> dict[str, Any]:
    """Where the pipeline is: its origin step, the next step and Grain's iterator state."""
    return {"origin": self._origin, "next_step": self._next_step,
            "iterator": json.dumps(self._iterator.get_state())}

  def next(self, step: int) -> dict[str, jax.Array]:
    """The raw batch of ``step``, which must be the step after the previous one."""
    if step != self._next_step:
      raise RuntimeError(f"asked for step {step}, the stream is at step {self._next_step}; "
                         "call restart(step) to jump.")
    try:
      batch = next(self._iterator)
    except Exception as error:  # pylint: disable=broad-except  # a worker's error, re-raised
      raise RuntimeError(f"the host input pipeline failed at step {step}: "
                         f"{type(error).__name__}: {error}") from error
    produced = batch.pop(_STEP)
    if produced != step:
      raise RuntimeError(f"the input pipeline delivered step {produced} for step {step}; its "
                         "saved state belongs to another step (checkpoint and input state "
                         "disagree).")
    self._next_step += 1
    return batch

  def close(self) -> None:
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def __enter__(self) -> "HostStream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
