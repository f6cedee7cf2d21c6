"""A persistent XLA compilation cache for ggr-jax's runs, on unless the user chose one.

Every run compiles its train step and its evaluation before the first step (the default
job's step took 9.6 s of its 14 s start-up on 2 CPU cores), and the next run with the
same shapes compiles the same programs again: each seed and each repeat of an ablation
grid, each resume after an interruption, each ``ggr-jax eval``. JAX can keep compiled
programs on disk and load them in place of compiling (``jax_compilation_cache_dir``);
its key covers the program, the compile options and XLA flags, the backend and devices
and the jax/jaxlib versions, so a hit is the same executable.

:func:`use_compilation_cache` points it at ``$GGR_JAX_COMPILATION_CACHE``, else
``$XDG_CACHE_HOME/ggr_jax/xla`` (``~/.cache/ggr_jax/xla``), capped at
:data:`MAX_BYTES` with the least recently used entries evicted; programs that compile
in under JAX's threshold (1 s) are not stored. It leaves JAX alone when the user set a
cache already (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``), and when
``GGR_JAX_COMPILATION_CACHE=off``. It must run before the first compile.

  >>> import os
  >>> os.environ["GGR_JAX_COMPILATION_CACHE"] = "off"
  >>> use_compilation_cache() is None
  True
  >>> del os.environ["GGR_JAX_COMPILATION_CACHE"]
"""

from __future__ import annotations

import os
import pathlib

import jax

SETTING = "GGR_JAX_COMPILATION_CACHE"
MAX_BYTES = 4 << 30


def default_folder() -> pathlib.Path:
  """``$XDG_CACHE_HOME/ggr_jax/xla``, ``~/.cache/ggr_jax/xla`` without it."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "ggr_jax" / "xla"


def use_compilation_cache() -> pathlib.Path | None:
  """Turns the persistent cache on (see the module); returns its folder, or None when it
  left JAX's setting as it was."""
  choice = os.environ.get(SETTING, "")
  if choice.lower() in ("off", "0", "false", "no"):
    return None
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return None
  folder = pathlib.Path(choice) if choice else default_folder()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError:  # a read-only home: run uncached rather than fail
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return folder
