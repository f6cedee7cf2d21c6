"""Semi-supervised algorithms on one interface (:class:`~ggr_jax.ssl.interface.Algorithm`).

Each built-in algorithm is one module defining ``ALGORITHM``; :func:`register` adds one
from anywhere (a user's module, a test) without touching the run layer.
"""

from __future__ import annotations

import importlib
from typing import Any

from ggr_jax.ssl import common
from ggr_jax.ssl.interface import Algorithm, EpochContext, LossContext, Losses

# name -> "module" defining ALGORITHM, or "module:NAME" (imported on first use)
BUILTIN: dict[str, str] = {
    "supervised": "ggr_jax.ssl.supervised",
    "fixmatch": "ggr_jax.ssl.fixmatch",
    "iomatch": "ggr_jax.ssl.iomatch",
    "openmatch": "ggr_jax.ssl.openmatch",
    "ggcr": "ggr_jax.ssl.ggcr:GGCR",
    "iomatch_ggcr": "ggr_jax.ssl.ggcr:IOMATCH_GGCR",
    "openmatch_ggcr": "ggr_jax.ssl.ggcr:OPENMATCH_GGCR",
    "metasemi": "ggr_jax.ssl.metasemi",
    "metasemi_ggcr": "ggr_jax.ssl.ggcr:METASEMI_GGCR",
    "simgcd": "ggr_jax.ssl.simgcd",
}
ALGORITHMS = tuple(BUILTIN)  # the built-in names
_REGISTERED: dict[str, Algorithm] = {}

__all__ = ["ALGORITHMS", "Algorithm", "EpochContext", "LossContext", "Losses", "get", "head",
           "labeled_loss", "names", "register"]


def register(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
  """Makes ``algorithm`` available as ``config.algorithm = algorithm.name``.

  Its config block must be in the run's config (``cfg[name] = algorithm.default_config()``;
  the packaged ``default`` config adds a block for every algorithm registered before it
  is built).
  """
  if not isinstance(algorithm, Algorithm):
    raise TypeError(f"register takes a ggr_jax.ssl.Algorithm, got {type(algorithm).__name__}.")
  if not replace and (algorithm.name in BUILTIN or algorithm.name in _REGISTERED):
    raise ValueError(f"an algorithm named {algorithm.name!r} exists; pass replace=True to "
                     "replace it or choose another name.")
  _REGISTERED[algorithm.name] = algorithm
  return algorithm


def names() -> tuple[str, ...]:
  """Every algorithm name: the built-in ones, then the registered ones."""
  return ALGORITHMS + tuple(n for n in _REGISTERED if n not in BUILTIN)


def get(name: str) -> Algorithm:
  """The algorithm registered under ``name``."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in BUILTIN:
    raise ValueError(f"Unknown algorithm {name!r}; choose one of {sorted(names())}.")
  module, _, attribute = BUILTIN[name].partition(":")
  return getattr(importlib.import_module(module), attribute or "ALGORITHM")


def head(name: str) -> str:
  """The model head algorithm ``name`` needs."""
  return get(name).head


def labeled_loss(name: str, apply_fn: common.ApplyFn, params: Any, model_state: Any,
                 batch: dict, cfg: Any) -> tuple[Any, Any]:
  """``(sup_loss, new_model_state)`` of algorithm ``name`` from a forward of its labeled
  views alone (train-mode BatchNorm with the labeled batch's own statistics)."""
  algo = get(name)
  outputs, new_state = common.forward_concat(apply_fn, params, model_state,
                                             [batch[k] for k in algo.labeled_views])
  return algo.supervised_loss(outputs, batch, cfg), new_state
