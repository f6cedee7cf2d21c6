"""The paper grid from one config function, and the smoke mode of one cell per data set."""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ggr_jax.configs import grid
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop
from tests.test_sources import _fake_in30


def _paper_cells():
  for dataset in ("cifar10", "cifar100_50", "cifar100_20"):
    for algorithm, mode, labels, seed in itertools.product(
        ("fixmatch", "iomatch", "openmatch"), grid.MODES, (5, 10, 25), (0, 1, 2)):
      yield f"algorithm={algorithm},dataset={dataset},labels={labels},seed={seed},ggr={mode}"
  for algorithm, mode, labels in itertools.product(("iomatch",), grid.MODES, ("p1", "p5")):
    yield f"algorithm={algorithm},dataset=imagenet30,labels={labels},seed=0,ggr={mode}"


def test_every_paper_cell_is_a_valid_config_with_its_own_values():
  seen = set()
  for cell in _paper_cells():
    cfg = grid.get_config(cell)
    config_lib.validate(cfg, num_devices=1)
    parsed = grid.parse_cell(cell)
    assert cfg.algorithm == parsed["algorithm"] and cfg.ggr.mode == parsed["ggr"]
    assert cfg.train.seed == int(parsed["seed"])
    seen.add(json.dumps(cfg.to_dict(), sort_keys=True, default=list))
  assert len(seen) == 3 * 3 * 6 * 3 * 3 + 6 * 2  # no two cells share a config


@pytest.mark.parametrize("cell, field, value", [
    ("dataset=cifar10", "model.backbone", "wrn28_2"),
    ("dataset=cifar10", "optim.weight_decay", 5e-4),
    ("dataset=cifar100_50", "optim.weight_decay", 1e-3),
    ("dataset=cifar100_20", "dataset.num_id_classes", 20),
    ("dataset=cifar10", "train.steps", 262144),
    ("dataset=cifar10,algorithm=openmatch", "train.uratio", 2),
    ("dataset=cifar10,algorithm=iomatch", "train.uratio", 7),
    ("dataset=cifar10", "augment.pad", 4),
    ("dataset=imagenet30", "model.backbone", "resnet18_official"),
    ("dataset=imagenet30", "train.uratio", 3),
    ("dataset=imagenet30", "train.input", "stream"),
    ("dataset=imagenet30,labels=p5", "dataset.in30_labels", "p5"),
    ("dataset=digits,labels=10", "dataset.labels_per_class", 10),
    ("ggr=osr", "ggr.subspace_dim", 10),
    ("anchor=labeled", "ggr.anchor", "labeled"),
    # the official protocol where results depend on it (issue 11)
    ("dataset=cifar100_50,algorithm=openmatch", "openmatch.lambda_socr", 1.0),
    ("dataset=cifar100_20,algorithm=openmatch", "openmatch.lambda_socr", 1.0),
    ("dataset=cifar10,algorithm=openmatch", "openmatch.lambda_socr", 0.5),
    ("dataset=imagenet30,algorithm=openmatch", "openmatch.lambda_socr", 0.5),
    ("dataset=cifar10,algorithm=openmatch", "ggr.start_step", 10240),
    ("dataset=digits,algorithm=openmatch", "ggr.start_step", 1000),
    ("dataset=cifar10,algorithm=iomatch", "ggr.start_step", 0),
    ("dataset=cifar10", "ggr.scope", "backbone"),
    ("dataset=cifar10,algorithm=openmatch,scope=official", "ggr.scope", "all"),
    ("dataset=cifar10,algorithm=iomatch,scope=official", "ggr.scope", "backbone"),
    ("dataset=cifar10,algorithm=iomatch,scope=all", "ggr.scope", "all"),
    ("dataset=imagenet30,algorithm=iomatch,ggr=sum,baseline=official", "train.steps", 102400),
    ("dataset=imagenet30,algorithm=iomatch,ggr=sum,baseline=official", "train.uratio", 2),
    ("dataset=imagenet30,algorithm=openmatch,ggr=sum,baseline=official",
     "optim.weight_decay", 3e-4),
    ("dataset=imagenet30,algorithm=iomatch,ggr=sum", "train.steps", 204800),
    ("dataset=imagenet30,algorithm=iomatch,ggr=sum", "optim.weight_decay", 5e-4),
    ("dataset=cifar10,algorithm=iomatch,ggr=sum,baseline=official", "train.steps", 262144),
    # closed-set SSL and GGCR (issue 12)
    ("dataset=digits_closed", "dataset.protocol", "closed"),
    ("dataset=digits_closed", "dataset.labels_per_class", 4),
    ("dataset=digits", "dataset.protocol", "openset"),
    ("dataset=cifar10_closed,labels=400", "dataset.labels_per_class", 400),
    ("dataset=cifar10_closed", "train.steps", 2 ** 20),
    ("dataset=cifar10_closed", "model.backbone", "wrn28_2"),
    ("dataset=cifar100_closed", "model.backbone", "wrn28_8"),
    ("dataset=cifar100_closed", "optim.weight_decay", 1e-3),
    ("dataset=imagenet", "dataset.imagenet_subset", "1pct"),
    ("dataset=imagenet,labels=10pct", "dataset.imagenet_subset", "10pct"),
    ("dataset=imagenet", "model.backbone", "resnet50"),
    ("dataset=imagenet", "train.input", "stream"),
    ("dataset=imagenet", "augment.crop", 224),
    ("dataset=cifar10_closed,algorithm=fixmatch", "fixmatch.hard_label", True),
    ("dataset=cifar10_closed,algorithm=fixmatch", "fixmatch.unsup_warmup_steps", 5000),
    ("dataset=cifar10,algorithm=fixmatch", "fixmatch.hard_label", False),
    ("algorithm=ggcr,gc_method=sketch,gc_sketch=16", "ggcr.consistency.sketch_dim", 16),
    ("algorithm=ggcr,gc_weight=0.5", "ggcr.consistency.weight", 0.5),
    ("algorithm=ggcr,gc_penalty=grad_norm", "ggcr.consistency.penalty", "grad_norm"),
    ("algorithm=ggcr,gc_pairs=0.25", "ggcr.consistency.pair_fraction", 0.25),
    ("algorithm=ggcr,gc_chunks=16", "ggcr.consistency.pair_chunks", 16),
    ("algorithm=ggcr,gc_statistics=held", "ggcr.consistency.statistics", "held"),
    ("algorithm=ggcr,gc_warmup=0", "ggcr.consistency.warmup_steps", 0),
    ("algorithm=ggcr", "ggcr.consistency.method", "exact"),
    ("dataset=cifar10,algorithm=openmatch_ggcr", "ggr.start_step", 10240),
    ("dataset=cifar10,algorithm=openmatch_ggcr", "train.uratio", 2),
    ("dataset=cifar10,algorithm=iomatch_ggcr", "iomatch_ggcr.op_warmup_steps", 1024),
])
def test_each_dataset_gets_its_official_protocol(cell, field, value):
  cfg = grid.get_config(cell)
  node = cfg
  for part in field.split("."):
    node = node[part]
  assert node == value


@pytest.mark.parametrize("cell, message", [
    ("algorithm=mixmatch", "choose one of supervised"),
    ("dataset=svhn", "choose one of digits"),
    ("algorithm=fixmatch,meta=jvp", "apply to algorithm=metasemi"),
    ("algorithm=metasemi,meta=exact", "choose one of jvp, finite_difference, off"),
    ("algorithm=metasemi,mixup=sometimes", "True or False"),
    ("labels=five", "non-negative integer"),
    ("dataset=imagenet30,labels=5", "choose one of p1, p5"),
    ("seed=0,seed=1", "given twice"),
    ("steps=5", "unknown grid key 'steps'"),
    ("runlocal=maybe", "True or False"),
    ("algorithm=supervised,ggr=vlr", "no auxiliary loss"),
    ("scope=head", "choose one of backbone, all, official"),
    ("ggr=vlr,baseline=official", "only the sum baseline"),
    ("dataset=imagenet,labels=4", "choose one of 1pct, 10pct"),
    ("algorithm=fixmatch,gc_weight=0.1", "apply to the GGCR algorithms"),
    ("algorithm=ggcr,gc_method=loop", "choose one of exact, sketch, vmap"),
    ("algorithm=ggcr,gc_weight=big", "must be a number"),
    ("algorithm=ggcr,gc_pairs=half", "must be a number"),
    ("algorithm=ggcr,gc_statistics=frozen", "choose one of held, through"),
    ("algorithm=ggcr,gc_chunks=two", "must be a non-negative integer"),
])
def test_bad_cells_name_the_key_and_the_choices(cell, message):
  with pytest.raises(ValueError, match=message):
    grid.get_config(cell)


def test_openmatch_rectification_starts_with_its_fixmatch_stage_when_either_is_moved():
  cfg = grid.get_config("algorithm=openmatch,dataset=cifar10")
  cfg.openmatch.start_fix_steps = 77
  assert cfg.ggr.start_step == 77
  cfg = grid.get_config("algorithm=openmatch,dataset=cifar10,runlocal=True")
  assert cfg.ggr.start_step == cfg.openmatch.start_fix_steps == 2


def _smoke(tmp_path, cell, **dataset):
  cfg = grid.get_config(cell + ",runlocal=True")
  cfg.dataset.update(dataset)
  summary = loop.Trainer(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1]).run()
  assert summary["steps"] == cfg.train.steps == 3
  for key in ("closed_acc", "open_bacc", "auroc"):
    assert 0.0 <= summary[key] <= 1.0
  return summary


def test_smoke_mode_runs_a_digits_cell(tmp_path):
  _smoke(tmp_path, "algorithm=iomatch,dataset=digits,ggr=csr")


@pytest.mark.parametrize("dataset, algorithm", [("cifar10", "fixmatch"), ("cifar100_20", "openmatch")])
def test_smoke_mode_runs_a_cifar_cell_on_mock_tfds_data(tmp_path, dataset, algorithm):
  with tfds.testing.mock_data(num_examples=2000, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = _smoke(tmp_path, f"algorithm={algorithm},dataset={dataset},labels=3,ggr=vlr")
  k = 6 if dataset == "cifar10" else 20
  assert len(summary["closed_per_class_acc"]) == k


def test_every_closed_set_ggcr_and_metasemi_cell_is_a_valid_config():
  for dataset, algorithm, mode in itertools.product(
      grid.CLOSED_SET, ("supervised", "fixmatch", "ggcr", "metasemi", "metasemi_ggcr"),
      ("sum", "vlr")):
    if algorithm == "supervised" and mode != "sum":
      continue
    cfg = grid.get_config(f"algorithm={algorithm},dataset={dataset},ggr={mode}")
    config_lib.validate(cfg, num_devices=1)
    assert cfg.dataset.protocol == "closed"


def _closed_smoke(tmp_path, cell):
  cfg = grid.get_config(cell + ",runlocal=True")
  summary = loop.Trainer(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1]).run()
  assert summary["steps"] == 3 and summary["protocol"] == "closed"
  assert 0.0 <= summary["closed_acc"] <= summary["top5_acc"] <= 1.0
  return summary


def test_smoke_mode_runs_a_closed_digits_ggcr_cell_with_the_rectifier(tmp_path):
  _closed_smoke(tmp_path, "algorithm=ggcr,dataset=digits_closed,ggr=vlr")


@pytest.mark.parametrize("cell, field, value", [
    ("algorithm=metasemi,dataset=svhn_closed", "dataset.labels_per_class", 100),
    ("algorithm=metasemi,dataset=svhn_closed", "metasemi.mixup_alpha", 0.1),
    ("algorithm=metasemi,dataset=svhn_closed", "augment.flip", False),
    ("algorithm=metasemi,dataset=cifar10_closed", "dataset.labels_per_class", 400),
    ("algorithm=metasemi,dataset=cifar10_closed", "model.backbone", "convlarge"),
    ("algorithm=metasemi,dataset=cifar10_closed", "optim.milestones", (300_000, 350_000)),
    ("algorithm=metasemi,dataset=cifar100_closed", "optim.weight_decay", 1e-4),
    ("algorithm=metasemi,dataset=cifar100_closed", "dataset.unlabeled_excludes_labeled", True),
    ("algorithm=metasemi,dataset=imagenet", "dataset.imagenet_subset", "10pct"),
    ("algorithm=metasemi,dataset=imagenet", "optim.schedule", "warmup_cosine"),
    ("algorithm=metasemi,dataset=imagenet", "metasemi.ramp_steps", 0),
    ("algorithm=metasemi,meta=off,mixup=False", "metasemi.meta", False),
    ("algorithm=metasemi,meta=finite_difference", "metasemi.method", "finite_difference"),
    ("algorithm=metasemi_ggcr,dataset=cifar10_closed", "model.backbone", "convlarge"),
    ("algorithm=metasemi_ggcr,dataset=svhn_closed", "metasemi_ggcr.mixup_alpha", 0.1),
    ("algorithm=metasemi_ggcr,meta=off", "metasemi_ggcr.meta", False),
    ("algorithm=metasemi_ggcr,gc_weight=0.5", "metasemi_ggcr.consistency.weight", 0.5),
    ("algorithm=metasemi_ggcr", "dataset.protocol", "closed"),
    ("algorithm=metasemi_ggcr", "metasemi_ggcr.consistency.warmup_steps", 200),
    ("algorithm=metasemi_ggcr,gc_warmup=0", "metasemi_ggcr.consistency.warmup_steps", 0),
    ("algorithm=metasemi_ggcr,dataset=cifar10_closed",
     "metasemi_ggcr.consistency.warmup_steps", 1000),
])
def test_metasemi_cells_follow_semimeta_protocol(cell, field, value):
  node = grid.get_config(cell)
  for part in field.split("."):
    node = node[part]
  assert node == value


def test_smoke_mode_runs_a_closed_svhn_metasemi_cell_on_mock_tfds_data(tmp_path):
  with tfds.testing.mock_data(num_examples=400, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = _closed_smoke(tmp_path, "algorithm=metasemi,dataset=svhn_closed,labels=2,ggr=vlr")
  assert len(summary["closed_per_class_acc"]) == 10


def test_smoke_mode_runs_a_closed_imagenet_cell_on_mock_tfds_data(tmp_path):
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = _closed_smoke(tmp_path, "algorithm=fixmatch,dataset=imagenet,ggr=sum")
  assert len(summary["closed_per_class_acc"]) == 1000


def test_smoke_mode_runs_an_imagenet30_cell_on_a_local_tree(tmp_path):
  _fake_in30(tmp_path / "in30", per_class=3, test_per_class=1,
             classes=tuple(f"class{i:02d}" for i in range(30)), k=20)
  summary = _smoke(tmp_path, "algorithm=iomatch,dataset=imagenet30,ggr=sum",
                   data_dir=str(tmp_path / "in30"))
  assert np.isfinite(summary["closed_acc"])


def test_imagenet30_without_a_root_is_a_config_error(tmp_path):
  cfg = grid.get_config("dataset=imagenet30,runlocal=True")
  with pytest.raises(config_lib.ConfigError, match="dataset.data_dir"):
    loop.Trainer(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1])
