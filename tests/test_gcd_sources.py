"""The GCD benchmarks: tfds CIFAR-100 / CUB / Stanford Cars on mock data, ImageNet-100 and
Herbarium-19 from folders, and the errors that name the preparation."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ggr_jax.data import gcd_sources
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop
from tests.test_simgcd import gcd_config

CLASSES = {"cifar100": 100, "cub": 200, "scars": 196}


def _records(num_classes: int, per_class: int, seed: int):
  """Records whose image colour encodes the class (channel 0: label // 256, 1: label % 256),
  of varying sizes, as the tfds fine-grained sets have."""
  rng = np.random.default_rng(seed)
  out = []
  for label in np.repeat(np.arange(num_classes), per_class):
    h, w = rng.integers(9, 30, size=2)
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0], image[..., 1] = label // 256, label % 256
    out.append({"image": image, "label": int(label)})
  return out


def _mock(num_classes: int):
  def source(builder, split, **_):
    del builder
    return _records(num_classes, 2 if split == "train" else 1, seed=len(split))
  return tfds.testing.mock_data(as_data_source_fn=source)


def _class_of(images: np.ndarray) -> np.ndarray:
  return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1]


@pytest.mark.parametrize("name", ["cifar100", "cub", "scars"])
def test_tfds_benchmarks_label_half_of_each_old_class_image_set_and_keep_the_rest(name):
  k = CLASSES[name]
  with _mock(k):
    split = gcd_sources.gcd_split(name, prop_labeled=0.5, seed=3, image_size=12)
  old = tuple(range(80)) if name == "cifar100" else gcd_sources.ssb_known_classes(name)
  assert split.num_old_classes == len(old) and split.num_classes == k
  assert split.id_classes[:len(old)] == old
  assert split.x_labeled.shape[1:] == (12, 12, 3)
  assert len(split.y_labeled) == len(old)  # half of 2 images per Old class
  # labels are positions in id_classes: the image's own class read back agrees
  for x, y in ((split.x_labeled, split.y_labeled), (split.x_unlabeled, split.y_unlabeled),
               (split.x_test_id, split.y_test_id)):
    np.testing.assert_array_equal(np.asarray(split.id_classes)[y], _class_of(x))
  assert np.all(split.y_labeled < len(old))
  assert len(split.y_unlabeled) == 2 * k - len(old)
  np.testing.assert_array_equal(split.unlabeled_is_id, split.y_unlabeled < len(old))


def test_a_benchmark_not_prepared_names_the_tfds_command(tmp_path):
  cfg = gcd_config()
  cfg.dataset.update(name="cub", data_dir=str(tmp_path))
  config_lib.validate(cfg)
  with pytest.raises(config_lib.ConfigError, match="tfds build caltech_birds2011"):
    loop.load_split(cfg)


def _folders(root, names, split_dirs):
  for split_dir in split_dirs:
    for i, name in enumerate(names):
      (root / split_dir / name).mkdir(parents=True)
      colour = np.zeros((5, 7, 3), np.uint8)
      colour[..., 0], colour[..., 1] = i // 256, i % 256
      Image.fromarray(colour).save(root / split_dir / name / "a.png")


def test_imagenet100_takes_gcds_hundred_synsets_and_herbarium_its_ssb_classes(tmp_path):
  synsets = [f"n{i:08d}" for i in range(1000)]
  _folders(tmp_path / "in", synsets, ("train", "val"))
  split = gcd_sources.gcd_split("imagenet100", prop_labeled=0.5, seed=0, image_size=8,
                                data_dir=tmp_path / "in", num_workers=2)
  chosen = gcd_sources.imagenet100_classes()
  assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
  assert sorted(set(_class_of(split.x_unlabeled).tolist()) | set(
      _class_of(split.x_labeled).tolist())) == chosen.tolist()
  assert set(_class_of(split.x_labeled).tolist()) <= set(chosen[:50].tolist())
  assert split.num_old_classes == 50 and split.num_classes == 100

  # Herbarium-19 numbers classes by sorted folder name ("10" before "2")
  names = [str(i) for i in range(683)]
  _folders(tmp_path / "herb", names, ("small-train", "small-validation"))
  split = gcd_sources.gcd_split("herbarium19", prop_labeled=0.5, seed=0, image_size=8,
                                data_dir=tmp_path / "herb", num_workers=2)
  by_name = sorted(names)
  old = gcd_sources.ssb_known_classes("herbarium19")
  assert len(old) == 341 and split.num_old_classes == 341
  labeled_folders = {names[i] for i in _class_of(split.x_labeled)}  # colour: own name
  assert labeled_folders <= {by_name[i] for i in old} and len(labeled_folders) == 170


def test_a_missing_or_incomplete_folder_is_named(tmp_path):
  cfg = gcd_config()
  cfg.dataset.update(name="imagenet100", data_dir="")
  with pytest.raises(config_lib.ConfigError, match="dataset.data_dir.*local folder"):
    config_lib.validate(cfg)
  cfg.dataset.data_dir = str(tmp_path / "absent")
  with pytest.raises(config_lib.ConfigError, match="absent/train not found"):
    loop.load_split(cfg)
  _folders(tmp_path / "few", ["a", "b"], ("train", "val"))
  cfg.dataset.data_dir = str(tmp_path / "few")
  with pytest.raises(config_lib.ConfigError, match="same 1000 class folders"):
    loop.load_split(cfg)


def test_the_released_recipe_runs_end_to_end_on_mock_cub_with_a_small_vit(tmp_path):
  from ggr_jax.configs import simgcd_vit  # pylint: disable=import-outside-toplevel
  cfg = simgcd_vit.get_config("cub")
  cfg.model.update(backbone="vit_tiny")
  cfg.model.vit.update(patch_size=4, depth=2, grad_from_block=1)
  cfg.dataset.image_size = 16
  cfg.augment.crop = 12
  cfg.simgcd.update(hidden_dim=32, bottleneck_dim=16)
  cfg.train.update(steps=2, batch_size=8, steps_per_epoch=1, eval_every=2,
                   checkpoint_every=2, log_every=1, eval_batch_size=64)
  cfg.eagc.update(terms="both", reference_steps=0)  # the initial model as the reference
  with _mock(CLASSES["cub"]):
    summary = loop.train(cfg, tmp_path / "run", progress=False)
  assert summary["steps"] == 2 and 0 <= summary["gcd_all"] <= 1
  assert 0 <= summary["eagc_soc"] <= 1
