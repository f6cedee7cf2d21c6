"""Validation of a run config: every bad value fails here, before any compilation."""

from __future__ import annotations

import pathlib
from typing import Any, Iterable

import jax
import ml_collections

from ggr_jax.rectify import BASIS_SIGNS, GRANULARITIES, MODES, PER_SAMPLE_MODES, SUBSPACE_MODES
from ggr_jax import ssl
from ggr_jax.data import gcd_sources, imagenet30, imagenet_subset
from ggr_jax.evaluate import THRESHOLD_RULES
from ggr_jax.models import BACKBONES, VITS, convert_gcd
from ggr_jax.ssl.interface import PROTOCOLS, SSL_PROTOCOLS
from ggr_jax.train import eagc, optim, step as step_lib

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagenet30", "imagenet", "cub", "scars",
            "imagenet100", "herbarium19")
# the protocols (ggr_jax.ssl.interface.PROTOCOLS) each data set has (ImageNet-30 is
# open-set, ImageNet's 1%/10% closed)
DATASET_PROTOCOLS = {"digits": PROTOCOLS, "cifar10": SSL_PROTOCOLS,
                     "cifar100": (*SSL_PROTOCOLS, "gcd"), "svhn": ("closed",),
                     "imagenet30": ("openset",), "imagenet": ("closed",),
                     **{name: ("gcd",) for name in ("cub", "scars", "imagenet100",
                                                    "herbarium19")}}
ANCHORS = ("joint", "labeled")
SCOPES = ("backbone", "all")


class ConfigError(ValueError):
  """A config field has a value the run cannot use."""


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config.{field} = {value!r} is invalid: {allowed}. "
                    f"Fix it in the config file or with --config.{field}=...")


def _choice(cfg, field: str, choices: Iterable[str]) -> None:
  value = _get(cfg, field)
  choices = tuple(choices)
  if value not in choices:
    _fail(field, value, "allowed values are " + ", ".join(map(repr, choices)))


def _positive_int(cfg, field: str) -> None:
  value = _get(cfg, field)
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    _fail(field, value, "must be a positive integer")


def _number(cfg, field: str, low: float, high: float, *, low_open=False, high_open=False) -> None:
  value = _get(cfg, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _fail(field, value, f"must be a number in {bounds}")


def _get(cfg, field: str) -> Any:
  node = cfg
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config.{field} is missing; start from ggr_jax.configs.default (configs/default.py).")
    node = node[part]
  return node


def _dataset(cfg: ml_collections.ConfigDict) -> None:
  name = cfg.dataset.name
  _choice(cfg, "dataset.protocol", PROTOCOLS)
  if cfg.dataset.protocol not in DATASET_PROTOCOLS[name]:
    _fail("dataset.protocol", cfg.dataset.protocol,
          f"dataset {name!r} has the protocol{'s' if len(DATASET_PROTOCOLS[name]) > 1 else ''} "
          f"{', '.join(map(repr, DATASET_PROTOCOLS[name]))} only")
  algorithm = ssl.get(cfg.algorithm)
  if cfg.dataset.protocol not in algorithm.protocols:
    _fail("dataset.protocol", cfg.dataset.protocol,
          f"algorithm {algorithm.name!r} trains on {', '.join(algorithm.protocols)}")
  if name not in ("imagenet30", "imagenet") and cfg.dataset.protocol != "gcd":
    _positive_int(cfg, "dataset.labels_per_class")
  if name == "cifar100" and cfg.dataset.num_id_classes not in range(5, 100, 5):
    _fail("dataset.num_id_classes", cfg.dataset.num_id_classes,
          "CIFAR-100 takes the first num_id_classes/5 superclasses: use 50 or 20 (any "
          "multiple of 5 below 100)")
  if name == "imagenet30":
    _choice(cfg, "dataset.in30_labels", ("p1", "p5"))
    _choice(cfg, "dataset.on_bad_image", imagenet30.BAD_IMAGE_RULES)
    if cfg.train.input != "stream":
      _fail("train.input", cfg.train.input, "ImageNet-30 is read from disk per batch and never "
            "held whole: use 'stream'")
  if name == "imagenet":
    _choice(cfg, "dataset.imagenet_subset", imagenet_subset.SUBSETS)
    if cfg.train.input != "stream":
      _fail("train.input", cfg.train.input, "ImageNet is read on demand and never held whole: "
            "use 'stream'")
  gcd = cfg.dataset.protocol == "gcd"
  if name in ("imagenet30", "imagenet") or (gcd and name != "digits"):
    _positive_int(cfg, "dataset.image_size")
  if gcd:
    _number(cfg, "dataset.prop_labeled", 0.0, 1.0, low_open=True, high_open=True)
  if gcd and name in gcd_sources.FOLDER_SOURCES and not cfg.dataset.data_dir:
    _fail("dataset.data_dir", "", f"{name} is read from a local folder; set it to the root "
          "(layout: ggr_jax.data.gcd_sources)")
  max_test = cfg.dataset.max_test_images
  if not isinstance(max_test, int) or isinstance(max_test, bool) or max_test < 0:
    _fail("dataset.max_test_images", max_test, "must be an integer >= 0 (0: every test image)")
  excludes = cfg.dataset.get("unlabeled_excludes_labeled", False)
  if not isinstance(excludes, bool):
    _fail("dataset.unlabeled_excludes_labeled", excludes, "must be True or False")
  if excludes and name == "imagenet":
    _fail("dataset.unlabeled_excludes_labeled", excludes, "ImageNet's labeled subset is "
          "another tfds data set, not rows of the unlabeled one: use False")
  if not isinstance(cfg.dataset.data_dir, str):
    _fail("dataset.data_dir", cfg.dataset.data_dir, "must be a path string ('' = default)")


def _algorithm(cfg: ml_collections.ConfigDict) -> None:
  algo = ssl.get(cfg.algorithm)
  if algo.name not in cfg:
    raise ConfigError(f"config.{algo.name} is missing: the config needs the algorithm's block "
                      f"(cfg.{algo.name} = <its module>.default_config()).")
  if algo.validate is not None:
    algo.validate(cfg[algo.name], lambda field, value, allowed: _fail(
        f"{algo.name}.{field}", value, allowed))
  check_run(cfg)


def check_run(cfg: ml_collections.ConfigDict, counts: dict[str, int] | None = None) -> None:
  """The algorithm's run-wide constraints (:attr:`Algorithm.check_run`); ``counts``: the
  loaded data's labeled and unlabeled image counts (None before loading)."""
  algo = ssl.get(cfg.algorithm)
  if algo.check_run is not None:
    algo.check_run(cfg, counts, _fail)


def _optimizer(cfg: ml_collections.ConfigDict) -> None:
  if not isinstance(cfg.optim.name, str):
    _fail("optim.name", cfg.optim.name, "must be an optax optimizer name")
  try:
    optim.optimizer_factory(cfg.optim.name)
  except ValueError as err:
    raise ConfigError(f"{err} Fix it with --config.optim.name=...") from None
  if "kwargs" in cfg.optim and not isinstance(cfg.optim.kwargs, ml_collections.ConfigDict):
    _fail("optim.kwargs", cfg.optim.kwargs, "must be a ConfigDict of keyword arguments")
  optim_cfg = cfg.optim
  if optim_cfg.get("schedule", "usb_cosine") not in optim.SCHEDULES:
    _choice(cfg, "optim.schedule", optim.SCHEDULES)
  for prefix, lr in (optim_cfg.get("group_lr", None) or {}).items():
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
      _fail(f"optim.group_lr.{prefix}", lr, "must be a learning rate > 0")
  if optim_cfg.get("decay", "kernels") not in optim.DECAYS:
    _choice(cfg, "optim.decay", optim.DECAYS)
  if "schedule" in optim_cfg:
    warmup = _get(cfg, "optim.warmup_steps")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
      _fail("optim.warmup_steps", warmup, "must be an integer >= 0 (0: no warm-up)")
    milestones = _get(cfg, "optim.milestones")
    if not isinstance(milestones, (tuple, list)) or not all(
        isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones) or \
        list(milestones) != sorted(set(milestones)):
      _fail("optim.milestones", milestones, "must be increasing non-negative step numbers, "
            "e.g. (300000, 350000)")
    _number(cfg, "optim.decay_factor", 0.0, float("inf"), high_open=True)


def _model(cfg: ml_collections.ConfigDict) -> None:
  _choice(cfg, "model.backbone", BACKBONES)
  _number(cfg, "model.bn_momentum", 0.0, 1.0, low_open=True)
  model = cfg.model
  pretrained = model.get("pretrained", "")
  if model.backbone not in VITS:
    if pretrained:
      _fail("model.pretrained", pretrained, f"loads DINO ViT weights, which backbone "
            f"{model.backbone!r} cannot take; choose one of {tuple(VITS)} or set it to ''")
    return
  vit = model.get("vit", None) or {}
  depth = vit.get("depth", 0) or 12
  for field in ("patch_size", "grad_from_block", "depth"):
    value = vit.get(field, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < (field == "patch_size"):
      _fail(f"model.vit.{field}", value, "must be an integer >= "
            f"{int(field == 'patch_size')}")
  if vit.get("grad_from_block", 0) > depth:
    _fail("model.vit.grad_from_block", vit.grad_from_block,
          f"must be at most the depth {depth} (the first trained block; {depth}: none)")
  if pretrained and not pathlib.Path(pretrained).is_file():
    _fail("model.pretrained", pretrained, "must be a DINO checkpoint file that exists (.pth "
          f"or .npz); download {convert_gcd.DINO_DOWNLOAD} (or another DINO ViT's file from "
          "github.com/facebookresearch/dino)")


def _eagc(cfg: ml_collections.ConfigDict) -> None:
  _choice(cfg, "eagc.terms", eagc.TERMS)
  if cfg.eagc.terms == "off":
    return
  _number(cfg, "eagc.aperture", 0.0, float("inf"), low_open=True, high_open=True)
  _number(cfg, "eagc.beta", 0.0, float("inf"), high_open=True)
  _number(cfg, "eagc.aga_weight", 0.0, float("inf"), high_open=True)
  _number(cfg, "eagc.momentum", 0.0, 1.0, high_open=True)
  steps = cfg.eagc.reference_steps
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    _fail("eagc.reference_steps", steps, "must be an integer >= 0 (0: the initial model is "
          "the reference)")
  _number(cfg, "eagc.reference_lr", 0.0, float("inf"), high_open=True)
  if cfg.ggr.granularity == "per_sample" or cfg.ggr.sample_diagnostics:
    _fail("eagc.terms", cfg.eagc.terms, "EAGC's feature-cotangent edit has no forward-mode "
          "derivative, which per-sample geometry needs; set --config.ggr.granularity=global "
          "and --config.ggr.sample_diagnostics=False")
  if cfg.ggr.anchor == "labeled":
    _fail("eagc.terms", cfg.eagc.terms, "a labeled-only anchor would leave out EAGC's "
          "edit; set --config.ggr.anchor=joint")


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises :class:`ConfigError` naming the first invalid field and its allowed values."""
  _choice(cfg, "algorithm", ssl.names())
  _algorithm(cfg)
  _choice(cfg, "dataset.name", DATASETS)
  _model(cfg)
  _choice(cfg, "ggr.mode", MODES)
  _choice(cfg, "ggr.scope", SCOPES)
  _choice(cfg, "ggr.basis_signs", BASIS_SIGNS)
  _choice(cfg, "ggr.granularity", GRANULARITIES)
  _choice(cfg, "ggr.per_sample_method", ("jvp", "materialize"))
  _choice(cfg, "ggr.anchor", ANCHORS)
  if cfg.ggr.anchor == "labeled" and not cfg.ggr.split_gradients:
    _fail("ggr.anchor", "labeled", "a labeled-only anchor needs the two gradients apart; "
          "set --config.ggr.split_gradients=True")
  if cfg.ggr.granularity == "per_sample" and cfg.ggr.mode not in PER_SAMPLE_MODES:
    _fail("ggr.mode", cfg.ggr.mode, "granularity 'per_sample' supports modes "
          + ", ".join(map(repr, PER_SAMPLE_MODES)))
  if not isinstance(cfg.ggr.microbatch, int) or cfg.ggr.microbatch < 0:
    _fail("ggr.microbatch", cfg.ggr.microbatch, "must be an integer >= 0 (0: all rows at once)")
  if not isinstance(cfg.ggr.split_gradients, bool):
    _fail("ggr.split_gradients", cfg.ggr.split_gradients, "must be True or False")
  if not cfg.ggr.split_gradients and (cfg.ggr.mode != "sum" or cfg.ggr.granularity == "per_sample"
                                      or cfg.ggr.sample_diagnostics):
    _fail("ggr.split_gradients", False, "only mode 'sum' without per-sample geometry can "
          "skip the separate gradients")
  if not isinstance(cfg.ggr.sample_diagnostics, bool):
    _fail("ggr.sample_diagnostics", cfg.ggr.sample_diagnostics, "must be True or False")
  if cfg.ggr.mode in SUBSPACE_MODES:
    _positive_int(cfg, "ggr.subspace_dim")
  _positive_int(cfg, "ggr.subspace_interval")
  start = cfg.ggr.start_step
  if not isinstance(start, int) or isinstance(start, bool) or start < 0:
    _fail("ggr.start_step", start, "must be an integer >= 0 (the first rectified step)")
  _number(cfg, "ggr.alpha", 0.0, float("inf"), high_open=True)
  _number(cfg, "ggr.aux_weight", 0.0, float("inf"), high_open=True)
  _optimizer(cfg)
  _number(cfg, "optim.lr", 0.0, float("inf"), low_open=True, high_open=True)
  _number(cfg, "optim.momentum", 0.0, 1.0, high_open=True)
  _number(cfg, "optim.weight_decay", 0.0, float("inf"), high_open=True)
  _number(cfg, "optim.ema", 0.0, 1.0, high_open=True)
  _choice(cfg, "train.input", ("device", "stream"))
  _choice(cfg, "eval.threshold", THRESHOLD_RULES)
  for field in ("steps", "steps_per_epoch", "batch_size", "uratio", "log_every", "eval_every",
                "checkpoint_every", "eval_batch_size", "prefetch", "nonfinite_patience"):
    _positive_int(cfg, f"train.{field}")
  if not isinstance(cfg.train.input_workers, int) or cfg.train.input_workers < 0:
    _fail("train.input_workers", cfg.train.input_workers, "must be 0 (a reader thread) or a "
          "number of Grain worker processes")
  if not isinstance(cfg.train.seed, int) or cfg.train.seed < 0:
    _fail("train.seed", cfg.train.seed, "must be a non-negative integer")
  _dataset(cfg)
  _eagc(cfg)
  _number(cfg, "dataset.test_fraction", 0.0, 1.0, low_open=True, high_open=True)
  _number(cfg, "dataset.prop_labeled", 0.0, 1.0, low_open=True, high_open=True)
  if not 0 <= cfg.augment.pad:
    _fail("augment.pad", cfg.augment.pad, "must be >= 0")
  _positive_int(cfg, "augment.num_ops")
  crop = cfg.augment.crop
  if not isinstance(crop, int) or isinstance(crop, bool) or crop < 0:
    _fail("augment.crop", crop, "must be an integer >= 0 (0: no crop)")
  if crop and cfg.dataset.name in ("imagenet30", "imagenet") and crop > cfg.dataset.image_size:
    _fail("augment.crop", crop, f"must not exceed dataset.image_size = {cfg.dataset.image_size}")
  _number(cfg, "augment.cutout", 0.0, 1.0)

  devices = num_devices or jax.device_count()
  for source, size in step_lib.source_sizes(cfg).items():
    if size % devices:
      raise ConfigError(
          f"the {source} batch of {cfg.algorithm} has {size} rows, not divisible by the "
          f"{devices} devices the batch is sharded over; make every source a multiple of "
          f"{devices} with --config.train.batch_size=... (and the algorithm's ratios, e.g. "
          "--config.train.uratio=...).")
