"""The host input pipeline: uint8 batches gathered on the host and streamed to device.

With ``train.input="stream"`` the split stays in host memory and a background thread
prepares the raw batch of each step ahead of the step that consumes it:

1. the batch's row indices, by :func:`ggr_jax.data.sampling.batch_indices` with the
   per-epoch permutations computed once per epoch on the host CPU (the same JAX
   functions the device path runs, so both paths feed bit-identical batches);
2. every process gathers only the rows of its own devices' shards (numpy fancy
   indexing of the uint8 images) and puts them on those devices;
3. the shards are assembled into one global array sharded over the ``("data",)`` mesh.

Augmentation stays inside the jitted step. ``prefetch`` batches wait in a queue, so the
step never waits for the host unless the host is slower than the step
(``ggr-jax bench --pipeline`` measures both rates). Indices depend only on
``(key, step, selected)``, so a resumed run streams the same batches it would have seen.

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

import math
import queue
import threading
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ggr_jax.data import sampling

_STOP_POLL_S = 0.1


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


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class HostStream:
  """Prefetched raw batches for consecutive steps, gathered per process on the host.

  Args:
    split: host arrays ``x_labeled``, ``y_labeled``, ``x_unlabeled``, ``unlabeled_is_id``.
    key: the run's key as the step sees it (``fold_in(state.key, 0)``).
    sizes: rows per source, in the algorithm's source order (``step.source_sizes``).
    mesh: the ``("data",)`` mesh the step shards its batch over.
    start_step: the first step to stream.
    selected: OpenMatch's inlier mask (host bool array), or None.
    prefetch: batches prepared ahead (at least 1).
  """

  def __init__(self, split: dict[str, np.ndarray], key: jax.Array, sizes: dict[str, int],
               mesh: Mesh, start_step: int, selected: np.ndarray | None = None,
               prefetch: int = 2):
    if prefetch < 1:
      raise ValueError(f"prefetch = {prefetch}: at least one batch must be prepared ahead.")
    for source, size in sizes.items():
      if size % mesh.size:
        raise ValueError(f"{source} batch of {size} rows does not split over the {mesh.size} "
                         "devices of the mesh; choose a batch size divisible by it.")
    if "selected" in sizes and selected is None:
      raise ValueError("the 'selected' source needs the inlier mask: pass selected=...")
    # tables read on demand (ImageNet) are indexed as they are, never converted
    self._split = {name: split[name] if getattr(split[name], "read_on_demand", False)
                   else np.asarray(split[name]) for name in
                   ("x_labeled", "y_labeled", "x_unlabeled", "unlabeled_is_id")}
    self._counts = {name: self._split[name].shape[0] for name in ("x_labeled", "x_unlabeled")}
    self._cpu = jax.local_devices(backend="cpu")[0]
    self._key = jax.device_put(key, self._cpu)
    self._sizes = dict(sizes)
    self._sharding = NamedSharding(mesh, P("data"))
    self._streams = _EpochStreams()
    self._masked = jax.jit(sampling.masked_indices, static_argnums=2)
    self._devices = sorted(self._sharding.addressable_devices, key=lambda d: d.id)
    self._rows = {source: {device: index[0] for device, index in
                           self._sharding.addressable_devices_indices_map((size,)).items()}
                  for source, size in sizes.items()}  # this process's rows of each source
    self._prefetch = prefetch
    self._thread: threading.Thread | None = None
    self._selected: np.ndarray | None = None
    self.restart(start_step, selected)

  # -- producer ------------------------------------------------------------------------
  def indices(self, step: int, selected: np.ndarray | None) -> dict[str, np.ndarray]:
    """The global row indices of batch ``step`` (host numpy), as the device path draws them."""
    with jax.default_device(self._cpu):
      out = sampling.batch_indices(self._key, step, self._sizes, self._counts, selected,
                                   stream=self._streams, masked=self._masked)
    return {source: np.asarray(idx) for source, idx in out.items()}

  def batch(self, step: int, selected: np.ndarray | None) -> dict[str, jax.Array]:
    """The raw batch of ``step`` as global arrays; this process gathers only its rows."""
    indices = self.indices(step, selected)
    shards: dict[str, list[jax.Array]] = {}
    for device in self._devices:
      local = {source: idx[self._rows[source][device]] for source, idx in indices.items()}
      for name, value in sampling.gather_rows(self._split, local).items():
        shards.setdefault(name, []).append(jax.device_put(value, device))
    return {name: jax.make_array_from_single_device_arrays(
        (arrays[0].shape[0] * self._sharding.mesh.size, *arrays[0].shape[1:]),
        self._sharding, arrays) for name, arrays in shards.items()}

  def _produce(self, step: int, selected, stop: threading.Event, out: queue.Queue) -> None:
    while not stop.is_set():
      try:
        item: Any = (step, self.batch(step, selected))
      except BaseException as error:  # pylint: disable=broad-except
        item = _Failure(error)
      while not stop.is_set():
        try:
          out.put(item, timeout=_STOP_POLL_S)
          break
        except queue.Full:
          continue
      if isinstance(item, _Failure):
        return
      step += 1

  # -- consumer ------------------------------------------------------------------------
  def restart(self, step: int, selected: np.ndarray | None = None) -> None:
    """Drops prefetched batches and streams again from ``step`` (with a new inlier mask,
    or the previous one when ``selected`` is None)."""
    self._stop_thread()
    if selected is None:
      selected = self._selected
    else:
      selected = np.asarray(selected, bool)
      if selected.shape != (self._counts["x_unlabeled"],):
        raise ValueError(f"selected mask has shape {selected.shape}; expected "
                         f"({self._counts['x_unlabeled']},), one flag per unlabeled image.")
    self._selected = selected
    self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self._prefetch)
    self._next_step = step
    self._thread = threading.Thread(target=self._produce, name="ggr_jax-host-stream",
                                    args=(step, selected, self._stop, self._queue), daemon=True)
    self._thread.start()

  def next(self, step: int) -> dict[str, jax.Array]:
    """The raw batch of ``step``, which must be the step after the previous one."""
    if step != self._next_step:
      raise RuntimeError(f"asked for step {step}, the stream is at step {self._next_step}; "
                         "call restart(step) to jump.")
    item = self._queue.get()
    if isinstance(item, _Failure):
      raise RuntimeError("the host input pipeline failed") from item.error
    produced, batch = item
    assert produced == step, (produced, step)
    self._next_step += 1
    return batch

  def _stop_thread(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def close(self) -> None:
    self._stop_thread()

  def __enter__(self) -> "HostStream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
