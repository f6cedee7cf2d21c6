"""The run directory (workdir) contract, in one place; imports no JAX.

A workdir holds one run::

  config.json     the run's config (nested JSON), written when the run starts
  summary.json    final metrics, diagnostics and the flat config, written when it ends
  eval.json       ``ggr-jax eval``'s result
  metrics.jsonl   one JSON record per log interval and per evaluation
  tb/             TensorBoard event files
  checkpoints/    orbax step folders ``<step>/``

The trainer, ``ggr-jax eval``, the sweep and the report all read and write it through
this module: the file names, which config fields may change when a run resumes, config
flattening and diffing, and the newest checkpoint step.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Mapping

CONFIG = "config.json"
SUMMARY = "summary.json"
EVAL = "eval.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"

# Fields that may differ when a run resumes: none changes the trajectory (cadence of
# logging, evaluation and checkpoints; how the same batches reach the device; where the
# data set is read from). The same fields never tell two runs apart in a report.
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.input", "train.prefetch", "train.eval_batch_size",
                     "dataset.data_dir", "eval.threshold")


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
  :data:`RESUMABLE_CHANGES`.

  >>> config_diff({"train": {"steps": 5, "log_every": 1}}, {"train": {"steps": 6}})
  ['train.steps']
  """
  before, now = flatten(before), flatten(now)
  return sorted(k for k in set(before) | set(now)
                if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k))


def read_json(file: str | os.PathLike) -> Any:
  return json.loads(pathlib.Path(file).read_text())


def write_json(file: str | os.PathLike, value: Any, **dumps_kwargs: Any) -> None:
  """Writes ``value`` as JSON atomically (a temporary file in the same folder, then a
  rename), so a reader never sees a half-written file."""
  file = pathlib.Path(file)
  text = json.dumps(value, **{"indent": 1, **dumps_kwargs})
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


def latest_checkpoint_step(workdir: str | os.PathLike) -> int | None:
  """The newest finished checkpoint step (orbax names finished step folders by the
  bare step number; unfinished ones carry a temporary suffix)."""
  steps = [int(p.name) for p in checkpoint_dir(workdir).glob("*") if p.name.isdigit()]
  return max(steps) if steps else None
