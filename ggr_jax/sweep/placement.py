"""Where sweep cells run: one per GPU or TPU chip, one over all devices, or CPU core shares."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys

from ggr_jax.sweep.spec import SweepError

TPU_BASE_PORT = 8476


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one cell runs: a label, environment variables and (CPU) the cores it may use."""
  label: str
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  cpus: tuple[int, ...] | None = None


def detect_accelerators() -> tuple[str, list[str]]:
  """``("gpu", ids)``, ``("tpu", chip indices)`` or ``("cpu", [])``, without starting JAX.

  GPUs: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``. TPU chips:
  ``TPU_VISIBLE_CHIPS`` if set, else the ``/dev/accel*`` or ``/dev/vfio/N`` device files.
  """
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    ids = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if ids:
      return "gpu", ids
  elif shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                           check=False).stdout
    except (OSError, subprocess.SubprocessError):
      out = ""
    ids = [m.group(1) for m in re.finditer(r"^GPU (\d+):", out, re.MULTILINE)]
    if ids:
      return "gpu", ids
  chips = os.environ.get("TPU_VISIBLE_CHIPS")
  if chips:
    return "tpu", [c.strip() for c in chips.split(",") if c.strip()]
  count = len(glob.glob("/dev/accel[0-9]*")) or len(glob.glob("/dev/vfio/[0-9]*"))
  return ("tpu", [str(i) for i in range(count)]) if count else ("cpu", [])


def make_slots(devices: str = "auto", parallel: int | None = None,
               accelerators: tuple[str, list[str]] | None = None,
               cpus: list[int] | None = None) -> list[Slot]:
  """The places cells run concurrently (one cell per slot).

  ``devices``: ``auto`` (one cell per accelerator, else ``parallel`` CPU cells), ``per-run``
  (one cell per accelerator; an error without one) or ``all`` (one cell at a time over
  every device). ``parallel`` caps the number of concurrent cells.
  """
  kind, ids = accelerators or detect_accelerators()
  if devices not in ("auto", "all", "per-run"):
    raise SweepError(f"--devices {devices!r}: choose auto, all or per-run.")
  if parallel is not None and parallel < 1:
    raise SweepError(f"--parallel {parallel}: must be a positive integer.")
  if devices == "all":
    if parallel not in (None, 1):
      raise SweepError("--devices all trains one cell at a time over every device; drop "
                       "--parallel, or use --devices per-run for one cell per device.")
    return [Slot("all devices")]
  if kind == "cpu":
    if devices == "per-run":
      raise SweepError("--devices per-run needs GPUs (nvidia-smi) or TPU chips and none were "
                       "found; on CPU use --parallel N.")
    cores = sorted(os.sched_getaffinity(0) if cpus is None and hasattr(os, "sched_getaffinity")
                   else cpus or range(os.cpu_count() or 1))
    n = parallel or 1
    if n == 1:
      return [Slot("cpu")]
    if n > len(cores):
      raise SweepError(f"--parallel {n} exceeds the {len(cores)} CPU cores available; each "
                       f"cell needs at least one (use --parallel {len(cores)} or less).")
    shares = [tuple(int(c) for c in chunk) for chunk in _split(cores, n)]
    return [Slot(f"cpu {s[0]}" + (f"-{s[-1]}" if len(s) > 1 else ""), cpus=s) for s in shares]
  ids = ids[:parallel] if parallel else ids
  if kind == "gpu":
    return [Slot(f"gpu {i}", {"CUDA_VISIBLE_DEVICES": i}) for i in ids]
  return [Slot(f"tpu chip {i}", _tpu_env(i, TPU_BASE_PORT + k)) for k, i in enumerate(ids)]


def _split(items: list[int], n: int) -> list[list[int]]:
  size, extra = divmod(len(items), n)
  out, start = [], 0
  for k in range(n):
    end = start + size + (k < extra)
    out.append(items[start:end])
    start = end
  return out


def _tpu_env(chip: str, port: int) -> dict[str, str]:
  """One chip as its own single-process TPU slice (untested here: no TPU at hand)."""
  return {"TPU_VISIBLE_CHIPS": chip, "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
          "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": str(port),
          "TPU_PROCESS_ADDRESSES": f"localhost:{port}", "CLOUD_TPU_TASK_ID": "0"}




def terminate_with_parent(parent: int) -> None:
  """In a child of ``parent`` (a cell's trainer): SIGTERM when the parent dies, even by
  ``kill -9`` (Linux), so that no cell trains on as an orphan; the cell checkpoints and
  exits as on a Ctrl-C."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=import-outside-toplevel
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request was made
      os.kill(os.getpid(), signal.SIGTERM)
