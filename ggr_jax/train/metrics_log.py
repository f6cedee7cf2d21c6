"""Metrics as JSON lines (``metrics.jsonl``) and TensorBoard event files (``tb/``)."""

from __future__ import annotations

import json
import math
import pathlib
import warnings
from typing import Any

from ggr_jax import rundir


def _clean(value: Any) -> Any:
  value = float(value)
  return value if math.isfinite(value) else str(value)


class MetricsLog:
  """Appends ``{"step", "split", **metrics}`` records; on resume drops records past ``step``."""

  def __init__(self, workdir: pathlib.Path, resume_step: int = 0, tensorboard: bool = True):
    self.path = rundir.path(workdir, rundir.METRICS)
    if self.path.exists():
      kept = [json.dumps(r) for r in _records(self.path) if r["step"] <= resume_step]
      rundir.write_text(self.path, "".join(line + "\n" for line in kept))
    self._writer = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(str(rundir.path(workdir, rundir.TENSORBOARD)), purge_step=resume_step + 1)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    record = {"step": step, "split": split, **{k: _clean(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._writer is not None:
      for name, value in metrics.items():
        if isinstance(record[name], float):
          self._writer.add_scalar(name if "/" in name else f"{split}/{name}", value, step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def read(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Every record of a run's ``metrics.jsonl``; a torn last line (a write that an
  interruption cut short) is dropped with a warning."""
  return _records(rundir.path(workdir, rundir.METRICS))


def _records(path: pathlib.Path) -> list[dict[str, Any]]:
  lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
  records = []
  for n, line in lines:
    try:
      records.append(json.loads(line))
    except ValueError:
      if n != lines[-1][0]:
        raise rundir.WorkdirError(f"{path} line {n} is not a JSON record; the log is damaged "
                                  "in the middle: restore it from a copy.") from None
      warnings.warn(f"{path}: dropped a torn last line (line {n}), a write that an "
                    "interruption cut short.", stacklevel=2)
  return records


class NullLog:
  """What processes other than 0 of a multi-process run log to: nothing."""

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass
