"""Dataset-agnostic open-set splits, built the way the official code builds CIFAR-10 6/4.

From a labelled train/test pair and a list of in-distribution (ID) classes:

* ID classes are remapped to ``0..K-1`` in the order given; the remaining (OOD)
  classes to ``K..K+M-1`` in ascending original-class order (analysis labels only).
* ``labels_per_class`` labeled images per ID class are drawn without replacement.
* The unlabeled set is the **entire** training set, labeled images and every OOD
  class included (official ``include_lb_to_ulb=True``).
* ``test_id`` is the test split restricted to ID classes (official ``eval``);
  ``test_full`` is the whole test split with every OOD label mapped to ``K``
  ("unknown", official ``full``).

The closed-set SSL protocol (:func:`make_closed_split`) is the degenerate case with
every class known: no OOD data, ``test_id`` and ``test_full`` are the whole test split.

Example:
  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> y_train, y_test = np.repeat(np.arange(4), 10), np.repeat(np.arange(4), 3)
  >>> x_train = rng.integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)
  >>> x_test = rng.integers(0, 256, (12, 4, 4, 1), dtype=np.uint8)
  >>> split = make_openset_split(x_train, y_train, x_test, y_test, id_classes=(1, 3),
  ...                            labels_per_class=2, seed=0, mean=(0.5,), std=(0.25,),
  ...                            name="toy")
  >>> split.y_labeled.tolist(), split.ood_classes
  ([0, 0, 1, 1], (0, 2))
  >>> sorted(set(split.y_unlabeled.tolist())), sorted(set(split.y_test_full.tolist()))
  ([0, 1, 2, 3], [0, 1, 2])
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class OpenSetSplit:
  """One open-set (or closed-set) split; every array is read-only.

  The image and label arrays are numpy arrays, or, for data sets too large for memory,
  read-only tables read on demand (:mod:`ggr_jax.data.imagenet_subset`) that support
  ``shape``, ``len`` and indexing by row numbers.

  Attributes:
    x_labeled: labeled ID images, uint8 NHWC, grouped by class (class 0 first).
    y_labeled: their labels, int32 in ``0..K-1``.
    x_unlabeled: every training image (ID and OOD, labeled ones included), uint8 NHWC.
    y_unlabeled: analysis-only labels of ``x_unlabeled``: ID in ``0..K-1``, OOD
      classes in ``K..K+M-1`` in ascending original-class order. Not for training.
    unlabeled_is_id: bool, True where the unlabeled image is from an ID class.
    x_test_id, y_test_id: the test images of ID classes only, labels ``0..K-1``.
    x_test_full, y_test_full: the whole test split; every OOD label is ``K``.
    test_full_is_id: bool, True where the full-test image is from an ID class.
    num_classes: ``K``, the number of ID classes.
    id_classes: original ids of the ID classes; ``id_classes[i]`` becomes label ``i``.
    ood_classes: original ids of the OOD classes, ascending.
    labeled_index: rows of the training set that form ``x_labeled`` (same order); -1
      where the labeled set comes from another data set (ImageNet's tfds subsets).
    mean, std: per-channel normalisation on the [0, 1] scale.
    name: a short identifier such as ``"digits_6_4"``.
    num_old_classes: for a category-discovery split (:mod:`ggr_jax.data.gcd`), the
      number of Old (labeled) classes, labels ``0..num_old_classes-1``; the New classes
      follow up to ``num_classes - 1``. ``None`` for the SSL protocols.
  """

  x_labeled: np.ndarray
  y_labeled: np.ndarray
  x_unlabeled: np.ndarray
  y_unlabeled: np.ndarray
  unlabeled_is_id: np.ndarray
  x_test_id: np.ndarray
  y_test_id: np.ndarray
  x_test_full: np.ndarray
  y_test_full: np.ndarray
  test_full_is_id: np.ndarray
  num_classes: int
  id_classes: tuple[int, ...]
  ood_classes: tuple[int, ...]
  labeled_index: np.ndarray
  mean: tuple[float, ...]
  std: tuple[float, ...]
  name: str
  num_old_classes: int | None = None

  @property
  def is_closed_set(self) -> bool:
    """True for a closed-set split (every class known, no OOD data)."""
    return not self.ood_classes

  def summary(self) -> dict[str, Any]:
    """Counts for logging: labeled per class, unlabeled ID/OOD, test ID/full."""
    k = self.num_classes
    return {
        "name": self.name,
        "num_classes": k,
        "id_classes": list(self.id_classes),
        "ood_classes": list(self.ood_classes),
        "image_shape": list(self.x_unlabeled.shape[1:]),
        "labeled": int(self.y_labeled.size),
        # [:] reads the labels of a table read on demand (ggr_jax.data.imagenet_subset)
        "labeled_per_class": np.bincount(self.y_labeled[:], minlength=k).tolist(),
        "unlabeled": int(self.y_unlabeled.size),
        "unlabeled_id": int(self.unlabeled_is_id.sum()),
        "unlabeled_ood": int((~self.unlabeled_is_id).sum()),
        "test_id": int(self.y_test_id.size),
        "test_full": int(self.y_test_full.size),
        "test_full_ood": int((~self.test_full_is_id).sum()),
    }


def _readonly(array: np.ndarray) -> np.ndarray:
  # A view, so the caller's own array keeps its flags.
  view = array.view()
  view.flags.writeable = False
  return view


def _check_images(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype != np.uint8:
    raise TypeError(f"{name} must be uint8 images, got dtype {x.dtype}; convert with "
                    f"np.clip(np.rint(x), 0, 255).astype(np.uint8) from the 0..255 scale.")
  if x.ndim != 4:
    raise ValueError(f"{name} must be NHWC with 4 dimensions, got shape {x.shape}; add a "
                     f"channel axis (x[..., None]) to grayscale images.")
  return x


def _check_labels(y: Any, name: str, length: int, images: str) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name} must be a 1-D integer array, got dtype {y.dtype} and shape "
                     f"{y.shape}.")
  if y.size != length:
    raise ValueError(f"{name} has {y.size} labels but {images} has {length} images; "
                     f"they must match one to one.")
  if y.size and y.min() < 0:
    raise ValueError(f"{name} holds a negative class id ({y.min()}); class ids must be >= 0.")
  return y


def _check_stats(values: Sequence[float], name: str, channels: int, positive: bool) -> tuple:
  values = tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))
  if len(values) != channels:
    raise ValueError(f"{name} needs one value per channel ({channels}), got {len(values)}.")
  if not all(np.isfinite(values)) or (positive and min(values) <= 0):
    raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {values}.")
  return values


def _check_count(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an integer, got {value!r}.")
  return int(value)


def make_openset_split(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                       y_test: np.ndarray, *, id_classes: Sequence[int], labels_per_class: int,
                       seed: int, mean: Sequence[float], std: Sequence[float],
                       name: str, closed_set: bool = False) -> OpenSetSplit:
  """Builds an :class:`OpenSetSplit` with the official open-set protocol.

  Args:
    x_train, x_test: uint8 images, NHWC (0..255).
    y_train, y_test: integer class ids (>= 0), one per image.
    id_classes: original ids of the ID classes. ``id_classes[i]`` becomes label
      ``i``, so pass them ascending to match the official ``reassign_target``.
      Every id must occur in ``y_train``; all other classes of ``y_train`` or
      ``y_test`` are OOD. An empty OOD set is allowed (a closed-set split) but warns,
      because the open-set metrics (AUROC, unknown recall) are then undefined.
    labels_per_class: labeled images per ID class, drawn without replacement.
    seed: seeds ``np.random.default_rng``, one draw per class in label order. The
      official code draws with the legacy global ``np.random`` seeded by the config
      seed, so the exact labeled indices differ from the official ones (the protocol
      does not).
    mean, std: per-channel normalisation on the [0, 1] scale, stored with the split.
    name: identifier stored with the split.
    closed_set: True when a split without OOD classes is intended (the closed-set
      protocol, :func:`make_closed_split`): no warning, and every test class must be
      a training class.

  Returns:
    The split; its arrays are read-only.

  Raises:
    TypeError: non-uint8 images, non-integer ``labels_per_class`` or ``seed``.
    ValueError: a shape or length mismatch, an unknown or duplicate ID class, too few
      images in an ID class, bad normalisation statistics or an empty name.
  """
  x_train, x_test = _check_images(x_train, "x_train"), _check_images(x_test, "x_test")
  y_train = _check_labels(y_train, "y_train", len(x_train), "x_train")
  y_test = _check_labels(y_test, "y_test", len(x_test), "x_test")
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(f"x_train images are {x_train.shape[1:]} but x_test images are "
                     f"{x_test.shape[1:]}; both splits need the same HWC shape.")
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty string, got {name!r}.")
  labels_per_class = _check_count(labels_per_class, "labels_per_class")
  if labels_per_class < 1:
    raise ValueError(f"labels_per_class must be >= 1, got {labels_per_class}.")
  seed = _check_count(seed, "seed")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}.")
  channels = x_train.shape[-1]
  mean = _check_stats(mean, "mean", channels, positive=False)
  std = _check_stats(std, "std", channels, positive=True)

  id_classes = tuple(_check_count(c, "every entry of id_classes") for c in id_classes)
  train_classes = set(np.unique(y_train).tolist())
  if not id_classes:
    raise ValueError("id_classes is empty; name at least one in-distribution class.")
  if len(set(id_classes)) != len(id_classes):
    dups = sorted({c for c in id_classes if id_classes.count(c) > 1})
    raise ValueError(f"id_classes lists {dups} more than once; every ID class must be "
                     f"listed exactly once.")
  unknown = [c for c in id_classes if c not in train_classes]
  if unknown:
    raise ValueError(f"id_classes {unknown} do not occur in y_train (its classes are "
                     f"{sorted(train_classes)}); pick ID classes from those.")
  ood_classes = tuple(sorted((train_classes | set(np.unique(y_test).tolist()))
                             - set(id_classes)))
  if closed_set and ood_classes:
    raise ValueError(f"{name}: a closed-set split needs every class among id_classes, but "
                     f"{list(ood_classes)} are not; list them or use the open-set protocol.")
  if not ood_classes and not closed_set:
    warnings.warn(f"{name}: every class is an ID class, so the split has no OOD data and "
                  f"AUROC and unknown recall will be undefined (NaN).", stacklevel=2)

  k = len(id_classes)
  # Full lookup table over every class id: ID -> 0..K-1, OOD -> K..K+M-1.
  mapping = np.full(max(max(ood_classes, default=0), max(id_classes)) + 1, -1, np.int32)
  mapping[list(id_classes)] = np.arange(k, dtype=np.int32)
  mapping[list(ood_classes)] = np.arange(k, k + len(ood_classes), dtype=np.int32)
  y_train_mapped = mapping[y_train]
  y_test_mapped = mapping[y_test]

  counts = np.bincount(y_train_mapped, minlength=k)[:k]
  if counts.min() < labels_per_class:
    short = {id_classes[i]: int(counts[i]) for i in np.flatnonzero(counts < labels_per_class)}
    raise ValueError(f"labels_per_class={labels_per_class} exceeds the training images of "
                     f"ID classes {short} (original id: count); use labels_per_class <= "
                     f"{int(counts.min())}.")

  rng = np.random.default_rng(seed)
  labeled_index = np.concatenate([
      rng.choice(np.flatnonzero(y_train_mapped == c), labels_per_class, replace=False)
      for c in range(k)
  ]).astype(np.int64)

  return assemble_split(x_train, y_train_mapped, x_test, y_test_mapped, labeled_index,
                        num_classes=k, id_classes=id_classes, ood_classes=ood_classes,
                        mean=mean, std=std, name=name)


def assemble_split(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, labeled_index: np.ndarray, *, num_classes: int,
                   id_classes: tuple[int, ...], ood_classes: tuple[int, ...],
                   mean: tuple[float, ...], std: tuple[float, ...], name: str) -> OpenSetSplit:
  """The :class:`OpenSetSplit` of already remapped labels (ID ``0..K-1``, OOD ``>= K``).

  The unlabeled set is all of ``x_train``; ``labeled_index`` picks the labeled rows;
  the test split is cut into its ID part and the full split with OOD labels set to K.
  """
  k = num_classes
  unlabeled_is_id = y_train < k
  test_full_is_id = y_test < k
  return OpenSetSplit(
      x_labeled=_readonly(x_train[labeled_index]),
      y_labeled=_readonly(y_train[labeled_index]),
      x_unlabeled=_readonly(x_train),
      y_unlabeled=_readonly(y_train),
      unlabeled_is_id=_readonly(unlabeled_is_id),
      x_test_id=_readonly(x_test[test_full_is_id]),
      y_test_id=_readonly(y_test[test_full_is_id]),
      x_test_full=_readonly(x_test),
      y_test_full=_readonly(np.minimum(y_test, k).astype(np.int32)),
      test_full_is_id=_readonly(test_full_is_id),
      num_classes=k,
      id_classes=tuple(id_classes),
      ood_classes=tuple(ood_classes),
      labeled_index=_readonly(labeled_index),
      mean=tuple(mean),
      std=tuple(std),
      name=name,
  )


def make_closed_split(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                      y_test: np.ndarray, *, labels_per_class: int, seed: int,
                      mean: Sequence[float], std: Sequence[float], name: str) -> OpenSetSplit:
  """The closed-set SSL protocol: every training class is known.

  ``labels_per_class`` labeled images per class are drawn from ``seed`` exactly as in
  :func:`make_openset_split` (one draw per class, ascending class id); the unlabeled
  set is the whole training set; ``test_id`` and ``test_full`` are both the whole test
  split. Class ids are kept (classes are remapped to ``0..K-1`` in ascending order,
  which is the identity for the usual ``0..K-1`` labels). Every test class must occur
  in ``y_train``.

  Example:
    >>> import numpy as np
    >>> x = np.zeros((12, 2, 2, 1), np.uint8)
    >>> y = np.repeat(np.arange(3), 4)
    >>> split = make_closed_split(x, y, x[:6], y[::2], labels_per_class=2, seed=0,
    ...                           mean=(0.5,), std=(0.5,), name="toy")
    >>> split.is_closed_set, split.num_classes, split.y_labeled.tolist()
    (True, 3, [0, 0, 1, 1, 2, 2])
  """
  classes = np.unique(_check_labels(y_train, "y_train", len(np.asarray(x_train)), "x_train"))
  return make_openset_split(x_train, y_train, x_test, y_test,
                            id_classes=tuple(int(c) for c in classes),
                            labels_per_class=labels_per_class, seed=seed, mean=mean, std=std,
                            name=name, closed_set=True)


def exclude_labeled(split: OpenSetSplit) -> OpenSetSplit:
  """``split`` with its labeled images left out of the unlabeled set (SemiMeta's official
  protocol; FixMatch's keeps them). ``labeled_index`` still counts rows of the full
  training set.

  Example:
    >>> import numpy as np
    >>> x = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    >>> y = np.repeat(np.arange(3), 4)
    >>> split = make_closed_split(x, y, x[:6], y[::2], labels_per_class=1, seed=0,
    ...                           mean=(0.5,), std=(0.5,), name="toy")
    >>> out = exclude_labeled(split)
    >>> len(out.x_unlabeled), set(out.x_labeled.ravel()) & set(out.x_unlabeled.ravel())
    (9, set())
  """
  index = np.asarray(split.labeled_index)
  if (index < 0).any():
    raise ValueError(f"{split.name}: its labeled images come from another data set "
                     "(labeled_index -1), so they cannot be left out of the unlabeled set; "
                     "set dataset.unlabeled_excludes_labeled=False.")
  keep = np.ones(len(split.x_unlabeled), bool)
  keep[index] = False
  images = split.x_unlabeled
  images = images.subset(keep) if hasattr(images, "subset") else _readonly(
      np.asarray(images)[keep])  # a table read on demand stays one
  return dataclasses.replace(
      split, x_unlabeled=images,
      y_unlabeled=_readonly(np.asarray(split.y_unlabeled)[keep]),
      unlabeled_is_id=_readonly(np.asarray(split.unlabeled_is_id)[keep]))
