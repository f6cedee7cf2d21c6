"""Semi-supervised algorithms: pure loss functions, each returning the supervised and the
auxiliary loss separately.

Every algorithm module provides ``losses(apply_fn, params, model_state, batch, rng,
step, cfg) -> (sup_loss, aux_loss, new_model_state, metrics)``, ``default_config()``,
``VIEWS``: the augmented views it needs from each index source (``labeled``,
``unlabeled``, ``selected``), each ``"weak"`` or ``"strong"``, and the supervised loss
alone, ``supervised_loss(outputs, batch, cfg)`` on the outputs of its ``LABELED_VIEWS``
(the same function ``losses`` uses), for an anchor from the labeled views only
(:func:`labeled_loss`).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from ggr_jax.ssl import common

# name -> (module, model head it needs; see ggr_jax.models.heads.OpenSetNet)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "supervised": ("ggr_jax.ssl.supervised", "none"),
    "fixmatch": ("ggr_jax.ssl.fixmatch", "none"),
    "iomatch": ("ggr_jax.ssl.iomatch", "iomatch"),
    "openmatch": ("ggr_jax.ssl.openmatch", "openmatch"),
}


def get(name: str) -> types.ModuleType:
  """The algorithm module registered under ``name``."""
  if name not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}.")
  return importlib.import_module(ALGORITHMS[name][0])


def head(name: str) -> str:
  """The model head algorithm ``name`` needs."""
  get(name)
  return ALGORITHMS[name][1]


def labeled_loss(name: str, apply_fn: common.ApplyFn, params: Any, model_state: Any,
                 batch: dict, cfg: Any) -> tuple[Any, Any]:
  """``(sup_loss, new_model_state)`` of algorithm ``name`` from a forward of its labeled
  views alone (train-mode BatchNorm with the labeled batch's own statistics)."""
  algo = get(name)
  outputs, new_state = common.forward_concat(apply_fn, params, model_state,
                                             [batch[k] for k in algo.LABELED_VIEWS])
  return algo.supervised_loss(outputs, batch, cfg), new_state
