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
from ggr_jax.sweep import placement
me = os.getpid()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         preexec_fn=lambda: placement.terminate_with_parent(me),
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
  other = tiny_config("supervised", "sum", steps=2)
  other.ggr.split_gradients, other.optim.lr = False, 0.5
  with pytest.raises(loop.config_lib.ConfigError, match=r"lost its config.json.*optim.lr"):
    loop.train(other, tmp_path, progress=False)
  with pytest.warns(UserWarning, match="matches the one stored in checkpoint step 2"):
    assert loop.train(cfg, tmp_path, progress=False)["steps"] == 2  # the same config resumes
  assert rundir.read_config(tmp_path) == rundir.read_json(
      rundir.checkpoint_dir(tmp_path) / "2" / rundir.STEP_CONFIG)
  for step in rundir.checkpoint_steps(tmp_path):  # checkpoints from before this existed
    (rundir.checkpoint_dir(tmp_path) / str(step) / rundir.STEP_CONFIG).unlink()
  rundir.path(tmp_path, rundir.CONFIG).unlink()
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


@pytest.mark.parametrize("args, message", [
    (["--config.train.nope=3"], "--config.train.nope names a field the config does not have"),
    (["--config", "grid:steps=5"], "unknown grid key 'steps'"),
])
def test_a_config_that_cannot_be_built_is_one_line(tmp_path, capsys, args, message):
  with pytest.raises(SystemExit) as stop:
    cli.main(["train", "--workdir", str(tmp_path / "run"), *args])
  text = str(stop.value.code)
  assert text.startswith("ggr-jax train: ") and len(text.splitlines()) == 1 and message in text


@pytest.mark.parametrize("override, message", [
    ("--config.dataset.labels_per_class=500", "labels_per_class=500 exceeds"),
    ("--config.dataset.id_classes=(0,11)", "id_classes [11] do not occur"),
    ("--config.dataset.id_classes=(0,0,1)", "id_classes lists [0] more than once"),
    ("--config.dataset.name=cifar10", "cifar10 is not prepared"),
])
def test_a_split_the_dataset_fields_cannot_make_is_one_line(tmp_path, capsys, override, message):
  rc = cli.main(["train", "--workdir", str(tmp_path / "run"), override,
                 f"--config.dataset.data_dir={tmp_path / 'no_tfds_here'}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("ggr-jax train: config.dataset")
  assert message in err and not (tmp_path / "run" / "checkpoints").exists()


def test_a_garbled_tfds_folder_is_one_line(tmp_path, capsys):
  version = tmp_path / "tfds" / "cifar10" / "3.0.2"
  version.mkdir(parents=True)
  (version / "dataset_info.json").write_text("{not json")
  rc = cli.main(["train", "--workdir", str(tmp_path / "run"), "--config.dataset.name=cifar10",
                 f"--config.dataset.data_dir={tmp_path / 'tfds'}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and "cifar10 (train)" in err
  assert "cannot be read" in err and "tfds build cifar10" in err


def test_a_garbled_imagenet30_file_list_is_one_line(tmp_path, capsys):
  lists = tmp_path / "in30" / "filelist"
  lists.mkdir(parents=True)
  (lists / "train_labeled_p1.txt").write_text("data/imagenet30/a.png 0\nno label here\n")
  rc = cli.main(["train", "--workdir", str(tmp_path / "run"), "--config.dataset.name=imagenet30",
                 "--config.train.input=stream", f"--config.dataset.data_dir={tmp_path / 'in30'}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1
  assert "train_labeled_p1.txt:2: expected '<path> <integer label>'" in err


def test_an_interrupt_before_training_is_one_line(monkeypatch, capsys):
  def interrupted(argv):
    raise KeyboardInterrupt
  monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
  assert cli.main(["train"]) == 130
  assert capsys.readouterr().err.strip() == "ggr-jax train: interrupted"


def test_a_test_split_without_ood_images_warns_that_auroc_is_undefined():
  from ggr_jax.configs import default  # pylint: disable=import-outside-toplevel
  cfg = default.get_config()
  cfg.dataset.max_test_images = 1
  with pytest.warns(UserWarning, match="AUROC will be NaN"):
    loop.load_split(cfg)


# -- checkpoint writes that fail, exact interval means across interrupts ----------------
def test_a_checkpoint_folder_that_is_not_writable_stops_the_run_at_that_step(
    tmp_path, monkeypatch):
  from ggr_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(steps=6)
  cfg.train.update(checkpoint_every=2, log_every=2)
  folder, steps = rundir.checkpoint_dir(tmp_path), []
  allowed = checkpoint.os.access
  monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: allowed(path, mode) and not (
      pathlib.Path(path) == folder and len(steps) >= 3))  # read-only from step 3 on
  with pytest.raises(checkpoint.CheckpointWriteError, match=r"step 4 could not be written.*"
                     r"PermissionError.*not writable.*Checkpoints kept: \[2\]"):
    loop.Trainer(cfg, tmp_path, progress=False, on_step=steps.append).run()
  assert steps == [1, 2, 3]  # stopped at step 4, before its on_step
  assert rundir.checkpoint_steps(tmp_path) == [2]


FILL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "ggr-jax"  # as the installed command
from ggr_jax import cli
sys.exit(cli.main(["train", "--workdir", sys.argv[2], "--config.train.steps=6",
                   "--config.train.batch_size=8", "--config.train.uratio=1",
                   "--config.train.log_every=2", "--config.train.checkpoint_every=2",
                   "--config.train.eval_every=6"]))
"""


def test_a_full_disk_stops_the_run_with_one_line_naming_the_cause(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # no cache writes
  proc = subprocess.run([sys.executable, "-c", FILL_DISK, str(64 * 1024), str(tmp_path / "run")],
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  # orbax's writer thread logs its own traceback meanwhile, possibly on the same line
  message = proc.stderr[proc.stderr.index("ggr-jax train: checkpoint step 2 could not be "):]
  assert message.index("(File too large, errno 27); the run stopped. Checkpoints kept: none") < 300


def test_interval_means_are_exact_across_an_interrupt_off_a_log_step(tmp_path):
  cfg = tiny_config(steps=6)
  cfg.train.update(log_every=3, checkpoint_every=3)
  loop.train(cfg, tmp_path / "full", progress=False)

  def interrupt(step):
    if step == 2:  # off a log step, after no checkpoint
      signal.raise_signal(signal.SIGTERM)

  assert loop.Trainer(cfg, tmp_path / "resumed", progress=False, on_step=interrupt).run() is None
  loop.train(cfg, tmp_path / "resumed", progress=False)
  full, resumed = (
      [{k: v for k, v in r.items() if k != "monitors/steps_per_s"}
       for r in metrics_log.read(tmp_path / name) if r["split"] == "train"]
      for name in ("full", "resumed"))
  assert [r["step"] for r in full] == [3, 6] and resumed == full
