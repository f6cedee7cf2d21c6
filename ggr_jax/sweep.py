"""``ggr-jax sweep``: many ``ggr-jax train`` runs from one spec, placed on devices, resumable.

A sweep spec is a Python file (or the name of a file in ``ggr_jax/configs/``) whose
``get_sweep()`` (``get_sweep(arg)`` for ``SPEC:ARG``) returns a list of cells::

  {"name": "fixmatch-vlr-s0",            # optional: unique, filesystem-safe
   "config": "grid:algorithm=fixmatch,ggr=vlr,seed=0",   # as for ggr-jax train --config
   "overrides": {"train.steps": 500}}     # optional: --config.FIELD=VALUE flags

:func:`product` builds the cells of a grid of axes. Each cell trains in ``ROOT/<name>``
as its own process (``python -m ggr_jax.cli train``), its output in ``ROOT/<name>/log.txt``.
A cell whose ``summary.json`` belongs to the same config is done and skipped; a cell
with a checkpoint is resumed by rerunning its command (the loop resumes); a failed cell
is rerun. Placement: one cell per GPU (``CUDA_VISIBLE_DEVICES``) or TPU chip
(``TPU_VISIBLE_CHIPS``) at a time, or one cell over all devices at a time
(``--devices all``); on CPU, ``--parallel N`` cells at a time, each pinned to its own
share of the cores (XLA sizes its thread pool from the affinity mask). Ctrl-C (or
SIGTERM) sends SIGTERM to the running cells, which save a checkpoint and exit 130; the
next ``ggr-jax sweep`` resumes them. At the end the report of :mod:`ggr_jax.report` is
written into ``ROOT``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

CELL_KEYS = ("name", "config", "overrides")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]{0,199}$")
_FIELD = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
_SCALARS = (bool, int, float, str)
TPU_BASE_PORT = 8476


class SweepError(ValueError):
  """A sweep spec, a cell or a placement request the sweep cannot use."""


@dataclasses.dataclass
class Cell:
  """One run: ``ggr-jax train --config CONFIG --config.K=V ... --workdir ROOT/NAME``."""
  name: str
  config: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

  def config_args(self) -> list[str]:
    return ["--config", self.config] + [f"--config.{k}={_flag_value(v)}"
                                        for k, v in self.overrides.items()]

  def command(self, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "ggr_jax.cli", "train", *self.config_args(),
            f"--workdir={workdir}"]


def _flag_value(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return str(tuple(value))
  return str(value)


def default_name(config: str, overrides: dict[str, Any] | None = None) -> str:
  """A filesystem-safe name from the config and overrides: ``grid_algorithm-iomatch_seed-0``."""
  path, _, arg = config.partition(":")
  parts = [pathlib.Path(path).stem]
  parts += [p.replace("=", "-") for p in arg.split(",") if p]
  parts += [f"{k}-{_flag_value(v)}" for k, v in (overrides or {}).items()]
  return _UNSAFE.sub("-", "_".join(parts))[:200]


def product(config: str = "grid", *, overrides: dict[str, Any] | None = None,
            name: str | None = None, **axes: Any) -> list[dict[str, Any]]:
  """The cells of every combination of the list-valued arguments (earlier keys vary slowest).

  ``axes`` become the config argument ``config:k=v,k=v`` (the cell string of the
  ``grid`` config); ``overrides`` become ``--config.FIELD=VALUE`` flags. A ``list`` value
  is an axis, any other value (a tuple included) is fixed. ``name``, if given, is a
  ``str.format`` template over the keys (dots in override keys read as ``_``).

  >>> [c["config"] for c in product("grid", algorithm=["fixmatch", "iomatch"], seed=0)]
  ['grid:algorithm=fixmatch,seed=0', 'grid:algorithm=iomatch,seed=0']
  >>> product("default", overrides={"train.seed": [0, 1]}, name="s{train_seed}")[1]["name"]
  's1'
  """
  overrides = dict(overrides or {})
  keys = [("axis", k) for k in axes] + [("field", k) for k in overrides]
  values = [v if isinstance(v, list) else [v] for v in (*axes.values(), *overrides.values())]
  cells = []
  for combo in itertools.product(*values):
    arg = {k: v for (kind, k), v in zip(keys, combo) if kind == "axis"}
    fields = {k: v for (kind, k), v in zip(keys, combo) if kind == "field"}
    text = config + (":" + ",".join(f"{k}={v}" for k, v in arg.items()) if arg else "")
    cell = {"config": text, "overrides": fields}
    if name is not None:
      try:
        cell["name"] = name.format(**arg, **{k.replace(".", "_"): v for k, v in fields.items()})
      except (KeyError, IndexError) as err:
        raise SweepError(f"name template {name!r} uses {err}, which is no key of this product; "
                         f"keys: {', '.join(k.replace('.', '_') for _, k in keys)}") from err
    cells.append(cell)
  return cells


def parse_cells(raw: Any, origin: str = "get_sweep()") -> list[Cell]:
  """Checks the cell dicts (keys, types, unique safe names) and returns them as :class:`Cell`."""
  if not isinstance(raw, (list, tuple)):
    raise SweepError(f"{origin} returned a {type(raw).__name__}; it must return a list of cell "
                     "dicts {'name', 'config', 'overrides'} (ggr_jax.sweep.product builds one).")
  if not raw:
    raise SweepError(f"{origin} returned no cells.")
  cells: list[Cell] = []
  for i, item in enumerate(raw):
    where = f"{origin}: cell #{i}"
    if not isinstance(item, dict):
      raise SweepError(f"{where} is a {type(item).__name__}, not a dict with keys "
                       f"{', '.join(CELL_KEYS)}.")
    unknown = sorted(set(item) - set(CELL_KEYS))
    if unknown:
      raise SweepError(f"{where} has unknown keys {unknown}; allowed keys: {', '.join(CELL_KEYS)} "
                       "(config fields go into 'overrides').")
    config = item.get("config")
    if not isinstance(config, str) or not config:
      raise SweepError(f"{where} needs 'config': a config name or path as for "
                       f"ggr-jax train --config (got {config!r}).")
    overrides = item.get("overrides") or {}
    if not isinstance(overrides, dict):
      raise SweepError(f"{where}: 'overrides' must be a dict {{'train.steps': 500, ...}}.")
    for key, value in overrides.items():
      if not isinstance(key, str) or not _FIELD.match(key):
        raise SweepError(f"{where}: override key {key!r} is no config field path; write "
                         "fields as 'train.steps' (without '--config.').")
      if not (isinstance(value, _SCALARS) or (isinstance(value, (list, tuple))
                                              and all(isinstance(v, _SCALARS) for v in value))):
        raise SweepError(f"{where}: override {key} = {value!r} must be a bool, int, float, str "
                         "or a tuple of them.")
    name = item.get("name") or default_name(config, overrides)
    if not isinstance(name, str) or not _NAME.match(name):
      raise SweepError(f"{where}: name {name!r} is not filesystem-safe; use up to 200 letters, "
                       "digits and . _ - = , + (not starting with a symbol).")
    cells.append(Cell(name, config, dict(overrides)))
  counts = collections.Counter(c.name for c in cells)
  duplicates = sorted(n for n, k in counts.items() if k > 1)
  if duplicates:
    raise SweepError(f"{origin}: duplicate cell names {duplicates}; give each cell a unique "
                     "'name' (two cells would share one workdir).")
  return cells


def load_spec(spec: str) -> list[Cell]:
  """The cells of ``PATH.py[:ARG]`` or of a packaged ``NAME[:ARG]`` in ``ggr_jax/configs``."""
  from ggr_jax.cli import CONFIG_DIR  # pylint: disable=import-outside-toplevel
  text, _, arg = spec.partition(":")
  path = pathlib.Path(text)
  if "/" not in text and not text.endswith(".py"):
    path = CONFIG_DIR / f"{text}.py"
  if not path.is_file():
    raise SweepError(f"sweep spec {text!r} not found: give the path of a .py file defining "
                     "get_sweep(), or the name of one in ggr_jax/configs/.")
  module_spec = importlib.util.spec_from_file_location(f"_ggr_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  get_sweep = getattr(module, "get_sweep", None)
  if not callable(get_sweep):
    raise SweepError(f"{path} defines no get_sweep(); a sweep spec returns a list of cells "
                     "{'name', 'config', 'overrides'} from get_sweep() "
                     "(see ggr_jax.sweep.product).")
  return parse_cells(get_sweep(arg) if arg else get_sweep(), f"{path.name}:get_sweep()")


# -- configs and the state of each cell's workdir --------------------------------------
def resolve_config(cell: Cell):
  """The validated ``ConfigDict`` the cell's ``ggr-jax train`` command would train."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from ggr_jax import cli  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel

  try:
    # pylint: disable-next=protected-access
    argv = ["ggr-jax"] + cli._resolve_config_path(cell.config_args())
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    values(argv)
    cfg = values.config
    config_lib.validate(cfg, num_devices=1)
  except SystemExit as err:
    raise SweepError(f"cell {cell.name}: {err}") from None
  except (flags.Error, config_lib.ConfigError) as err:
    raise SweepError(f"cell {cell.name}: {_without_traceback(str(err))}") from None
  except Exception as err:  # pylint: disable=broad-except
    raise SweepError(f"cell {cell.name}: config {cell.config!r} failed to load: "
                     f"{type(err).__name__}: {err}") from err
  return cfg


def _without_traceback(text: str) -> str:
  """A config file's exception as absl reports it, less the traceback: head and last line."""
  head, sep, tail = text.partition("Traceback (most recent call last):")
  return f"{head.strip()} {tail.strip().splitlines()[-1]}" if sep and tail.strip() else text


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return json.loads(json.dumps(out, default=list))  # tuples -> lists, as in the workdir


def config_diff(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """Flat fields that differ between two configs, ignoring fields a resume may change."""
  from ggr_jax.train.loop import RESUMABLE_CHANGES  # pylint: disable=import-outside-toplevel
  before, now = _flat(before), _flat(now)
  return sorted(k for k in set(before) | set(now)
                if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k))


def checkpoint_step(workdir: pathlib.Path) -> int | None:
  """The newest finished checkpoint step in ``workdir/checkpoints`` (orbax step folders)."""
  steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps) if steps else None


def cell_state(workdir: pathlib.Path, cfg) -> tuple[str, int]:
  """``("done", steps)``, ``("resume", checkpoint step)`` or ``("new", 0)``.

  Raises :class:`SweepError` when the workdir holds a run of another config.
  """
  now = cfg.to_dict()
  for name, read in (("summary.json", lambda s: s.get("config", {})), ("config.json", lambda c: c)):
    path = workdir / name
    if path.exists():
      changed = config_diff(read(json.loads(path.read_text())), now)
      if changed:
        raise SweepError(f"{workdir} holds a run of another config ({', '.join(changed[:6])}); "
                         "delete it, rename the cell, or use another --root.")
  summary = workdir / "summary.json"
  if summary.exists():
    return "done", int(json.loads(summary.read_text()).get("steps", 0))
  step = checkpoint_step(workdir)
  return ("resume", step) if step else ("new", 0)


# -- placement ---------------------------------------------------------------------------
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


# -- running -------------------------------------------------------------------------
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
    return self.workdir / "log.txt"

  def summary(self) -> dict[str, Any]:
    path = self.workdir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def plan(cells: list[Cell], root: str | pathlib.Path) -> list[Outcome]:
  """Loads and validates every cell's config and classifies its workdir, before any run.

  Raises :class:`SweepError` listing every bad cell (config errors, foreign workdirs).
  """
  root = pathlib.Path(root).absolute()
  outcomes, errors = [], []
  for cell in cells:
    try:
      state, step = cell_state(root / cell.name, resolve_config(cell))
    except SweepError as err:
      errors.append(str(err))
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
  cpus = slot.cpus
  preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  try:
    # A session of its own: a terminal's Ctrl-C reaches the sweep only, which stops the
    # cells with SIGTERM (the train loop saves a checkpoint and exits 130).
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                            preexec_fn=preexec)
  finally:
    log.close()


def _finished(outcome: Outcome, rc: int, stopping: bool) -> str:
  if rc == 0 and (outcome.workdir / "summary.json").exists():
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
  parser.add_argument("spec", nargs="?", help="PATH.py[:ARG] or a name in ggr_jax/configs "
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
  """``ggr-jax sweep``: exit 0 if every cell is done, 1 if one failed, 2 on a bad spec or
  placement, 130 if stopped by a signal."""
  parser = build_parser()
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  if args.report_only:
    return _write_report(root)
  if not args.spec:
    parser.error("SPEC is required (or give --report-only)")
  try:
    cells = load_spec(args.spec)
    if args.only:
      cells = [c for c in cells if any(s in c.name for s in args.only)]
      if not cells:
        raise SweepError(f"--only {' '.join(args.only)} matches no cell of {args.spec}.")
    slots = make_slots(args.devices, args.parallel)
    outcomes = plan(cells, root)
  except SweepError as err:
    print(f"ggr-jax sweep: {err}", file=sys.stderr)
    return 2
  counts = collections.Counter(o.before for o in outcomes)
  print(f"{len(outcomes)} cells in {root}: {counts['done']} done, {counts['resume']} to resume, "
        f"{counts['new']} to train; {len(slots)} at a time ({', '.join(s.label for s in slots)})")
  if args.dry_run:
    for o in outcomes:
      if o.before != "done":
        print(f"  {o.before:<6} {o.cell.name}: {' '.join(o.cell.command(o.workdir))}")
    return 0
  interrupted = run_sweep(outcomes, slots)
  print("\n" + status_table(outcomes))
  if not args.no_report and any(o.status in ("done", "trained", "resumed") for o in outcomes):
    _write_report(root)
  if interrupted:
    return 130
  return 1 if any(o.status not in ("done", "trained", "resumed") for o in outcomes) else 0
