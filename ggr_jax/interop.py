"""Adapters for training loops that do not forward optax extra arguments.

Flax NNX needs none: ``nnx.Optimizer.update(model, g_sup, aux_grads=g_aux)`` forwards
keyword arguments to the transformation. Linen's ``TrainState.apply_gradients`` does
not, so :class:`RectifiedTrainState` adds ``aux_grads`` to it.
"""

from __future__ import annotations

from typing import Any

import optax
from flax.training import train_state


class RectifiedTrainState(train_state.TrainState):
  """A Linen ``TrainState`` whose ``apply_gradients`` takes the auxiliary gradient.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ggr_jax
    >>> from flax import linen as nn
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> state = RectifiedTrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=optax.chain(ggr_jax.rectify("vlr"), optax.sgd(0.1)))
    >>> g = jax.tree.map(jnp.ones_like, params)
    >>> state = state.apply_gradients(grads=g, aux_grads=jax.tree.map(jnp.negative, g))
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads: Any, aux_grads: Any = None, **kwargs: Any):
    """Like ``TrainState.apply_gradients``, forwarding ``aux_grads`` to ``tx.update``.

    ``aux_grads`` must have the structure of ``grads``.
    """
    updates, new_opt_state = self.tx.update(
        grads, self.opt_state, self.params, aux_grads=aux_grads)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=new_opt_state,
        **kwargs,
    )
