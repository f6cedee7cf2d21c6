"""Meta-gradient pseudo-labels ("Semi-Supervised Learning with Meta-Gradient", Zhang et al.).

Each unlabeled image's soft pseudo-label is moved so that one gradient step on it would
lower the labeled loss. With the network in eval mode (BatchNorm running statistics, no
dropout, statistics not updated), ``g = grad_theta CE(f(x_l), y_l)`` (every parameter,
BatchNorm scales and biases included, no weight decay) and ``p = softmax f(x_u)``:

    delta = 2 J g,   J = d softmax f(x_u; theta) / d theta         (method "jvp")
    delta = (p(theta + eps g) - p(theta - eps g)) / eps,
            eps = epsilon / ||g||_2                                  (method "finite_difference")
    yhat  = renormalise(relu(p - lr * delta))    (a row summing to 0 is left as it is)

``yhat`` carries no gradient. Scaling conventions of the official code (kept here): the
meta learning rate ``lr`` is the optimizer's current learning rate (warm-up and decay
included), and the paper's ``alpha_t / B_u`` factor of the meta-gradient is absorbed into
it. With the paper's MSE inner loss and ``ytilde = p``, ``(2 alpha / B_u) J g`` is the
exact meta-gradient of the unrolled step, not a first-order approximation, so the JVP
is the method's quantity itself; the finite difference approximates it. On networks
with kinks (LeakyReLU, max-pool) the central difference at the official ``eps`` differs
from ``2 J g`` by O(eps) (units change sign between ``theta +- eps g``): a few percent of
``delta`` on ConvLarge. ``"finite_difference"`` reproduces the official numbers;
``"jvp"`` (the default) is exact wherever the network is differentiable and costs one
forward-mode pass instead of two more forwards.

Example:
  >>> import jax, jax.numpy as jnp
  >>> W = jnp.array([[1.0, -1.0], [0.5, 0.2]])
  >>> apply_fn = lambda p, s, x, train: ({"logits": x @ p}, s)
  >>> out = meta_pseudo_labels(apply_fn, W, {}, jnp.ones((2, 2)), jnp.array([0, 1]),
  ...                          jnp.eye(2), 0.1)
  >>> bool(jnp.allclose(out.yhat.sum(-1), 1.0))
  True
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

METHODS = ("jvp", "finite_difference")

ApplyFn = Callable[..., tuple[dict, Any]]


class MetaLabels(NamedTuple):
  """The meta pass: pseudo-labels and what they were made of (every entry stop-gradient).

  ``epsilon`` is the finite-difference step (0 for ``"jvp"``); ``clipped`` counts the
  entries the ReLU set to zero.
  """

  yhat: jax.Array  # (B_u, K) the pseudo-labels
  p: jax.Array  # (B_u, K) eval-mode softmax of the unlabeled images
  delta: jax.Array  # (B_u, K) 2 J g, or its central difference
  yhat_pre_relu: jax.Array  # p - lr * delta
  g_norm: jax.Array  # ||g||_2 over every parameter
  epsilon: jax.Array
  clipped: jax.Array


class LabeledGradient(NamedTuple):
  """The eval-mode labeled cross-entropy, its logits and its gradient ``g``."""

  loss: jax.Array
  logits: jax.Array
  grad: Any


def labeled_gradient(apply_fn: ApplyFn, params: Any, model_state: Any, x: jax.Array,
                     y: jax.Array) -> LabeledGradient:
  """``g = grad CE(f(x), y)`` with the network in eval mode (running statistics)."""

  def loss_fn(theta):
    logits = apply_fn(theta, model_state, x, False)[0]["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  (loss, logits), grad = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return LabeledGradient(loss, logits, grad)


def clip_and_renormalise(yhat: jax.Array) -> jax.Array:
  """``relu(yhat)`` with each row divided by its sum (a row summing to 0 stays 0)."""
  yhat = jax.nn.relu(yhat)
  sums = jnp.sum(yhat, axis=-1, keepdims=True)
  return yhat / jnp.where(sums == 0, 1.0, sums)


def meta_pseudo_labels(apply_fn: ApplyFn, params: Any, model_state: Any, x_l: jax.Array,
                       y_l: jax.Array, x_u: jax.Array, lr: jax.Array | float, *,
                       method: str = "jvp", epsilon: float = 0.01) -> MetaLabels:
  """The meta pseudo-labels of ``x_u`` (see the module docstring for the math).

  Args:
    apply_fn: ``(params, model_state, x, train) -> (outputs with "logits", state)``;
      called in eval mode only (``train=False``).
    params: the current parameters (differentiated here, not through: the result is
      stop-gradient).
    model_state: the BatchNorm running statistics the eval-mode forwards use.
    x_l, y_l: the labeled batch (integer labels) of ``g``.
    x_u: the unlabeled batch.
    lr: the meta learning rate (officially the optimizer's current one).
    method: ``"jvp"`` (exact) or ``"finite_difference"`` (the official central
      difference, for parity).
    epsilon: the finite-difference step before the ``1 / ||g||`` scaling (official 0.01).
  """
  if method not in METHODS:
    raise ValueError(f"method = {method!r}; choose one of {METHODS}.")
  if not epsilon > 0:
    raise ValueError(f"epsilon = {epsilon!r} must be > 0 (official 0.01).")
  params = jax.lax.stop_gradient(params)
  g = labeled_gradient(apply_fn, params, model_state, x_l, y_l).grad
  g_norm = optax.tree.norm(g)

  def probs(theta):
    return jax.nn.softmax(apply_fn(theta, model_state, x_u, False)[0]["logits"], axis=-1)

  if method == "jvp":
    p, tangent = jax.jvp(probs, (params,), (g,))
    delta, eps = 2.0 * tangent, jnp.zeros_like(g_norm)
  else:
    eps = jnp.where(g_norm > 0, epsilon / jnp.where(g_norm > 0, g_norm, 1.0), 0.0)
    p = probs(params)
    p_pos = probs(optax.tree.add_scale(params, eps, g))
    p_neg = probs(optax.tree.add_scale(params, -eps, g))
    delta = jnp.where(eps > 0, (p_pos - p_neg) / jnp.where(eps > 0, eps, 1.0), 0.0)
  pre = p - jnp.asarray(lr, p.dtype) * delta
  out = MetaLabels(clip_and_renormalise(pre), p, delta, pre, g_norm, eps,
                   jnp.sum(pre < 0))
  return jax.tree.map(jax.lax.stop_gradient, out)
