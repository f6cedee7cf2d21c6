"""Running a sweep: plan the cells, start them on their slots, stop cleanly, report."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from ggr_jax import rundir
from ggr_jax.sweep.placement import Slot, make_slots, terminate_with_parent
from ggr_jax.sweep import status as status_lib
from ggr_jax.sweep.spec import (Cell, SweepError, cell_state, checkpoint_step, load_spec,
                                resolve_config)
from ggr_jax.sweep.submitit_launcher import (LAUNCHERS, CellInterrupted, LauncherOptions,
                                             read_jobs, submit)


@dataclasses.dataclass
class Outcome:
  """A cell's state before the sweep (``done``/``resume``/``new``) and what became of it.

  ``status``: ``done`` (skipped), ``trained``, ``resumed``, ``interrupted`` (checkpoint
  saved; the next sweep resumes it), ``failed`` (see ``log``) or ``pending`` (not started).
  """
  cell: Cell
  workdir: pathlib.Path
  before: str
  from_step: int = 0
  status: str = "pending"
  rc: int | None = None
  wall_s: float = 0.0
  slot: str = ""

  @property
  def log(self) -> pathlib.Path:
    return rundir.path(self.workdir, rundir.SWEEP_LOG)

  def summary(self) -> dict[str, Any]:
    path = rundir.path(self.workdir, rundir.SUMMARY)
    return rundir.read_json(path) if path.exists() else {}


def plan(cells: list[Cell], root: str | pathlib.Path) -> list[Outcome]:
  """Loads and validates every cell's config and classifies its workdir, before any run.

  Raises :class:`SweepError` listing every bad cell (config errors, foreign workdirs,
  workdirs a live trainer holds, e.g. one left running by a killed sweep).
  """
  root = pathlib.Path(root).absolute()
  outcomes, errors = [], []
  for cell in cells:
    try:
      state, step = cell_state(root / cell.name, resolve_config(cell))
    except SweepError as err:
      errors.append(str(err))
      continue
    owner = rundir.lock_owner(root / cell.name) if state != "done" else None
    if owner is not None:
      errors.append(f"{cell.name}: its workdir {root / cell.name} is in use by a trainer "
                    f"({owner}); wait for it or stop it.")
      continue
    outcomes.append(Outcome(cell, root / cell.name, state, step,
                            status="done" if state == "done" else "pending"))
  if errors:
    more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
    raise SweepError(f"{len(errors)} of {len(cells)} cells cannot run:\n  "
                     + "\n  ".join(errors[:10]) + more)
  return outcomes


def _start(outcome: Outcome, slot: Slot) -> subprocess.Popen:
  outcome.workdir.mkdir(parents=True, exist_ok=True)
  command = outcome.cell.command(outcome.workdir)
  env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}
  log = outcome.log.open("a")
  log.write(f"=== ggr-jax sweep {time.strftime('%Y-%m-%d %H:%M:%S')} on {slot.label}: "
            f"{' '.join(command)}\n")
  log.flush()
  cpus, sweep_pid = slot.cpus, os.getpid()

  def preexec():
    if cpus:
      os.sched_setaffinity(0, cpus)
    terminate_with_parent(sweep_pid)
  try:
    # A session of its own: a terminal's Ctrl-C reaches the sweep only, which stops the
    # cells with SIGTERM (the train loop saves a checkpoint and exits 130).
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                            preexec_fn=preexec)
  finally:
    log.close()


def _finished(outcome: Outcome, rc: int, stopping: bool) -> str:
  if rc == 0 and rundir.path(outcome.workdir, rundir.SUMMARY).exists():
    return "resumed" if outcome.before == "resume" else "trained"
  if rc == 130 or (stopping and rc in (-signal.SIGTERM, -signal.SIGKILL)):
    return "interrupted"
  return "failed"


def run_sweep(outcomes: list[Outcome], slots: list[Slot],
              echo: Callable[[str], None] = print) -> bool:
  """Runs the cells not done, one per free slot; returns True if stopped by a signal.

  The first SIGINT/SIGTERM stops launching and sends SIGTERM to the running cells (they
  checkpoint and exit); a second one kills them.
  """
  queue = collections.deque(o for o in outcomes if o.status != "done")
  total, started = len(queue), 0
  running: dict[int, tuple[subprocess.Popen, Outcome, float]] = {}
  received: list[int] = []
  terminated = killed = False
  handlers = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread
      pass
  try:
    while running or (queue and not received):
      for k, slot in enumerate(slots):
        if k not in running and queue and not received:
          outcome = queue.popleft()
          started += 1
          outcome.slot = slot.label
          running[k] = (_start(outcome, slot), outcome, time.perf_counter())
          what = f"resume from step {outcome.from_step}" if outcome.before == "resume" else "train"
          echo(f"[{started}/{total}] {outcome.cell.name}: {what} on {slot.label}")
      for k, (proc, outcome, t0) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        del running[k]
        outcome.rc, outcome.wall_s = rc, time.perf_counter() - t0
        outcome.status = _finished(outcome, rc, bool(received))
        tail = f" (exit {rc}; log {outcome.log})" if outcome.status == "failed" else ""
        echo(f"  {outcome.cell.name}: {outcome.status} in {outcome.wall_s:.0f} s{tail}")
      if received and running and not terminated:
        echo(f"{signal.Signals(received[0]).name}: stopping {len(running)} running cells "
             "(they save a checkpoint; the next ggr-jax sweep resumes them)")
        for proc, _, _ in running.values():
          proc.send_signal(signal.SIGTERM)
        terminated = True
      if len(received) > 1 and running and not killed:
        echo("second signal: killing the running cells")
        for proc, _, _ in running.values():
          proc.kill()
        killed = True
      time.sleep(0.2)
  finally:
    for sig, old in handlers.items():
      signal.signal(sig, old)
  return bool(received)


def status_table(outcomes: list[Outcome]) -> str:
  """One line per cell: status, steps, closed accuracy, wall time, and the log of a failure."""
  width = max(len("cell"), *(len(o.cell.name) for o in outcomes))
  lines = [f"{'cell':<{width}}  {'status':<11}  {'steps':>6}  {'closed_acc':>10}  "
           f"{'wall_s':>7}  log"]
  for o in outcomes:
    s = o.summary() if o.status in ("done", "trained", "resumed") else {}
    acc = f"{s['closed_acc']:.4f}" if isinstance(s.get("closed_acc"), float) else "-"
    steps = s.get("steps", checkpoint_step(o.workdir) or "-")
    wall = f"{o.wall_s:.0f}" if o.wall_s else "-"
    log = str(o.log) if o.status in ("failed", "interrupted") else ""
    lines.append(f"{o.cell.name:<{width}}  {o.status:<11}  {steps:>6}  {acc:>10}  {wall:>7}  {log}")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ggr-jax sweep", description="train every cell of a sweep spec, then write the report")
  parser.add_argument("spec", nargs="?", help="PATH.py[:ARG] or a name in configs/ "
                      "defining get_sweep() (not needed with --report-only)")
  parser.add_argument("--root", required=True, help="sweep directory: one workdir per cell")
  parser.add_argument("--devices", default="auto", choices=("auto", "all", "per-run"),
                      help="auto: one cell per GPU/TPU chip, else --parallel CPU cells; "
                      "all: one cell at a time over every device")
  parser.add_argument("--parallel", type=int, default=None,
                      help="at most N cells at a time (CPU: each on its share of the cores)")
  parser.add_argument("--only", action="append", default=[], metavar="SUBSTR",
                      help="only the cells whose name contains SUBSTR (repeatable)")
  parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands")
  parser.add_argument("--report-only", action="store_true",
                      help="only (re)write the report from the summaries under --root")
  parser.add_argument("--no-report", action="store_true", help="do not write the report")
  parser.add_argument("--status", action="store_true",
                      help="show each cell's state (done, running, queued, failed, interrupted, "
                      "new) from the workdirs and the scheduler, and start nothing")
  slurm = parser.add_argument_group(
      "scheduler launch (submitit)", "--launcher slurm submits the cells not done as one SLURM "
      "job array and returns (--wait: and waits); submitit-local runs the jobs here")
  slurm.add_argument("--launcher", default="local", choices=LAUNCHERS,
                     help="local (default): start the cells on this machine's slots")
  slurm.add_argument("--partition", help="SLURM partition")
  slurm.add_argument("--gpus-per-run", type=int, default=0, help="GPUs of one cell")
  slurm.add_argument("--gpus-per-node", type=int, default=None,
                     help="GPUs a node has (default: from sinfo), checked before submitting")
  slurm.add_argument("--nodes", type=int, default=1, help="nodes of one (multi-host) cell")
  slurm.add_argument("--tasks-per-node", type=int, default=1,
                     help="trainer processes per node (one per GPU for multi-process runs)")
  slurm.add_argument("--cpus-per-task", type=int, default=None)
  slurm.add_argument("--time", default="60", help="wall time of one job: MINUTES or HH:MM:SS")
  slurm.add_argument("--array-parallelism", type=int, default=256,
                     help="at most N cells of the array at a time")
  slurm.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="any further submitit SLURM parameter (qos=high, mem_gb=64, ...)")
  slurm.add_argument("--wait", action="store_true",
                     help="wait for the submitted jobs, then print the table and the report")
  return parser


def _write_report(root: pathlib.Path) -> int:
  from ggr_jax import report  # pylint: disable=import-outside-toplevel
  try:
    paths = report.write_report(root)
  except (ValueError, FileNotFoundError) as err:
    print(f"ggr-jax sweep: no report: {err}", file=sys.stderr)
    return 2
  print("report: " + ", ".join(str(p) for p in paths.values()))
  return 0


def main(argv: list[str]) -> int:
  """``ggr-jax sweep``: exit 0 if every cell is done (or submitted), 1 if one failed, 2 on a
  bad spec, placement or launcher option, 130 if stopped by a signal."""
  parser = build_parser()
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  if args.report_only:
    return _write_report(root)
  if args.status:
    names = None
    if args.spec:
      try:
        names = [c.name for c in load_spec(args.spec)]
      except SweepError as err:
        print(f"ggr-jax sweep: {err}", file=sys.stderr)
        return 2
    print(status_lib.format_status(status_lib.status_rows(root, names)))
    return 0
  if not args.spec:
    parser.error("SPEC is required (or give --report-only or --status)")
  try:
    cells = load_spec(args.spec)
    if args.only:
      cells = [c for c in cells if any(s in c.name for s in args.only)]
      if not cells:
        raise SweepError(f"--only {' '.join(args.only)} matches no cell of {args.spec}.")
    slots = make_slots(args.devices, args.parallel) if args.launcher == "local" else []
    outcomes = plan(cells, root)
  except SweepError as err:
    print(f"ggr-jax sweep: {err}", file=sys.stderr)
    return 2
  counts = collections.Counter(o.before for o in outcomes)
  where = (f"{len(slots)} at a time ({', '.join(s.label for s in slots)})" if slots
           else f"through {args.launcher}")
  print(f"{len(outcomes)} cells in {root}: {counts['done']} done, {counts['resume']} to resume, "
        f"{counts['new']} to train; {where}")
  if args.dry_run:
    for o in outcomes:
      if o.before != "done":
        print(f"  {o.before:<6} {o.cell.name}: {' '.join(o.cell.command(o.workdir))}")
    return 0
  if args.launcher != "local":
    return _submit_main(args, outcomes, root)
  interrupted = run_sweep(outcomes, slots)
  return _finish(args, outcomes, root, interrupted)


def _finish(args, outcomes: list[Outcome], root: pathlib.Path, interrupted: bool) -> int:
  print("\n" + status_table(outcomes))
  if not args.no_report and any(o.status in ("done", "trained", "resumed") for o in outcomes):
    _write_report(root)
  if interrupted:
    return 130
  return 1 if any(o.status not in ("done", "trained", "resumed") for o in outcomes) else 0


def _submit_main(args, outcomes: list[Outcome], root: pathlib.Path) -> int:
  """Submits the cells not done and not already live in the scheduler; ``--wait``s for them."""
  options = LauncherOptions(
      partition=args.partition, gpus_per_run=args.gpus_per_run, time=args.time,
      array_parallelism=args.array_parallelism, nodes=args.nodes,
      tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
      gpus_per_node=args.gpus_per_node, slurm=tuple(args.slurm))
  jobs_before = read_jobs(root)
  todo = []
  for o in outcomes:
    if o.status == "done":
      continue
    live = status_lib.cell_status(root, o.cell.name, jobs_before)
    if live.state in ("queued", "running"):
      print(f"  {o.cell.name}: already {live.state} as job {live.job}; not submitted again")
      o.status = live.state
      continue
    todo.append(o)
  try:
    jobs = submit([(o.cell, o.workdir) for o in todo], args.launcher, root, options) if todo else []
  except SweepError as err:
    print(f"ggr-jax sweep: {err}", file=sys.stderr)
    return 2
  for o, job in zip(todo, jobs):
    o.status, o.slot = "submitted", f"job {job.job_id}"
    what = f"resume from step {o.from_step}" if o.before == "resume" else "train"
    print(f"  {o.cell.name}: {what} as job {job.job_id}")
  if not args.wait:
    print(f"{len(jobs)} submitted; follow them with: ggr-jax sweep --status --root {root}")
    return 0
  for o, job in zip(todo, jobs):
    t0 = time.perf_counter()
    try:
      job.result()
      o.status = "resumed" if o.before == "resume" else "trained"
    except Exception as err:  # pylint: disable=broad-except  # submitit re-raises the task's
      o.status = "interrupted" if CellInterrupted.__name__ in str(err) else "failed"
    o.wall_s = time.perf_counter() - t0
  return _finish(args, outcomes, root, False)
