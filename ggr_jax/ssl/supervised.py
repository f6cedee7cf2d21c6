"""Supervised-only baseline: the labeled cross-entropy, no auxiliary loss."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ggr_jax.ssl import common

VIEWS = {"labeled": {"x_lb": "weak"}}


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict()


def losses(apply_fn, params, model_state, batch, rng, step, cfg):
  """``(sup, aux, new_model_state, metrics)`` with ``aux = 0``."""
  del rng, step, cfg
  (out,), new_state = common.forward_concat(apply_fn, params, model_state, [batch["x_lb"]])
  sup = common.cross_entropy(out["logits"], batch["y_lb"])
  return sup, jnp.zeros_like(sup), new_state, {"losses/sup": sup}
