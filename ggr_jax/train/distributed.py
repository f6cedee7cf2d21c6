"""Multi-process (multi-host) training: ``jax.distributed.initialize`` from flags or env.

Every process runs the same program (SPMD, one JAX "controller" per process). Each
builds the same data split from the config seed, holds the whole (small) dataset, and
samples the same global batch from the same PRNG key; the jitted step shards that batch
over the ``("data",)`` mesh of *all* processes' devices, so each device computes its
own slice and the gradient mean is a cross-process all-reduce. Parameters stay
replicated. Only process 0 writes ``metrics.jsonl``, TensorBoard, ``config.json`` and
``summary.json`` and prints; all processes take part in the orbax checkpoint save and
restore (the workdir must be on a file system all hosts see, e.g. NFS or GCS).

On each of N machines (process id I = 0..N-1, HOST0 the machine of process 0)::

  ggr-jax train --config default --workdir /shared/run \\
      --coordinator HOST0:12355 --num-processes N --process-id I

or, equivalently, with environment variables::

  JAX_COORDINATOR_ADDRESS=HOST0:12355 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=I \\
      ggr-jax train --config default --workdir /shared/run

``JAX_COORDINATOR_ADDRESS`` (and ``JAX_LOCAL_DEVICE_IDS``, ``JAX_COORDINATOR_BIND_ADDRESS``,
``JAX_COORDINATOR_PORT``) are read by ``jax.distributed`` itself; ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` are read here. Under ``srun`` (SLURM, more than one task) or
``mpirun`` (Open MPI, more than one rank) nothing needs to be given: JAX reads the
launcher's variables. On Cloud TPU pods or Kubernetes set ``GGR_JAX_DISTRIBUTED=1`` to
let JAX detect the cluster. CPU processes exchange gradients through gloo
(``jax_cpu_collectives_implementation``, set to ``"gloo"`` here when unset).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_AUTO = "GGR_JAX_DISTRIBUTED"


class DistributedError(ValueError):
  """A multi-process setting (flag or environment variable) the run cannot use."""


def _env_int(name: str) -> int | None:
  text = os.environ.get(name)
  if text is None or not text.strip():
    return None
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"environment variable {name}={text!r} is not an integer; "
                           f"set it to a whole number or unset it.") from None


def _launcher_world_size() -> int:
  """Processes started by SLURM (``srun``) or Open MPI (``mpirun``); 1 when neither."""
  for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    value = os.environ.get(name, "")
    if value.isdigit():
      return int(value)
  return 1


def check_address(address: str) -> tuple[str, int]:
  """Splits ``host:port`` (``[v6addr]:port`` for IPv6); a bad address names the fix."""
  host, sep, port = address.rpartition(":")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"coordinator address {address!r} is not host:port; give the "
                           "machine of process 0 and a free TCP port, e.g. 10.0.0.1:12355 "
                           "or [::1]:12355.")
  return host, int(port)


def _check_ids(num_processes: int | None, process_id: int | None) -> None:
  if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
    raise DistributedError(f"num_processes = {num_processes!r} must be a positive integer "
                           "(the number of processes of the run, all machines together).")
  if process_id is not None and (not isinstance(process_id, int) or process_id < 0):
    raise DistributedError(f"process_id = {process_id!r} must be an integer >= 0.")
  if None not in (num_processes, process_id) and process_id >= num_processes:
    raise DistributedError(f"process_id = {process_id} is out of range for num_processes = "
                           f"{num_processes}; use 0..{num_processes - 1}, one id per process.")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None) -> bool:
  """Joins a multi-process run; returns whether ``jax.distributed`` was initialized.

  Arguments win over the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``). Outside a SLURM/Open MPI launch (or ``GGR_JAX_DISTRIBUTED=1``) all
  three must be known. A single process (nothing given, or ``num_processes == 1``) does
  nothing. Must run before any other JAX call of the process.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
  process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id
  if coordinator is not None:
    check_address(coordinator)
  _check_ids(num_processes, process_id)
  auto = os.environ.get(ENV_AUTO, "").lower() in ("1", "true", "yes", "auto")
  launched = _launcher_world_size() > 1
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  if num_processes == 1 or (not auto and not launched and not any(
      v is not None for v in given.values())):
    return False
  missing = [name for name, value in given.items() if value is None]
  if missing and not (auto or launched):
    flags = ", ".join(f"--{name.replace('_', '-')} (or {env})" for name, env in zip(
        given, (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)) if name in missing)
    raise DistributedError(f"a multi-process run needs {flags} as well: every process gets the "
                           "same coordinator host:port and process count and its own id.")
  if jax.distributed.is_initialized():
    return True
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids)
  except RuntimeError as err:
    if "before" in str(err):  # a JAX backend exists already
      raise RuntimeError("ggr_jax.train.distributed.initialize() must run before any other "
                         "JAX call of the process (devices, arrays, jit).") from err
    raise
  return True


def is_primary() -> bool:
  """Whether this is process 0, the one that writes logs and summaries and prints."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reached ``name``; nothing to do in a single process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
