"""Every cell of the paper's grid from one string: ``get_config("algorithm=iomatch,...")``.

``ggr-jax train --config grid:algorithm=iomatch,dataset=cifar10,labels=25,seed=0,ggr=vlr``

Keys (all optional; defaults in brackets):

* ``algorithm`` [fixmatch]: ``supervised``, ``fixmatch``, ``iomatch``, ``openmatch``.
* ``dataset`` [digits]: ``digits`` (6/4), ``cifar10`` (6/4), ``cifar100_50`` (50/50),
  ``cifar100_20`` (20/80), ``imagenet30`` (20/10).
* ``labels`` [5]: labeled images per known class (CIFAR: 5, 10 or 25); for
  ``imagenet30`` the official file list, ``p1`` or ``p5``.
* ``seed`` [0]: the labeled draw and every PRNG key of the run.
* ``ggr`` [vlr]: ``sum`` (the plain SSL baseline), ``vlr``, ``osr``, ``csr``,
  ``pcgrad_sym``, ``conflict_drop``; ``osr``/``csr`` keep ``k = 10`` directions.
* ``anchor`` [joint]: ``joint`` or ``labeled`` (see ``ggr.anchor`` in :mod:`default`).
* ``scope`` [backbone]: the parameters the rectifier acts on: ``backbone`` (the stated
  intent of the official code), ``all``, or ``official``: what the released runs did,
  ``all`` for OpenMatch (its DDP-wrapped model has no ``backbone.`` names, so the official
  rule falls back to every parameter, the OVA head included) and ``backbone`` otherwise.
* ``baseline`` [shared]: ``shared`` gives the ``sum`` baseline the hyperparameters of the
  GGR runs (a fair comparison); ``official`` gives it the official baseline configs'
  own, which differ on ImageNet-30 only (IOMatch and OpenMatch: 102,400 iterations,
  weight decay 3e-4, unlabeled ratio 2, against GGR-IOMatch's 204,800, 5e-4, 3).
* ``runlocal`` [False]: a smoke run of the same cell with tiny shapes (batch 2,
  unlabeled ratio 2, 3 steps, evaluation on at most 64 test images, ImageNet-30 at
  32x32, the small CNN in place of WRN/ResNet) that finishes in well under a minute on
  a CPU.

The protocol of each data set (official configs, ``shared/reference/ggr_official.md``
section 6) is set here once: optimiser, weight decay, batch sizes, unlabeled ratio,
iteration budget, epoch length, augmentation and backbone, and OpenMatch's
official start of rectification (``ggr.start_step = openmatch.start_fix_steps``: the
official GGR-OpenMatch sums the gradients before its FixMatch stage) and SOCR weight
(1.0 on CIFAR-100, 0.5 elsewhere). All modes of one
(algorithm, data set) share the hyperparameters of its GGR config, so a mode's delta over
``sum`` isolates the rectifier. Any field can still be overridden after the string,
e.g. ``--config.train.steps=5000``.

Example:
  >>> cfg = get_config("algorithm=iomatch,dataset=cifar10,labels=25,seed=2,ggr=csr")
  >>> cfg.dataset.name, cfg.dataset.labels_per_class, cfg.model.backbone, cfg.train.steps
  ('cifar10', 25, 'wrn28_2', 262144)
  >>> cfg.ggr.mode, cfg.ggr.subspace_dim, cfg.train.seed, cfg.train.uratio
  ('csr', 10, 2, 7)
"""

from __future__ import annotations

import ml_collections

from ggr_jax.configs import default

KEYS = ("algorithm", "dataset", "labels", "seed", "ggr", "anchor", "scope", "baseline",
        "runlocal")
DATASETS = ("digits", "cifar10", "cifar100_50", "cifar100_20", "imagenet30")
MODES = ("sum", "vlr", "osr", "csr", "pcgrad_sym", "conflict_drop")
ALGORITHMS = ("supervised", "fixmatch", "iomatch", "openmatch")
EPOCH = 1024  # official iterations per epoch


def parse_cell(arg: str | None) -> dict[str, str]:
  """``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}``, checking the keys."""
  cell: dict[str, str] = {}
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not value.strip():
      raise ValueError(f"grid cell item {item!r} is not KEY=VALUE; write e.g. "
                       "'algorithm=iomatch,dataset=cifar10,labels=25,seed=0,ggr=vlr'.")
    if key not in KEYS:
      raise ValueError(f"unknown grid key {key!r}; the keys are {', '.join(KEYS)}.")
    if key in cell:
      raise ValueError(f"grid key {key!r} is given twice in {arg!r}.")
    cell[key] = value.strip()
  return cell


def _choice(cell: dict[str, str], key: str, default_value: str, allowed: tuple[str, ...]) -> str:
  value = cell.get(key, default_value)
  if value not in allowed:
    raise ValueError(f"grid {key}={value!r} is invalid; choose one of {', '.join(allowed)}.")
  return value


def _integer(cell: dict[str, str], key: str, default_value: int) -> int:
  value = cell.get(key, str(default_value))
  if not value.isdigit():
    raise ValueError(f"grid {key}={value!r} must be a non-negative integer.")
  return int(value)


def _boolean(cell: dict[str, str], key: str) -> bool:
  value = cell.get(key, "False")
  if value.lower() not in ("true", "false", "1", "0"):
    raise ValueError(f"grid {key}={value!r} must be True or False.")
  return value.lower() in ("true", "1")


def _dataset_protocol(cfg: ml_collections.ConfigDict, dataset: str, labels: str) -> None:
  """The official data, model and schedule settings of ``dataset``."""
  if dataset == "digits":
    cfg.dataset.labels_per_class = int(labels)
    return
  cfg.dataset.name = "cifar100" if dataset.startswith("cifar100") else dataset
  cfg.model.bn_momentum = 0.001
  cfg.train.update(steps=256 * EPOCH, steps_per_epoch=EPOCH, batch_size=64, uratio=7,
                   log_every=256, eval_every=EPOCH, checkpoint_every=4 * EPOCH,
                   eval_batch_size=256)
  cfg.augment.update(flip=True, num_ops=3, cutout=0.5)
  if dataset == "imagenet30":
    cfg.dataset.in30_labels = labels
    cfg.model.update(backbone="resnet18_official", bn_momentum=0.1)
    cfg.train.update(steps=200 * EPOCH, uratio=3, eval_batch_size=128)
    cfg.augment.update(pad=0, crop=224)  # 256 -> random 224 crops, centre crop to test
    # 7.6 GB of uint8 images stay in host memory; each step's batch is streamed.
    cfg.train.input = "stream"
    return
  cfg.dataset.labels_per_class = int(labels)
  cfg.model.backbone = "wrn28_2"
  cfg.augment.pad = 4
  if cfg.dataset.name == "cifar100":
    cfg.dataset.num_id_classes = int(dataset.split("_")[1])
    cfg.optim.weight_decay = 1e-3


def _algorithm_protocol(cfg: ml_collections.ConfigDict, algorithm: str, dataset: str) -> None:
  cfg.algorithm = algorithm
  if dataset == "digits":
    return
  cfg.iomatch.op_warmup_steps = EPOCH
  cfg.openmatch.start_fix_steps = 10 * EPOCH
  if algorithm == "openmatch":
    cfg.train.uratio = 2
    cfg.openmatch.fix_uratio = 2
    if dataset.startswith("cifar100"):
      cfg.openmatch.lambda_socr = 1.0


def _official_baseline(cfg: ml_collections.ConfigDict, algorithm: str, dataset: str) -> None:
  """The official IOMatch/OpenMatch baseline configs' settings where they differ."""
  if dataset == "imagenet30" and algorithm in ("iomatch", "openmatch"):
    cfg.train.update(steps=100 * EPOCH, uratio=2)
    cfg.optim.weight_decay = 3e-4


def _runlocal(cfg: ml_collections.ConfigDict) -> None:
  cfg.model.backbone = "cnn"
  cfg.train.update(steps=3, steps_per_epoch=2, batch_size=2, uratio=2, log_every=1,
                   eval_every=3, checkpoint_every=3, eval_batch_size=32)
  cfg.dataset.update(max_test_images=64, image_size=32)
  if cfg.augment.crop:
    cfg.augment.crop = 28
  cfg.openmatch.update(fix_uratio=1, start_fix_steps=2)
  cfg.iomatch.op_warmup_steps = 1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one grid cell; see the module docstring for the keys."""
  cell = parse_cell(arg)
  algorithm = _choice(cell, "algorithm", "fixmatch", ALGORITHMS)
  dataset = _choice(cell, "dataset", "digits", DATASETS)
  labels = cell.get("labels", "p1" if dataset == "imagenet30" else "5")
  if dataset == "imagenet30":
    _choice(cell, "labels", "p1", ("p1", "p5"))
  else:
    _integer(cell, "labels", 5)

  cfg = default.get_config()
  _dataset_protocol(cfg, dataset, labels)
  _algorithm_protocol(cfg, algorithm, dataset)
  cfg.train.seed = _integer(cell, "seed", 0)
  cfg.ggr.mode = _choice(cell, "ggr", "sum" if algorithm == "supervised" else "vlr", MODES)
  cfg.ggr.anchor = _choice(cell, "anchor", "joint", ("joint", "labeled"))
  scope = _choice(cell, "scope", "backbone", ("backbone", "all", "official"))
  if scope == "official":
    scope = "all" if algorithm == "openmatch" else "backbone"
  cfg.ggr.scope = scope
  if algorithm == "openmatch":
    cfg.ggr.start_step = cfg.openmatch.get_ref("start_fix_steps")
  if _choice(cell, "baseline", "shared", ("shared", "official")) == "official":
    if cfg.ggr.mode != "sum":
      raise ValueError("grid baseline=official sets the official baseline configs' "
                       "hyperparameters, which only the sum baseline has; use it with ggr=sum.")
    _official_baseline(cfg, algorithm, dataset)
  if algorithm == "supervised":
    if cell.get("ggr", "sum") != "sum":
      raise ValueError("grid algorithm=supervised has no auxiliary loss to rectify; drop "
                       "the ggr key or set ggr=sum.")
    cfg.ggr.mode = "sum"
  if _boolean(cell, "runlocal"):
    _runlocal(cfg)
  return cfg
