"""One trainer per workdir: the lock, and what the CLI and the sweep do with it."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ggr_jax import cli, rundir, sweep
from ggr_jax.train import metrics_log

HOLD = """
import sys, time
from ggr_jax import rundir
with rundir.exclusive(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
  """A live process holding ``tmp_path / "run"``; yields ``(workdir, process)``."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  yield workdir, proc
  proc.kill()
  proc.wait()


def test_a_held_workdir_refuses_a_second_holder_naming_the_first(holder):
  workdir, proc = holder
  assert f"pid {proc.pid} on " in rundir.lock_owner(workdir)
  with pytest.raises(rundir.WorkdirLocked, match=f"pid {proc.pid} on .*another --workdir"):
    with rundir.exclusive(workdir):
      pass


def test_a_lock_left_by_a_killed_holder_is_not_stale(holder):
  workdir, proc = holder
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert rundir.path(workdir, rundir.LOCK).exists()  # the file stays; the lock does not
  assert rundir.lock_owner(workdir) is None
  with rundir.exclusive(workdir):
    assert f"pid {os.getpid()} on " in rundir.lock_owner(workdir)  # held, by this process


def test_the_lock_is_reentrant_in_one_process_and_released_at_the_end(tmp_path):
  with rundir.exclusive(tmp_path):
    with rundir.exclusive(tmp_path):
      assert rundir.lock_owner(tmp_path) is not None
    assert rundir.lock_owner(tmp_path) is not None  # the outer hold is still on
  assert rundir.lock_owner(tmp_path) is None
  assert rundir.lock_owner(tmp_path / "never_used") is None


def test_train_on_a_held_workdir_stops_at_once_with_one_line(holder, capsys):
  workdir, proc = holder
  start = time.perf_counter()
  rc = cli.main(["train", "--workdir", str(workdir), "--config.train.steps=4"])
  assert rc == 2 and time.perf_counter() - start < 30
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"pid {proc.pid}" in err and "in use" in err
  assert not rundir.path(workdir, rundir.CONFIG).exists()  # nothing of the run was touched


def test_a_sweep_refuses_a_cell_whose_workdir_a_trainer_holds(holder):
  workdir, proc = holder
  cells = sweep.parse_cells([{"config": "default", "name": workdir.name},
                             {"config": "default", "name": "free"}])
  with pytest.raises(sweep.SweepError, match=f"1 of 2 cells(.|\n)*run: .*pid {proc.pid}"):
    sweep.plan(cells, workdir.parent)


PARENT = """
import os, subprocess, sys, time
from ggr_jax.sweep import runner
me = os.getpid()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         preexec_fn=lambda: runner._terminate_with_parent(me),
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
  status = pathlib.Path(f"/proc/{pid}/status")
  try:
    return "\nState:\tZ" not in status.read_text()
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_cell_does_not_outlive_a_killed_sweep():
  parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
  child = int(parent.stdout.readline())
  assert _alive(child)
  parent.kill()
  parent.wait()
  deadline = time.monotonic() + 20
  while _alive(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  if _alive(child):
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its killed parent")


# -- damaged state files ----------------------------------------------------------------
@pytest.mark.parametrize("text, what", [("", "empty"), ('{"train": {"st', "not valid JSON")])
def test_a_damaged_config_json_is_named_with_the_fix(tmp_path, capsys, text, what):
  rundir.path(tmp_path, rundir.CONFIG).write_text(text)
  with pytest.raises(rundir.WorkdirError, match=f"config.json is {what}.*restore it"):
    rundir.read_config(tmp_path)
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and what in err


def _write_log(workdir: pathlib.Path, lines: list[str]) -> None:
  rundir.path(workdir, rundir.METRICS).write_text("\n".join(lines))


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
  _write_log(tmp_path, ['{"step": 2, "split": "train"}', '{"step": 4, "split": "train"}',
                        '{"step": 6, "spl'])
  with pytest.warns(UserWarning, match="torn last line"):
    assert [r["step"] for r in metrics_log.read(tmp_path)] == [2, 4]
  with pytest.warns(UserWarning, match="torn last line"):
    metrics_log.MetricsLog(tmp_path, resume_step=4, tensorboard=False).close()
  assert [r["step"] for r in metrics_log.read(tmp_path)] == [2, 4]  # rewritten without it


def test_a_metrics_log_damaged_in_the_middle_is_refused(tmp_path):
  _write_log(tmp_path, ['{"step": 2, "split": "train"}', 'garbage', '{"step": 6}'])
  with pytest.raises(rundir.WorkdirError, match="line 2 is not a JSON record"):
    metrics_log.read(tmp_path)
