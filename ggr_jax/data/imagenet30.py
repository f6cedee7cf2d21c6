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
the 39 000 training images take 7.7 GB and the test set 0.6 GB.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from ggr_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ggr_jax.data.openset import OpenSetSplit, assemble_split
from ggr_jax.data.resize import square_image

NUM_ID_CLASSES = 20
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
  out = np.empty((len(paths), image_size, image_size, 3), np.uint8)

  def fill(i: int) -> None:
    out[i] = _load_image(paths[i], image_size, centre_crop)

  workers = num_workers or min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for _ in pool.map(fill, range(len(paths))):
      pass
  return out


def _check_files(paths: Sequence[pathlib.Path], list_name: str) -> None:
  missing = [p for p in paths if not p.is_file()]
  if missing:
    shown = ", ".join(str(p) for p in missing[:3])
    raise FileNotFoundError(f"{len(missing)} of {len(paths)} images listed in {list_name} "
                            f"are missing (first: {shown}); expected {_LAYOUT}.")


def imagenet30_split(root: str | os.PathLike, *, labels: str = "p1", image_size: int = 256,
                     num_classes: int = NUM_ID_CLASSES,
                     num_workers: int | None = None) -> OpenSetSplit:
  """The ImageNet-30 open-set split (``"imagenet30_p1"`` or ``"imagenet30_p5"``).

  Args:
    root: the folder in the layout above (official ``data/imagenet30``).
    labels: which labeled list, ``"p1"`` (13 per class) or ``"p5"`` (65 per class).
    image_size: side of the stored square images (official 256 before the 224 crop).
    num_classes: K; labels below K are ID (official 20).
    num_workers: decoding threads (default: the CPU count, at most 32).

  Raises:
    FileNotFoundError: a missing root, file list or listed image (checked before any
      image is decoded); the message names the expected layout.
    ValueError: a bad argument or list entry, a labeled image absent from
      ``train_unlabeled_full.txt`` or listed there with another label, a labeled
      label >= K, or an ID class without training images.
  """
  if labels not in LABELED_LISTS:
    raise ValueError(f"labels must be one of {LABELED_LISTS}, got {labels!r}.")
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

  x_train = load_images(train_paths, image_size, centre_crop=False, num_workers=num_workers)
  x_test = load_images(test_paths, image_size, centre_crop=True, num_workers=num_workers)
  return assemble_split(x_train, mapping[y_train], x_test, mapping[y_test], labeled_index,
                        num_classes=k, id_classes=tuple(range(k)), ood_classes=ood_classes,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, name=f"imagenet30_{labels}")
