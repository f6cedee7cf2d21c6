"""Sweeps through submitit: option checks before submitting, the status table, and real
cells on submitit's local executor (done cells skipped, a preempted cell requeued and
resumed, a cancelled cell resumed by the next sweep)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

import pytest

from ggr_jax import cli, rundir, sweep
from ggr_jax.sweep import status as status_lib
from ggr_jax.sweep import submitit_launcher as launcher
from tests.test_sweep import TINY

submitit = pytest.importorskip("submitit")
STEPS = 150


@pytest.mark.parametrize("text, minutes", [("90", 90), ("90:30", 91), ("01:30:00", 90),
                                           ("1-12", 2160), ("1-00:30", 1470),
                                           ("2-01:00:00", 2940)])
def test_slurm_time_forms_convert_to_minutes(text, minutes):
  assert launcher.timeout_minutes(text) == minutes


@pytest.mark.parametrize("options, message", [
    (launcher.LauncherOptions(slurm=("bogus=1",)), "bogus"),
    (launcher.LauncherOptions(slurm=("qos",)), "KEY=VALUE"),
    (launcher.LauncherOptions(time="1h"), "HH:MM:SS"),
    (launcher.LauncherOptions(gpus_per_run=16, gpus_per_node=8), "has 8"),
    (launcher.LauncherOptions(gpus_per_run=3, nodes=2), "multiple of the node count"),
    (launcher.LauncherOptions(nodes=0), "--nodes"),
])
def test_bad_launcher_options_are_refused_before_anything_is_submitted(tmp_path, options,
                                                                       message):
  with pytest.raises(sweep.SweepError, match=message):
    launcher.make_executor("slurm", tmp_path / "jobs", options)


def test_slurm_without_a_cluster_names_the_way_out(tmp_path):
  if os.environ.get("SLURM_JOB_ID") or any(
      (pathlib.Path(d) / "srun").exists() for d in os.environ.get("PATH", "").split(":")):
    pytest.skip("SLURM is here")
  with pytest.raises(sweep.SweepError, match="submitit-local"):
    launcher.make_executor("slurm", tmp_path / "jobs", launcher.LauncherOptions())


def test_a_rejected_slurm_option_submits_nothing(tmp_path, capsys):
  spec = tmp_path / "spec.py"
  spec.write_text("def get_sweep():\n  return [{'config': 'default', 'name': 'a'}]\n")
  root = tmp_path / "root"
  rc = cli.main(["sweep", str(spec), "--root", str(root), "--launcher", "slurm",
                 "--slurm", "no_such_option=3"])
  assert rc == 2 and "no_such_option" in capsys.readouterr().err
  assert not (root / launcher.JOBS).exists()


def _workdir(root: pathlib.Path, name: str, files: dict[str, str]) -> None:
  for rel, text in files.items():
    (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / name / rel).write_text(text)


def test_status_reads_each_state_from_the_workdir_and_the_job_record(tmp_path, capsys):
  _workdir(tmp_path, "done", {"summary.json": json.dumps({"steps": 8, "closed_acc": 0.5})})
  _workdir(tmp_path, "failed", {"log.txt": "=== ggr-jax sweep 1\nTraceback (most recent call "
                                           "last):\nValueError: boom\n"})
  _workdir(tmp_path, "retried", {"log.txt": "=== ggr-jax sweep 1\nTraceback (most recent call "
                                            "last):\n=== ggr-jax sweep 2\nstep 3\n",
                                 "checkpoints/3/x": ""})
  _workdir(tmp_path, "live", {"log.txt": "=== ggr-jax sweep 1\n"})
  (tmp_path / launcher.JOBS).write_text(json.dumps(
      {"live": {"job_id": str(os.getpid()), "launcher": "submitit-local"},
       "gone": {"job_id": "999999999", "launcher": "submitit-local"}}))
  rows = {r.name: r for r in status_lib.status_rows(tmp_path)}
  assert {n: r.state for n, r in rows.items()} == {
      "done": "done", "failed": "failed", "retried": "interrupted", "live": "running",
      "gone": "new"}
  assert rows["retried"].steps == 3 and rows["done"].closed_acc == 0.5
  assert cli.main(["sweep", "--status", "--root", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "1 done, 1 failed, 1 interrupted, 1 new, 1 running" in out
  assert "failed failed; its log ends:" in out and "ValueError: boom" in out


def _spec(tmp_path: pathlib.Path, steps: int, seeds: list[int]) -> pathlib.Path:
  # TINY's compile with steps long enough (batch 128) to be stopped while they run
  overrides = {**TINY, "train.steps": steps, "train.log_every": 10, "train.eval_every": steps,
               "train.checkpoint_every": steps, "train.batch_size": 128, "train.seed": seeds}
  spec = tmp_path / "spec.py"
  spec.write_text("from ggr_jax import sweep\n"
                  "def get_sweep():\n"
                  f"  return sweep.product('default', overrides={overrides!r}, "
                  "name='s{train_seed}')\n")
  return spec


def _wait_for(predicate, what: str, timeout: float = 240.0) -> None:
  t0 = time.monotonic()
  while not predicate():
    assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
    time.sleep(0.1)


def _children(pid: int) -> list[int]:
  text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
  return [int(p) for p in text.split()]


def _stepping(workdir: pathlib.Path):
  metrics = rundir.path(workdir, rundir.METRICS)
  return lambda: metrics.exists() and metrics.stat().st_size > 0


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_local_executor_trains_skips_done_requeues_a_preempted_cell_and_resumes_a_cancelled_one(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device per cell: the fastest compile
  root = tmp_path / "root"
  args = ["sweep", str(_spec(tmp_path, STEPS, [0])), "--root", str(root),
          "--launcher", "submitit-local", "--time", "30", "--no-report"]
  cell, = sweep.load_spec(args[1])
  workdir = root / cell.name

  # Preemption: SIGUSR2 to the task (what SLURM sends before it stops a job). The trainer
  # saves, submitit requeues the task, and the requeued task resumes and finishes.
  job, = launcher.submit([(cell, workdir)], "submitit-local", root,
                         launcher.LauncherOptions(time="30"))
  _wait_for(_stepping(workdir), "the trainer's first steps")
  task, = _children(int(job.job_id))
  os.kill(task, signal.SIGUSR2)
  assert job.result()["status"] == "trained"
  summary = json.loads(rundir.path(workdir, rundir.SUMMARY).read_text())
  assert 0 < summary["resumed_from"] < STEPS and summary["steps"] == STEPS
  assert rundir.path(workdir, rundir.SWEEP_LOG).read_text().count("=== ggr-jax sweep") == 2

  # A done cell is not submitted again.
  assert cli.main(args + ["--wait"]) == 0
  assert "1 done, 0 to resume, 0 to train" in capsys.readouterr().out

  # Cancel (scancel): the trainer saves on the way out; --status says interrupted, and
  # the next sweep resubmits the cell, which resumes.
  args = ["sweep", str(_spec(tmp_path, STEPS, [1])), "--root", str(root),
          "--launcher", "submitit-local", "--time", "30", "--no-report"]
  assert cli.main(args) == 0
  workdir = root / "s1"
  _wait_for(_stepping(workdir), "the second cell's first steps")
  controller = int(launcher.read_jobs(root)["s1"]["job_id"])
  assert status_lib.cell_status(root, "s1").state == "running"
  trainer, = [pid for task in _children(controller) for pid in _children(task)
              if b"ggr_jax.cli" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]
  for pid in (trainer, controller):  # scancel: SIGTERM to every process of the job
    os.kill(pid, signal.SIGTERM)
  _wait_for(lambda: status_lib.cell_status(root, "s1").state != "running",
            "the cancelled job's end")
  row = status_lib.cell_status(root, "s1")
  assert row.state == "interrupted" and row.steps > 0
  capsys.readouterr()
  assert cli.main(args + ["--wait"]) == 0
  out = capsys.readouterr().out
  assert f"s1: resume from step {row.steps} as job" in out
  resumed = json.loads(rundir.path(workdir, rundir.SUMMARY).read_text())
  assert resumed["resumed_from"] == row.steps and resumed["steps"] == STEPS


class _TaskEnv:
  def __init__(self, rank: int, tasks: int):
    self.global_rank, self.num_tasks, self.job_id, self.hostnames = rank, tasks, "4242", ["n0"]


def test_tasks_of_a_multi_process_cell_join_one_run(monkeypatch):
  for name in ("SLURM_JOB_ID", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  environment = launcher.CellJob("c", ["true"], "/tmp/c")._environment  # pylint: disable=protected-access
  envs = [environment(_TaskEnv(rank, 2))[0] for rank in (0, 1)]
  assert {e["JAX_COORDINATOR_ADDRESS"] for e in envs} == {f"n0:{launcher.LOCAL_BASE_PORT + 4242}"}
  assert [(e["JAX_NUM_PROCESSES"], e["JAX_PROCESS_ID"]) for e in envs] == [("2", "0"), ("2", "1")]
  assert "JAX_NUM_PROCESSES" not in environment(_TaskEnv(0, 1))[0]  # one task: one process
  monkeypatch.setenv("SLURM_JOB_ID", "7")  # under srun JAX reads SLURM's own variables
  env, rank = environment(_TaskEnv(1, 2))
  assert rank == 1 and "JAX_PROCESS_ID" not in env
