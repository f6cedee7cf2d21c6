"""The optimizer of the official protocol, with the rectifier chained in front."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

import ggr_jax


def usb_cosine_schedule(lr: float, total_steps: int, cycles: float = 7 / 16) -> Callable:
  """``lr * max(0, cos(pi * cycles * t / T))``: the official (USB) schedule, no warm-up.

  Written by hand: optax's cosine schedules use ``(1 + cos) / 2``, which is another
  curve. The final rate is ``cos(7 pi / 16) = 0.195`` of the initial one.
  """

  def schedule(count: jax.Array) -> jax.Array:
    return lr * jnp.maximum(0.0, jnp.cos(jnp.pi * cycles * count / total_steps))

  return schedule


def weight_decay_mask(params: Any) -> Any:
  """Decay only tensors of rank > 1 (conv and dense kernels), like the official rule."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def scope_fn(ggr: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """``params -> bools``: the leaves the rectifier acts on."""
  if ggr.scope == "all":
    return lambda tree: jax.tree.map(lambda _: True, tree)
  return ggr_jax.scope_from_prefix(ggr.scope)


def make_rectifier(ggr: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """``ggr_jax.rectify`` from the config's ``ggr`` block."""
  scope = scope_fn(ggr)
  return ggr_jax.rectify(
      ggr.mode, alpha=ggr.alpha, aux_weight=ggr.aux_weight, scope=scope,
      subspace_dim=ggr.subspace_dim if ggr.mode in ("osr", "csr") else 0,
      subspace_interval=ggr.subspace_interval, basis_signs=ggr.basis_signs,
      granularity=ggr.granularity)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """rectify -> coupled L2 weight decay -> SGD with Nesterov momentum, on the schedule."""
  optim = cfg.optim
  schedule = usb_cosine_schedule(optim.lr, cfg.train.steps)
  return optax.chain(
      make_rectifier(cfg.ggr),
      optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask),
      optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov),
  )
