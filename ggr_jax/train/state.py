"""The train state (one pytree, checkpointed whole) and the model as a pure function."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly; ``key`` is a raw uint32 PRNG key.

  ``algo_state`` is the algorithm's own state (``Algorithm.init_state``; e.g. OpenMatch's
  selection mask), replicated like the parameters. ``coordinator`` is EAGC's state
  (:mod:`ggr_jax.train.eagc`: the conceptor, the running labeled energy and the frozen
  reference model), ``None`` when EAGC is off.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  key: jax.Array
  algo_state: Any
  coordinator: Any = None


def make_apply_fn(model: nn.Module, dropout_key: jax.Array | None = None) -> Callable:
  """``apply_fn(params, batch_stats, x, train, rng=None) -> (outputs, new_batch_stats)``.

  A train-mode forward draws dropout (models that have it) from ``rng``, else from
  ``dropout_key``; eval mode draws nothing.
  """

  def apply_fn(params, batch_stats, x, train, rng=None):
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
      key = dropout_key if rng is None else rng
      rngs = {} if key is None else {"dropout": key}
      outputs, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                     rngs=rngs)
      return outputs, mutated["batch_stats"]
    return model.apply(variables, x, train=False), batch_stats

  return apply_fn


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape,
                       seed: int, init_algo_state: Callable[[], Any] = dict,
                       init_coordinator: Callable[..., Any] | None = None) -> TrainState:
  """Initialises parameters, BN statistics, optimizer state, the EMA copy, the
  algorithm state (``init_algo_state()``) and the coordinator state
  (``init_coordinator(feature_dim, params, batch_stats)``, or None).

  One compiled program (op-by-op initialisation compiles every op of the network).
  """

  @jax.jit
  def init(key):
    variables = model.init(jax.random.fold_in(key, 0), jnp.zeros((2, *image_shape)),
                           train=False)
    params = variables["params"]
    coordinator = None
    if init_coordinator is not None:
      feat = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *image_shape)),
                                                  train=False), variables)["feat"]
      coordinator = init_coordinator(feat.shape[-1], params,
                                     variables.get("batch_stats", {}))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        key=jax.random.fold_in(key, 1),
        algo_state=init_algo_state(),
        coordinator=coordinator,
    )

  return init(jax.random.PRNGKey(seed))
