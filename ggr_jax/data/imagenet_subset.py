"""ImageNet with 1% or 10% labels, the closed-set SSL protocol, streamed from tfds.

* Labeled: the ``train`` split of ``imagenet2012_subset/1pct`` (12,811 images, the
  SimCLR list of about 13 per class) or ``/10pct`` (128,116); the list fixes the
  draw, so the experiment seed does not change it.
* Unlabeled: the ``train`` split of ``imagenet2012`` (1,281,167 images, the labeled
  ones included, as in the other protocols).
* Test: the ``validation`` split (50,000 images), top-1 and top-5 accuracy.

ImageNet needs a manual download: put the ILSVRC2012 tar files in a folder and run,
once, on a machine with TensorFlow::

  tfds build imagenet2012 imagenet2012_subset/1pct --manual_dir=TARS --data_dir=DIR \\
      --file_format=array_record

The images are never loaded whole: every image array of the split is a
:class:`TfdsImageTable`, a read-only array-like that decodes, resizes (shorter side
to ``image_size``, centre square; :func:`ggr_jax.data.resize.square_image`) and
returns only the rows a batch asks for, in a thread pool. Labels are
:class:`TfdsLabelTable` views of the same records, cached as images are read, so the
labels of a batch cost nothing after its images. Such a split needs
``train.input="stream"`` (the host pipeline gathers each batch's rows).

Example (needs the prepared data):
  >>> split = imagenet_subset_split("1pct", image_size=256)  # doctest: +SKIP
  >>> split.x_labeled.shape, split.x_unlabeled.shape  # doctest: +SKIP
  ((12811, 256, 256, 3), (1281167, 256, 256, 3))
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Callable

import numpy as np

from ggr_jax.data import tfds_sources
from ggr_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ggr_jax.data.openset import OpenSetSplit
from ggr_jax.data.resize import square_image

SUBSETS = ("1pct", "10pct")
NUM_CLASSES = 1000


def _rows(key: Any, n: int) -> np.ndarray:
  """The row numbers a numpy-style index ``key`` selects from ``range(n)``."""
  if isinstance(key, slice):
    return np.arange(n)[key]
  rows = np.asarray(key)
  if rows.dtype == bool:
    raise TypeError("boolean masks are not supported; index with row numbers.")
  if not np.issubdtype(rows.dtype, np.integer):
    raise TypeError(f"rows must be integers or a slice, got dtype {rows.dtype}.")
  if rows.size and (rows.max() >= n or rows.min() < -n):
    raise IndexError(f"row {int(rows.max() if rows.max() >= n else rows.min())} is out of "
                     f"range for a table of {n} rows.")
  return np.where(rows < 0, rows + n, rows)


class _Records:
  """One tfds data source with its label cache (-1: not read yet) and decode pool.

  Picklable when ``reopen`` (a picklable function returning the source) is given: a
  Grain worker process opens its own source and pool."""

  def __init__(self, source: Any, image_size: int, centre_crop: bool, num_workers: int,
               reopen: Callable[[], Any] | None = None):
    self.source, self.image_size, self.centre_crop = source, image_size, centre_crop
    self.labels = np.full(len(source), -1, np.int64)
    self._num_workers, self._reopen = num_workers, reopen
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_workers)

  def __getstate__(self) -> dict[str, Any]:
    if self._reopen is None:
      raise TypeError("this tfds table cannot be sent to another process (no reopen).")
    return {k: v for k, v in self.__dict__.items() if k not in ("source", "_pool")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self.source = self._reopen()
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self._num_workers)

  def read(self, rows: np.ndarray, images: bool = True) -> np.ndarray | None:
    """Decodes ``rows`` (caching their labels); returns their images when asked."""
    out = (np.empty((rows.size, self.image_size, self.image_size, 3), np.uint8)
           if images else None)
    chunks = np.array_split(np.arange(rows.size), max(1, min(rows.size, 64)))

    def fill(positions: np.ndarray) -> None:
      records = tfds_sources.read_records(self.source, rows[positions].tolist())
      for position, record in zip(positions, records):
        if out is not None:
          out[position] = square_image(np.asarray(record["image"]), self.image_size,
                                       self.centre_crop)
        self.labels[rows[position]] = int(record["label"])

    list(self._pool.map(fill, [c for c in chunks if c.size]))
    return out


class _Table:
  shape: tuple[int, ...]
  dtype: np.dtype
  read_on_demand = True  # the host pipeline indexes it instead of converting it

  def __init__(self, records: _Records, rows: np.ndarray):
    self._records, self._rows = records, rows

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def __len__(self) -> int:
    return self.shape[0]

  def __array__(self, dtype=None, copy=None):
    raise TypeError(f"{type(self).__name__} of {len(self)} rows is read on demand and is "
                    "never loaded whole; index the rows you need (a split of it needs "
                    "--config.train.input=stream).")


class TfdsImageTable(_Table):
  """Read-only uint8 ``(N, S, S, 3)`` images of a tfds split, decoded on indexing.

  ``table[rows]`` (an int, a slice or an integer array) returns a numpy array; no
  image is kept after it is returned.
  """

  dtype = np.dtype(np.uint8)

  def __init__(self, records: _Records, rows: np.ndarray | None = None):
    super().__init__(records, np.arange(len(records.source)) if rows is None else rows)
    size = records.image_size
    self.shape = (self._rows.size, size, size, 3)

  def __getitem__(self, key: Any) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self[np.asarray([key])][0]
    return self._records.read(self._rows[_rows(key, len(self))])

  @property
  def labels(self) -> "TfdsLabelTable":
    """The labels of these rows, from the same records."""
    return TfdsLabelTable(self._records, self._rows)


class TfdsLabelTable(_Table):
  """Read-only int32 labels of a tfds split; rows not read yet are decoded once."""

  dtype = np.dtype(np.int32)

  def __init__(self, records: _Records, rows: np.ndarray):
    super().__init__(records, rows)
    self.shape = (self._rows.size,)

  def __getitem__(self, key: Any) -> np.ndarray | np.int32:
    if isinstance(key, (int, np.integer)):
      return self[np.asarray([key])][0]
    rows = self._rows[_rows(key, len(self))]
    missing = rows[self._records.labels[rows] < 0]
    if missing.size:
      self._records.read(np.unique(missing), images=False)
    return self._records.labels[rows].astype(np.int32)

  def astype(self, dtype: Any) -> "TfdsLabelTable":
    if np.dtype(dtype) != self.dtype:
      raise TypeError(f"labels are int32; index them and convert the result to {dtype}.")
    return self


def _tables(name: str, split: str, data_dir: str | None, image_size: int,
            num_workers: int) -> TfdsImageTable:
  reopen = functools.partial(tfds_sources.open_source, name, split, data_dir)
  source = reopen()
  tfds_sources.check_features(source.dataset_info.features, name)
  return TfdsImageTable(_Records(source, image_size, True, num_workers, reopen))


def imagenet_subset_split(subset: str = "1pct", *, image_size: int = 256,
                          data_dir: str | os.PathLike | None = None,
                          num_workers: int | None = None) -> OpenSetSplit:
  """The closed-set ImageNet split ``"imagenet_<subset>"`` read on demand (see above).

  Args:
    subset: ``"1pct"`` or ``"10pct"`` (``imagenet2012_subset/<subset>``).
    image_size: the stored square size (256; the step crops 224 with
      ``augment.crop``).
    data_dir: the tfds data directory (default ``$TFDS_DATA_DIR``, else
      ``~/tensorflow_datasets``).
    num_workers: decode threads per table (default: the CPU count, at most 32).

  Raises:
    ValueError: an unknown subset or a non-positive ``image_size``.
    DatasetNotPreparedError: either data set is not prepared; the message names the
      ``tfds build`` command.
  """
  if subset not in SUBSETS:
    raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}.")
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
  data_dir = tfds_sources.data_dir_or_env(data_dir)
  workers = num_workers or min(32, os.cpu_count() or 1)
  labeled = _tables(f"imagenet2012_subset/{subset}", "train", data_dir, image_size, workers)
  unlabeled = _tables("imagenet2012", "train", data_dir, image_size, workers)
  test = _tables("imagenet2012", "validation", data_dir, image_size, workers)
  y_test = test.labels
  return OpenSetSplit(
      x_labeled=labeled, y_labeled=labeled.labels,
      x_unlabeled=unlabeled, y_unlabeled=unlabeled.labels,
      unlabeled_is_id=np.ones(len(unlabeled), bool),
      x_test_id=test, y_test_id=y_test, x_test_full=test, y_test_full=y_test,
      test_full_is_id=np.ones(len(test), bool),
      num_classes=NUM_CLASSES, id_classes=tuple(range(NUM_CLASSES)), ood_classes=(),
      labeled_index=np.full(len(labeled), -1, np.int64), mean=IMAGENET_MEAN, std=IMAGENET_STD,
      name=f"imagenet_{subset}")
