"""The closed-set SSL protocol: digits, CIFAR (tfds mock data), ImageNet 1% read on demand."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ggr_jax import evaluate
from ggr_jax.configs import default
from ggr_jax.data import digits, imagenet_subset, tfds_sources
from ggr_jax.data.augment import CIFAR10_MEAN
from ggr_jax.data.openset import make_closed_split
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop


def _mock(num_examples: int):
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE)


def _check_closed(split, x_train, y_train, x_test, y_test, labels_per_class):
  k = split.num_classes
  assert split.is_closed_set and split.ood_classes == ()
  assert k == len(np.unique(y_train)) and list(split.id_classes) == sorted(np.unique(y_train))
  assert np.bincount(split.y_labeled, minlength=k).tolist() == [labels_per_class] * k
  np.testing.assert_array_equal(split.x_labeled, x_train[split.labeled_index])
  np.testing.assert_array_equal(split.x_unlabeled, x_train)
  assert split.unlabeled_is_id.all() and split.test_full_is_id.all()
  np.testing.assert_array_equal(split.x_test_id, x_test)
  np.testing.assert_array_equal(split.y_test_id, split.y_test_full)
  np.testing.assert_array_equal(np.asarray(split.id_classes)[split.y_test_id], y_test)


@pytest.mark.parametrize("seed", [0, 3])
def test_closed_digits_know_every_digit_and_draw_four_labels_each(seed):
  split = digits.digits_closed_split(labels_per_class=4, seed=seed)
  _check_closed(split, *digits.load_digits_arrays(), labels_per_class=4)
  assert split.name == "digits_closed" and split.x_labeled.shape[0] == 40
  other = digits.digits_closed_split(labels_per_class=4, seed=seed + 1)
  assert not np.array_equal(split.labeled_index, other.labeled_index)


def test_a_closed_split_refuses_test_classes_unseen_in_training():
  x = np.zeros((8, 2, 2, 1), np.uint8)
  with pytest.raises(ValueError, match=r"closed-set split needs every class.*\[5\]"):
    make_closed_split(x, np.repeat([0, 1], 4), x[:2], np.array([0, 5]), labels_per_class=1,
                      seed=0, mean=(0.5,), std=(0.5,), name="toy")


def test_closed_set_metrics_agree_with_a_direct_count():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(200, 12)), rng.integers(0, 12, 200)
  m = evaluate.closed_set_metrics(logits, labels, 12)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert m["closed_acc"] == pytest.approx(np.mean(logits.argmax(1) == labels))
  assert m["top5_acc"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))
  assert m["top5_acc"] >= m["closed_acc"]
  recalls = [np.mean(logits[labels == c].argmax(1) == c) for c in range(12)]
  assert m["mean_class_acc"] == pytest.approx(np.mean(recalls))
  assert "top5_acc" not in evaluate.closed_set_metrics(logits[:, :5], labels % 5, 5)


@pytest.mark.parametrize("name, k", [("cifar10", 10), ("cifar100", 100), ("svhn_cropped", 10)])
def test_closed_cifar_from_tfds_mock_data(name, k):
  with _mock(1200 if k == 10 else 2500):
    raw = tfds_sources.load_tfds_arrays(name)
    loader = getattr(tfds_sources, f"{name.removesuffix('_cropped')}_closed_split")
    split = loader(labels_per_class=2, seed=0)
  assert split.name == f"{name}_closed"
  _check_closed(split, *raw, labels_per_class=2)
  if name == "cifar10":
    assert split.mean == CIFAR10_MEAN


def test_imagenet_subset_tables_read_rows_on_demand_and_cache_their_labels():
  with _mock(24):
    split = imagenet_subset.imagenet_subset_split("1pct", image_size=12, num_workers=2)
    source = tfds.data_source("imagenet2012", split="validation", download=False)
    records = [source[i] for i in range(24)]
  assert split.is_closed_set and split.num_classes == 1000 and split.name == "imagenet_1pct"
  assert split.x_unlabeled.shape == (24, 12, 12, 3) and len(split.x_test_id) == 24
  rows = np.array([5, 0, 5, 23])
  images = split.x_test_id[rows]
  assert images.shape == (4, 12, 12, 3) and images.dtype == np.uint8
  for image, row in zip(images, rows):  # the record's image, shorter side to 12, centred
    expected = imagenet_subset.square_image(records[row]["image"], 12, centre_crop=True)
    np.testing.assert_array_equal(image, expected)
  np.testing.assert_array_equal(split.y_test_id[rows], [records[r]["label"] for r in rows])
  np.testing.assert_array_equal(split.y_test_id[:], [r["label"] for r in records])
  assert split.x_test_id[-1].shape == (12, 12, 3)
  with pytest.raises(TypeError, match="never loaded whole.*train.input=stream"):
    np.asarray(split.x_unlabeled)
  with pytest.raises(IndexError, match="out of range"):
    split.x_labeled[np.array([24])]
  assert split.summary()["labeled"] == 24
  with _mock(24):  # a Grain worker receives the table pickled and opens its own source
    copy = pickle.loads(pickle.dumps(split.x_test_id))
    np.testing.assert_array_equal(copy[rows], images)


def _closed_config(**dataset):
  cfg = default.get_config()
  cfg.dataset.update(protocol="closed", **dataset)
  cfg.train.update(steps=2, batch_size=4, uratio=1, log_every=1, eval_every=2,
                   checkpoint_every=2, eval_batch_size=16)
  return cfg


@pytest.mark.parametrize("field, value, message", [
    ("dataset.protocol", "closedset", "config.dataset.protocol"),
    ("dataset.name", "imagenet30", "has the protocol 'openset' only"),
])
def test_bad_protocol_settings_fail_before_loading(field, value, message):
  cfg = _closed_config()
  cfg[field.split(".")[0]][field.split(".")[1]] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg, num_devices=1)


def test_imagenet_needs_the_closed_protocol_and_the_host_stream():
  cfg = _closed_config(name="imagenet")
  with pytest.raises(config_lib.ConfigError, match="train.input.*use 'stream'"):
    config_lib.validate(cfg, num_devices=1)
  cfg.train.input, cfg.dataset.protocol = "stream", "openset"
  with pytest.raises(config_lib.ConfigError, match="has the protocol 'closed' only"):
    config_lib.validate(cfg, num_devices=1)


def test_a_closed_digits_run_reports_top1_and_top5(tmp_path):
  cfg = _closed_config(labels_per_class=4)
  summary = loop.Trainer(cfg, tmp_path, progress=False, devices=jax.devices()[:1]).run()
  assert summary["protocol"] == "closed" and len(summary["closed_per_class_acc"]) == 10
  assert 0.0 <= summary["closed_acc"] <= summary["top5_acc"] <= 1.0
  assert np.isnan(summary["open_bacc"]) and np.isnan(summary["auroc"])
  assert summary["unlabeled_ood_fraction"] == 0.0


def test_an_imagenet_run_streams_its_batches_from_the_tables(tmp_path):
  cfg = _closed_config(name="imagenet", image_size=16, max_test_images=8)
  cfg.train.input = "stream"
  with _mock(16):
    summary = loop.Trainer(cfg, tmp_path, progress=False, devices=jax.devices()[:1]).run()
  assert summary["steps"] == 2 and summary["protocol"] == "closed"
  assert 0.0 <= summary["closed_acc"] <= summary["top5_acc"] <= 1.0
