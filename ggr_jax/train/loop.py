"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly on signals."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ggr_jax import evaluate, ssl
from ggr_jax.data import augment, imagenet30, tfds_sources
from ggr_jax.data.digits import digits_split
from ggr_jax.data.openset import OpenSetSplit
from ggr_jax.data.stream import HostStream
from ggr_jax.models import build_model
from ggr_jax.ssl import openmatch
from ggr_jax.train import config as config_lib
from ggr_jax.train import distributed, optim, step as step_lib
from ggr_jax.train.checkpoint import Checkpointer
from ggr_jax.train.metrics_log import MetricsLog, NullLog
from ggr_jax.train.state import TrainState, create_train_state, make_apply_fn

# Fields that may differ when a run resumes (they do not change the trajectory).
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.input", "train.prefetch",
                     "train.eval_batch_size")


class Interrupted(Exception):
  """Raised by the signal handler's flag check; the loop saves before leaving."""


def load_split(cfg: ml_collections.ConfigDict) -> OpenSetSplit:
  """The open-set split of ``cfg.dataset`` (labeled draw from ``cfg.train.seed``)."""
  ds, seed = cfg.dataset, cfg.train.seed
  data_dir = ds.data_dir or None
  if ds.name == "digits":
    split = digits_split(id_classes=tuple(ds.id_classes), labels_per_class=ds.labels_per_class,
                         seed=seed, test_fraction=ds.test_fraction)
  elif ds.name == "cifar10":
    split = tfds_sources.cifar10_split(labels_per_class=ds.labels_per_class, seed=seed,
                                       data_dir=data_dir)
  elif ds.name == "cifar100":
    split = tfds_sources.cifar100_split(num_id_classes=ds.num_id_classes,
                                        labels_per_class=ds.labels_per_class, seed=seed,
                                        data_dir=data_dir)
  elif ds.name == "imagenet30":
    if data_dir is None:
      raise config_lib.ConfigError(
          "config.dataset.data_dir is empty: ImageNet-30 is read from a local root (the "
          "official data/imagenet30); set --config.dataset.data_dir=ROOT.")
    split = imagenet30.imagenet30_split(data_dir, labels=ds.in30_labels,
                                        image_size=ds.image_size)
  else:
    raise config_lib.ConfigError(f"config.dataset.name = {ds.name!r} has no loader.")
  if ds.max_test_images:
    split = dataclasses.replace(split, **_first_test_images(split, ds.max_test_images))
  return split


def _first_test_images(split: OpenSetSplit, n: int) -> dict[str, np.ndarray]:
  """The first ``n`` images of each test split (smoke runs evaluate on a few)."""
  return {name: getattr(split, name)[:n] for name in
          ("x_test_id", "y_test_id", "x_test_full", "y_test_full", "test_full_is_id")}


def _flat_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value

  walk(cfg.to_dict(), "")
  return out


def _check_same_run(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> None:
  path = workdir / "config.json"
  now = _flat_config(cfg)
  if path.exists():
    before = _flat_config(ml_collections.ConfigDict(json.loads(path.read_text())))
    changed = sorted(k for k in set(now) | set(before)
                     if k not in RESUMABLE_CHANGES and now.get(k) != before.get(k))
    if changed:
      raise config_lib.ConfigError(
          f"{workdir} holds a run with a different config ({', '.join(changed)}); resume it "
          "with the same config or choose a new --workdir.")
  distributed.barrier("ggr_jax.config_checked")  # every process read before process 0 writes
  if distributed.is_primary():
    path.write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True, default=list))


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (``config.json``)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not a ggr-jax workdir.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


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
    self.split = load_split(cfg)
    self.algorithm = cfg.algorithm
    self.model = build_model(cfg.model.backbone, self.split.num_classes, ssl.head(cfg.algorithm),
                             bn_momentum=cfg.model.bn_momentum)
    self.tx = optim.make_optimizer(cfg)
    self.mesh = Mesh(np.array(devices), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    mean, std = self.split.mean, self.split.std
    self.train_step = step_lib.make_train_step(cfg, self.model, self.tx, mean, std, self.mesh)
    self.forward = step_lib.make_eval_forward(self.model, mean, std, cfg.augment.crop)
    self._score_unlabeled = self._make_inlier_scorer(mean, std)

  # -- pieces ------------------------------------------------------------------------
  def _split_arrays(self) -> dict[str, np.ndarray]:
    s = self.split
    return {"x_labeled": s.x_labeled, "y_labeled": s.y_labeled.astype(np.int32),
            "x_unlabeled": s.x_unlabeled, "unlabeled_is_id": s.unlabeled_is_id}

  def _feed(self, state: TrainState, start: int):
    """What the step reads: the split on device, or the host stream of raw batches."""
    if self.cfg.train.input == "device":
      return _ResidentData(jax.device_put(self._split_arrays(), self.replicated))
    key = jax.random.fold_in(_host_copy(state.key), 0)
    selected = _host_copy(state.selected) if self.algorithm == "openmatch" else None
    return HostStream(self._split_arrays(), key, step_lib.source_sizes(self.cfg), self.mesh,
                      start, selected=selected, prefetch=self.cfg.train.prefetch)

  def _initial_state(self) -> TrainState:
    s = self.split
    state = create_train_state(self.model, self.tx, s.x_labeled.shape[1:],
                               s.x_unlabeled.shape[0], self.cfg.train.seed)
    return jax.device_put(state, self.replicated)

  def _make_inlier_scorer(self, mean, std):
    apply_fn = make_apply_fn(self.model)
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    aug = self.cfg.augment

    def view(key, image):  # one image's weak view, from its own key
      x = step_lib.crop_images(key, image[None].astype(jnp.float32) / 255.0, aug.crop, "random")
      return augment.weak_augment(key, x, pad=aug.pad, flip=aug.flip)[0]

    @jax.jit
    def score(params, batch_stats, images, key, first_row):
      rows = first_row + jnp.arange(images.shape[0])
      x = jax.vmap(view)(jax.vmap(lambda r: jax.random.fold_in(key, r))(rows), images)
      outputs, _ = apply_fn(params, batch_stats, augment.normalize(x, mean, std), False)
      return openmatch.select_inliers(outputs, self.cfg.openmatch.inlier_threshold)

    return score

  def _maybe_select_inliers(self, state: TrainState, feed) -> TrainState:
    """OpenMatch: the EMA model re-selects inliers at every epoch boundary from start_fix,
    scoring the unlabeled set in ``eval_batch_size`` chunks (fixed shapes, bounded memory;
    each image's weak view has its own key, so the chunk size does not change the result)."""
    if self.algorithm != "openmatch":
      return state
    step, cfg = int(state.step), self.cfg
    if step < cfg.openmatch.start_fix_steps or step % cfg.train.steps_per_epoch:
      return state
    key = jax.random.fold_in(jax.random.fold_in(state.key, 3), step)
    images, size = self.split.x_unlabeled, cfg.train.eval_batch_size
    parts = []
    for begin in range(0, images.shape[0], size):
      part = images[begin:begin + size]
      rows = part.shape[0]
      if rows < size:
        part = np.concatenate([part, np.zeros((size - rows, *part.shape[1:]), part.dtype)])
      flags = self._score_unlabeled(state.ema_params, state.batch_stats, part, key,
                                    np.int32(begin))
      parts.append(_host_copy(flags)[:rows])
    selected = np.concatenate(parts)
    feed.restart(step, selected)
    return state.replace(selected=jax.device_put(selected, self.replicated))

  def evaluate(self, state: TrainState) -> dict[str, Any]:
    """Closed-set accuracy (ID test) and open-set metrics (full test) with EMA weights."""
    s, bs = self.split, self.cfg.train.eval_batch_size
    out_id = step_lib.predict(self.forward, state.ema_params, state.batch_stats, s.x_test_id, bs)
    out_full = step_lib.predict(self.forward, state.ema_params, state.batch_stats,
                                s.x_test_full, bs)
    result = evaluate.evaluate_outputs(self.algorithm, out_id, s.y_test_id, out_full,
                                       s.y_test_full, s.num_classes)
    result["closed_per_class_acc"] = evaluate.per_class_accuracy(
        out_id["logits"].argmax(-1), s.y_test_id, s.num_classes).tolist()
    return result

  def restore(self, ckpt: Checkpointer) -> TrainState:
    """The newest checkpoint of the workdir, or a fresh state."""
    state = self._initial_state()
    return state if ckpt.latest_step() is None else ckpt.restore(state)

  # -- the loop ----------------------------------------------------------------------
  def run(self) -> dict[str, Any] | None:
    """Trains to ``train.steps``; returns the summary, or None if stopped by a signal."""
    cfg, workdir = self.cfg, self.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    _check_same_run(workdir, cfg)
    ckpt = Checkpointer(workdir)
    state = self.restore(ckpt)
    start = int(state.step)
    primary = distributed.is_primary()  # the one process that logs, prints and summarizes
    log = MetricsLog(workdir, resume_step=start) if primary else NullLog()
    feed = self._feed(state, start)
    total, pending, last_eval = cfg.train.steps, [], None
    bar = _progress(start, total, self.progress and primary)
    t0, wall_start, step = time.perf_counter(), time.perf_counter(), start
    try:
      with _stop_on_signals() as received:
        while step < total:
          state = self._maybe_select_inliers(state, feed)
          state, metrics = self.train_step(state, feed.next(step))
          pending.append(metrics)
          step += 1
          if step % cfg.train.log_every == 0 or step == total:
            means = _mean_metrics(pending)
            rate = len(pending) / max(time.perf_counter() - t0, 1e-9)
            means["monitors/steps_per_s"] = rate
            log.write(step, "train", means)
            bar.update(len(pending))
            bar.set_postfix(loss=f"{means['losses/total']:.3f}", it_s=f"{rate:.1f}")
            pending, t0 = [], time.perf_counter()
          if step % cfg.train.eval_every == 0 or step == total:
            last_eval = self.evaluate(state)
            log.write(step, "eval", _scalars(last_eval))
          if step % cfg.train.checkpoint_every == 0 or step == total:
            ckpt.save(state)
          if self.on_step is not None:
            self.on_step(step)
          if _stop_agreed(received, step, cfg.train.log_every):
            raise Interrupted(signal.Signals(received[0]).name if received
                              else "a signal to another process")
    except Interrupted as stop:
      ckpt.save(state)
      ckpt.close()
      log.close()
      bar.close()
      if primary:
        print(f"\n{stop} received: checkpoint saved at step {int(state.step)} in "
              f"{workdir / 'checkpoints'}; run the same command to resume.")
      return None
    finally:
      feed.close()
    ckpt.close()
    log.close()
    bar.close()
    if last_eval is None:  # resumed a finished run
      last_eval = self.evaluate(state)
    summary = self._summary(last_eval, step, time.perf_counter() - wall_start, start)
    if primary:
      (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

  def _summary(self, ev: dict[str, Any], step: int, wall: float, start: int) -> dict[str, Any]:
    history = _read_train(self.workdir) if distributed.is_primary() else []
    diag = {}
    for k in ("ggr/cos_before", "ggr/conflict", "ggr/aux_norm_kept"):
      values = [r[k] for r in history if isinstance(r.get(k), float)]
      if values:
        diag[f"mean_{k}"] = float(np.mean(values))
    return {
        "closed_acc": ev["closed_acc"], "open_bacc": ev["open_bacc"], "auroc": ev["auroc"],
        "closed_per_class_acc": ev["closed_per_class_acc"],
        "open_per_class_acc": list(ev["per_class_acc"]), "threshold": ev["threshold"], "steps": step, "resumed_from": start,
        "wall_s": wall, "algorithm": self.algorithm, "ggr_mode": self.cfg.ggr.mode,
        "unlabeled_ood_fraction": float(1.0 - np.mean(self.split.unlabeled_is_id)),
        "seed": self.cfg.train.seed, "device": self.mesh.devices.flat[0].device_kind,
        "num_devices": self.mesh.devices.size, "num_processes": jax.process_count(), **diag,
        "config": _flat_config(self.cfg),
    }


class _ResidentData:
  """``train.input="device"``: the whole split on device; the step samples its batch."""

  def __init__(self, data: dict[str, jax.Array]):
    self.data = data

  def next(self, step: int) -> dict[str, jax.Array]:  # pylint: disable=unused-argument
    return self.data

  def restart(self, step: int, selected=None) -> None:
    pass

  def close(self) -> None:
    pass


def _host_copy(array: jax.Array) -> np.ndarray:
  """This process's copy of a replicated array (also in a multi-process run)."""
  return np.asarray(array.addressable_data(0))


def _stop_agreed(received: list[int], step: int, log_every: int) -> bool:
  """Whether to stop after ``step``. Processes of a multi-process run agree (any signal
  stops all) at log steps only, so the stop costs no extra host sync between them."""
  if jax.process_count() == 1:
    return bool(received)
  if step % log_every:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.process_allgather(np.array(bool(received))).any())


def _read_train(workdir: pathlib.Path) -> list[dict[str, Any]]:
  from ggr_jax.train.metrics_log import read  # pylint: disable=import-outside-toplevel
  return [r for r in read(workdir) if r["split"] == "train"]


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(pending)  # the one host sync per log interval
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _scalars(result: dict[str, Any]) -> dict[str, float]:
  return {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}


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
  """Trains (or resumes) the run of ``cfg`` in ``workdir``; see :class:`Trainer`."""
  return Trainer(cfg, workdir, progress).run()
