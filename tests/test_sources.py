"""Data sources: tfds CIFAR-10/100 (on tfds mock data) and ImageNet-30 from a folder."""

from __future__ import annotations

import io
import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ggr_jax.data import imagenet30, tfds_sources
from tensorflow_datasets.proto import tf_example_pb2

CIFAR10_N, CIFAR100_N = 600, 2000  # mock examples; every class gets >= 3 images


def _mock(num_examples: int):
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.fixture(scope="module", name="cifar10")
def _cifar10():
  with _mock(CIFAR10_N):
    raw = tfds_sources.load_tfds_arrays("cifar10")
    splits = {seed: tfds_sources.cifar10_split(labels_per_class=4, seed=seed)
              for seed in (0, 1)}
    again = tfds_sources.cifar10_split(labels_per_class=4, seed=0)
  return raw, splits, again


@pytest.fixture(scope="module", name="cifar100")
def _cifar100():
  with _mock(CIFAR100_N):
    raw = tfds_sources.load_tfds_arrays("cifar100")
  # Reuse the arrays (the cifar10 fixture covers the read inside the split builder).
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds_sources, "load_tfds_arrays", lambda name, data_dir: raw)
    splits = {k: tfds_sources.cifar100_split(num_id_classes=k, labels_per_class=3, seed=0)
              for k in (50, 20)}
  return raw, splits


def _check_protocol(split, raw, labels_per_class):
  """The official open-set rules, checked against the raw arrays."""
  x_train, y_train, x_test, y_test = raw
  ids, k = np.asarray(split.id_classes), split.num_classes
  assert list(split.id_classes) == sorted(split.id_classes)  # ascending remap
  assert set(split.ood_classes) == set(np.unique(y_train)) - set(split.id_classes)
  # Labeled: labels_per_class per class, each the remapped original label.
  assert np.bincount(split.y_labeled, minlength=k).tolist() == [labels_per_class] * k
  np.testing.assert_array_equal(ids[split.y_labeled], y_train[split.labeled_index])
  np.testing.assert_array_equal(split.x_labeled, x_train[split.labeled_index])
  # Unlabeled: the whole training set, ID/OOD as in the original labels.
  np.testing.assert_array_equal(split.x_unlabeled, x_train)
  is_id = np.isin(y_train, ids)
  np.testing.assert_array_equal(split.unlabeled_is_id, is_id)
  np.testing.assert_array_equal(ids[split.y_unlabeled[is_id]], y_train[is_id])
  ood = np.asarray(split.ood_classes)
  np.testing.assert_array_equal(ood[split.y_unlabeled[~is_id] - k], y_train[~is_id])
  # Test: test_id holds only ID images; test_full keeps every image, OOD -> K.
  test_is_id = np.isin(y_test, ids)
  np.testing.assert_array_equal(split.x_test_id, x_test[test_is_id])
  np.testing.assert_array_equal(ids[split.y_test_id], y_test[test_is_id])
  np.testing.assert_array_equal(split.x_test_full, x_test)
  np.testing.assert_array_equal(split.y_test_full == k, ~test_is_id)
  np.testing.assert_array_equal(ids[split.y_test_full[test_is_id]], y_test[test_is_id])


def test_tfds_arrays_are_uint8_nhwc_with_int32_labels(cifar10):
  x_train, y_train, x_test, y_test = cifar10[0]
  assert x_train.shape == (CIFAR10_N, 32, 32, 3) and x_test.shape == (CIFAR10_N, 32, 32, 3)
  assert x_train.dtype == np.uint8 and y_train.dtype == np.int32 and y_test.dtype == np.int32
  assert y_train.min() >= 0 and y_train.max() <= 9


def test_cifar10_split_follows_the_official_6_4_protocol(cifar10):
  raw, splits, _ = cifar10
  split = splits[0]
  assert split.id_classes == (2, 3, 4, 5, 6, 7) and split.ood_classes == (0, 1, 8, 9)
  assert split.name == "cifar10_6_4" and split.num_classes == 6
  _check_protocol(split, raw, labels_per_class=4)


def test_cifar10_uses_imagenet_normalisation(cifar10):
  split = cifar10[1][0]
  assert split.mean == pytest.approx((0.485, 0.456, 0.406))
  assert split.std == pytest.approx((0.229, 0.224, 0.225))


def test_labeled_draw_is_deterministic_per_seed(cifar10):
  _, splits, again = cifar10
  np.testing.assert_array_equal(splits[0].labeled_index, again.labeled_index)
  assert not np.array_equal(splits[0].labeled_index, splits[1].labeled_index)


def test_cifar100_superclass_table_is_a_partition_into_fives():
  table = tfds_sources.CIFAR100_SUPERCLASSES
  assert len(table) == 20 and all(len(row) == 5 for row in table)
  assert sorted(c for row in table for c in row) == list(range(100))


# Superclass -> fine class names of the CIFAR-100 release (not shipped with tfds's code;
# the names come with the downloaded archive), to check the id table.
SUPERCLASS_NAMES = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}


def test_cifar100_superclass_table_matches_the_class_names():
  # The release numbers both label sets in alphabetical order of their names.
  coarse = sorted(SUPERCLASS_NAMES)
  fine = sorted(name for names in SUPERCLASS_NAMES.values() for name in names.split())
  assert len(set(fine)) == 100
  for c, row in enumerate(tfds_sources.CIFAR100_SUPERCLASSES):
    assert sorted(fine[f] for f in row) == SUPERCLASS_NAMES[coarse[c]].split(), coarse[c]


@pytest.mark.parametrize("k, superclasses", [(50, 10), (20, 4)])
def test_cifar100_split_takes_the_first_superclasses(cifar100, k, superclasses):
  raw, splits = cifar100
  split = splits[k]
  expected = sorted(c for row in tfds_sources.CIFAR100_SUPERCLASSES[:superclasses]
                    for c in row)
  assert list(split.id_classes) == expected and split.num_classes == k
  assert split.name == f"cifar100_{k}_{100 - k}"
  assert split.mean == pytest.approx((129.3 / 255, 124.1 / 255, 112.4 / 255))
  assert split.std == pytest.approx((68.2 / 255, 65.4 / 255, 70.4 / 255))
  _check_protocol(split, raw, labels_per_class=3)


@pytest.mark.parametrize("k", [0, 7, 100, 50.0, True])
def test_cifar100_rejects_bad_num_id_classes_before_reading(tmp_path, k):
  with pytest.raises(ValueError, match="num_id_classes"):
    tfds_sources.cifar100_split(num_id_classes=k, labels_per_class=5, seed=0,
                                data_dir=tmp_path)


def test_bad_labels_per_class_fails_before_reading(tmp_path):
  with pytest.raises(ValueError, match="labels_per_class"):
    tfds_sources.cifar10_split(labels_per_class=0, seed=0, data_dir=tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_tfds_data_names_the_folder_and_the_build_command(tmp_path, name):
  with pytest.raises(FileNotFoundError) as info:
    tfds_sources.load_tfds_arrays(name, data_dir=tmp_path)
  assert isinstance(info.value, tfds_sources.DatasetNotPreparedError)
  message = str(info.value)
  assert str(tmp_path / name) in message
  assert f"tfds build {name} --data_dir={tmp_path} --file_format=array_record" in message


def test_missing_tfds_data_follows_the_tfds_data_dir_variable(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(tfds_sources.DatasetNotPreparedError,
                     match=re.escape(f"--data_dir={tmp_path} ")):
    tfds_sources.cifar10_split(labels_per_class=5, seed=0)


def _prepare_fake_cifar10(data_dir: pathlib.Path, sizes: dict, file_format: str) -> None:
  """Writes a tiny CIFAR-10 as ``tfds build`` would, without TensorFlow.

  Image ``i`` of a split is random with pixel (0, 0) = (i, split id, 0), label i % 10.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  builder = tfds.builder("cifar10", data_dir=data_dir, file_format=file_format)
  out = pathlib.Path(builder.data_dir)
  out.mkdir(parents=True)
  rng, infos = np.random.default_rng(0), []
  for split_id, (split, n) in enumerate(sizes.items()):
    template = tfds.core.ShardedFileTemplate(data_dir=out, dataset_name="cifar10", split=split,
                                             filetype_suffix=file_format)
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(n):
      image = rng.integers(0, 256, (32, 32, 3), np.uint8)
      image[0, 0] = (i, split_id, 0)
      png = io.BytesIO()
      Image.fromarray(image).save(png, format="PNG")
      example = tf_example_pb2.Example()
      example.features.feature["image"].bytes_list.value.append(png.getvalue())
      example.features.feature["label"].int64_list.value.append(i % 10)
      example.features.feature["id"].bytes_list.value.append(f"{split}_{i}".encode())
      writer.write(example.SerializeToString())
    writer.close()
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=1,
                                     filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(out)


def test_prepared_array_record_data_load_in_order(tmp_path):
  _prepare_fake_cifar10(tmp_path, {"train": 70, "test": 30}, "array_record")
  x_train, y_train, x_test, y_test = tfds_sources.load_tfds_arrays("cifar10", tmp_path)
  assert x_train.shape == (70, 32, 32, 3) and x_test.shape == (30, 32, 32, 3)
  np.testing.assert_array_equal(x_train[:, 0, 0, 0], np.arange(70))
  assert (x_train[:, 0, 0, 1] == 0).all() and (x_test[:, 0, 0, 1] == 1).all()
  np.testing.assert_array_equal(y_train, np.arange(70) % 10)
  np.testing.assert_array_equal(y_test, np.arange(30) % 10)


def test_data_prepared_without_random_access_is_reported(tmp_path):
  # Only the metadata matter here: tfds refuses random access from it alone.
  _prepare_fake_cifar10(tmp_path, {"train": 1, "test": 1}, "tfrecord")
  with pytest.raises(tfds_sources.DatasetNotPreparedError, match="tfrecord format") as info:
    tfds_sources.load_tfds_arrays("cifar10", tmp_path)
  assert "--file_format=array_record" in str(info.value)


# ImageNet-30 from a fake folder: 3 ID classes (K=3) and 2 OOD classes.
K, CLASSES = 3, ("acorn", "airliner", "ambulance", "tank", "volcano")
SIZE = 16


def _write(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _colour(label: int, row: int) -> tuple[int, int, int]:
  return (40 * label + 20, 10 * row + 5, 200)


def _fake_in30(root: pathlib.Path, per_class: int = 4, test_per_class: int = 2,
               classes: tuple[str, ...] = CLASSES, k: int = K) -> dict:
  """Solid-colour training PNGs (colour encodes class and row) in the official layout."""
  train, test = [], []
  for label, name in enumerate(classes):
    for j in range(per_class):
      rel = f"one_class_train/{name}/{name}_{j}.png"
      _write(root / rel, np.full((20 + 3 * j, 24, 3), _colour(label, j), np.uint8))
      train.append(f"data/imagenet30/{rel} {label}")
    for j in range(test_per_class):
      rel = f"one_class_test/{name}/{name}_{j}.jpg"
      _write(root / rel, np.full((30, 22, 3), _colour(label, j), np.uint8))
      test.append(f"data/imagenet30/{rel} {label}")
  labeled = [line for line in train if int(line.split()[1]) < k and "_1.png" not in line]
  labeled.append(labeled[0])  # the official lists repeat some images
  lists = root / "filelist"
  lists.mkdir()
  for name, lines in (("train_unlabeled_full", train), ("test", test),
                      ("train_labeled_p1", labeled), ("train_labeled_p5", train[:2])):
    (lists / f"{name}.txt").write_text("\n".join(lines) + "\n")
  return {"train": train, "test": test, "labeled": labeled}


def test_imagenet30_split_follows_the_official_protocol(tmp_path):
  lists = _fake_in30(tmp_path)
  split = imagenet30.imagenet30_split(tmp_path, labels="p1", image_size=SIZE,
                                      num_classes=K, num_workers=2)
  y_train = np.array([int(line.split()[1]) for line in lists["train"]])
  assert split.name == "imagenet30_p1" and split.num_classes == K
  assert split.id_classes == (0, 1, 2) and split.ood_classes == (3, 4)
  assert split.x_unlabeled.shape == (len(CLASSES) * 4, SIZE, SIZE, 3)
  assert split.x_unlabeled.dtype == np.uint8 and split.x_test_full.shape[1:] == (SIZE,) * 2 + (3,)
  # Every unlabeled image decodes to its own solid colour (train images are squashed).
  for i, line in enumerate(lists["train"]):
    row = int(line.split("_")[-1].split(".")[0])
    assert (split.x_unlabeled[i] == _colour(y_train[i], row)).all()
  np.testing.assert_array_equal(split.y_unlabeled, y_train)
  np.testing.assert_array_equal(split.unlabeled_is_id, y_train < K)
  # The labeled list as written: duplicates kept, rows of the unlabeled set.
  assert split.y_labeled.size == len(lists["labeled"])
  assert split.labeled_index[-1] == split.labeled_index[0]
  np.testing.assert_array_equal(split.x_labeled[:], split.x_unlabeled[split.labeled_index])
  np.testing.assert_array_equal(split.y_labeled, y_train[split.labeled_index])
  # Test labels >= K collapse to K; test_id keeps only ID images.
  y_test = np.array([int(line.split()[1]) for line in lists["test"]])
  np.testing.assert_array_equal(split.y_test_full, np.minimum(y_test, K))
  np.testing.assert_array_equal(split.y_test_id, y_test[y_test < K])
  assert split.mean == pytest.approx((0.485, 0.456, 0.406))
  assert split.std == pytest.approx((0.229, 0.224, 0.225))


def test_imagenet30_squashes_train_images_and_centre_crops_test_images(tmp_path):
  stripes = np.zeros((20, 60, 3), np.uint8)
  stripes[:, :20, 0] = stripes[:, 20:40, 1] = stripes[:, 40:, 2] = 255  # red|green|blue
  paths = [tmp_path / "wide.png"]
  _write(paths[0], stripes)
  squashed = imagenet30.load_images(paths, SIZE, centre_crop=False)[0]
  cropped = imagenet30.load_images(paths, SIZE, centre_crop=True)[0]
  assert squashed[:, 0, 0].min() > 200 and squashed[:, -1, 2].min() > 200  # all 3 stripes
  assert (cropped[:, 2:-2, 1] == 255).all() and (cropped[:, 2:-2, [0, 2]] == 0).all()


def test_imagenet30_file_list_paths_resolve_under_the_root(tmp_path):
  (tmp_path / "list.txt").write_text(
      "data/imagenet30/one_class_test/a/x.jpg 3\n\n"
      "sub dir/y z.png 0\n"
      f"{tmp_path / 'abs.png'} 25\n")
  paths, labels = imagenet30.read_file_list(tmp_path / "list.txt", tmp_path / "root")
  assert paths == [tmp_path / "root/one_class_test/a/x.jpg", tmp_path / "root/sub dir/y z.png",
                   tmp_path / "abs.png"]
  assert labels.tolist() == [3, 0, 25] and labels.dtype == np.int32


def test_imagenet30_missing_root_names_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="filelist") as info:
    imagenet30.imagenet30_split(tmp_path / "nowhere")
  assert str(tmp_path / "nowhere") in str(info.value)


@pytest.mark.parametrize("missing", ["filelist/test.txt", "filelist/train_labeled_p5.txt",
                                     "one_class_test/volcano/volcano_1.jpg"])
def test_imagenet30_missing_file_is_named(tmp_path, missing):
  _fake_in30(tmp_path)
  (tmp_path / missing).unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / missing))):
    imagenet30.imagenet30_split(tmp_path, labels="p5", image_size=SIZE, num_classes=K)


def test_imagenet30_labeled_image_must_be_in_the_unlabeled_list(tmp_path):
  lists = _fake_in30(tmp_path)
  (tmp_path / "filelist/train_unlabeled_full.txt").write_text("\n".join(lists["train"][1:]))
  with pytest.raises(ValueError, match="train_unlabeled_full"):
    imagenet30.imagenet30_split(tmp_path, image_size=SIZE, num_classes=K)


@pytest.mark.parametrize("line", ["one_class_train/a.png", "one_class_train/a.png x"])
def test_imagenet30_malformed_list_line_is_reported(tmp_path, line):
  _fake_in30(tmp_path)
  (tmp_path / "filelist/test.txt").write_text(line + "\n")
  with pytest.raises(ValueError, match="test.txt:1"):
    imagenet30.imagenet30_split(tmp_path, image_size=SIZE, num_classes=K)


def test_imagenet30_rejects_an_unknown_labeled_list(tmp_path):
  with pytest.raises(ValueError, match="p1"):
    imagenet30.imagenet30_split(tmp_path, labels="p2")


def test_imagenet30_streams_from_disk_through_grain_workers(tmp_path):
  """The tables decode in Grain's worker processes the rows the device path would gather."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from ggr_jax.data import sampling, stream  # pylint: disable=import-outside-toplevel
  _fake_in30(tmp_path)
  split = imagenet30.imagenet30_split(tmp_path, labels="p1", image_size=SIZE, num_classes=K,
                                      num_workers=2)
  assert isinstance(split.x_unlabeled, imagenet30.ImageFileTable)
  tables = {"x_labeled": split.x_labeled, "y_labeled": split.y_labeled,
            "x_unlabeled": split.x_unlabeled, "unlabeled_is_id": split.unlabeled_is_id}
  decoded = {**tables, "x_labeled": split.x_labeled[:], "x_unlabeled": split.x_unlabeled[:]}
  key, sizes = jax.random.PRNGKey(2), {"labeled": 4, "unlabeled": 6}
  counts = {"x_labeled": len(split.x_labeled), "x_unlabeled": len(split.x_unlabeled)}
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  with stream.HostStream(tables, key, sizes, mesh, 0, workers=2) as feed:
    for step in range(3):
      expected = sampling.gather_rows(decoded, sampling.batch_indices(key, step, sizes, counts,
                                                                      None))
      got = feed.next(step)
      for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)


def test_an_image_that_fails_to_decode_stops_or_is_skipped_by_the_option(tmp_path, capsys):
  lists = _fake_in30(tmp_path)
  broken = tmp_path / lists["train"][1].split()[0].split("imagenet30/")[1]
  broken.write_bytes(b"not an image")
  strict = imagenet30.imagenet30_split(tmp_path, image_size=SIZE, num_classes=K)
  with pytest.raises(imagenet30.UnreadableImage, match=re.escape(str(broken)) + ".*on_bad_image"):
    strict.x_unlabeled[np.array([0, 1])]
  lenient = imagenet30.imagenet30_split(tmp_path, image_size=SIZE, num_classes=K,
                                        on_bad_image="skip")
  images = lenient.x_unlabeled[np.array([0, 1])]
  np.testing.assert_array_equal(images[1], lenient.x_unlabeled[2])  # the next one instead
  assert f"skipped image {broken}" in capsys.readouterr().err
  with pytest.raises(ValueError, match="on_bad_image"):
    imagenet30.imagenet30_split(tmp_path, image_size=SIZE, num_classes=K, on_bad_image="drop")
