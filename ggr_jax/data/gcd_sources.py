"""The category-discovery benchmarks of GCD, SimGCD and EAGC, as GCD splits.

Every split is :func:`ggr_jax.data.gcd.make_gcd_split` of the benchmark's Old classes with
``prop_labeled`` (0.5) of their training images labeled; images are stored uint8 at
``image_size`` squared, normalised with ImageNet's statistics (the DINO backbones'):

* ``cifar100`` (tfds ``cifar100``): Old = fine classes 0-79, New = 80-99.
* ``cub`` (tfds ``caltech_birds2011``, 200 species) and ``scars`` (tfds ``cars196``, 196
  models): Old = the Semantic Shift Benchmark's known classes (100 and 98,
  ``ssb_known_classes.json``), the rest New.
* ``imagenet100`` (a local ImageNet folder): the 100 classes GCD codebases draw,
  ``sorted(RandomState(0).choice(1000, 100, replace=False))`` of the 1,000 sorted synset
  folders; Old = the first 50 of them.
* ``herbarium19`` (a local folder): 683 classes numbered by sorted folder name, as
  torchvision's ``ImageFolder`` numbers them; Old = the SSB's 341 known classes.

Images are resized as the GCD codebases' test transform does (shorter side to
``image_size``, centre square; :func:`ggr_jax.data.resize.square_image`); training then
takes random ``augment.crop`` windows of that square (the official training transform
crops from the whole resized image, a little more of the long side). CIFAR-100 at 256 is
9.8 GB of images, ImageNet-100 at 256 about 25 GB: set ``dataset.image_size`` to what
the host holds. The labeled draw uses this library's generator, so its images differ from
the official draw (same proportion, same classes).

Preparation (nothing is downloaded at run time): on a machine with network access and
TensorFlow, ``tfds build cifar100 caltech_birds2011 cars196 --data_dir=DIR
--file_format=array_record`` (Stanford Cars' original host is gone; tfds' manual
instructions say where its files are now), then pass ``dataset.data_dir=DIR``. ImageNet:
the ILSVRC-2012 ``train/<wnid>/`` and ``val/<wnid>/`` folders (val sorted into synset
folders). Herbarium-19: the ``small-train/<class>/`` and ``small-validation/<class>/``
folders of the FGVC6 Herbarium 2019 release (kaggle.com/c/herbarium-2019-fgvc6).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from ggr_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ggr_jax.data.gcd import make_gcd_split
from ggr_jax.data.imagenet30 import load_images
from ggr_jax.data.openset import OpenSetSplit
from ggr_jax.data.resize import square_image
from ggr_jax.data.tfds_sources import data_dir_or_env, open_source, read_records

GCD_SOURCES = ("cifar100", "cub", "scars", "imagenet100", "herbarium19")
FOLDER_SOURCES = ("imagenet100", "herbarium19")
_TFDS_NAMES = {"cifar100": "cifar100", "cub": "caltech_birds2011", "scars": "cars196"}
_CHUNK = 1024
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


def ssb_known_classes(name: str) -> tuple[int, ...]:
  """The Semantic Shift Benchmark's known (Old) classes of ``cub``, ``scars`` or
  ``herbarium19``, ascending."""
  table = json.loads((pathlib.Path(__file__).parent / "ssb_known_classes.json").read_text())
  if name not in table or name.startswith("_"):
    raise ValueError(f"no SSB class split for {name!r}; known: cub, scars, herbarium19")
  return tuple(table[name])


def imagenet100_classes() -> np.ndarray:
  """Indices (into the 1,000 sorted synsets) of GCD's ImageNet-100 classes, ascending."""
  return np.sort(np.random.RandomState(0).choice(1000, 100, replace=False))


def gcd_split(name: str, *, prop_labeled: float, seed: int, image_size: int,
              data_dir: str | os.PathLike | None = None,
              num_workers: int | None = None) -> OpenSetSplit:
  """The GCD split of benchmark ``name`` (:data:`GCD_SOURCES`; see the module docstring).

  Raises:
    DatasetNotPreparedError: (a FileNotFoundError) a tfds benchmark not prepared under
      ``data_dir``, with the command that prepares it.
    FileNotFoundError: a folder benchmark whose root or split folders are missing.
    ValueError: a bad argument, or data that lack the benchmark's classes.
  """
  if name not in GCD_SOURCES:
    raise ValueError(f"unknown GCD benchmark {name!r}; choose one of {GCD_SOURCES}")
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
  if name in FOLDER_SOURCES:
    if not data_dir:
      raise FileNotFoundError(f"{name} is read from a local folder: set dataset.data_dir "
                              f"(see ggr_jax.data.gcd_sources for the layout)")
    x_train, y_train, x_test, y_test, old = _folder_arrays(name, pathlib.Path(data_dir),
                                                           image_size, num_workers)
  else:
    data_dir = data_dir_or_env(data_dir)
    tfds_name = _TFDS_NAMES[name]
    train, test = open_source(tfds_name, "train", data_dir), open_source(tfds_name, "test",
                                                                          data_dir)
    x_train, y_train = _read_resized(train, tfds_name, image_size)
    x_test, y_test = _read_resized(test, tfds_name, image_size)
    old = tuple(range(80)) if name == "cifar100" else ssb_known_classes(name)
  return make_gcd_split(x_train, y_train, x_test, y_test, old_classes=old,
                        prop_labeled=prop_labeled, seed=seed, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, name=f"{name}_gcd")


def _read_resized(source: Any, name: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Every ``(image, label)`` of a tfds source, each image made a square of ``image_size``
  (images of another size or shape are resized; an image already that size is kept)."""
  n = len(source)
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  labels = np.empty(n, np.int64)
  for start in range(0, n, _CHUNK):
    for offset, record in enumerate(read_records(source, range(start, min(n, start + _CHUNK)))):
      if "image" not in record or "label" not in record:
        raise ValueError(f"{name} records hold {sorted(record)}; an 'image' and a 'label' "
                         "are needed")
      image = np.asarray(record["image"])
      if image.shape != (image_size, image_size, 3):
        image = square_image(image if image.shape[-1] == 3 else image[..., 0], image_size,
                             centre_crop=True)
      images[start + offset], labels[start + offset] = image, int(record["label"])
  return images, labels


def _class_folders(split_dir: pathlib.Path) -> list[pathlib.Path]:
  if not split_dir.is_dir():
    raise FileNotFoundError(f"{split_dir} not found (see ggr_jax.data.gcd_sources for the "
                            "layout of the folder benchmarks)")
  return sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: p.name)


def _listing(folders: Sequence[pathlib.Path]) -> tuple[list[pathlib.Path], np.ndarray]:
  paths, labels = [], []
  for label, folder in enumerate(folders):
    files = sorted(p for p in folder.iterdir() if p.suffix in _IMAGE_SUFFIXES)
    paths += files
    labels += [label] * len(files)
  return paths, np.asarray(labels, np.int64)


def _folder_arrays(name: str, root: pathlib.Path, image_size: int,
                   num_workers: int | None) -> tuple:
  splits = ("train", "val") if name == "imagenet100" else ("small-train", "small-validation")
  train_dirs, test_dirs = (_class_folders(root / s) for s in splits)
  expected = 1000 if name == "imagenet100" else 683
  if len(train_dirs) != expected or [p.name for p in train_dirs] != [p.name for p in test_dirs]:
    raise ValueError(f"{root / splits[0]} and {root / splits[1]} must hold the same "
                     f"{expected} class folders ({len(train_dirs)} and {len(test_dirs)} found)")
  if name == "imagenet100":
    chosen = imagenet100_classes()
    train_dirs, test_dirs = [train_dirs[i] for i in chosen], [test_dirs[i] for i in chosen]
    old: tuple[int, ...] = tuple(range(50))
  else:
    old = ssb_known_classes("herbarium19")
  (train_paths, y_train), (test_paths, y_test) = _listing(train_dirs), _listing(test_dirs)
  empty = [folder.name for i, folder in enumerate(train_dirs) if not np.any(y_train == i)]
  if empty:
    raise ValueError(f"class folders without images under {root / splits[0]}: {empty[:5]}")
  load = lambda paths: load_images(paths, image_size, centre_crop=True,
                                   num_workers=num_workers)
  return load(train_paths), y_train, load(test_paths), y_test, old
