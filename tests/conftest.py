"""Shared fixtures: paths to the shared reference data and random pytree suites."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

# 8 virtual CPU devices for the sharding tests; must be set before jax initialises.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("GGR_SHARED", REPO.parent / "shared"))


def shared_file(*parts: str) -> pathlib.Path:
  """A file under ../shared, or a skip naming where it was expected."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} not found: the reference data lives in ../shared beside the "
                "repository (or set GGR_SHARED to its folder).")
  return path


def random_tree(rng: np.random.Generator, shapes: dict, dtype=np.float32) -> dict:
  """A dict pytree of standard-normal leaves with the given shapes."""
  return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


# Shared input suite: pytrees of mixed ranks, including scalars and a nested dict.
TREE_SHAPES = [
    {"w": (7,)},
    {"conv": (3, 3, 2, 4), "bias": (4,), "scale": ()},
    {"a": (5, 3), "b": (11,), "c": (2, 2, 2)},
]
