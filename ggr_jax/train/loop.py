"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly on signals."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import time
import warnings
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ggr_jax import allocator, evaluate, rundir
from ggr_jax.data import gcd_sources, imagenet30, imagenet_subset, openset, tfds_sources
from ggr_jax.data.digits import digits_closed_split, digits_gcd_split, digits_split
from ggr_jax.data.openset import OpenSetSplit
from ggr_jax.train import build as build_lib
from ggr_jax.train import config as config_lib
from ggr_jax.train import distributed, eagc, step as step_lib
from ggr_jax.train.checkpoint import CheckpointWriteError, Checkpointer
from ggr_jax.train.feeds import split_arrays
from ggr_jax.train.metrics_log import MetricsLog, NullLog
from ggr_jax.train.state import TrainState

RESUMABLE_CHANGES = rundir.RESUMABLE_CHANGES  # kept for importers of the old name
RAW_PREFIX = "eval_raw"  # metrics.jsonl keys of the raw (non-EMA) weights' evaluation
OFFICIAL_METRICS = ("closed_acc", "open_bacc", "auroc")


class Interrupted(Exception):
  """Raised by the signal handler's flag check; the loop saves before leaving."""


class Diverged(RuntimeError):
  """The loss or a gradient was non-finite for ``train.nonfinite_patience`` steps."""


class _FiniteGuard:
  """Counts consecutive steps whose ``monitors/finite`` is 0, reading them from the
  device only at the loop's sync points (logging, evaluation, checkpoints)."""

  def __init__(self, patience: int):
    self.patience, self.streak, self.first_bad, self._unread = patience, 0, None, []

  def add(self, step: int, finite: jax.Array) -> None:
    self._unread.append((step, finite))

  def check(self, workdir: pathlib.Path, lr: float) -> None:
    """Raises :class:`Diverged` if the streak reached the patience."""
    values = jax.device_get([v for _, v in self._unread])
    for (step, _), finite in zip(self._unread, values):
      if finite:
        self.streak, self.first_bad = 0, None
      else:
        self.streak += 1
        self.first_bad = step if self.first_bad is None else self.first_bad
      if self.streak >= self.patience:
        self._unread = []
        newest = rundir.latest_checkpoint_step(workdir)
        kept = f"step {newest}" if newest is not None else "none yet"
        raise Diverged(
            f"the run diverged: the loss or a gradient is non-finite from step "
            f"{self.first_bad} ({self.streak} consecutive steps); stopped without "
            f"evaluating or checkpointing it (newest checkpoint: {kept}). Lower optim.lr "
            f"(now {lr:g}) or start from a checkpoint before the divergence; "
            "train.nonfinite_patience sets the tolerated streak.")
    self._unread = []


def load_split(cfg: ml_collections.ConfigDict) -> OpenSetSplit:
  """The split of ``cfg.dataset`` under ``cfg.dataset.protocol`` (labeled draw from
  ``cfg.train.seed``).

  Raises:
    ConfigError: a split the dataset fields cannot make (too many labels per class, an
      unknown or repeated ID class, data that are not prepared or are damaged), in one
      line naming the fields.
  """
  try:
    split = _load_split(cfg)
  except config_lib.ConfigError:
    raise
  except (ValueError, TypeError, FileNotFoundError) as err:
    raise config_lib.ConfigError(
        f"config.dataset ({cfg.dataset.name}, {cfg.dataset.get('protocol', 'openset')}): "
        f"{err}") from None
  if not split.is_closed_set and not (0 < int(np.sum(split.test_full_is_id))
                                      < len(split.test_full_is_id)):
    warnings.warn(f"the test split of {split.name} holds only ID or only OOD images "
                  f"(dataset.max_test_images = {cfg.dataset.max_test_images}): AUROC will be "
                  "NaN; evaluate on more images (0: all).", stacklevel=2)
  return split


def _load_split(cfg: ml_collections.ConfigDict) -> OpenSetSplit:
  ds, seed = cfg.dataset, cfg.train.seed
  data_dir = ds.data_dir or None
  closed = ds.get("protocol", "openset") == "closed"
  if ds.get("protocol") == "gcd" and ds.name in gcd_sources.GCD_SOURCES:
    split = gcd_sources.gcd_split(ds.name, prop_labeled=ds.prop_labeled, seed=seed,
                                  image_size=ds.image_size, data_dir=data_dir)
  elif ds.name == "digits" and ds.get("protocol") == "gcd":
    split = digits_gcd_split(old_classes=tuple(ds.id_classes), prop_labeled=ds.prop_labeled,
                             seed=seed, test_fraction=ds.test_fraction)
  elif ds.name == "digits" and closed:
    split = digits_closed_split(labels_per_class=ds.labels_per_class, seed=seed,
                                test_fraction=ds.test_fraction)
  elif ds.name == "digits":
    split = digits_split(id_classes=tuple(ds.id_classes), labels_per_class=ds.labels_per_class,
                         seed=seed, test_fraction=ds.test_fraction)
  elif ds.name in ("cifar10", "cifar100", "svhn") and closed:
    loader = {"cifar10": tfds_sources.cifar10_closed_split,
              "cifar100": tfds_sources.cifar100_closed_split,
              "svhn": tfds_sources.svhn_closed_split}[ds.name]
    split = loader(labels_per_class=ds.labels_per_class, seed=seed, data_dir=data_dir)
  elif ds.name == "cifar10":
    split = tfds_sources.cifar10_split(labels_per_class=ds.labels_per_class, seed=seed,
                                       data_dir=data_dir)
  elif ds.name == "cifar100":
    split = tfds_sources.cifar100_split(num_id_classes=ds.num_id_classes,
                                        labels_per_class=ds.labels_per_class, seed=seed,
                                        data_dir=data_dir)
  elif ds.name == "imagenet":
    split = imagenet_subset.imagenet_subset_split(ds.imagenet_subset, image_size=ds.image_size,
                                                  data_dir=data_dir)
  elif ds.name == "imagenet30":
    if data_dir is None:
      raise config_lib.ConfigError(
          "config.dataset.data_dir is empty: ImageNet-30 is read from a local root (the "
          "official data/imagenet30); set --config.dataset.data_dir=ROOT.")
    split = imagenet30.imagenet30_split(data_dir, labels=ds.in30_labels,
                                        image_size=ds.image_size,
                                        on_bad_image=ds.on_bad_image)
  else:
    raise config_lib.ConfigError(f"config.dataset.name = {ds.name!r} has no loader.")
  if ds.get("unlabeled_excludes_labeled", False):
    split = openset.exclude_labeled(split)
  if ds.max_test_images:
    split = dataclasses.replace(split, **_first_test_images(split, ds.max_test_images))
  return split


def _first_test_images(split: OpenSetSplit, n: int) -> dict[str, np.ndarray]:
  """The first ``n`` images of each test split (smoke runs evaluate on a few)."""
  return {name: getattr(split, name)[:n] for name in
          ("x_test_id", "y_test_id", "x_test_full", "y_test_full", "test_full_is_id")}


def _check_same_run(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> None:
  path = rundir.path(workdir, rundir.CONFIG)
  if path.exists():
    changed = rundir.config_diff(rundir.read_json(path), cfg.to_dict())
    if changed:
      raise config_lib.ConfigError(
          f"{workdir} holds a run with a different config ({', '.join(changed)}); resume it "
          "with the same config or choose a new --workdir.")
  elif rundir.latest_checkpoint_step(workdir) is not None:
    stored = _checkpoint_config(workdir)
    if stored is None:
      raise config_lib.ConfigError(
          f"{workdir} holds checkpoints but no {rundir.CONFIG}, so the config they were "
          f"trained with cannot be checked; restore {path} or choose a new --workdir.")
    step, before = stored
    changed = rundir.config_diff(before, cfg.to_dict())
    if changed:
      raise config_lib.ConfigError(
          f"{workdir} lost its {rundir.CONFIG}, and its checkpoint (step {step}) was trained "
          f"with a different config ({', '.join(changed)}); resume it with the same config "
          "or choose a new --workdir.")
    warnings.warn(f"{path} was missing; the config matches the one stored in checkpoint "
                  f"step {step}, so it is written again.", stacklevel=2)
  distributed.barrier("ggr_jax.config_checked")  # every process read before process 0 writes
  if distributed.is_primary():
    rundir.write_json(path, cfg.to_dict(), sort_keys=True, default=list)


def _checkpoint_config(workdir: pathlib.Path) -> tuple[int, dict] | None:
  """``(step, config)`` of the newest checkpoint that stores its run's config."""
  for step in reversed(rundir.checkpoint_steps(workdir)):
    file = rundir.checkpoint_dir(workdir) / str(step) / rundir.STEP_CONFIG
    if file.exists():
      return step, rundir.read_json(file)
  return None


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (``config.json``)."""
  return ml_collections.ConfigDict(rundir.read_config(workdir))


@contextlib.contextmanager
def _stop_on_signals():
  """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""
  received: list[int] = []
  handlers = {}

  def handler(signum, frame):  # pylint: disable=unused-argument
    received.append(signum)

  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      handlers[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers, no clean stop
      pass
  try:
    yield received
  finally:
    for sig, old in handlers.items():
      signal.signal(sig, old)


class Trainer:
  """One run in one workdir. ``run()`` trains (resuming if possible) and returns the summary."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path,
               progress: bool = True, devices: list | None = None,
               on_step: Callable[[int], None] | None = None):
    devices = list(jax.devices() if devices is None else devices)
    config_lib.validate(cfg, num_devices=len(devices))
    self.cfg, self.progress, self.on_step = cfg, progress, on_step
    self.workdir = pathlib.Path(workdir)
    began, age = time.perf_counter(), _process_age()
    self.split = load_split(cfg)
    loaded = time.perf_counter()
    self.program = build_lib.build(cfg, build_lib.DataSpec.of_split(self.split),
                                   build_lib.make_mesh(devices))
    # where the time to the first step goes (reported in the summary's "startup")
    self.startup = {"before_trainer_s": age, "data_s": loaded - began,
                    "build_s": time.perf_counter() - loaded}
    self._created = time.perf_counter()
    self.algorithm = self.program.algorithm
    self.mesh = self.program.mesh

  def restore(self, ckpt: Checkpointer) -> TrainState:
    """The newest checkpoint of the workdir, or a fresh state."""
    state = self.program.init_state()
    if ckpt.latest_step() is not None:
      return ckpt.restore(state)
    return self._from_reference(state) if eagc.enabled(self.cfg) else state

  def _from_reference(self, state: TrainState) -> TrainState:
    """EAGC's first stage (:mod:`ggr_jax.train.eagc`): the reference run in
    ``<workdir>/reference`` (resumed if interrupted), then the state started from it."""
    reference = state
    if self.cfg.eagc.reference_steps > 0:
      trainer = Trainer(eagc.reference_config(self.cfg),
                        rundir.path(self.workdir, rundir.REFERENCE),
                        progress=self.progress, devices=list(self.mesh.devices.flat))
      if trainer.run() is None:  # it printed where it saved and how to resume
        raise Interrupted("a signal during the reference run")
      ckpt = Checkpointer(trainer.workdir)
      reference = trainer.restore(ckpt)
      ckpt.close()
    feats = step_lib.predict(self.program.eval_forward, reference.params,
                             reference.batch_stats, self.split.x_labeled,
                             self.cfg.train.eval_batch_size)["feat"]
    state = eagc.from_reference(state, reference.params, reference.batch_stats, feats,
                                self.cfg.eagc.aperture)
    return jax.device_put(state, self.program.replicated)

  def evaluate(self, state: TrainState, weights: str = "ema") -> dict[str, Any]:
    """Closed-set accuracy (ID test) and open-set metrics (full test) with the EMA
    (``weights="ema"``) or the raw (``"raw"``) weights and the live BatchNorm statistics;
    on a closed-set split, :func:`evaluate.closed_set_metrics` of the test split."""
    s, bs = self.split, self.cfg.train.eval_batch_size
    forward = self.program.eval_forward
    params = {"ema": state.ema_params, "raw": state.params}[weights]
    out_id = step_lib.predict(forward, params, state.batch_stats, s.x_test_id, bs)
    if s.num_old_classes is not None:  # category discovery: transductive and test
      out_ulb = step_lib.predict(forward, params, state.batch_stats, s.x_unlabeled, bs)
      return {**evaluate.category_discovery_metrics(out_ulb["logits"], s.y_unlabeled,
                                                    out_id["logits"], s.y_test_id,
                                                    s.num_old_classes),
              **self._feature_diagnostics(state, out_ulb["feat"])}
    if s.is_closed_set:  # labels read after the images: on-demand tables cached them
      return {"protocol": "closed",
              **evaluate.closed_set_metrics(out_id["logits"], s.y_test_id[:], s.num_classes)}
    out_full = step_lib.predict(forward, params, state.batch_stats, s.x_test_full, bs)
    result = evaluate.evaluate_outputs(self.algorithm.ood_score, out_id, s.y_test_id, out_full,
                                       s.y_test_full, s.num_classes, self.cfg.eval.threshold)
    result["closed_per_class_acc"] = evaluate.per_class_accuracy(
        out_id["logits"].argmax(-1), s.y_test_id, s.num_classes).tolist()
    if eagc.enabled(self.cfg):  # where the coordinator puts ID and OOD unlabeled images
      feats = step_lib.predict(forward, params, state.batch_stats, s.x_unlabeled, bs)["feat"]
      result.update(self._feature_diagnostics(state, feats))
    return result

  def _feature_diagnostics(self, state: TrainState, features: np.ndarray) -> dict[str, Any]:
    """``eagc_*``: :func:`eagc.feature_diagnostics` of the unlabeled images' features."""
    found = eagc.feature_diagnostics(features, self.split.unlabeled_is_id, state.coordinator,
                                     self.cfg)
    return {f"eagc_{k}": v for k, v in found.items()}

  # -- the loop ----------------------------------------------------------------------
  def run(self) -> dict[str, Any] | None:
    """Trains to ``train.steps``; returns the summary, or None if stopped by a signal.

    The primary process holds the workdir's lock throughout (:func:`rundir.exclusive`):
    a second trainer of the same workdir stops at once.
    """
    rundir.make_workdir(self.workdir)
    with _workdir_lock(self.workdir):
      return self._run()

  def _run(self) -> dict[str, Any] | None:
    cfg, workdir = self.cfg, self.workdir
    _check_same_run(workdir, cfg)
    ckpt = Checkpointer(workdir, config=cfg.to_dict())
    try:
      state = self.restore(ckpt)
    except Interrupted:  # during EAGC's reference run, which saved its own checkpoint
      ckpt.close()
      return None
    start = int(state.step)
    self.startup["state_s"] = time.perf_counter() - self._created
    primary = distributed.is_primary()  # the one process that logs, prints and summarizes
    log = MetricsLog(workdir, resume_step=start) if primary else NullLog()
    feed = self.program.feed(split_arrays(self.split), state, start, ckpt.feed_state(start))
    total, pending, last_eval = cfg.train.steps, _load_pending(workdir, start), None

    def save(state):  # the checkpoint, and the metrics of the unfinished log interval
      if primary:
        _save_pending(workdir, int(state.step), pending)
      ckpt.save(state, feed.state())

    bar = _progress(start, total, self.progress and primary)
    t0, wall_start, step = time.perf_counter(), time.perf_counter(), start
    guard = _FiniteGuard(cfg.train.nonfinite_patience)
    try:
      with _stop_on_signals() as received:
        while step < total:
          state = self.program.epoch_boundary(state, step, self.split.x_unlabeled, feed)
          batch = feed.next(step)
          if step == start:  # compile first, then hand the compiler's freed heap back
            self.program.train_step.lower(state, batch).compile()
            allocator.return_freed_memory()
          state, metrics = self.program.train_step(state, batch)
          pending.append(metrics)
          guard.add(step, metrics["monitors/finite"])
          step += 1
          if step == start + 1:  # one host sync, to time the compile and the first step
            jax.block_until_ready(metrics["monitors/finite"])
            self._first_step_done()
          at_log = step % cfg.train.log_every == 0 or step == total
          if at_log:
            means = _mean_metrics(pending)
            rate = len(pending) / max(time.perf_counter() - t0, 1e-9)
            means["monitors/steps_per_s"] = rate
            log.write(step, "train", means)
            bar.update(len(pending))
            bar.set_postfix(loss=f"{means['losses/total']:.3f}", it_s=f"{rate:.1f}")
            pending, t0 = [], time.perf_counter()
          if at_log or step % cfg.train.eval_every == 0 or step % cfg.train.checkpoint_every == 0:
            guard.check(workdir, cfg.optim.lr)
          if step % cfg.train.eval_every == 0 or step == total:
            last_eval = self.evaluate(state)
            raw = self.evaluate(state, "raw")  # for the official figures (see _summary)
            log.write(step, "eval", {**_scalars(last_eval), **_scalars(raw, RAW_PREFIX)})
          if (step % cfg.train.checkpoint_every == 0 or step == total) and not guard.streak:
            save(state)  # never a state from a non-finite step
          ckpt.check()  # a failed background write stops the run now
          if self.on_step is not None:
            self.on_step(step)
          if _stop_agreed(received, step, cfg.train.log_every):
            raise Interrupted(signal.Signals(received[0]).name if received
                              else "a signal to another process")
    except Interrupted as stop:
      try:
        guard.check(workdir, cfg.optim.lr)  # a diverged state is not saved either
        if not guard.streak:
          save(state)
      finally:
        ckpt.close()
        log.close()
        bar.close()
      if primary:
        saved = f"saved at step {int(state.step)}" if not guard.streak else (
            f"kept at step {rundir.latest_checkpoint_step(workdir)} (step "
            f"{int(state.step)} is non-finite)")
        print(f"\n{stop} received: checkpoint {saved} in "
              f"{rundir.checkpoint_dir(workdir)}; run the same command to resume.")
      return None
    except Diverged:
      ckpt.close()
      log.close()
      bar.close()
      raise
    except CheckpointWriteError:  # the writer is broken: nothing more to wait for
      ckpt.abandon()
      log.close()
      bar.close()
      raise
    finally:
      feed.close()
    ckpt.close()
    log.close()
    bar.close()
    if last_eval is None:  # resumed a finished run
      last_eval = self.evaluate(state)
    summary = self._summary(last_eval, step, time.perf_counter() - wall_start, start)
    if primary:
      rundir.write_json(rundir.path(workdir, rundir.SUMMARY), summary)
    return summary

  def _first_step_done(self) -> None:
    """``startup``: seconds before the trainer (the process's imports, from ``/proc``;
    None off Linux), loading the data, building the program, the initial or restored
    state (EAGC's reference stage included), the first step (its compile) and in all."""
    now = time.perf_counter()
    took = self.startup
    took["first_step_s"] = now - self._created - took["state_s"]  # the compile, mostly
    took["to_first_step_s"] = (took["before_trainer_s"] or 0.0) + took["data_s"] + \
        took["build_s"] + now - self._created

  def _summary(self, ev: dict[str, Any], step: int, wall: float, start: int) -> dict[str, Any]:
    records = _read_log(self.workdir) if distributed.is_primary() else []
    history = [r for r in records if r["split"] == "train"]
    diag = {}
    for k in ("ggr/cos_before", "ggr/conflict", "ggr/aux_norm_kept", "diagnostics/gdc"):
      values = [r[k] for r in history if isinstance(r.get(k), float)]
      if values:
        diag[f"mean_{k}"] = float(np.mean(values))
    nan = float("nan")
    if ev.get("protocol") == "gcd":
      protocol = {k: v for k, v in ev.items() if k.startswith(("gcd_", "protocol", "eagc_"))}
    elif self.split.is_closed_set:
      protocol = {"protocol": "closed", "top5_acc": ev.get("top5_acc", nan),
                  "mean_class_acc": ev["mean_class_acc"]}
    else:
      protocol = {"protocol": "openset", "open_per_class_acc": list(ev["per_class_acc"]),
                  "threshold": ev["threshold"],
                  **{k: v for k, v in ev.items() if k.startswith("eagc_")}}
    return {
        "closed_acc": ev["closed_acc"], "open_bacc": ev.get("open_bacc", nan),
        "auroc": ev.get("auroc", nan),
        **official_figures([r for r in records if r["split"] == "eval"]),
        "closed_per_class_acc": ev["closed_per_class_acc"], **protocol,
        "steps": step, "resumed_from": start,
        "wall_s": wall, "startup": dict(self.startup),
        "algorithm": self.algorithm.name, "ggr_mode": self.cfg.ggr.mode,
        "unlabeled_ood_fraction": float(1.0 - np.mean(self.split.unlabeled_is_id)),
        "seed": self.cfg.train.seed, "device": self.mesh.devices.flat[0].device_kind,
        "num_devices": self.mesh.devices.size, "num_processes": jax.process_count(), **diag,
        "config": rundir.flatten(self.cfg.to_dict()),
    }


def _stop_agreed(received: list[int], step: int, log_every: int) -> bool:
  """Whether to stop after ``step``. Processes of a multi-process run agree (any signal
  stops all) at log steps only, so the stop costs no extra host sync between them."""
  if jax.process_count() == 1:
    return bool(received)
  if step % log_every:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.process_allgather(np.array(bool(received))).any())


def official_figures(evals: list[dict[str, Any]]) -> dict[str, Any]:
  """The figures the official code reports, from a run's evaluation records.

  Official closed-set accuracy is the best EMA accuracy over the evaluations, selected
  on the test split itself (the first of equal ones, as the official ``>`` keeps it);
  the official open-set numbers are ``eval.py``'s on that step's ``model_best.pth``,
  whose raw (non-EMA) weights it loads. Returns ``official_closed_acc``,
  ``official_open_bacc``, ``official_auroc`` and ``official_step`` (empty without evals).
  Category discovery (SimGCD's and EAGC's code) logs the evaluation with the best
  transductive All accuracy, selected on that same split: ``official_gcd_all``,
  ``official_gcd_old``, ``official_gcd_new`` and ``official_gcd_step``.
  """
  scored = [r for r in evals if isinstance(r.get("eval/closed_acc"), float)]
  if not scored:
    return {}
  best = max(scored, key=lambda r: (r["eval/closed_acc"], -r["step"]))
  figures = {"official_closed_acc": best["eval/closed_acc"], "official_step": best["step"]}
  for name in OFFICIAL_METRICS[1:]:
    figures[f"official_{name}"] = best.get(f"{RAW_PREFIX}/{name}", float("nan"))
  gcd = [r for r in scored if isinstance(r.get("eval/gcd_all"), float)]
  if gcd:
    best = max(gcd, key=lambda r: (r["eval/gcd_all"], -r["step"]))
    figures.update({f"official_gcd_{k}": best[f"eval/gcd_{k}"] for k in ("all", "old", "new")},
                   official_gcd_step=best["step"])
  return figures


def _process_age() -> float | None:
  """Seconds since this process started (imports included), from ``/proc`` (Linux);
  None elsewhere."""
  try:
    fields = pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None


def _read_log(workdir: pathlib.Path) -> list[dict[str, Any]]:
  from ggr_jax.train.metrics_log import read  # pylint: disable=import-outside-toplevel
  return read(workdir)


def _pending_file(workdir: pathlib.Path, step: int) -> pathlib.Path:
  return rundir.path(workdir, rundir.PENDING) / f"{step}.json"


def _save_pending(workdir: pathlib.Path, step: int, pending: list[dict[str, Any]]) -> None:
  """The unfinished interval's per-step metrics at checkpoint ``step`` (values with their
  dtypes, so that the resumed means are computed from the same numbers); files of steps
  without a checkpoint any more are dropped."""
  records = [{k: [np.asarray(v).item(), np.asarray(v).dtype.name] for k, v in m.items()}
             for m in jax.device_get(pending)]
  folder = rundir.path(workdir, rundir.PENDING)
  folder.mkdir(exist_ok=True)
  rundir.write_json(_pending_file(workdir, step), records)
  kept = {step, *rundir.checkpoint_steps(workdir)}
  for file in folder.glob("*.json"):
    if file.stem.isdigit() and int(file.stem) not in kept:
      file.unlink(missing_ok=True)


def _load_pending(workdir: pathlib.Path, step: int) -> list[dict[str, Any]]:
  """The metrics :func:`_save_pending` kept at ``step`` (none if it kept none)."""
  file = _pending_file(workdir, step)
  if not step or not file.exists():
    return []
  return [{k: np.asarray(value, dtype) for k, (value, dtype) in record.items()}
          for record in rundir.read_json(file)]


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means over the interval; NaN entries (a metric not measured at a step, e.g. a group
  mean over an empty group) are skipped, and a metric measured at no step is NaN."""
  host = jax.device_get(pending)  # the one host sync per log interval
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
    return {k: float(np.nanmean([m[k] for m in host])) for k in host[0]}


def _scalars(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in result.items() if isinstance(v, (int, float))}


class _NoBar:
  def update(self, n):
    pass

  def set_postfix(self, **kwargs):
    pass

  def close(self):
    pass


def _progress(start: int, total: int, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def train(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          progress: bool = True) -> dict[str, Any] | None:
  """Trains (or resumes) the run of ``cfg`` in ``workdir``; see :class:`Trainer`. The
  workdir's lock is taken before the data and the program are built."""
  rundir.make_workdir(workdir)
  with _workdir_lock(workdir):
    return Trainer(cfg, workdir, progress).run()


def _workdir_lock(workdir: str | pathlib.Path):
  """The workdir's lock in the primary process (the others share its run)."""
  return rundir.exclusive(workdir) if distributed.is_primary() else contextlib.nullcontext()
