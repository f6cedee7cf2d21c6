"""ggr_jax: gradient-level control for semi-supervised learning in JAX.

The core is :func:`rectify`, Geometric Gradient Rectification (arXiv 2606.26973) as
an optax gradient transformation; :mod:`ggr_jax.geometry` holds the pure pytree math.
``import ggr_jax`` needs only jax and optax: the Flax Linen adapter
:class:`RectifiedTrainState` imports flax on first access.
"""

import importlib
from typing import Any

from ggr_jax import geometry
from ggr_jax.rectify import (
    MODES,
    RectifyState,
    combine,
    rectify,
    scope_from_prefix,
)

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "RectifiedTrainState",
    "RectifyState",
    "combine",
    "geometry",
    "rectify",
    "scope_from_prefix",
]

_LAZY = {"RectifiedTrainState": "ggr_jax.interop"}  # name -> module that needs flax


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
