"""Shared fixtures: paths to the shared reference data and random pytree suites."""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np
import pytest

# 8 virtual CPU devices for the sharding tests; must be set before jax initialises.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite compiles far more than it computes: cheap LLVM code generation halves the
# compile time of a train step (no test measures speed).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                              " --xla_llvm_disable_expensive_passes=true")

# Many tests build the same small programs in fresh closures (one Trainer each), which jit
# caches apart; a persistent compilation cache shared by the session (and its
# subprocesses) compiles each program once. Set JAX_COMPILATION_CACHE_DIR to keep one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ggr_jax_tests_xla_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# As ggr-jax does at start-up: freed XLA buffers stay in the process (ggr_jax.allocator),
# and XLA's CPU convolutions are Eigen's (ggr_jax.xla_flags).
from ggr_jax.allocator import retain_freed_memory  # pylint: disable=wrong-import-position
from ggr_jax.xla_flags import use_eigen_convolutions  # pylint: disable=wrong-import-position

retain_freed_memory()
use_eigen_convolutions()

import jax  # pylint: disable=wrong-import-position,wrong-import-order
import jax.numpy as jnp  # pylint: disable=wrong-import-position,wrong-import-order

from ggr_jax.models.float64_conv import float64_convolutions_by_matmul  # pylint: disable=wrong-import-position,unused-import

REPO = pathlib.Path(__file__).resolve().parents[1]


def with_optimized_code(jitted):
  """``jitted`` compiled at full XLA code-generation effort, for the few compute-heavy
  tests (the suite's default is cheap code generation, see above)."""
  options = {"xla_backend_optimization_level": 2, "xla_llvm_disable_expensive_passes": False}
  compiled = {}

  def call(*args):
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in compiled:
      compiled[key] = jitted.lower(*args).compile(compiler_options=options)
    return compiled[key](*args)

  return call


SHARED = pathlib.Path(os.environ.get("GGR_SHARED", REPO.parent / "shared"))


def shared_file(*parts: str) -> pathlib.Path:
  """A file under ../shared, or a skip naming where it was expected."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} not found: the reference data lives in ../shared beside the "
                "repository (or set GGR_SHARED to its folder).")
  return path


def parity_reference(env: str, name: str) -> pathlib.Path:
  """The reference file named by the environment variable ``env``, else
  ``shared/parity/<name>``; a skip naming it when it does not exist."""
  value = os.environ.get(env)
  if not value:
    return shared_file("parity", name)
  path = pathlib.Path(value)
  if not path.exists():
    pytest.skip(f"{env}={value} does not exist.")
  return path


def parity_checker(module: str):
  """The numpy checker ``module`` (``compare_ref``, ``compare_meta``, ...) from the shared
  folder ``shared/parity``, never from beside a reference."""
  import importlib  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  folder = SHARED / "parity"
  if not (folder / f"{module}.py").exists():
    pytest.skip(f"{module}.py not found in {folder}.")
  if str(folder) not in sys.path:
    sys.path.insert(0, str(folder))
  return importlib.import_module(module)


def random_tree(rng: np.random.Generator, shapes: dict, dtype=np.float32) -> dict:
  """A dict pytree of standard-normal leaves with the given shapes."""
  return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


# Shared input suite: pytrees of mixed ranks, including scalars and a nested dict.
TREE_SHAPES = [
    {"w": (7,)},
    {"conv": (3, 3, 2, 4), "bias": (4,), "scale": ()},
    {"a": (5, 3), "b": (11,), "c": (2, 2, 2)},
]
