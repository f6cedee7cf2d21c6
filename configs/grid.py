"""Every cell of the paper's grid from one string: ``get_config("algorithm=iomatch,...")``.

``ggr-jax train --config grid:algorithm=iomatch,dataset=cifar10,labels=25,seed=0,ggr=vlr``

Keys (all optional; defaults in brackets):

* ``algorithm`` [fixmatch]: ``supervised``, ``fixmatch``, ``iomatch``, ``openmatch``,
  ``ggcr`` (FixMatch + gradient consistency), ``iomatch_ggcr``, ``openmatch_ggcr``,
  ``metasemi`` (meta-gradient pseudo-labels with mixup), ``metasemi_ggcr`` (MetaSemi +
  gradient consistency, on a strong view drawn for it).
* ``dataset`` [digits]: open-set ``digits`` (6/4), ``cifar10`` (6/4), ``cifar100_50``
  (50/50), ``cifar100_20`` (20/80), ``imagenet30`` (20/10); closed-set (every class
  known, top-1/top-5) ``digits_closed``, ``cifar10_closed``, ``cifar100_closed``,
  ``svhn_closed``, ``imagenet`` (ResNet-50, streamed from tfds).
* ``labels`` [5; 4 closed-set]: labeled images per known class (open-set CIFAR: 5, 10
  or 25; closed-set CIFAR-10 4/25/400 for 40/250/4000 labels, CIFAR-100 4/25 for
  400/2500); for ``imagenet30`` the official file list, ``p1`` or ``p5``; for
  ``imagenet`` the tfds subset, ``1pct`` or ``10pct``.
* ``meta`` [jvp]: MetaSemi's pseudo-labels, ``jvp``, ``finite_difference`` (official) or
  ``off`` (the eval-mode predictions); ``mixup`` [True]: its cross-domain mixup. With
  ``algorithm=metasemi`` (or ``metasemi_ggcr``) the data set [digits_closed] follows
  SemiMeta's protocol instead of FixMatch's: ConvLarge, batch 128 + 128, 400k steps, SGD
  (momentum 0.9, no Nesterov, weight decay 1e-4 on every parameter, 5e-5 on SVHN),
  learning rate 0.1 with a 4,000-step warm-up then x0.1 after 300k and 350k, no EMA, the
  unlabeled set without the labeled images, crop (and flip, not on SVHN) augmentation,
  mixup Beta(1, 1) (0.1 on SVHN); ``labels`` [10, 100, 400, 100] per class on digits,
  SVHN, CIFAR-10, CIFAR-100 (1,000, 4,000 and 10,000 labels); ImageNet [10pct]: ResNet-18,
  8 x (64 + 64), 600 epochs, 5 warm-up epochs then cosine, no ramp. On the digits, which
  run 2,000 steps, ``metasemi_ggcr``'s ``L_g`` starts after a tenth of them
  (``configs/metasemi_ggcr.py``).
* ``gc_method`` [exact], ``gc_weight`` [0.1], ``gc_warmup`` [1000]: the GGCR
  algorithms' per-sample method (``exact``, ``sketch``, ``vmap``), lambda and the steps
  before ``L_g`` starts (0: no warm-up); ``gc_sketch`` [64]: ``k`` of ``sketch``;
  ``gc_penalty`` [cosine]: ``grad_norm`` for the paper's gradient-norm-penalty ablation;
  ``gc_pairs`` [1.0]: the share of the unlabeled pairs whose geometry enters ``L_g``;
  ``gc_chunks`` [1]: the exact geometry in that many chunks one after the other (less
  memory, the same ``L_g``); ``gc_statistics`` [through]: ``held`` keeps the batch
  statistics constant in ``L_g``'s gradient too (``consistency.statistics``).
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
  unlabeled ratio 2, 3 steps, evaluation on at most 64 test images, no input workers, ImageNet and
  ImageNet-30 at 32x32, the small CNN in place of WRN/ResNet) that finishes in well under a minute on
  a CPU.

The protocol of each data set (official configs, ``shared/reference/ggr_official.md``
section 6) is set here once: optimiser, weight decay, batch sizes, unlabeled ratio,
iteration budget, epoch length, augmentation and backbone, and OpenMatch's
official start of rectification (``ggr.start_step = openmatch.start_fix_steps``: the
official GGR-OpenMatch sums the gradients before its FixMatch stage) and SOCR weight
(1.0 on CIFAR-100, 0.5 elsewhere). The closed-set cells follow FixMatch's protocol
(WRN-28-2 on CIFAR-10, WRN-28-8 with weight decay 1e-3 on CIFAR-100, 2^20 steps, batch
64 + 7 x 64; ImageNet: ResNet-50, batch 64 + 5 x 64, weight decay 3e-4, 256 -> 224
crops) and give FixMatch the GGCR paper's base (hard pseudo-labels, the unlabeled
weight ramped over 5,000 steps), so ``ggcr`` against ``fixmatch`` isolates ``L_g``.
All modes of one (algorithm, data set) share the hyperparameters of its GGR config, so a
mode's delta over ``sum`` isolates the rectifier. Any field can still be overridden after the string,
e.g. ``--config.train.steps=5000``.

Example:
  >>> cfg = get_config("algorithm=iomatch,dataset=cifar10,labels=25,seed=2,ggr=csr")
  >>> cfg.dataset.name, cfg.dataset.labels_per_class, cfg.model.backbone, cfg.train.steps
  ('cifar10', 25, 'wrn28_2', 262144)
  >>> cfg.ggr.mode, cfg.ggr.subspace_dim, cfg.train.seed, cfg.train.uratio
  ('csr', 10, 2, 7)
  >>> cfg = get_config("algorithm=ggcr,dataset=cifar10_closed,labels=4,gc_method=sketch")
  >>> cfg.dataset.protocol, cfg.train.steps, cfg.ggcr.consistency.method
  ('closed', 1048576, 'sketch')
"""

from __future__ import annotations

import ml_collections

from ggr_jax.configs import default
from ggr_jax.ssl import ggcr

KEYS = ("algorithm", "dataset", "labels", "seed", "ggr", "anchor", "scope", "baseline",
        "gc_method", "gc_weight", "gc_warmup", "gc_sketch", "gc_penalty", "gc_pairs",
        "gc_chunks", "gc_statistics", "meta", "mixup", "runlocal")
OPEN_SET = ("digits", "cifar10", "cifar100_50", "cifar100_20", "imagenet30")
CLOSED_SET = ("digits_closed", "cifar10_closed", "cifar100_closed", "svhn_closed", "imagenet")
DATASETS = OPEN_SET + CLOSED_SET
MODES = ("sum", "vlr", "osr", "csr", "pcgrad_sym", "conflict_drop")
ALGORITHMS = ("supervised", "fixmatch", "iomatch", "openmatch", "ggcr", "iomatch_ggcr",
              "openmatch_ggcr", "metasemi", "metasemi_ggcr")
METASEMI = ("metasemi", "metasemi_ggcr")  # the algorithms on SemiMeta's protocol
META = ("jvp", "finite_difference", "off")
# MetaSemi's labels per class by data set (the paper's 1,000 / 4,000 / 10,000 labels)
METASEMI_LABELS = {"digits_closed": "10", "svhn_closed": "100", "cifar10_closed": "400",
                   "cifar100_closed": "100", "imagenet": "10pct"}
GC_METHODS = ("exact", "sketch", "vmap")
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


def _number(cell: dict[str, str], key: str, default_value: float, meaning: str) -> float:
  value = cell.get(key, str(default_value))
  try:
    return float(value)
  except ValueError:
    raise ValueError(f"grid {key}={value!r} must be a number ({meaning}).") from None


def _boolean(cell: dict[str, str], key: str) -> bool:
  value = cell.get(key, "False")
  if value.lower() not in ("true", "false", "1", "0"):
    raise ValueError(f"grid {key}={value!r} must be True or False.")
  return value.lower() in ("true", "1")


def _dataset_protocol(cfg: ml_collections.ConfigDict, dataset: str, labels: str) -> None:
  """The official data, model and schedule settings of ``dataset``."""
  if dataset in CLOSED_SET:
    cfg.dataset.protocol = "closed"
    dataset = dataset.removesuffix("_closed")
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
    # each step's batch is streamed; Grain workers read and decode the images
    cfg.train.update(input="stream", input_workers=8)
    return
  if dataset == "imagenet":
    cfg.dataset.imagenet_subset = labels
    cfg.model.update(backbone="resnet50", bn_momentum=0.1)
    cfg.train.update(steps=300 * EPOCH, uratio=5, eval_batch_size=128, input="stream",
                     input_workers=8)
    cfg.optim.weight_decay = 3e-4
    cfg.augment.update(pad=0, crop=224)
    return
  cfg.dataset.labels_per_class = int(labels)
  cfg.model.backbone = "wrn28_2"
  cfg.augment.pad = 4
  if cfg.dataset.protocol == "closed":
    cfg.train.steps = 2 ** 20
  if cfg.dataset.name == "cifar100":
    if cfg.dataset.protocol == "closed":
      cfg.model.backbone = "wrn28_8"
    else:
      cfg.dataset.num_id_classes = int(dataset.split("_")[1])
    cfg.optim.weight_decay = 1e-3


def _algorithm_protocol(cfg: ml_collections.ConfigDict, algorithm: str, dataset: str) -> None:
  cfg.algorithm = algorithm
  block = cfg[algorithm]
  if dataset in CLOSED_SET and algorithm == "fixmatch":  # GGCR's base, without L_g
    cfg.fixmatch.update(hard_label=cfg.ggcr.hard_label,
                        unsup_warmup_steps=cfg.ggcr.get_ref("unsup_warmup_steps"))
  if dataset.startswith("digits"):
    return
  for name in ALGORITHMS:  # IOMatch's open-set loss after an epoch, OpenMatch's stage 2
    if "op_warmup_steps" in cfg[name]:
      cfg[name].op_warmup_steps = EPOCH
    if "start_fix_steps" in cfg[name]:
      cfg[name].start_fix_steps = 10 * EPOCH
  if "fix_uratio" in block:  # OpenMatch
    cfg.train.uratio = 2
    block.fix_uratio = 2
    if dataset.startswith("cifar100"):
      block.lambda_socr = 1.0


def _consistency(cfg: ml_collections.ConfigDict, cell: dict[str, str], algorithm: str) -> None:
  """The GGCR keys, refused for algorithms without gradient consistency."""
  keys = [key for key in ("gc_method", "gc_weight", "gc_warmup", "gc_sketch", "gc_penalty",
                          "gc_pairs", "gc_chunks", "gc_statistics") if key in cell]
  if "consistency" not in cfg[algorithm]:
    if keys:
      raise ValueError(f"grid {', '.join(keys)} apply to the GGCR algorithms (ggcr, "
                       f"iomatch_ggcr, openmatch_ggcr, metasemi_ggcr), not to "
                       f"algorithm={algorithm}.")
    return
  gc = cfg[algorithm].consistency
  gc.method = _choice(cell, "gc_method", gc.method, GC_METHODS)
  gc.warmup_steps = _integer(cell, "gc_warmup", gc.warmup_steps)
  gc.sketch_dim = _integer(cell, "gc_sketch", gc.sketch_dim)
  gc.penalty = _choice(cell, "gc_penalty", gc.penalty, ggcr.PENALTIES)
  gc.weight = _number(cell, "gc_weight", gc.weight, "lambda")
  gc.pair_fraction = _number(cell, "gc_pairs", gc.pair_fraction,
                             "the share of the unlabeled pairs in L_g")
  gc.pair_chunks = _integer(cell, "gc_chunks", gc.pair_chunks)
  gc.statistics = _choice(cell, "gc_statistics", gc.statistics, ggcr.STATISTICS)


def _metasemi(cfg: ml_collections.ConfigDict, cell: dict[str, str], dataset: str) -> None:
  """SemiMeta's own protocol (``train_meta.py`` and its README commands), and the
  ``meta``/``mixup`` keys of its ablation, refused for other algorithms."""
  keys = [key for key in ("meta", "mixup") if key in cell]
  if cfg.algorithm not in METASEMI:
    if keys:
      raise ValueError(f"grid {', '.join(keys)} apply to algorithm={' or '.join(METASEMI)}, "
                       f"not to algorithm={cfg.algorithm}.")
    return
  block = cfg[cfg.algorithm]
  meta = _choice(cell, "meta", "jvp", META)
  block.update(meta=meta != "off", method="jvp" if meta == "off" else meta,
               mixup=_boolean(cell, "mixup") if "mixup" in cell else True)
  cfg.dataset.unlabeled_excludes_labeled = dataset != "imagenet"
  cfg.optim.update(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                   decay="all", ema=0.0, schedule="warmup_step", warmup_steps=4000,
                   milestones=(300_000, 350_000), decay_factor=0.1)
  if dataset.startswith("digits"):  # configs/metasemi.py, the schedule scaled to 2,000 steps
    steps = cfg.train.steps
    cfg.train.update(batch_size=32, uratio=1)
    cfg.optim.update(warmup_steps=steps // 100, milestones=(steps * 3 // 4, steps * 7 // 8))
    block.ramp_steps = steps // 100
    if "consistency" in block and "gc_warmup" not in cell:  # configs/metasemi_ggcr.py
      block.consistency.warmup_steps = steps // 10
    return
  cfg.train.update(steps=400_000, batch_size=128, uratio=1)
  cfg.model.update(backbone="convlarge", bn_momentum=0.1)
  cfg.augment.update(pad=4, flip=dataset != "svhn_closed")
  block.ramp_steps = 4000
  if dataset == "svhn_closed":
    cfg.optim.weight_decay = 5e-5
    block.mixup_alpha = 0.1
  if dataset == "imagenet":  # ResNet-18, 8 GPUs x (64 + 64), 600 epochs of the unlabeled set
    epoch = 1_281_167 // 512
    cfg.model.backbone = "resnet18"
    cfg.train.update(batch_size=512, steps=600 * epoch, steps_per_epoch=epoch)
    cfg.optim.update(schedule="warmup_cosine", warmup_steps=5 * epoch, milestones=())
    block.ramp_steps = 0


def _official_baseline(cfg: ml_collections.ConfigDict, algorithm: str, dataset: str) -> None:
  """The official IOMatch/OpenMatch baseline configs' settings where they differ."""
  if dataset == "imagenet30" and algorithm in ("iomatch", "openmatch"):  # not their GGCR forms
    cfg.train.update(steps=100 * EPOCH, uratio=2)
    cfg.optim.weight_decay = 3e-4


def _runlocal(cfg: ml_collections.ConfigDict) -> None:
  cfg.model.backbone = "cnn"
  cfg.train.update(steps=3, steps_per_epoch=2, batch_size=2, uratio=2, log_every=1,
                   eval_every=3, checkpoint_every=3, eval_batch_size=32, input_workers=0)
  cfg.dataset.update(max_test_images=64, image_size=32)
  if cfg.augment.crop:
    cfg.augment.crop = 28
  for name in ALGORITHMS:
    block = cfg[name]
    if "fix_uratio" in block:
      block.update(fix_uratio=1, start_fix_steps=2)
    if "op_warmup_steps" in block:
      block.op_warmup_steps = 1
    if "consistency" in block:
      block.consistency.warmup_steps = 1
  if cfg.algorithm in METASEMI:
    cfg.train.uratio = 1
    cfg[cfg.algorithm].ramp_steps = 1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one grid cell; see the module docstring for the keys."""
  cell = parse_cell(arg)
  algorithm = _choice(cell, "algorithm", "fixmatch", ALGORITHMS)
  dataset = _choice(cell, "dataset", "digits_closed" if algorithm in METASEMI else "digits",
                    DATASETS)
  fixed_lists = {"imagenet30": ("p1", "p5"), "imagenet": ("1pct", "10pct")}
  if dataset in fixed_lists:
    labels = _choice(cell, "labels", fixed_lists[dataset][0], fixed_lists[dataset])
  elif algorithm in METASEMI and dataset in METASEMI_LABELS:
    labels = str(_integer(cell, "labels", int(METASEMI_LABELS[dataset])))
  else:
    labels = str(_integer(cell, "labels", 4 if dataset in CLOSED_SET else 5))
  if algorithm in METASEMI and dataset == "imagenet":
    labels = _choice(cell, "labels", METASEMI_LABELS[dataset], fixed_lists[dataset])

  cfg = default.get_config()
  _dataset_protocol(cfg, dataset, labels)
  _algorithm_protocol(cfg, algorithm, dataset)
  cfg.train.seed = _integer(cell, "seed", 0)
  cfg.ggr.mode = _choice(cell, "ggr", "sum" if algorithm == "supervised" else "vlr", MODES)
  cfg.ggr.anchor = _choice(cell, "anchor", "joint", ("joint", "labeled"))
  scope = _choice(cell, "scope", "backbone", ("backbone", "all", "official"))
  if scope == "official":
    scope = "all" if algorithm.startswith("openmatch") else "backbone"
  cfg.ggr.scope = scope
  if "start_fix_steps" in cfg[algorithm]:
    cfg.ggr.start_step = cfg[algorithm].get_ref("start_fix_steps")
  _consistency(cfg, cell, algorithm)
  _metasemi(cfg, cell, dataset)
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
