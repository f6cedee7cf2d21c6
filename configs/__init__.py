"""Packaged ``ml_collections`` configs, and where config names resolve.

This folder is the top-level ``configs/`` of the repository, installed as the package
``ggr_jax.configs``. Variants inherit from :mod:`default` by import
(``from ggr_jax.configs import default``). ``ggr-jax train --config X`` takes a
packaged name (``default``, ``fixmatch_ggr``, ``sum``, ``supervised``, ``iomatch``,
``openmatch``, ``ggcr``, ``metasemi``, ``metasemi_ggcr``, ``simgcd``, ``grid``, ...: see
:func:`names`), a path to a ``get_config()`` file (``configs/sum.py`` from a checkout,
or your own), each optionally followed by ``:ARG`` for ``get_config(ARG)``.
"""

from __future__ import annotations

import pathlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent


class UnknownConfig(ValueError):
  """A config name that is neither packaged nor a path."""


def names() -> list[str]:
  """The packaged config names."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def resolve(spec: str) -> str:
  """``NAME[:ARG]`` of a packaged config -> ``PATH[:ARG]``; a path is returned as given.

  >>> resolve("sum").endswith("configs/sum.py")
  True
  """
  path, sep, arg = spec.partition(":")
  if "/" in path or path.endswith(".py"):
    return spec
  packaged = CONFIG_DIR / f"{path}.py"
  if not packaged.exists():
    raise UnknownConfig(f"unknown config {path!r}; packaged configs: {', '.join(names())} "
                        "(or give a path to a .py file with get_config()).")
  return str(packaged) + sep + arg


def resolve_argv(argv: list[str]) -> list[str]:
  """``argv`` with the value of ``--config NAME`` / ``--config=NAME`` resolved."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolve(out[i + 1])
    elif arg.startswith("--config="):
      out[i] = "--config=" + resolve(arg.split("=", 1)[1])
  return out


def define_config_flag(values, argv: list[str], default: str | None = "default") -> list[str]:
  """Defines the locked ``--config`` flag (``ml_collections.config_flags``) on the absl
  ``FlagValues`` ``values``; returns the argv to parse them with (names resolved)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  full_argv = ["ggr-jax"] + resolve_argv(argv)
  # sys_argv: the --config.a.b overrides are read from these, not from sys.argv.
  config_flags.DEFINE_config_file(
      "config", None if default is None else resolve(default),
      "ml_collections config file (or packaged config name)", flag_values=values,
      lock_config=True, sys_argv=full_argv)
  return full_argv


def load(argv: list[str]):
  """The locked config of ``["--config", X, "--config.FIELD=V", ...]``; raises
  ``absl.flags.Error`` or :class:`UnknownConfig`."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  values = flags.FlagValues()
  values(define_config_flag(values, argv, default=None))
  return values.config
