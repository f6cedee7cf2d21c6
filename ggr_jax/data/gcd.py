"""Generalized category discovery (GCD) splits: labeled Old classes, unlabeled Old + New.

The protocol of GCD codebases (Vaze et al. 2022; SimGCD, EAGC): the classes are cut into
Old (known) and New; ``prop_labeled`` (0.5) of the Old-class training images, drawn
uniformly from all of them at once, form the labeled set; the unlabeled set is every
other training image (the rest of the Old classes and all of the New ones); the model
classifies all ``K = Old + New`` classes. Accuracy is read on the unlabeled training
images (the official, transductive figure) and on the test split, under one Hungarian
assignment (:func:`ggr_jax.evaluate.category_discovery_accuracy`).

In the returned :class:`~ggr_jax.data.openset.OpenSetSplit` every class is "ID": labels
are ``0..K-1``, Old classes first in the order given, then New ones; ``num_old_classes``
marks the boundary; ``unlabeled_is_id`` is True on Old-class images (the analysis label
EAGC's diagnostics read); both test views are the whole test split.

Example:
  >>> import numpy as np
  >>> y = np.repeat(np.arange(4), 6)
  >>> x = np.arange(24, dtype=np.uint8).reshape(24, 1, 1, 1)
  >>> split = make_gcd_split(x, y, x[:8], y[::3], old_classes=(2, 0), prop_labeled=0.5,
  ...                        seed=0, mean=(0.5,), std=(0.5,), name="toy")
  >>> split.num_old_classes, split.num_classes, split.id_classes
  (2, 4, (2, 0, 1, 3))
  >>> len(split.y_labeled), sorted(set(split.y_labeled.tolist())), len(split.y_unlabeled)
  (6, [0, 1], 18)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ggr_jax.data.openset import OpenSetSplit, _readonly, assemble_split


def make_gcd_split(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, *, old_classes: Sequence[int], prop_labeled: float,
                   seed: int, mean: Sequence[float], std: Sequence[float],
                   name: str) -> OpenSetSplit:
  """The GCD split of a labelled train/test pair (see the module docstring).

  Raises:
    ValueError: an Old class that is absent or repeated, no New class, or a
      ``prop_labeled`` that labels no image or every Old image.
  """
  y_train, y_test = np.asarray(y_train).astype(np.int64), np.asarray(y_test).astype(np.int64)
  present = np.unique(y_train)
  old = [int(c) for c in old_classes]
  if len(set(old)) != len(old) or not set(old) <= set(present.tolist()):
    raise ValueError(f"old_classes {old} must be distinct classes of the training set "
                     f"{present.tolist()}")
  new = [int(c) for c in present if int(c) not in old]
  if not new:
    raise ValueError(f"old_classes {old} leave no New class to discover")
  if not 0.0 < prop_labeled < 1.0:
    raise ValueError(f"prop_labeled must be in (0, 1), got {prop_labeled}")
  order = old + new
  remap = np.full(int(max(present.max(), y_test.max())) + 1, -1, np.int64)
  remap[order] = np.arange(len(order))
  if np.any(remap[y_test] < 0):
    raise ValueError("the test split holds classes the training set does not")
  old_rows = np.flatnonzero(np.isin(y_train, old))
  count = int(prop_labeled * old_rows.size)
  if not 0 < count < old_rows.size:
    raise ValueError(f"prop_labeled = {prop_labeled} of {old_rows.size} Old images labels "
                     f"{count}; choose a proportion that labels some but not all")
  labeled = np.sort(np.random.default_rng(seed).choice(old_rows, count, replace=False))
  y_all = remap[y_train].astype(np.int32)
  split = assemble_split(np.asarray(x_train), y_all, np.asarray(x_test),
                         remap[y_test].astype(np.int32), labeled, num_classes=len(order),
                         id_classes=tuple(order), ood_classes=(), mean=tuple(mean),
                         std=tuple(std), name=name)
  unlabeled = np.setdiff1d(np.arange(len(y_all)), labeled)
  return dataclasses.replace(
      split, x_unlabeled=_readonly(np.asarray(x_train)[unlabeled]),
      y_unlabeled=_readonly(y_all[unlabeled]),
      unlabeled_is_id=_readonly(y_all[unlabeled] < len(old)), num_old_classes=len(old))

