"""Sweep specs: cells, grids of cells, their validated configs and workdir states."""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import itertools
import pathlib
import re
import sys
from typing import Any

from ggr_jax import configs, rundir
from ggr_jax.rundir import config_diff, latest_checkpoint_step as checkpoint_step


CELL_KEYS = ("name", "config", "overrides")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]{0,199}$")
_FIELD = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
_SCALARS = (bool, int, float, str)


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
  text, _, arg = spec.partition(":")
  path = pathlib.Path(text)
  if "/" not in text and not text.endswith(".py"):
    path = configs.CONFIG_DIR / f"{text}.py"
  if not path.is_file():
    raise SweepError(f"sweep spec {text!r} not found: give the path of a .py file defining "
                     "get_sweep(), or the name of one in configs/.")
  module_spec = importlib.util.spec_from_file_location(f"_ggr_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as err:
    raise SweepError(f"sweep spec {path} line {err.lineno}: {err.msg}; fix the file.") from None
  except Exception as err:  # pylint: disable=broad-except  # the spec's own code failed
    raise SweepError(f"sweep spec {path} failed while loading: {type(err).__name__}: {err}"
                     ) from None
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
  from ggr_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel

  try:
    cfg = configs.load(cell.config_args())
    config_lib.validate(cfg, num_devices=1)
  except configs.UnknownConfig as err:
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


def cell_state(workdir: pathlib.Path, cfg) -> tuple[str, int]:
  """``("done", steps)``, ``("resume", checkpoint step)`` or ``("new", 0)``.

  Raises :class:`SweepError` when the workdir holds a run of another config.
  """
  now = cfg.to_dict()
  for name, read in ((rundir.SUMMARY, lambda s: s.get("config", {})),
                     (rundir.CONFIG, lambda c: c)):
    path = rundir.path(workdir, name)
    if path.exists():
      changed = config_diff(read(rundir.read_json(path)), now)
      if changed:
        raise SweepError(f"{workdir} holds a run of another config ({', '.join(changed[:6])}); "
                         "delete it, rename the cell, or use another --root.")
  summary = rundir.path(workdir, rundir.SUMMARY)
  if summary.exists():
    return "done", int(rundir.read_json(summary).get("steps", 0))
  step = checkpoint_step(workdir)
  return ("resume", step) if step else ("new", 0)


