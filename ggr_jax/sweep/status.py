"""``ggr-jax sweep --status``: each cell's state from its workdir and the scheduler.

States: ``done`` (a summary), ``running`` (a live job, or a trainer holding the workdir
lock), ``queued`` (a job waiting in the scheduler), ``failed`` (the last attempt's log
ends in a traceback, or the scheduler says so; the log tail is shown), ``interrupted``
(stopped with a checkpoint or before one: the next sweep resumes it), ``new``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from ggr_jax import rundir
from ggr_jax.sweep.spec import checkpoint_step
from ggr_jax.sweep.submitit_launcher import JOBS, SUBMITIT_DIR, job_state, log_tail, read_jobs

RUNNING_STATES = ("RUNNING", "COMPLETING", "CONFIGURING")
QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESIZING")
FAILED_STATES = ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
_ATTEMPT = "=== ggr-jax sweep "


@dataclasses.dataclass
class CellStatus:
  """One cell's row: state, steps (done or checkpointed), job id and scheduler state."""
  name: str
  state: str
  steps: int | None = None
  job: str = ""
  scheduler: str = ""
  closed_acc: float | None = None
  tail: str = ""


def _last_attempt(log: pathlib.Path) -> str:
  text = log_tail(log, lines=400)
  return text[text.rfind(_ATTEMPT):] if _ATTEMPT in text else text


def cell_status(root: str | os.PathLike, name: str,
                jobs: dict[str, dict] | None = None) -> CellStatus:
  """The state of cell ``name`` of the sweep in ``root`` (see the module docstring)."""
  root = pathlib.Path(root)
  workdir = root / name
  record = (read_jobs(root) if jobs is None else jobs).get(name)
  job = record["job_id"] if record else ""
  scheduler = job_state(record, root) if record else ""
  summary = rundir.path(workdir, rundir.SUMMARY)
  if summary.exists():
    data = rundir.read_json(summary)
    acc = data.get("closed_acc")
    return CellStatus(name, "done", data.get("steps"), job, scheduler,
                      acc if isinstance(acc, float) else None)
  steps = checkpoint_step(workdir) if workdir.exists() else None
  if scheduler in RUNNING_STATES or (not record and workdir.exists()
                                     and rundir.lock_owner(workdir) is not None):
    return CellStatus(name, "running", steps, job, scheduler)
  if scheduler in QUEUED_STATES:
    return CellStatus(name, "queued", steps, job, scheduler)
  log = rundir.path(workdir, rundir.SWEEP_LOG)
  attempt = _last_attempt(log) if log.exists() else ""
  if scheduler in FAILED_STATES or "Traceback (most recent call last)" in attempt:
    return CellStatus(name, "failed", steps, job, scheduler, tail=log_tail(log))
  if steps or attempt:
    return CellStatus(name, "interrupted", steps, job, scheduler)
  return CellStatus(name, "new", None, job, scheduler)


def sweep_cells(root: str | os.PathLike) -> list[str]:
  """The cells found under ``root``: workdirs (a config, a log or checkpoints) and job records."""
  root = pathlib.Path(root)
  names = set(read_jobs(root))
  for child in root.iterdir() if root.is_dir() else ():
    if child.is_dir() and child.name != SUBMITIT_DIR and any(
        rundir.path(child, n).exists() for n in (rundir.CONFIG, rundir.SWEEP_LOG,
                                                  rundir.CHECKPOINTS, rundir.SUMMARY)):
      names.add(child.name)
  return sorted(names)


def status_rows(root: str | os.PathLike, names: list[str] | None = None) -> list[CellStatus]:
  """Every cell's status (the cells under ``root`` when ``names`` is not given)."""
  jobs = read_jobs(root)
  return [cell_status(root, n, jobs) for n in (sweep_cells(root) if names is None else names)]


def format_status(rows: list[CellStatus]) -> str:
  """A table of the rows, a count per state, and the log tail of each failed cell."""
  width = max([len("cell")] + [len(r.name) for r in rows])
  lines = [f"{'cell':<{width}}  {'state':<11}  {'steps':>7}  {'closed_acc':>10}  job"]
  for r in rows:
    steps = "-" if r.steps is None else str(r.steps)
    acc = "-" if r.closed_acc is None else f"{r.closed_acc:.4f}"
    job = f"{r.job} ({r.scheduler})" if r.job else ""
    lines.append(f"{r.name:<{width}}  {r.state:<11}  {steps:>7}  {acc:>10}  {job}")
  counts: dict[str, int] = {}
  for r in rows:
    counts[r.state] = counts.get(r.state, 0) + 1
  lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no cells")
  for r in rows:
    if r.state == "failed" and r.tail:
      lines.append(f"\n{r.name} failed; its log ends:\n" + "\n".join(
          "  " + line for line in r.tail.splitlines()))
  return "\n".join(lines)


__all__ = ["CellStatus", "JOBS", "cell_status", "format_status", "status_rows", "sweep_cells"]
