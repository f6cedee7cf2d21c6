"""Runs that never lose or corrupt work: one trainer per workdir (the lock, and what the CLI
and the sweep do with it), damaged state files, the divergence guard."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ggr_jax import cli, rundir, sweep
from ggr_jax.train import loop, metrics_log
from ggr_jax.train.checkpoint import Checkpointer

from tests.test_train import tiny_config

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


# -- divergence ---------------------------------------------------------------------------
def test_a_diverging_run_stops_before_checkpointing_a_non_finite_state(tmp_path, capsys):
  cfg = tiny_config("fixmatch", "sum", steps=8)
  cfg.ggr.split_gradients = False
  cfg.optim.lr = 1e30  # the first update sends the logits to infinity
  with pytest.raises(loop.Diverged, match=r"non-finite from step \d+ .*Lower optim.lr"):
    loop.train(cfg, tmp_path, progress=False)
  records = metrics_log.read(tmp_path)
  assert records and records[-1]["split"] == "train" and records[-1]["step"] < 8
  assert records[-1]["monitors/finite"] < 1  # the bad interval is logged
  assert not rundir.path(tmp_path, rundir.SUMMARY).exists()
  newest = rundir.latest_checkpoint_step(tmp_path)
  if newest is not None:  # whatever was saved is finite
    state = loop.Trainer(cfg, tmp_path, progress=False).restore(Checkpointer(tmp_path))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
  rc = cli.main(["train", "--workdir", str(tmp_path / "cli"), "--config.optim.lr=1e30",
                 "--config.train.steps=4", "--config.train.log_every=2",
                 "--config.train.batch_size=8", "--config.train.uratio=1"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "Traceback" not in err  # above it: the progress bar
  assert err.splitlines()[-1].startswith("ggr-jax train: the run diverged")


def test_checkpoints_without_their_config_json_are_not_resumed_blindly(tmp_path):
  cfg = tiny_config("supervised", "sum", steps=2)
  cfg.ggr.split_gradients = False
  loop.train(cfg, tmp_path, progress=False)
  rundir.path(tmp_path, rundir.CONFIG).unlink()
  cfg.train.steps = 4
  with pytest.raises(loop.config_lib.ConfigError, match="checkpoints but no config.json"):
    loop.train(cfg, tmp_path, progress=False)


# -- verified checkpoints -----------------------------------------------------------------
def _trained(tmp_path, steps=4):
  cfg = tiny_config("supervised", "sum", steps=steps)
  cfg.ggr.split_gradients = False
  loop.train(cfg, tmp_path, progress=False)
  return cfg


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _overwrite(file: pathlib.Path) -> None:
  with file.open("r+b") as f:
    f.seek(file.stat().st_size // 2)
    f.write(np.random.default_rng(0).bytes(min(4096, file.stat().st_size // 2)))


def _truncate(file: pathlib.Path) -> None:
  with file.open("r+b") as f:
    f.truncate(file.stat().st_size // 2)


def _empty_folder(folder: pathlib.Path) -> None:
  for child in folder.iterdir():
    shutil.rmtree(child) if child.is_dir() else child.unlink()


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "metadata", "empty"])
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, damage):
  cfg = _trained(tmp_path)
  newest = rundir.checkpoint_dir(tmp_path) / "4"
  assert (tmp_path / rundir.CHECKSUMS / "4.json").exists()
  if damage == "overwrite":
    _overwrite(_largest_file(newest))
  elif damage == "truncate":
    _truncate(_largest_file(newest))
  elif damage == "metadata":
    (newest / "_CHECKPOINT_METADATA").write_text("{garbled")
  else:
    _empty_folder(newest)
  with pytest.warns(UserWarning, match="checkpoint step 4 is damaged"):
    state = loop.Trainer(cfg, tmp_path, progress=False).restore(Checkpointer(tmp_path))
  assert int(state.step) == 2
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.opt_state))
  assert not newest.exists() and len(list((tmp_path / rundir.DAMAGED).iterdir())) == 1


def test_an_intact_checkpoint_restores_unchanged(tmp_path):
  cfg = _trained(tmp_path)
  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = loop.Trainer(cfg, tmp_path, progress=False).restore(Checkpointer(tmp_path))
  assert int(state.step) == 4 and not (tmp_path / rundir.DAMAGED).exists()
  assert sorted(p.name for p in (tmp_path / rundir.CHECKSUMS).iterdir()) == ["2.json", "4.json"]


def test_eval_with_no_intact_checkpoint_says_so_in_one_line(tmp_path, capsys):
  _trained(tmp_path)
  for step in ("2", "4"):
    _overwrite(_largest_file(rundir.checkpoint_dir(tmp_path) / step))
  with pytest.warns(UserWarning):
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("ggr-jax eval: no intact checkpoint") and len(err.splitlines()) == 1


# -- one-line input errors ----------------------------------------------------------------
@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_a_workdir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, where):
  (tmp_path / "a_file").write_text("")
  rc = cli.main(["train", "--workdir", str(tmp_path / where), "--config.train.steps=2"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1
  assert err.startswith("ggr-jax train: ") and str(tmp_path / where) in err


@pytest.mark.parametrize("text, message", [("def get_sweep(:\n", "line 1: invalid syntax"),
                                           ("import no_such_module_here\n", "ModuleNotFound")])
def test_a_sweep_spec_that_does_not_load_is_one_line(tmp_path, capsys, text, message):
  spec = tmp_path / "spec.py"
  spec.write_text(text)
  assert cli.main(["sweep", str(spec), "--root", str(tmp_path / "root")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err and str(spec) in err
