"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits.

1797 grayscale images of the digits 0-9 ship with scikit-learn, so nothing is
downloaded. Pixel values 0..16 are rescaled to uint8 0..255 (``rint(v * 255 / 16)``)
and a fixed stratified train/test split is drawn: with the defaults 1257 training and
540 test images. :func:`digits_split` then builds the open-set split exactly as for
CIFAR-10 6/4; with ID digits 0-5 that is 757 ID and 500 OOD training images and 326
ID of 540 test images.

Example:
  >>> split = digits_split(labels_per_class=5, seed=0)
  >>> split.x_labeled.shape, split.num_classes, split.ood_classes
  ((30, 8, 8, 1), 6, (6, 7, 8, 9))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ggr_jax.data.gcd import make_gcd_split
from ggr_jax.data.openset import OpenSetSplit, make_closed_split, make_openset_split


def load_digits_arrays(test_fraction: float = 0.3, split_seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The digits as ``(x_train, y_train, x_test, y_test)``.

  Images are uint8 ``(N, 8, 8, 1)`` in 0..255, labels int32 0..9. The split is
  stratified by digit (``train_test_split(stratify=y, random_state=split_seed)``), so
  every digit keeps its share in both halves.

  Example:
    >>> x_train, y_train, x_test, y_test = load_digits_arrays()
    >>> x_train.shape, x_test.shape, x_train.dtype, int(x_train.max())
    ((1257, 8, 8, 1), (540, 8, 8, 1), dtype('uint8'), 255)
  """
  if not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}.")
  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed)
  return x_train, y_train, x_test, y_test


def _pixel_stats(x_train: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  pixels = x_train.astype(np.float64) / 255.0
  return (tuple(float(m) for m in pixels.mean(axis=(0, 1, 2))),
          tuple(float(s) for s in pixels.std(axis=(0, 1, 2))))


def digits_split(*, id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5), labels_per_class: int,
                 seed: int, test_fraction: float = 0.3, split_seed: int = 0) -> OpenSetSplit:
  """The open-set digits split (default: digits 0-5 known, 6-9 unknown).

  ``labels_per_class`` and ``seed`` come from the experiment config. ``mean`` and
  ``std`` are the pixel statistics of all training images (ID and OOD) on the [0, 1]
  scale, as CIFAR's are of its whole training set; with the default split they are
  0.30560 and 0.37596. ``split_seed`` fixes the train/test split, ``seed`` only the
  labeled draw. The split is named ``digits_<K>_<M>``, e.g. ``digits_6_4``.
  """
  x_train, y_train, x_test, y_test = load_digits_arrays(test_fraction, split_seed)
  mean, std = _pixel_stats(x_train)
  num_ood = len(set(range(10)) - set(id_classes))
  return make_openset_split(
      x_train, y_train, x_test, y_test, id_classes=id_classes,
      labels_per_class=labels_per_class, seed=seed, mean=mean, std=std,
      name=f"digits_{len(id_classes)}_{num_ood}")


def digits_closed_split(*, labels_per_class: int, seed: int, test_fraction: float = 0.3,
                        split_seed: int = 0) -> OpenSetSplit:
  """The closed-set digits split ``"digits_closed"``: all ten digits known.

  The closed-set SSL analogue of CIFAR-10 with 40 labels is ``labels_per_class=4``.
  The train/test split and the normalisation are those of :func:`digits_split`.

  Example:
    >>> split = digits_closed_split(labels_per_class=4, seed=0)
    >>> split.x_labeled.shape, split.num_classes, split.is_closed_set
    ((40, 8, 8, 1), 10, True)
  """
  x_train, y_train, x_test, y_test = load_digits_arrays(test_fraction, split_seed)
  mean, std = _pixel_stats(x_train)
  return make_closed_split(x_train, y_train, x_test, y_test, labels_per_class=labels_per_class,
                           seed=seed, mean=mean, std=std, name="digits_closed")


def digits_gcd_split(*, old_classes: Sequence[int] = (0, 1, 2, 3, 4), prop_labeled: float = 0.5,
                     seed: int, test_fraction: float = 0.3, split_seed: int = 0
                     ) -> OpenSetSplit:
  """The category-discovery digits split ``"digits_gcd"``: Old digits ``old_classes``
  (half of their training images labeled), the other digits New
  (:func:`ggr_jax.data.gcd.make_gcd_split`); train/test split and normalisation as
  :func:`digits_split`.

  Example:
    >>> split = digits_gcd_split(seed=0)
    >>> split.num_classes, split.num_old_classes, int(split.y_labeled.max())
    (10, 5, 4)
  """
  x_train, y_train, x_test, y_test = load_digits_arrays(test_fraction, split_seed)
  mean, std = _pixel_stats(x_train)
  return make_gcd_split(x_train, y_train, x_test, y_test, old_classes=old_classes,
                        prop_labeled=prop_labeled, seed=seed, mean=mean, std=std,
                        name="digits_gcd")
