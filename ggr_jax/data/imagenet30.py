"""ImageNet-30 open-set split from a local folder in the official layout.

Layout of ``root`` (the official ``data/imagenet30``)::

  root/
    filelist/train_labeled_p1.txt    260 lines, 13 per ID class (labels 0..19)
    filelist/train_labeled_p5.txt    1300 lines, 65 per ID class
    filelist/train_unlabeled_full.txt  39 000 lines, every training image, labels 0..29
    filelist/test.txt                3000 lines, labels 0..29
    one_class_train/<class>/...      training images
    one_class_test/<class>/...       test images

File-list format: one image per line, ``<path> <label>`` separated by whitespace
(the last field is the integer label, so a path may itself hold spaces); blank lines
are skipped. A path is resolved as follows: an absolute path is used as is; a
relative path that contains a ``one_class_train`` or ``one_class_test`` component is
taken from that component on, under ``root`` (the official lists hold
``data/imagenet30/one_class_train/acorn/n12267677_23294.JPEG 0``, relative to the
official repository, so they work unchanged wherever ``root`` lives); any other
relative path is taken relative to ``root``.

Protocol (official ``imagenet30.py``): K = 20 ID classes (labels < 20). The labeled
set is the chosen list (``"p1"`` or ``"p5"``) exactly as written, duplicates included
(the official lists repeat some images); every labeled image must also appear in
``train_unlabeled_full.txt``, which is the unlabeled set (ID and OOD). Test labels
>= 20 collapse to 20 ("unknown") in ``test_full``; ``test_id`` keeps labels < 20.
ImageNet normalisation. The split ignores the experiment seed: the lists fix it.

Images are decoded with Pillow to RGB and stored uint8 NHWC at a fixed square
``image_size`` (default 256), matching the official resizes before the 224 crops:
training images are resized to ``(image_size, image_size)`` (official weak/strong
``Resize((256, 256))``), test images have their shorter side resized to
``image_size`` and are centre-cropped to a square, so a later 224 centre crop equals
the official ``Resize(256), CenterCrop(224)``. Both use bilinear resampling. At 256
the 39 000 training images would take 7.7 GB and the test set 0.6 GB: they stay on disk
and are decoded per batch (:class:`ImageFileTable`, in Grain's worker processes).
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import pathlib
import sys
from typing import Sequence

import numpy as np
from PIL import Image

from ggr_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ggr_jax.data.openset import OpenSetSplit
from ggr_jax.data.resize import square_image

NUM_ID_CLASSES = 20
BAD_IMAGE_RULES = ("stop", "skip")
LABELED_LISTS = ("p1", "p5")
_IMAGE_DIRS = ("one_class_train", "one_class_test")
_LAYOUT = ("root/filelist/{train_labeled_p1,train_labeled_p5,train_unlabeled_full,test}.txt "
           "and root/one_class_train/, root/one_class_test/ (see ggr_jax.data.imagenet30)")


def read_file_list(path: str | os.PathLike, root: str | os.PathLike
                   ) -> tuple[list[pathlib.Path], np.ndarray]:
  """The resolved image paths and int32 labels of one file list (format above)."""
  path, root = pathlib.Path(path), pathlib.Path(root)
  if not path.is_file():
    raise FileNotFoundError(f"ImageNet-30 file list {path} not found; expected {_LAYOUT}.")
  paths, labels = [], []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.rsplit(None, 1)
    if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
      raise ValueError(f"{path}:{number}: expected '<path> <integer label>', got {line!r}.")
    label = int(fields[1])
    if label < 0:
      raise ValueError(f"{path}:{number}: negative label {label}; labels must be >= 0.")
    paths.append(_resolve(fields[0].strip(), root))
    labels.append(label)
  if not paths:
    raise ValueError(f"ImageNet-30 file list {path} holds no images.")
  return paths, np.asarray(labels, np.int32)


def _resolve(entry: str, root: pathlib.Path) -> pathlib.Path:
  entry_path = pathlib.PurePath(entry)
  if entry_path.is_absolute():
    return pathlib.Path(entry_path)
  parts = entry_path.parts
  for i, part in enumerate(parts):
    if part in _IMAGE_DIRS:
      return root.joinpath(*parts[i:])
  return root / entry_path


def _load_image(path: pathlib.Path, size: int, centre_crop: bool) -> np.ndarray:
  with Image.open(path) as image:
    return square_image(image, size, centre_crop)


def load_images(paths: Sequence[pathlib.Path], image_size: int, *, centre_crop: bool,
                num_workers: int | None = None) -> np.ndarray:
  """Decodes ``paths`` into uint8 ``(N, image_size, image_size, 3)``, in a thread pool.

  ``centre_crop=False`` resizes to the square; ``True`` resizes the shorter side and
  centre-crops (the test-image rule above).
  """
  return ImageFileTable(paths, image_size, centre_crop=centre_crop,
                        num_workers=num_workers)[:]


class UnreadableImage(OSError):
  """An image file that exists but cannot be decoded; names its path and the option."""


class ImageFileTable:
  """Read-only uint8 ``(N, S, S, 3)`` images of a file list, decoded when indexed.

  ``table[rows]`` (an int, a slice or an integer array) decodes those files (in a
  thread pool) and returns a numpy array; nothing is kept. :meth:`subset` is the table
  of some rows (no decoding). Picklable, so Grain's worker processes decode their own
  batches. A file that fails to decode raises :class:`UnreadableImage` naming it
  (``on_error="stop"``), or is reported on stderr and replaced by the next readable
  image of the list (``"skip"``).
  """

  dtype = np.dtype(np.uint8)
  read_on_demand = True  # the host pipeline indexes it instead of converting it

  def __init__(self, paths: Sequence[str | os.PathLike], image_size: int, *,
               centre_crop: bool, num_workers: int | None = None, on_error: str = "stop"):
    if on_error not in BAD_IMAGE_RULES:
      raise ValueError(f"on_error = {on_error!r}; choose one of {BAD_IMAGE_RULES}.")
    self._paths = np.asarray([str(p) for p in paths], dtype=object)
    self.image_size, self.centre_crop, self.on_error = image_size, centre_crop, on_error
    self.num_workers = num_workers or min(32, os.cpu_count() or 1)
    self.shape = (len(self._paths), image_size, image_size, 3)

  @property
  def ndim(self) -> int:
    return 4

  def __len__(self) -> int:
    return self.shape[0]

  def __array__(self, dtype=None, copy=None):
    raise TypeError(f"ImageFileTable of {len(self)} images is read on demand and is never "
                    "loaded whole; index the rows you need (training on it needs "
                    "--config.train.input=stream).")

  def subset(self, rows: np.ndarray) -> "ImageFileTable":
    """The table of ``rows`` (integer indices or a boolean mask), decoding nothing."""
    out = copy.copy(self)
    out._paths = self._paths[np.asarray(rows)]  # pylint: disable=protected-access
    out.shape = (len(out._paths), *self.shape[1:])  # pylint: disable=protected-access
    return out

  def _decode(self, position: int) -> np.ndarray:
    for offset in range(len(self._paths)):
      path = pathlib.Path(self._paths[(position + offset) % len(self._paths)])
      try:
        return _load_image(path, self.image_size, self.centre_crop)
      except (OSError, ValueError, SyntaxError) as err:
        message = (f"image {path} cannot be decoded ({type(err).__name__}: {err}); replace "
                   "or remove it from the list, or set --config.dataset.on_bad_image=skip")
        if self.on_error == "stop":
          raise UnreadableImage(message) from None
        print(f"ggr_jax: skipped {message.split(';')[0]}; using the next image of the list",
              file=sys.stderr, flush=True)
    raise UnreadableImage(f"no image of the list ({len(self._paths)} files) can be decoded.")

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self[np.asarray([key])][0]
    rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
    if rows.dtype == bool or not np.issubdtype(rows.dtype, np.integer):
      raise TypeError(f"index rows with integers or a slice (got {rows.dtype}); use "
                      "subset() for a mask.")
    out = np.empty((rows.size, *self.shape[1:]), np.uint8)

    def fill(i: int) -> None:
      out[i] = self._decode(int(rows[i]))

    if rows.size <= 1:
      list(map(fill, range(rows.size)))
    else:
      with concurrent.futures.ThreadPoolExecutor(
          max_workers=min(self.num_workers, rows.size)) as pool:
        list(pool.map(fill, range(rows.size)))
    return out


def _check_files(paths: Sequence[pathlib.Path], list_name: str) -> None:
  missing = [p for p in paths if not p.is_file()]
  if missing:
    shown = ", ".join(str(p) for p in missing[:3])
    raise FileNotFoundError(f"{len(missing)} of {len(paths)} images listed in {list_name} "
                            f"are missing (first: {shown}); expected {_LAYOUT}.")


def imagenet30_split(root: str | os.PathLike, *, labels: str = "p1", image_size: int = 256,
                     num_classes: int = NUM_ID_CLASSES, num_workers: int | None = None,
                     on_bad_image: str = "stop") -> OpenSetSplit:
  """The ImageNet-30 open-set split (``"imagenet30_p1"`` or ``"imagenet30_p5"``).

  Args:
    root: the folder in the layout above (official ``data/imagenet30``).
    labels: which labeled list, ``"p1"`` (13 per class) or ``"p5"`` (65 per class).
    image_size: side of the stored square images (official 256 before the 224 crop).
    num_classes: K; labels below K are ID (official 20).
    num_workers: decoding threads per read (default: the CPU count, at most 32).
    on_bad_image: an image that fails to decode during training stops the run naming
      it (``"stop"``), or is reported and replaced by the next one (``"skip"``).

  The images stay on disk: the split's image arrays are :class:`ImageFileTable` s,
  decoded when a batch or an evaluation reads them (``train.input=stream``).

  Raises:
    FileNotFoundError: a missing root, file list or listed image (checked before any
      image is decoded); the message names the expected layout.
    ValueError: a bad argument or list entry, a labeled image absent from
      ``train_unlabeled_full.txt`` or listed there with another label, a labeled
      label >= K, or an ID class without training images.
  """
  if labels not in LABELED_LISTS:
    raise ValueError(f"labels must be one of {LABELED_LISTS}, got {labels!r}.")
  if on_bad_image not in BAD_IMAGE_RULES:
    raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_RULES}, got {on_bad_image!r}.")
  for value, name in ((image_size, "image_size"), (num_classes, "num_classes")):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"ImageNet-30 root {root} not found; expected {_LAYOUT}.")
  lists = root / "filelist"
  lb_paths, y_lb = read_file_list(lists / f"train_labeled_{labels}.txt", root)
  train_paths, y_train = read_file_list(lists / "train_unlabeled_full.txt", root)
  test_paths, y_test = read_file_list(lists / "test.txt", root)

  k = num_classes
  row = {p: i for i, p in reversed(list(enumerate(train_paths)))}
  absent = [str(p) for p in lb_paths if p not in row]
  if absent:
    raise ValueError(f"{len(absent)} labeled images are not in train_unlabeled_full.txt "
                     f"(first: {absent[0]}); the unlabeled list must hold every training "
                     f"image, labeled ones included.")
  labeled_index = np.asarray([row[p] for p in lb_paths], np.int64)
  if (y_train[labeled_index] != y_lb).any() or y_lb.max() >= k:
    raise ValueError(f"train_labeled_{labels}.txt must give ID labels (< {k}) that agree "
                     f"with train_unlabeled_full.txt for the same images.")
  empty = sorted(set(range(k)) - set(y_train.tolist()))
  if empty:
    raise ValueError(f"ID classes {empty} have no training images; check num_classes={k}.")
  _check_files(train_paths, "train_unlabeled_full.txt")
  _check_files(test_paths, "test.txt")

  ood_classes = tuple(sorted(set(y_train[y_train >= k].tolist())
                             | set(y_test[y_test >= k].tolist())))
  # ID labels stay; OOD labels map to K..K+M-1 in ascending order (analysis only).
  mapping = np.arange(max((k - 1, *ood_classes)) + 1, dtype=np.int32)
  mapping[list(ood_classes)] = np.arange(k, k + len(ood_classes), dtype=np.int32)

  x_train = ImageFileTable(train_paths, image_size, centre_crop=False, num_workers=num_workers,
                           on_error=on_bad_image)
  x_test = ImageFileTable(test_paths, image_size, centre_crop=True, num_workers=num_workers,
                          on_error=on_bad_image)
  y_train, y_test = mapping[y_train], mapping[y_test]
  test_id = y_test < k
  return OpenSetSplit(
      x_labeled=x_train.subset(labeled_index), y_labeled=_frozen(y_train[labeled_index]),
      x_unlabeled=x_train, y_unlabeled=_frozen(y_train), unlabeled_is_id=_frozen(y_train < k),
      x_test_id=x_test.subset(test_id), y_test_id=_frozen(y_test[test_id]),
      x_test_full=x_test, y_test_full=_frozen(np.minimum(y_test, k).astype(np.int32)),
      test_full_is_id=_frozen(test_id), num_classes=k, id_classes=tuple(range(k)),
      ood_classes=ood_classes, labeled_index=_frozen(labeled_index), mean=IMAGENET_MEAN,
      std=IMAGENET_STD, name=f"imagenet30_{labels}")


def _frozen(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False
  return array
