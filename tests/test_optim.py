"""The optimizer from the config: rectifier first, the named optax optimizer after it,
weight decay coupled (SGD) or decoupled (AdamW, Lion, Muon)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ggr_jax.configs import default
from ggr_jax.train import config as config_lib
from ggr_jax.train import optim

PARAMS = {"backbone": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
          "head": {"kernel": jnp.full((4, 2), 2.0)}}


def _cfg(name, **kwargs):
  cfg = default.get_config()
  cfg.optim.name = name
  cfg.optim.lr, cfg.optim.weight_decay, cfg.train.steps = 0.1, 0.01, 1000
  cfg.optim.kwargs.update(kwargs)
  return cfg


def _first_update(cfg, g_sup, g_aux):
  tx = optim.make_optimizer(cfg)
  state = tx.init(PARAMS)
  updates, state = tx.update(g_sup, state, PARAMS, aux_grads=g_aux)
  return updates, state


@pytest.mark.parametrize("name", ["adamw", "lion", "muon"])
def test_decoupled_decay_with_zero_gradients_shrinks_only_the_kernels(name):
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = _first_update(_cfg(name), zeros, zeros)
  lr, wd = 0.1, 0.01  # schedule value at step 0 is lr
  for path in (("backbone", "kernel"), ("head", "kernel")):
    p = PARAMS[path[0]][path[1]]
    np.testing.assert_allclose(updates[path[0]][path[1]], -lr * wd * p, rtol=1e-6)
  np.testing.assert_array_equal(updates["backbone"]["bias"], 0.0)


def test_sgd_decay_is_coupled_l2_before_the_momentum():
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = _first_update(_cfg("sgd"), zeros, zeros)
  # Nesterov on the first step: -lr * (1 + momentum) * (g + wd * p) with g = 0
  np.testing.assert_allclose(updates["backbone"]["kernel"], -0.1 * 1.9 * 0.01, rtol=1e-6)
  np.testing.assert_array_equal(updates["backbone"]["bias"], 0.0)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lion", "muon", "adam", "adafactor"])
def test_every_optimizer_receives_the_rectified_gradient(name):
  g_sup = jax.tree.map(jnp.ones_like, PARAMS)
  g_aux = jax.tree.map(lambda p: -2.0 * jnp.ones_like(p), PARAMS)  # opposes the anchor
  _, state = _first_update(_cfg(name), g_sup, g_aux)
  assert float(optax.tree.get(state, "cos_before")) < 0
  assert float(optax.tree.get(state, "conflict")) == 1.0
  assert abs(float(optax.tree.get(state, "cos_after"))) < 1e-5  # vlr left no conflict


def test_optimizer_kwargs_reach_the_optimizer():
  g = jax.tree.map(jnp.ones_like, PARAMS)
  plain, _ = _first_update(_cfg("adamw", b1=0.0), g, jax.tree.map(jnp.zeros_like, g))
  # with b1 = 0 and b2 = 0.999 Adam's first normalised step is sign(g) = 1: -lr * (1 + wd p)
  np.testing.assert_allclose(plain["backbone"]["bias"], -0.1, rtol=1e-4)


@pytest.mark.parametrize("name,message", [("sgdd", "no optax optimizer"),
                                          ("softmax_cross_entropy", "no optax optimizer")])
def test_an_unknown_optimizer_name_fails_before_compiling(name, message):
  cfg = _cfg(name)
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.validate(cfg, num_devices=1)
  assert "--config.optim.name=" in str(info.value)


def test_a_parameter_group_runs_at_its_own_rate_and_frozen_leaves_never_move():
  cfg = _cfg("sgd")
  cfg.optim.update(schedule="constant", momentum=0.0, nesterov=False)
  cfg.optim.group_lr = {"head": 1.0}
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  frozen = lambda p: {"backbone": {"kernel": True, "bias": False}, "head": {"kernel": True}}
  tx = optim.make_base_optimizer(cfg, frozen)
  updates, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  decayed = lambda p, lr: -lr * (1.0 + 0.01 * p)  # coupled decay on kernels
  np.testing.assert_allclose(updates["backbone"]["kernel"], decayed(1.0, 0.1), rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], decayed(2.0, 1.0), rtol=1e-6)
  assert float(jnp.max(jnp.abs(updates["backbone"]["bias"]))) == 0.0
  assert optim.momentum_buffers(state, PARAMS)["backbone"]["bias"].shape == (4,)


def test_momentum_buffers_go_in_and_come_out_of_the_optimizer_state():
  cfg = _cfg("sgd")
  cfg.optim.update(schedule="constant", nesterov=False)
  cfg.optim.group_lr = {"backbone": 0.5}
  tx = optim.make_base_optimizer(cfg)
  buffers = jax.tree.map(lambda p: jnp.full_like(p, 3.0), PARAMS)
  state = optim.with_momentum_buffers(tx.init(PARAMS), buffers)
  jax.tree.map(np.testing.assert_array_equal, optim.momentum_buffers(state, PARAMS), buffers)
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zero, state, PARAMS)  # the step follows the buffer: -lr * m * buf
  np.testing.assert_allclose(updates["head"]["kernel"],
                             -0.1 * (0.9 * 3.0 + 0.01 * 2.0), rtol=1e-6)


def test_a_bad_group_rate_is_named():
  cfg = _cfg("sgd")
  cfg.optim.group_lr = {"backbone": -1.0}
  with pytest.raises(config_lib.ConfigError, match="optim.group_lr.backbone"):
    config_lib.validate(cfg)
