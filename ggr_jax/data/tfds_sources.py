"""CIFAR-10, CIFAR-100 and SVHN splits read through ``tensorflow_datasets``.

The data come from ``tfds.data_source`` (random access to ``array_record`` files), so
TensorFlow is never imported. The dataset must already be prepared in array_record
format; nothing is downloaded here. On a machine with network access and TensorFlow
(``tfds build`` needs it to write the files), prepare it once with::

  tfds build cifar10 --data_dir=DIR --file_format=array_record
  tfds build cifar100 --data_dir=DIR --file_format=array_record
  tfds build svhn_cropped --data_dir=DIR --file_format=array_record

and pass ``data_dir=DIR`` (default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).

Splits (official protocol, see :mod:`ggr_jax.data.openset`):

* CIFAR-10 6/4: ID = original classes 2..7 (bird, cat, deer, dog, frog, horse) as
  labels 0..5, OOD = 0, 1, 8, 9 (airplane, automobile, ship, truck). ImageNet
  normalisation, as the official code uses for CIFAR-10.
* Closed-set CIFAR-10 and CIFAR-100 (:func:`cifar10_closed_split`,
  :func:`cifar100_closed_split`): every class known, normalised by each data set's own
  statistics as the closed-set SSL codebases do; 40/250/4000 labels on CIFAR-10 are
  ``labels_per_class`` 4/25/400, 400/2500 on CIFAR-100 are 4/25. Closed-set SVHN
  (:func:`svhn_closed_split`, tfds ``svhn_cropped``) likewise; 1,000 labels are 100.
* CIFAR-100 K/(100-K): ID = the 5 fine classes of each of the first K/5 superclasses
  in coarse-label order (:data:`CIFAR100_SUPERCLASSES`), ascending fine id, so 50/50
  takes superclasses 0-9 and 20/80 superclasses 0-3. CIFAR-100 normalisation
  (129.3, 124.1, 112.4)/255 and (68.2, 65.4, 70.4)/255.

Reading costs about 0.3 ms of CPU per image (tfds decodes each PNG record), so
CIFAR's 60 000 images take some 20 s; a split is built once per run.

Example (needs the prepared data):
  >>> split = cifar10_split(labels_per_class=25, seed=0)  # doctest: +SKIP
  >>> split.x_labeled.shape, split.summary()["unlabeled_ood"]  # doctest: +SKIP
  ((150, 32, 32, 3), 20000)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from ggr_jax.data.augment import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                  IMAGENET_MEAN, IMAGENET_STD, SVHN_MEAN, SVHN_STD)
from ggr_jax.data.openset import OpenSetSplit, make_closed_split, make_openset_split

CIFAR10_ID_CLASSES = (2, 3, 4, 5, 6, 7)

# The standard CIFAR-100 superclasses: row c lists the fine labels of coarse label c.
CIFAR100_SUPERCLASSES: tuple[tuple[int, ...], ...] = (
    (4, 30, 55, 72, 95),   # 0 aquatic mammals: beaver, dolphin, otter, seal, whale
    (1, 32, 67, 73, 91),   # 1 fish: aquarium fish, flatfish, ray, shark, trout
    (54, 62, 70, 82, 92),  # 2 flowers: orchid, poppy, rose, sunflower, tulip
    (9, 10, 16, 28, 61),   # 3 food containers: bottle, bowl, can, cup, plate
    (0, 51, 53, 57, 83),   # 4 fruit and vegetables: apple, mushroom, orange, pear, pepper
    (22, 39, 40, 86, 87),  # 5 household electrical devices: clock ... television
    (5, 20, 25, 84, 94),   # 6 household furniture: bed, chair, couch, table, wardrobe
    (6, 7, 14, 18, 24),    # 7 insects: bee, beetle, butterfly, caterpillar, cockroach
    (3, 42, 43, 88, 97),   # 8 large carnivores: bear, leopard, lion, tiger, wolf
    (12, 17, 37, 68, 76),  # 9 large man-made outdoor things: bridge ... skyscraper
    (23, 33, 49, 60, 71),  # 10 large natural outdoor scenes: cloud ... sea
    (15, 19, 21, 31, 38),  # 11 large omnivores and herbivores: camel ... kangaroo
    (34, 63, 64, 66, 75),  # 12 medium mammals: fox, porcupine, possum, raccoon, skunk
    (26, 45, 77, 79, 99),  # 13 non-insect invertebrates: crab, lobster, snail, spider, worm
    (2, 11, 35, 46, 98),   # 14 people: baby, boy, girl, man, woman
    (27, 29, 44, 78, 93),  # 15 reptiles: crocodile, dinosaur, lizard, snake, turtle
    (36, 50, 65, 74, 80),  # 16 small mammals: hamster, mouse, rabbit, shrew, squirrel
    (47, 52, 56, 59, 96),  # 17 trees: maple, oak, palm, pine, willow
    (8, 13, 48, 58, 90),   # 18 vehicles 1: bicycle, bus, motorcycle, pickup truck, train
    (41, 69, 81, 85, 89),  # 19 vehicles 2: lawn mower, rocket, streetcar, tank, tractor
)

_CHUNK = 4096  # records per bulk read


class DatasetNotPreparedError(FileNotFoundError):
  """The tfds dataset is not prepared (in array_record format) in the data directory."""


class DatasetUnreadableError(ValueError):
  """The tfds dataset's prepared files are damaged (garbled metadata, bad records)."""


def data_dir_or_env(data_dir: str | os.PathLike | None) -> str | None:
  # tfds reads TFDS_DATA_DIR once at import; read it per call instead.
  if data_dir is not None:
    return os.fspath(data_dir)
  return os.environ.get("TFDS_DATA_DIR")


def open_source(name: str, split: str, data_dir: str | None) -> Any:
  """``tfds.data_source(name, split)``, or :class:`DatasetNotPreparedError` naming the fix
  (:class:`DatasetUnreadableError` when the prepared files cannot be read)."""
  try:
    return _open_source(name, split, data_dir)
  except DatasetNotPreparedError:
    raise
  except Exception as err:  # pylint: disable=broad-except  # tfds/protobuf raise many kinds
    first = (str(err).splitlines() or [""])[0][:300]
    raise DatasetUnreadableError(
        f"{name} ({split}) in {data_dir or 'the tfds default folder'} cannot be read "
        f"({type(err).__name__}: {first}); rebuild it with `tfds build {name} "
        f"--file_format=array_record` or set dataset.data_dir to an intact copy.") from err


def _open_source(name: str, split: str, data_dir: str | None) -> Any:
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (KeyError, NotImplementedError) as err:
    # tfds raises KeyError (no splits recorded) or NotImplementedError (a format
    # without random access, tfrecord by default) when the data are not usable.
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
    if prepared and builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      raise
    root = data_dir if data_dir is not None else os.fspath(builder.data_dir_root)
    command = f"tfds build {name} --data_dir={root} --file_format=array_record"
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    problem = (f"{name} is prepared at {builder.data_dir} in the {file_format} format, "
               f"which has no random access" if prepared else
               f"{name} is not prepared: expected it at {builder.data_dir}")
    raise DatasetNotPreparedError(
        f"{problem}. On a machine with network access and TensorFlow run `{command}` "
        f"(or tfds.builder({name!r}, data_dir=..., file_format='array_record')"
        f".download_and_prepare()), then copy that folder here, or pass data_dir= / set "
        f"TFDS_DATA_DIR to the folder that holds it.") from err


def read_records(source: Any, keys: Sequence[int]) -> list[dict[str, Any]]:
  """The decoded records ``keys`` of a tfds data source, in one bulk read where it can."""
  getitems = getattr(source, "__getitems__", None)
  try:
    if getitems is not None:
      return list(getitems(list(keys)))
  except TypeError:  # tfds.testing.mock_data's stand-in reader has no usable __getitems__
    pass
  return [source[k] for k in keys]


def _read_all(source: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Every ``(image, label)`` of a data source, read in bulk chunks."""
  features = source.dataset_info.features
  check_features(features, name)
  n = len(source)
  images = np.empty((n, *features["image"].shape), np.uint8)
  labels = np.empty(n, np.int32)
  for start in range(0, n, _CHUNK):
    records = read_records(source, range(start, min(n, start + _CHUNK)))
    for offset, record in enumerate(records):
      images[start + offset] = record["image"]
      labels[start + offset] = record["label"]
  return images, labels


def check_features(features: Any, name: str) -> None:
  """Raises ValueError unless ``features`` hold an ``image`` and a ``label``."""
  if "image" not in features or "label" not in features:
    raise ValueError(f"{name} has features {sorted(features)}; an 'image' and a 'label' "
                     f"feature are needed.")


def load_tfds_arrays(name: str, data_dir: str | os.PathLike | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """A prepared tfds image data set as ``(x_train, y_train, x_test, y_test)``.

  Images are uint8 NHWC, labels int32 (the ``label`` feature; for CIFAR-100 the fine
  label). Both splits are opened before any image is read.

  Raises:
    DatasetNotPreparedError: (a FileNotFoundError) the data set is not prepared in
      array_record format under ``data_dir`` (default: ``$TFDS_DATA_DIR`` read at call
      time, else ``~/tensorflow_datasets``); the message names the expected folder
      and the ``tfds build`` command that prepares it.
    ValueError: the data set lacks an ``image`` or ``label`` feature.
  """
  data_dir = data_dir_or_env(data_dir)
  train, test = open_source(name, "train", data_dir), open_source(name, "test", data_dir)
  x_train, y_train = _read_all(train, name)
  x_test, y_test = _read_all(test, name)
  return x_train, y_train, x_test, y_test


def cifar100_id_classes(num_id_classes: int) -> tuple[int, ...]:
  """The ID fine labels for CIFAR-100 with ``num_id_classes`` known classes.

  The fine classes of the first ``num_id_classes // 5`` superclasses, ascending.
  ``num_id_classes`` must be a multiple of 5 in 5..95 (the paper uses 50 and 20).
  """
  if (isinstance(num_id_classes, bool) or not isinstance(num_id_classes, int)
      or num_id_classes % 5 or not 5 <= num_id_classes <= 95):
    raise ValueError(f"num_id_classes must be a multiple of 5 between 5 and 95 (the paper "
                     f"uses 50 and 20), got {num_id_classes!r}.")
  rows = CIFAR100_SUPERCLASSES[:num_id_classes // 5]
  return tuple(sorted(c for row in rows for c in row))


def _check_draw(labels_per_class: Any, seed: Any) -> None:
  # Checked again by make_openset_split; here so bad values fail before the read.
  for value, name, low in ((labels_per_class, "labels_per_class", 1), (seed, "seed", 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < low:
      raise ValueError(f"{name} must be >= {low}, got {value}.")


def _split(name: str, id_classes: Sequence[int], mean: Sequence[float],
           std: Sequence[float], split_name: str, labels_per_class: int, seed: int,
           data_dir: str | os.PathLike | None) -> OpenSetSplit:
  _check_draw(labels_per_class, seed)
  x_train, y_train, x_test, y_test = load_tfds_arrays(name, data_dir)
  return make_openset_split(x_train, y_train, x_test, y_test, id_classes=id_classes,
                            labels_per_class=labels_per_class, seed=seed, mean=mean,
                            std=std, name=split_name)


def cifar10_split(*, labels_per_class: int, seed: int,
                  data_dir: str | os.PathLike | None = None) -> OpenSetSplit:
  """CIFAR-10 6/4 (``"cifar10_6_4"``): ID classes 2..7 -> 0..5, OOD 0, 1, 8, 9.

  The paper uses ``labels_per_class`` 5, 10, 25 (30/60/150 labels) and seeds 0-2.
  The unlabeled set is all 50 000 training images (30 000 ID, 20 000 OOD).
  """
  return _split("cifar10", CIFAR10_ID_CLASSES, IMAGENET_MEAN, IMAGENET_STD, "cifar10_6_4",
                labels_per_class, seed, data_dir)


def cifar100_split(*, num_id_classes: int = 50, labels_per_class: int, seed: int,
                   data_dir: str | os.PathLike | None = None) -> OpenSetSplit:
  """CIFAR-100 K/(100-K) (``"cifar100_50_50"``, ``"cifar100_20_80"``).

  ID = :func:`cifar100_id_classes` (``num_id_classes``), remapped to 0..K-1 in
  ascending fine-label order; the other fine classes are OOD. The paper uses
  ``labels_per_class`` 5, 10, 25 with K = 50 and K = 20. ``num_id_classes`` is checked
  before any data are read.
  """
  id_classes = cifar100_id_classes(num_id_classes)
  return _split("cifar100", id_classes, CIFAR100_MEAN, CIFAR100_STD,
                f"cifar100_{num_id_classes}_{100 - num_id_classes}", labels_per_class, seed,
                data_dir)


def cifar10_closed_split(*, labels_per_class: int, seed: int,
                         data_dir: str | os.PathLike | None = None) -> OpenSetSplit:
  """Closed-set CIFAR-10 (``"cifar10_closed"``): all 10 classes, CIFAR-10 statistics."""
  return _closed("cifar10", CIFAR10_MEAN, CIFAR10_STD, labels_per_class, seed, data_dir)


def cifar100_closed_split(*, labels_per_class: int, seed: int,
                          data_dir: str | os.PathLike | None = None) -> OpenSetSplit:
  """Closed-set CIFAR-100 (``"cifar100_closed"``): all 100 fine classes."""
  return _closed("cifar100", CIFAR100_MEAN, CIFAR100_STD, labels_per_class, seed, data_dir)


def svhn_closed_split(*, labels_per_class: int, seed: int,
                      data_dir: str | os.PathLike | None = None) -> OpenSetSplit:
  """Closed-set SVHN (``"svhn_cropped_closed"``, tfds ``svhn_cropped``): 10 digits, the
  73,257 train images (not ``extra``), 1,000 labels = ``labels_per_class`` 100."""
  return _closed("svhn_cropped", SVHN_MEAN, SVHN_STD, labels_per_class, seed, data_dir)


def _closed(name: str, mean: Sequence[float], std: Sequence[float], labels_per_class: int,
            seed: int, data_dir: str | os.PathLike | None) -> OpenSetSplit:
  _check_draw(labels_per_class, seed)
  x_train, y_train, x_test, y_test = load_tfds_arrays(name, data_dir)
  return make_closed_split(x_train, y_train, x_test, y_test, labels_per_class=labels_per_class,
                           seed=seed, mean=mean, std=std, name=f"{name}_closed")
