"""Generalized category discovery accuracy (one Hungarian assignment over all classes)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ggr_jax.evaluate import category_discovery_accuracy


@pytest.mark.parametrize("seed", range(5))
def test_all_accuracy_is_the_best_over_every_cluster_to_class_bijection(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, 60)
  pred = np.where(rng.random(60) < 0.6, (labels + 2) % 5, rng.integers(0, 5, 60))
  best = max(np.mean(np.asarray(perm)[pred] == labels)
             for perm in itertools.permutations(range(5)))
  assert category_discovery_accuracy(pred, labels, [0, 1, 2])["all"] == pytest.approx(best)


def test_renaming_the_clusters_changes_nothing():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 6, 80)
  pred = np.where(rng.random(80) < 0.7, labels, rng.integers(0, 6, 80))
  renamed = np.array([4, 0, 5, 1, 3, 2])[pred]
  assert (category_discovery_accuracy(pred, labels, [0, 1, 2])
          == category_discovery_accuracy(renamed, labels, [0, 1, 2]))


def test_old_and_new_are_read_under_the_one_assignment_and_weight_into_all():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
  pred = np.array([5, 5, 5, 6, 7, 7, 7, 8, 9])
  acc = category_discovery_accuracy(pred, labels, old_classes=[0, 1])
  old, new = labels < 2, labels >= 2
  assert acc["all"] == pytest.approx((acc["old"] * old.sum() + acc["new"] * new.sum()) / 9)
  assert acc["old"] == pytest.approx(4 / 5) and acc["new"] == pytest.approx(3 / 4)


def test_a_perfect_clustering_scores_one_and_an_empty_subset_is_nan():
  labels = np.array([0, 1, 2, 2])
  acc = category_discovery_accuracy(labels + 3, labels, old_classes=[0, 1, 2])
  assert acc["all"] == acc["old"] == 1.0 and np.isnan(acc["new"])
