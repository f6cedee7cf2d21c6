"""The run directory (workdir) contract, in one place; imports no JAX.

A workdir holds one run::

  config.json     the run's config (nested JSON), written when the run starts
  summary.json    final metrics, diagnostics and the flat config, written when it ends
  eval.json       ``ggr-jax eval``'s result
  metrics.jsonl   one JSON record per log interval and per evaluation
  tb/             TensorBoard event files
  checkpoints/    orbax step folders ``<step>/``
  checksums/      ``<step>.json``: the SHA-256 of every file of a finished checkpoint
  damaged/        checkpoint folders that failed verification, moved aside
  .lock           held (``flock``) by the trainer of the workdir, naming its host and pid

The trainer, ``ggr-jax eval``, the sweep and the report all read and write it through
this module: the file names, which config fields may change when a run resumes, config
flattening and diffing, and the newest checkpoint step.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import tempfile
import time
from typing import Any, Iterator, Mapping

CONFIG = "config.json"
SUMMARY = "summary.json"
EVAL = "eval.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
CHECKSUMS = "checksums"
DAMAGED = "damaged"
# the per-step metrics of the unfinished log interval at each checkpoint (<step>.json), so
# that a resumed run logs the same interval means as an uninterrupted one
PENDING = "pending_metrics"
# the run's config inside each checkpoint step folder (written with its digests)
STEP_CONFIG = "run_config.json"
# EAGC's reference stage: a run of its own inside the run's workdir
REFERENCE = "reference"
# the output of a sweep cell's trainer (``ggr-jax sweep`` appends each attempt)
SWEEP_LOG = "log.txt"
# the input pipeline's state inside each checkpoint step folder (``train.input=stream``)
INPUT_STATE = "input_state.json"

# Fields that may differ when a run resumes: none changes the trajectory (cadence of
# logging, evaluation and checkpoints; how the same batches reach the device; where the
# data set is read from). The same fields never tell two runs apart in a report.
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.input", "train.prefetch", "train.input_workers", "train.eval_batch_size",
                     "dataset.data_dir", "dataset.on_bad_image", "eval.threshold", "train.nonfinite_patience")
# Fields added to the config after runs existed, with the value that keeps the behaviour
# those runs had: a stored config without the field resumes under that value (any other
# value is a change of run).
ADDED_FIELDS = {
    "dataset.prop_labeled": 0.5, "dataset.unlabeled_excludes_labeled": False,
    "optim.schedule": "usb_cosine", "optim.warmup_steps": 0, "optim.milestones": [],
    "optim.decay_factor": 0.1, "optim.decay": "kernels",
    "eagc.terms": "off", "eagc.aperture": 2.0, "eagc.beta": 0.5, "eagc.aga_weight": 0.7,
    "eagc.momentum": 0.95, "eagc.reference_steps": 200, "eagc.reference_lr": 0.0,
    "model.pretrained": "", "model.vit.patch_size": 16, "model.vit.grad_from_block": 11,
    "model.vit.depth": 0, "train.input_workers": 0,
    "dataset.on_bad_image": "stop",
}


def path(workdir: str | os.PathLike, name: str) -> pathlib.Path:
  """``workdir / name`` for one of this module's file names."""
  return pathlib.Path(workdir) / name


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a.b": value}`` from a nested config dict (or ``ConfigDict.to_dict()``), with
  tuples as lists, as they read back from JSON.

  >>> flatten({"train": {"steps": 5, "ids": (1, 2)}, "algorithm": "fixmatch"})
  {'train.steps': 5, 'train.ids': [1, 2], 'algorithm': 'fixmatch'}
  """
  out: dict[str, Any] = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return json.loads(json.dumps(out, default=list))


def config_diff(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """Flat fields that differ between two configs (nested or flat dicts), ignoring
  :data:`RESUMABLE_CHANGES` and the :data:`ADDED_FIELDS` ``before`` predates (absent
  there, at their old-behaviour value now).

  >>> config_diff({"train": {"steps": 5, "log_every": 1}}, {"train": {"steps": 6}})
  ['train.steps']
  >>> config_diff({}, {"eagc": {"terms": "off"}}), config_diff({}, {"eagc": {"terms": "eep"}})
  ([], ['eagc.terms'])
  """
  before, now = flatten(before), flatten(now)
  predates = {k for k, old in ADDED_FIELDS.items() if k not in before and now.get(k) == old}
  return sorted(k for k in set(before) | set(now) if k not in RESUMABLE_CHANGES
                and k not in predates and before.get(k) != now.get(k))


class WorkdirError(ValueError):
  """A workdir file that cannot be used as it is; the message names it and the fix."""


def read_json(file: str | os.PathLike) -> Any:
  """The JSON value of a workdir file; :class:`WorkdirError` naming it if it is empty or
  garbled (this module writes atomically, so that is damage from outside)."""
  file = pathlib.Path(file)
  text = file.read_text()
  try:
    return json.loads(text)
  except ValueError as err:
    what = "empty" if not text.strip() else f"not valid JSON ({err})"
    raise WorkdirError(f"{file} is {what}; restore it from a copy, or move the workdir "
                       "aside and start the run again.") from None


def write_json(file: str | os.PathLike, value: Any, **dumps_kwargs: Any) -> None:
  """Writes ``value`` as JSON atomically (see :func:`write_text`)."""
  write_text(file, json.dumps(value, **{"indent": 1, **dumps_kwargs}))


def write_text(file: str | os.PathLike, text: str) -> None:
  """Writes ``text`` atomically (a temporary file in the same folder, then a rename), so
  a reader never sees a half-written file."""
  file = pathlib.Path(file)
  fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, file)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def read_config(workdir: str | os.PathLike) -> dict[str, Any]:
  """The nested config a workdir was trained with."""
  file = path(workdir, CONFIG)
  if not file.exists():
    raise FileNotFoundError(f"{file} not found: {workdir} is not a ggr-jax workdir.")
  return read_json(file)


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / CHECKPOINTS


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The finished checkpoint steps, ascending (orbax names finished step folders by the
  bare step number; unfinished ones carry a temporary suffix)."""
  return sorted(int(p.name) for p in checkpoint_dir(workdir).glob("*") if p.name.isdigit())


def latest_checkpoint_step(workdir: str | os.PathLike) -> int | None:
  """The newest finished checkpoint step."""
  steps = checkpoint_steps(workdir)
  return steps[-1] if steps else None


def make_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates the workdir (and its parents); :class:`WorkdirError` naming it when it is a
  file, cannot be created, or is not writable."""
  folder = pathlib.Path(workdir)
  if folder.exists() and not folder.is_dir():
    raise WorkdirError(f"the workdir {folder} is a file, not a folder; choose another "
                       "--workdir.")
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise WorkdirError(f"cannot create the workdir {folder} ({err.strerror}); choose "
                       "another --workdir.") from None
  if not os.access(folder, os.W_OK | os.X_OK):
    raise WorkdirError(f"the workdir {folder} is not writable; fix its permissions or "
                       "choose another --workdir.")
  return folder


class WorkdirLocked(WorkdirError):
  """Another live trainer holds the workdir."""


def _owner_text(file: pathlib.Path) -> str:
  try:
    owner = json.loads(file.read_text())
    return (f"pid {owner['pid']} on {owner['host']}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['since']))}")
  except (OSError, ValueError, KeyError, TypeError):
    return "an unknown process"


def lock_owner(workdir: str | os.PathLike) -> str | None:
  """Who holds the workdir's lock (``"pid ... on <host>, since ..."``), or None if nobody
  does. A lock file left by a process that died is not held: the kernel released it."""
  file = path(workdir, LOCK)
  if not file.exists():
    return None
  with file.open("a") as probe:
    try:
      fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      return _owner_text(file)
    fcntl.flock(probe, fcntl.LOCK_UN)
  return None


_HELD: dict[pathlib.Path, int] = {}  # workdirs this process holds, and how many times


@contextlib.contextmanager
def exclusive(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds the workdir's lock for the life of a trainer; raises :class:`WorkdirLocked`
  at once, naming the owner, if another process holds it. Re-entrant within a process.

  The lock is an ``flock`` on ``.lock``: the kernel releases it when its holder exits
  in any way (``kill -9`` included), so a lock file left behind is never stale.
  """
  file = path(workdir, LOCK).absolute()
  if file in _HELD:
    _HELD[file] += 1
    try:
      yield
    finally:
      _HELD[file] -= 1
    return
  handle = file.open("a+")
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise WorkdirLocked(
          f"{workdir} is in use by another trainer ({_owner_text(file)}); wait for it or "
          "stop it, or choose another --workdir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.time()}))
    handle.flush()
    _HELD[file] = 1
    yield
  finally:
    _HELD.pop(file, None)
    handle.close()
