"""Sweep cells as scheduler jobs through ``submitit``: one SLURM job array per sweep.

``ggr-jax sweep SPEC --root ROOT --launcher slurm`` plans the cells as the local
launcher does (every config validated, done cells skipped, interrupted ones resumed,
failed ones rerun) and submits each cell that is not done, and not already queued or
running, as one task of a single job array. A task runs the cell's ``ggr-jax train``
command in a child process, its output appended to ``ROOT/<cell>/log.txt``, so a cell
trains exactly as under the local launcher.

Preemption and time limits: SLURM sends ``USR2`` (submitit's ``--signal``) before it
stops a job. submitit calls :meth:`CellJob.checkpoint`, which sends ``SIGTERM`` to the
trainer (it saves a checkpoint and exits 130) and returns the same job for requeueing;
the requeued task reruns the command and the loop resumes from that checkpoint. A
trainer stopped by a plain ``SIGTERM`` (``scancel``, a preemption without the signal)
saves as well; its cell shows as interrupted and the next ``ggr-jax sweep`` resubmits
it. Tasks of a multi-process cell (``--nodes``, ``--tasks-per-node``) each start one
trainer; under SLURM JAX reads the step's environment itself (``jax.distributed``),
under submitit's local executor the coordinator is given explicitly.

``--launcher submitit-local`` runs the same jobs through submitit's local executor (all
at once, on this machine); it is how the launcher is tested without a cluster.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Iterable

from ggr_jax import rundir
from ggr_jax.sweep.placement import terminate_with_parent
from ggr_jax.sweep.spec import Cell, SweepError

LAUNCHERS = ("local", "slurm", "submitit-local")
SUBMITIT_DIR = ".submitit"  # submitit's pickles and scheduler logs, in the sweep root
JOBS = "sweep_jobs.json"    # cell name -> the job that last ran it, in the sweep root
TRAINER_EXIT_INTERRUPTED = 130
LOCAL_BASE_PORT = 21000
LIVE_STATES = ("PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "RUNNING",
               "COMPLETING", "REQUEUE_HOLD", "REQUEUE_FED")


class CellInterrupted(RuntimeError):
  """The trainer saved a checkpoint and stopped on a signal; the next sweep resumes it."""


@dataclasses.dataclass(frozen=True)
class LauncherOptions:
  """What each submitted cell asks of the scheduler.

  ``time``: ``MINUTES``, ``HH:MM:SS`` or ``D-HH:MM:SS``; ``gpus_per_run``: GPUs of one
  cell, over all its nodes; ``gpus_per_node``: what one node has (read from ``sinfo``
  when not given); ``slurm``: further submitit SLURM parameters (``KEY=VALUE``).
  """
  partition: str | None = None
  gpus_per_run: int = 0
  time: str = "60"
  array_parallelism: int = 256
  nodes: int = 1
  tasks_per_node: int = 1
  cpus_per_task: int | None = None
  gpus_per_node: int | None = None
  slurm: tuple[str, ...] = ()


def timeout_minutes(text: str) -> int:
  """SLURM's time forms in whole minutes: ``"90"``, ``"90:30"`` (MM:SS), ``"01:30:00"``,
  ``"1-12"`` (D-HH), ``"1-12:30"``, ``"1-12:30:00"``; a bad value names the forms."""
  match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(text).strip())
  if not match:
    raise SweepError(f"--time {text!r}: give minutes (90), HH:MM:SS (01:30:00) or D-HH:MM:SS.")
  days, rest = match.groups()
  parts = [int(p) for p in rest.split(":")]
  if days is None:  # M, M:S, H:M:S
    weights = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
  else:             # D-H, D-H:M, D-H:M:S
    weights = (3600, 60, 1)[:len(parts)]
  seconds = sum(p * w for p, w in zip(parts, weights)) + 86400 * int(days or 0)
  minutes = -(-seconds // 60)
  if minutes < 1:
    raise SweepError(f"--time {text!r} is under a minute; give the wall time of one cell.")
  return minutes


def slurm_parameters(pairs: Iterable[str]) -> dict[str, Any]:
  """``["qos=high", "mem_gb=64"]`` -> submitit parameters (numbers as numbers)."""
  out: dict[str, Any] = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not re.fullmatch(r"[a-z_]+", key):
      raise SweepError(f"--slurm {pair!r}: write KEY=VALUE with a submitit SLURM parameter "
                       "name as KEY (e.g. --slurm qos=high --slurm mem_gb=64).")
    out[key] = int(value) if value.isdigit() else value
  return out


def node_gpus(partition: str | None) -> int | None:
  """GPUs per node of ``partition`` from ``sinfo`` (the largest ``gpu[:type]:N`` gres), or None."""
  if not shutil.which("sinfo"):
    return None
  command = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
  try:
    out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  counts = [int(n) for n in re.findall(r"gpu(?::[\w.-]+)?:(\d+)", out)]
  return max(counts) if counts else None


def make_executor(launcher: str, folder: str | os.PathLike, options: LauncherOptions):
  """A submitit executor with every option checked by submitit before anything is submitted."""
  if launcher not in LAUNCHERS[1:]:
    raise SweepError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}.")
  try:
    import submitit  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SweepError(f"--launcher {launcher} needs submitit: pip install 'ggr-jax[slurm]' "
                     "(or pip install submitit).") from None
  for name in ("gpus_per_run", "array_parallelism", "nodes", "tasks_per_node"):
    value = getattr(options, name)
    if not isinstance(value, int) or value < (0 if name == "gpus_per_run" else 1):
      raise SweepError(f"--{name.replace('_', '-')} {value!r}: must be a whole number "
                       f"{'>= 0' if name == 'gpus_per_run' else '>= 1'}.")
  if options.gpus_per_run % options.nodes:
    raise SweepError(f"--gpus-per-run {options.gpus_per_run} does not split evenly over "
                     f"--nodes {options.nodes}; give a multiple of the node count.")
  per_node = options.gpus_per_run // options.nodes
  capacity = options.gpus_per_node
  if capacity is None and launcher == "slurm":
    capacity = node_gpus(options.partition)
  if capacity is not None and per_node > capacity:
    raise SweepError(f"each cell needs {per_node} GPUs on each of its {options.nodes} node(s), "
                     f"but a node{' of ' + options.partition if options.partition else ''} has "
                     f"{capacity}; lower --gpus-per-run or raise --nodes.")
  params: dict[str, Any] = {
      "timeout_min": timeout_minutes(options.time), "nodes": options.nodes,
      "tasks_per_node": options.tasks_per_node, "gpus_per_node": per_node,
      "slurm_array_parallelism": options.array_parallelism, "name": "ggr-jax",
      "stderr_to_stdout": True}
  if options.cpus_per_task is not None:
    params["cpus_per_task"] = options.cpus_per_task
  if options.partition:
    params["slurm_partition"] = options.partition
  extra = slurm_parameters(options.slurm)
  params.update({k if k in params else f"slurm_{k}": v for k, v in extra.items()})
  # submitit checks every cluster's parameters on any executor: the local one checks the
  # SLURM options without a cluster, before the SLURM executor looks for srun.
  for cluster in ("local", "slurm") if launcher == "slurm" else ("local",):
    try:
      executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as err:
      raise SweepError(f"--launcher slurm: {err} Run the sweep where SLURM's srun and sbatch "
                       "are on PATH (a login node), or use --launcher submitit-local.") from None
    try:
      executor.update_parameters(**params)
    except (NameError, AssertionError, ValueError, TypeError) as err:
      first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
      raise SweepError(f"submitit rejects the job options: {first} (check --slurm KEY=VALUE "
                       "and the other launcher options).") from None
  return executor


@dataclasses.dataclass
class CellJob:
  """A submitit job function: one cell's trainer in a child process, checkpointable."""
  name: str
  command: list[str]
  workdir: str
  _process: Any = dataclasses.field(default=None, repr=False, compare=False)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_process": None}

  def _environment(self, job_env) -> tuple[dict[str, str], int]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}
    rank, tasks = job_env.global_rank, job_env.num_tasks
    if tasks > 1 and "SLURM_JOB_ID" not in os.environ:
      port = LOCAL_BASE_PORT + int(re.sub(r"\D", "", str(job_env.job_id)) or 0) % 20000
      env.update(JAX_COORDINATOR_ADDRESS=f"{job_env.hostnames[0]}:{port}",
                 JAX_NUM_PROCESSES=str(tasks), JAX_PROCESS_ID=str(rank))
    return env, rank

  def __call__(self) -> dict[str, Any]:
    import submitit  # pylint: disable=import-outside-toplevel
    env, rank = self._environment(submitit.JobEnvironment())
    workdir = pathlib.Path(self.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / (rundir.SWEEP_LOG if rank == 0 else f"log.rank{rank}.txt")
    with log_path.open("a") as log:
      log.write(f"=== ggr-jax sweep {time.strftime('%Y-%m-%d %H:%M:%S')} as job "
                f"{os.environ.get('SLURM_JOB_ID', os.environ.get('SUBMITIT_LOCAL_JOB_ID', '?'))} "
                f"task {rank}: {' '.join(self.command)}\n")
      log.flush()
      self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env,
                                       preexec_fn=functools.partial(terminate_with_parent,
                                                                    os.getpid()))
    if rank != 0:  # submitit checkpoints on task 0 only; the others stop their trainer
      signal.signal(signal.SIGUSR2, lambda *_: self._stop_trainer(wait=False))
    try:
      rc = _wait(self._process)
    finally:
      self._stop_trainer(wait=True)
    if rc == 0 and rundir.path(workdir, rundir.SUMMARY).exists():
      return {"cell": self.name, "status": "trained"}
    if rc == TRAINER_EXIT_INTERRUPTED:
      raise CellInterrupted(f"{self.name}: the trainer saved a checkpoint and stopped on a "
                            "signal; the next ggr-jax sweep resumes it.")
    raise RuntimeError(f"{self.name}: the trainer exited {rc}; log {log_path}:\n"
                       + log_tail(log_path))

  def _stop_trainer(self, wait: bool) -> None:
    proc = self._process
    if proc is not None and proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      if wait:
        _wait(proc)

  def checkpoint(self, *args: Any, **kwargs: Any):
    """submitit's preemption/timeout hook: the trainer checkpoints, the job is requeued."""
    from submitit.helpers import DelayedSubmission  # pylint: disable=import-outside-toplevel
    self._stop_trainer(wait=True)
    return DelayedSubmission(self, *args, **kwargs)


def _wait(proc: subprocess.Popen) -> int:
  """``proc``'s exit code. Polls: a signal handler that waits for the same process (the
  checkpoint hook) would deadlock on ``Popen.wait``'s lock if it interrupted a ``wait``."""
  while (rc := proc.poll()) is None:
    time.sleep(0.2)
  return rc


def log_tail(path: str | os.PathLike, lines: int = 5) -> str:
  """The last lines of a log file (empty if there is none)."""
  path = pathlib.Path(path)
  if not path.exists():
    return ""
  with path.open("rb") as f:
    f.seek(max(0, path.stat().st_size - 8192))
    text = f.read().decode("utf-8", "replace")
  return "\n".join(text.strip().splitlines()[-lines:])


def read_jobs(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """The record of submitted jobs: cell name -> ``{"job_id", "launcher", "submitted"}``."""
  path = pathlib.Path(root) / JOBS
  return rundir.read_json(path) if path.exists() else {}


def job_state(record: dict[str, Any], root: str | os.PathLike) -> str:
  """The scheduler's state of a recorded job (SLURM's names; ``UNKNOWN`` if it cannot say)."""
  folder = pathlib.Path(root) / SUBMITIT_DIR
  job_id = str(record["job_id"])
  if record.get("launcher") == "slurm":
    try:
      import submitit  # pylint: disable=import-outside-toplevel
      return submitit.SlurmJob(folder=folder, job_id=job_id).state.upper()
    except Exception:  # pylint: disable=broad-except  # no sacct here, or the job is gone
      return "UNKNOWN"
  pid = int(job_id)  # submitit's local job id is its controller's pid
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return "FINISHED"
  except PermissionError:
    pass
  stat = pathlib.Path(f"/proc/{pid}/stat")
  try:  # an exited controller not yet reaped by the process that submitted it
    if stat.read_text().rpartition(")")[2].split()[0] == "Z":
      return "FINISHED"
  except (OSError, IndexError):
    pass
  return "RUNNING"


def submit(cells: list[tuple[Cell, pathlib.Path]], launcher: str, root: str | os.PathLike,
           options: LauncherOptions) -> list[Any]:
  """Submits the cells as one job array and records their job ids in ``ROOT/sweep_jobs.json``."""
  root = pathlib.Path(root)
  executor = make_executor(launcher, root / SUBMITIT_DIR, options)
  functions = [CellJob(cell.name, cell.command(workdir), str(workdir)) for cell, workdir in cells]
  for _, workdir in cells:
    workdir.mkdir(parents=True, exist_ok=True)
  with executor.batch():
    jobs = [executor.submit(fn) for fn in functions]
  record = read_jobs(root)
  stamp = time.strftime("%Y-%m-%d %H:%M:%S")
  for (cell, _), job in zip(cells, jobs):
    record[cell.name] = {"job_id": str(job.job_id), "launcher": launcher, "submitted": stamp}
  rundir.write_json(root / JOBS, record, indent=1)
  return jobs
