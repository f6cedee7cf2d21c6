"""Shared fixtures: paths to the shared reference data and random pytree suites."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from unittest import mock

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


_LAX_CONV = jax.lax.conv_general_dilated


def _conv_by_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                    precision=None, preferred_element_type=None, **kwargs):
  """A float64 NHWC/HWIO 2-D convolution as shifted windows and one matmul (see
  :func:`float64_convolutions_by_matmul`); anything else goes to XLA's convolution."""
  plain = (lhs.dtype == jnp.float64 and lhs.ndim == 4 and feature_group_count == 1
           and not any(v is not None for v in kwargs.values())
           and batch_group_count == 1 and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and preferred_element_type in (None, jnp.float64)
           and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if not plain:
    return _LAX_CONV(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count, precision,
                     preferred_element_type, **kwargs)
  (kh, kw, cin, cout), strides = rhs.shape, tuple(window_strides)
  dilation = tuple(rhs_dilation or (1, 1))
  window = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
  pads = jax.lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding) \
      if isinstance(padding, str) else padding
  xp = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  out = [(xp.shape[1 + a] - window[a]) // strides[a] + 1 for a in range(2)]
  windows = [xp[:, i * dilation[0]:i * dilation[0] + (out[0] - 1) * strides[0] + 1:strides[0],
                j * dilation[1]:j * dilation[1] + (out[1] - 1) * strides[1] + 1:strides[1]]
             for i in range(kh) for j in range(kw)]
  return jnp.concatenate(windows, axis=-1) @ rhs.reshape(kh * kw * cin, cout)


@contextlib.contextmanager
def float64_convolutions_by_matmul():
  """Inside, float64 2-D convolutions traced through ``jax.lax.conv_general_dilated``
  (Flax's ``nn.Conv``) are shifted windows and one matmul. XLA's CPU backend has no
  float64 convolution kernel (it emits plain loops, about 2.5 GFLOP/s here), while its
  float64 matmul is Eigen's; the parity tests check the models, losses and steps, not
  XLA's convolution, and the two agree to float64 rounding."""
  with mock.patch.object(jax.lax, "conv_general_dilated", _conv_by_matmul):
    yield


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
