"""Multi-host training: 2 processes on loopback train exactly what one process trains.

The end-to-end test starts its processes with ``subprocess`` (a fresh JAX each, CPU
only, gloo collectives over 127.0.0.1); each runs ``ggr-jax train`` through
``tests/multihost_worker.py`` and dumps its copy of the parameters. The other tests
check the flag/environment handling of ``ggr_jax.train.distributed`` without starting
any process.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from ggr_jax import cli
from ggr_jax.train import distributed

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"
REPO = WORKER.parents[1]
TIMEOUT_S = 300  # generous: the 2 CPU cores are shared; an uncontended run takes about 60 s
STEPS = 3
TRAIN_ARGS = ["--config=default", "--config.model.backbone=cnn",
              f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
              "--config.train.uratio=2", "--config.train.log_every=1",
              f"--config.train.eval_every={STEPS}", f"--config.train.checkpoint_every={STEPS}"]
# Cheap XLA compiles (the same for every run compared, so results stay comparable).
XLA_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
NO_GLOO = re.compile(r"(gloo|collectives).{0,80}(not available|unavailable|not supported|"
                     r"unknown|not built)", re.IGNORECASE)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  keep = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")  # the session's compile cache
  env = {k: v for k, v in os.environ.items()
         if (k in keep or not k.startswith(("JAX_", "SLURM_", "OMPI_", "GGR_JAX_")))
         and "proxy" not in k.lower()}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_FAST}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _run_all(jobs: list[tuple[pathlib.Path, pathlib.Path, int, list[str]]]) -> None:
  """Runs every ``(out.npz, workdir, devices, flags)`` job at once; kills all on a failure."""
  started = []
  try:
    for out, workdir, devices, flags in jobs:
      log = open(out.with_suffix(".log"), "w")  # pylint: disable=consider-using-with
      cmd = [sys.executable, str(WORKER), str(out), "--", *TRAIN_ARGS, f"--workdir={workdir}",
             *flags]
      started.append((subprocess.Popen(cmd, env=_env(devices), cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    for proc, _ in started:
      proc.wait(timeout=TIMEOUT_S)
      if proc.returncode:  # the others would wait for it forever
        break
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, log in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  failed = [(job[0], proc.returncode) for job, (proc, _) in zip(jobs, started) if proc.returncode]
  if failed:
    report = "\n".join(f"--- {out.name} exited {code}:\n"
                       + out.with_suffix(".log").read_text()[-3000:] for out, code in failed)
    if NO_GLOO.search(report):
      pytest.skip(f"cross-process CPU collectives (gloo) are unavailable here:\n{report}")
    raise AssertionError(f"worker(s) failed or ran past {TIMEOUT_S} s:\n{report}")


def _load(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  with np.load(path) as data:
    meta = {k[2:]: int(data[k]) for k in data.files if k.startswith("__")}
    return {k: data[k] for k in data.files if not k.startswith("__")}, meta


@pytest.mark.parametrize("data_input", ["device", "stream"])
def test_two_processes_train_the_same_params_as_one_process_with_two_devices(tmp_path,
                                                                             data_input):
  """With ``stream`` each process gathers only its half of every batch on the host."""
  addr = f"127.0.0.1:{_free_port()}"
  multi = tmp_path / "multi"
  jobs = [(tmp_path / f"proc{i}.npz", multi, 1,
           ["--coordinator", addr, "--num-processes", "2", "--process-id", str(i),
            f"--config.train.input={data_input}"])
          for i in range(2)]
  jobs.append((tmp_path / "single.npz", tmp_path / "single", 2, []))
  _run_all(jobs)

  (p0, m0), (p1, m1), (ref, mref) = (_load(job[0]) for job in jobs)
  assert (m0["process_count"], m0["process_index"], m1["process_index"]) == (2, 0, 1)
  assert mref["process_count"] == 1
  assert m0["step"] == m1["step"] == mref["step"] == STEPS
  final = [k for k in ref if k.startswith("final")]
  assert final and p0.keys() == p1.keys() == ref.keys()
  moved = max(float(np.max(np.abs(ref[k] - ref["init" + k[5:]]))) for k in final)
  assert moved > 1e-4, "training did not move the parameters: the comparison would be vacuous"
  for name in final:
    np.testing.assert_array_equal(p0[name], p1[name], err_msg=f"replicas differ at {name}")
    np.testing.assert_allclose(p0[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Process 0 alone wrote the logs (one record per step); all wrote one checkpoint.
  records = (multi / "metrics.jsonl").read_text().splitlines()
  assert sum('"split": "train"' in r for r in records) == STEPS
  assert (multi / "summary.json").exists() and (multi / "config.json").exists()
  assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [
      str(STEPS)]


@pytest.fixture
def clean_env(monkeypatch):
  for name in list(os.environ):
    if name.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                        "OMPI_", "GGR_JAX_")):
      monkeypatch.delenv(name)
  return monkeypatch


def test_single_process_without_flags_or_env_does_not_initialize(clean_env):
  assert distributed.initialize() is False
  assert distributed.initialize("127.0.0.1:1234", num_processes=1, process_id=0) is False
  assert distributed.is_primary()


@pytest.mark.parametrize("address", ["localhost", "host:", ":123", "host:0", "host:70000",
                                     "host:http"])
def test_malformed_coordinator_address_is_rejected(address, clean_env):
  with pytest.raises(distributed.DistributedError, match="host:port"):
    distributed.initialize(address, num_processes=2, process_id=0)


def test_ipv6_and_named_coordinator_addresses_parse():
  assert distributed.check_address("[::1]:12355") == ("::1", 12355)
  assert distributed.check_address("node-0.cluster:80") == ("node-0.cluster", 80)


@pytest.mark.parametrize("num, pid, match", [(2, 2, "out of range"), (2, -1, ">= 0"),
                                             (0, 0, "positive integer")])
def test_process_ids_out_of_range_are_rejected(num, pid, match, clean_env):
  with pytest.raises(distributed.DistributedError, match=match):
    distributed.initialize("127.0.0.1:1234", num_processes=num, process_id=pid)


def test_partial_settings_name_the_missing_flag_and_env_var(clean_env):
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  clean_env.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(distributed.DistributedError, match="--process-id .or JAX_PROCESS_ID"):
    distributed.initialize()


def test_environment_variables_are_validated(clean_env):
  clean_env.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES='two'"):
    distributed.initialize()
  clean_env.setenv("JAX_NUM_PROCESSES", "2")
  clean_env.setenv("JAX_PROCESS_ID", "5")
  with pytest.raises(distributed.DistributedError, match="out of range"):
    distributed.initialize("127.0.0.1:1234")


def test_train_command_takes_the_multi_process_flags_out_of_the_config_flags():
  rest, flags = cli._split_distributed_flags(  # pylint: disable=protected-access
      ["--config", "default", "--coordinator", "10.0.0.1:99", "--config.train.steps=3",
       "--num-processes=4", "--workdir", "w", "--process-id", "3"])
  assert flags == {"coordinator": "10.0.0.1:99", "num_processes": 4, "process_id": 3}
  assert rest == ["--config", "default", "--config.train.steps=3", "--workdir", "w"]


def test_train_command_reports_a_bad_process_id_before_training(clean_env, capsys, tmp_path):
  code = cli.main(["train", "--workdir", str(tmp_path), "--coordinator", "127.0.0.1:1234",
                   "--num-processes", "2", "--process-id", "2"])
  assert code == 2 and "out of range" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())
