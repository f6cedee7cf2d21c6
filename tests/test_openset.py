"""The open-set split (official CIFAR protocol) and the embedded digits data set."""

import dataclasses

import numpy as np
import pytest

from ggr_jax.data import digits, openset

# Training classes 0..4 with 20, 12, 30, 9, 15 images; test classes 0..4, 4 each.
TRAIN_COUNTS = (20, 12, 30, 9, 15)


def _images(labels: np.ndarray) -> np.ndarray:
  """uint8 (N, 3, 3, 1) images that carry their class (pixel 0) and row (pixels 1-2)."""
  x = np.zeros((len(labels), 3, 3, 1), np.uint8)
  x[:, 0, 0, 0] = labels
  x[:, 0, 1, 0] = np.arange(len(labels)) // 256
  x[:, 0, 2, 0] = np.arange(len(labels)) % 256
  return x


def _row(x: np.ndarray) -> np.ndarray:
  return x[:, 0, 1, 0].astype(int) * 256 + x[:, 0, 2, 0]


@pytest.fixture(name="data")
def _data():
  y_train = np.random.default_rng(1).permutation(
      np.repeat(np.arange(5), TRAIN_COUNTS)).astype(np.int64)
  y_test = np.repeat(np.arange(5), 4)
  return _images(y_train), y_train, _images(y_test), y_test


def _split(data, **overrides):
  kwargs = dict(id_classes=(1, 3, 4), labels_per_class=3, seed=0, mean=(0.5,), std=(0.2,),
                name="toy")
  kwargs.update(overrides)
  return openset.make_openset_split(*data, **kwargs)


def test_labeled_set_is_exact_counts_of_id_images(data):
  x_train, y_train, _, _ = data
  split = _split(data, labels_per_class=9)  # class 3 has exactly 9 images
  assert split.y_labeled.dtype == np.int32 and split.x_labeled.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(split.y_labeled), [9, 9, 9])
  assert len(set(split.labeled_index.tolist())) == 27  # without replacement
  np.testing.assert_array_equal(split.x_labeled, x_train[split.labeled_index])
  np.testing.assert_array_equal(_row(split.x_labeled), split.labeled_index)
  # Each labeled image is from the ID class its label names (pixel 0 = original class).
  original = np.array(split.id_classes)[split.y_labeled]
  np.testing.assert_array_equal(split.x_labeled[:, 0, 0, 0], original)
  np.testing.assert_array_equal(y_train[split.labeled_index], original)
  # All 9 images of class 3 are used; the draw covers the whole class.
  assert set(split.labeled_index[split.y_labeled == 1].tolist()) == set(
      np.flatnonzero(y_train == 3).tolist())


def test_unlabeled_set_is_the_whole_training_set(data):
  x_train, y_train, _, _ = data
  split = _split(data)
  np.testing.assert_array_equal(split.x_unlabeled, x_train)
  # ID 1, 3, 4 -> 0, 1, 2 in the given order; OOD 0, 2 -> 3, 4 ascending.
  np.testing.assert_array_equal(split.y_unlabeled, np.array([3, 0, 4, 1, 2])[y_train])
  np.testing.assert_array_equal(split.unlabeled_is_id, np.isin(y_train, (1, 3, 4)))
  assert split.unlabeled_is_id[split.labeled_index].all()  # labeled images included
  assert split.ood_classes == (0, 2) and split.num_classes == 3


def test_test_splits_map_every_ood_label_to_k(data):
  _, _, x_test, y_test = data
  split = _split(data)
  np.testing.assert_array_equal(split.y_test_full, np.array([3, 0, 3, 1, 2])[y_test])
  np.testing.assert_array_equal(split.x_test_full, x_test)
  np.testing.assert_array_equal(split.test_full_is_id, split.y_test_full < 3)
  np.testing.assert_array_equal(split.x_test_id, x_test[np.isin(y_test, (1, 3, 4))])
  np.testing.assert_array_equal(split.y_test_id, np.repeat([0, 1, 2], 4))


def test_id_classes_map_in_the_order_given(data):
  _, y_train, _, _ = data
  split = _split(data, id_classes=(4, 1))
  assert split.id_classes == (4, 1) and split.ood_classes == (0, 2, 3)
  np.testing.assert_array_equal(split.y_unlabeled, np.array([2, 1, 3, 4, 0])[y_train])
  np.testing.assert_array_equal(split.x_labeled[split.y_labeled == 0, 0, 0, 0], [4, 4, 4])


def test_a_test_only_class_is_ood(data):
  x_train, y_train, x_test, y_test = data
  y_test = y_test.copy()
  y_test[-1] = 7  # never seen in training
  split = openset.make_openset_split(x_train, y_train, x_test, y_test, id_classes=(1, 3),
                                     labels_per_class=2, seed=0, mean=0.5, std=0.2, name="t")
  assert split.ood_classes == (0, 2, 4, 7)
  assert split.y_test_full[-1] == 2 and not split.test_full_is_id[-1]


def test_draw_is_deterministic_per_seed(data):
  first, again = _split(data, seed=3), _split(data, seed=3)
  np.testing.assert_array_equal(first.labeled_index, again.labeled_index)
  draws = {tuple(_split(data, seed=s).labeled_index.tolist()) for s in range(5)}
  assert len(draws) == 5


def test_split_is_read_only_and_leaves_inputs_writable(data):
  split = _split(data)
  with pytest.raises(ValueError, match="read-only"):
    split.x_unlabeled[0, 0, 0, 0] = 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    split.num_classes = 4  # type: ignore[misc]
  assert data[0].flags.writeable and data[1].flags.writeable


def test_summary_counts(data):
  summary = _split(data).summary()
  assert summary["labeled_per_class"] == [3, 3, 3] and summary["labeled"] == 9
  assert (summary["unlabeled"], summary["unlabeled_id"], summary["unlabeled_ood"]) == (86, 36, 50)
  assert (summary["test_id"], summary["test_full"], summary["test_full_ood"]) == (12, 20, 8)
  assert summary["ood_classes"] == [0, 2] and summary["image_shape"] == [3, 3, 1]


def test_closed_set_split_warns(data):
  with pytest.warns(UserWarning, match="no OOD data"):
    split = _split(data, id_classes=(0, 1, 2, 3, 4))
  assert split.ood_classes == () and split.test_full_is_id.all()


@pytest.mark.parametrize("overrides, error, match", [
    ({"id_classes": (1, 9)}, ValueError, r"id_classes \[9\] do not occur in y_train"),
    ({"id_classes": (1, 3, 1)}, ValueError, r"lists \[1\] more than once"),
    ({"id_classes": ()}, ValueError, "id_classes is empty"),
    ({"id_classes": (1.5,)}, TypeError, "every entry of id_classes must be an integer"),
    ({"labels_per_class": 10}, ValueError, r"ID classes \{3: 9\}.*labels_per_class <= 9"),
    ({"labels_per_class": 0}, ValueError, "labels_per_class must be >= 1"),
    ({"labels_per_class": 2.0}, TypeError, "labels_per_class must be an integer"),
    ({"labels_per_class": True}, TypeError, "labels_per_class must be an integer"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"mean": (0.5, 0.5)}, ValueError, r"mean needs one value per channel \(1\), got 2"),
    ({"std": (0.0,)}, ValueError, "std must be finite and > 0"),
    ({"name": ""}, ValueError, "name must be a non-empty string"),
])
def test_bad_arguments_are_named(data, overrides, error, match):
  with pytest.raises(error, match=match):
    _split(data, **overrides)


@pytest.mark.parametrize("change, error, match", [
    (lambda d: (d[0].astype(np.float32),) + d[1:], TypeError, "x_train must be uint8"),
    (lambda d: (d[0][..., 0],) + d[1:], ValueError, r"NHWC.*add a channel axis"),
    (lambda d: (d[0], d[1][:-1]) + d[2:], ValueError, "y_train has 85 labels but x_train has 86"),
    (lambda d: (d[0], d[1].astype(float)) + d[2:], ValueError, "y_train must be a 1-D integer"),
    (lambda d: (d[0], d[1] - 1) + d[2:], ValueError, "negative class id"),
    (lambda d: d[:2] + (d[2][:, :2], d[3]), ValueError, "both splits need the same HWC shape"),
])
def test_bad_arrays_are_named(data, change, error, match):
  with pytest.raises(error, match=match):
    openset.make_openset_split(*change(data), id_classes=(1, 3), labels_per_class=2, seed=0,
                               mean=(0.5,), std=(0.2,), name="toy")


def test_digits_arrays_shapes_range_and_stratification():
  x_train, y_train, x_test, y_test = digits.load_digits_arrays()
  assert x_train.shape == (1257, 8, 8, 1) and x_test.shape == (540, 8, 8, 1)
  assert x_train.dtype == x_test.dtype == np.uint8 and y_train.dtype == np.int32
  levels = set(np.rint(np.arange(17) * 255 / 16).astype(int).tolist())
  pixels = set(np.unique(np.concatenate([x_train.ravel(), x_test.ravel()])).tolist())
  assert pixels == levels and min(pixels) == 0 and max(pixels) == 255
  total = np.bincount(y_train, minlength=10) + np.bincount(y_test, minlength=10)
  assert total.sum() == 1797
  # Stratified: each digit's test share is its fraction, up to rounding.
  assert np.all(np.abs(np.bincount(y_test, minlength=10) - 0.3 * total) <= 1)
  again = digits.load_digits_arrays()
  np.testing.assert_array_equal(again[1], y_train)
  other = digits.load_digits_arrays(split_seed=1)
  assert not np.array_equal(other[1], y_train)
  with pytest.raises(ValueError, match="test_fraction must lie strictly between 0 and 1"):
    digits.load_digits_arrays(test_fraction=1.0)


def test_digits_split_counts_and_statistics():
  split = digits.digits_split(labels_per_class=5, seed=0)
  summary = split.summary()
  assert split.name == "digits_6_4" and split.ood_classes == (6, 7, 8, 9)
  assert summary["labeled_per_class"] == [5] * 6
  unlabeled = (summary["unlabeled"], summary["unlabeled_id"], summary["unlabeled_ood"])
  assert unlabeled == (1257, 757, 500)
  assert (summary["test_id"], summary["test_full"]) == (326, 540)
  pixels = split.x_unlabeled / 255.0
  np.testing.assert_allclose(split.mean, [pixels.mean()])
  np.testing.assert_allclose(split.std, [pixels.std()])
  np.testing.assert_allclose(split.mean + split.std, (0.30560, 0.37596), atol=5e-6)
  with pytest.raises(TypeError, match="labels_per_class"):
    digits.digits_split(seed=0)  # type: ignore[call-arg]
