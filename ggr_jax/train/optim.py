"""The optimizer from the config, with the rectifier first in the chain.

``optim.name`` picks the optax optimizer: ``sgd`` (the official protocol: coupled L2
weight decay, then SGD with Nesterov momentum), ``adamw``, ``lion``, ``muon``
(``optax.contrib.muon``), or the name of any other optax alias (``optax.<name>`` or
``optax.contrib.<name>``) with ``optim.kwargs`` passed on. Every optimizer runs on the
learning-rate schedule of ``optim.lr`` and ``train.steps``.

Weight decay (``optim.weight_decay``, on kernels only, see :func:`weight_decay_mask`, or on
every parameter with ``optim.decay = "all"``):
an optimizer that takes a decoupled ``weight_decay`` argument (AdamW, Lion, Muon)
gets it there: ``p <- p - lr * (update + wd * p)`` after its own normalisation; any other
(SGD included) gets coupled L2, ``g + wd * p`` before the optimizer, as officially.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

import ggr_jax

NAMED = ("sgd", "adamw", "lion", "muon")
# usb_cosine: the official GGR/USB cosine; warmup_step: linear warm-up then step decay
# (SemiMeta on SVHN/CIFAR); warmup_cosine: linear warm-up then half-cosine (SemiMeta ImageNet)
SCHEDULES = ("usb_cosine", "warmup_step", "warmup_cosine", "cosine", "constant")
DECAYS = ("kernels", "all")
# The keyword each optimizer takes its decay mask under, where it decays decoupled.
_DECOUPLED_MASK = {"adamw": "mask", "lion": "mask", "muon": "weight_decay_mask"}


def usb_cosine_schedule(lr: float, total_steps: int, cycles: float = 7 / 16) -> Callable:
  """``lr * max(0, cos(pi * cycles * t / T))``: the official (USB) schedule, no warm-up.

  Written by hand: optax's cosine schedules use ``(1 + cos) / 2``, which is another
  curve. The final rate is ``cos(7 pi / 16) = 0.195`` of the initial one.
  """

  def schedule(count: jax.Array) -> jax.Array:
    return lr * jnp.maximum(0.0, jnp.cos(jnp.pi * cycles * count / total_steps))

  return schedule


def warmup_step_schedule(lr: float, warmup_steps: int, milestones, factor: float) -> Callable:
  """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then ``lr * factor**k`` with
  ``k = #{m in milestones : step > m}`` (SemiMeta's ``0.1 * step / 4000``, then x0.1 after
  300k and 350k steps; note the strict ``>``)."""
  decay = optax.piecewise_constant_schedule(lr, {int(m) + 1: factor for m in milestones})
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return lambda count: jnp.where(count < warmup_steps, warmup(count), decay(count))


def learning_rate(cfg: ml_collections.ConfigDict, lr: float | None = None) -> Callable:
  """The run's learning-rate schedule, ``optim.schedule`` (see :data:`SCHEDULES`), from
  ``optim.lr`` or the base rate ``lr`` (a parameter group's)."""
  optim, steps = cfg.optim, cfg.train.steps
  lr = optim.lr if lr is None else lr
  kind = optim.get("schedule", "usb_cosine")
  if kind == "usb_cosine":
    return usb_cosine_schedule(lr, steps)
  if kind == "warmup_step":
    return warmup_step_schedule(lr, optim.warmup_steps, optim.milestones,
                                optim.decay_factor)
  if kind == "warmup_cosine":  # linear warm-up, then lr * (1 + cos(pi t / T)) / 2 to 0
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(optim.warmup_steps, 1),
                                              max(steps, optim.warmup_steps + 1))
  if kind == "cosine":  # SimGCD's CosineAnnealingLR (per step here) down to lr * 1e-3
    return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=1e-3)
  if kind == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"optim.schedule = {kind!r}; choose one of {SCHEDULES}.")


def weight_decay_mask(params: Any) -> Any:
  """Decay only tensors of rank > 1 (conv and dense kernels), like the official rule."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def decay_mask(optim: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
  """``optim.decay``: ``"kernels"`` (:func:`weight_decay_mask`) or ``"all"`` (every
  parameter, BatchNorm and biases included, as ``torch.optim.SGD(weight_decay=...)``)."""
  return None if optim.get("decay", "kernels") == "all" else weight_decay_mask


def scope_fn(ggr: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """``params -> bools``: the leaves the rectifier acts on."""
  if ggr.scope == "all":
    return lambda tree: jax.tree.map(lambda _: True, tree)
  return ggr_jax.scope_from_prefix(ggr.scope)


def trained_scope_fn(ggr: ml_collections.ConfigDict,
                     trainable: Callable[[Any], Any] | None = None) -> Callable[[Any], Any]:
  """``params -> bools``: the leaves in ``ggr.scope`` that train (``trainable``, if given,
  marks frozen ones False): the rectifier's geometry and the GDC diagnostic."""
  scope = scope_fn(ggr)
  if trainable is None:
    return scope
  return lambda tree: jax.tree.map(lambda a, b: a and b, scope(tree), trainable(tree))


def make_rectifier(ggr: ml_collections.ConfigDict,
                   trainable: Callable[[Any], Any] | None = None
                   ) -> optax.GradientTransformationExtraArgs:
  """``ggr_jax.rectify`` from the config's ``ggr`` block; leaves ``trainable`` marks
  False (frozen) stay out of its geometry."""
  scope = trained_scope_fn(ggr, trainable)
  return ggr_jax.rectify(
      ggr.mode, alpha=ggr.alpha, aux_weight=ggr.aux_weight, scope=scope,
      subspace_dim=ggr.subspace_dim if ggr.mode in ("osr", "csr") else 0,
      subspace_interval=ggr.subspace_interval, basis_signs=ggr.basis_signs,
      granularity=ggr.granularity, start_step=ggr.start_step)


def optimizer_factory(name: str) -> Callable[..., optax.GradientTransformation]:
  """``optax.<name>`` or ``optax.contrib.<name>``; ValueError if neither exists."""
  for namespace in (optax, optax.contrib):
    factory = getattr(namespace, name, None)
    if callable(factory) and "learning_rate" in _parameters(factory):
      return factory
  raise ValueError(f"optim.name = {name!r} is no optax optimizer (optax.{name} or "
                   f"optax.contrib.{name} taking a learning_rate); e.g. {', '.join(NAMED)}.")


def _parameters(fn: Callable) -> tuple[str, ...]:
  try:
    return tuple(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return ()


def make_base_optimizer(cfg: ml_collections.ConfigDict,
                        trainable: Callable[[Any], Any] | None = None
                        ) -> optax.GradientTransformation:
  """Weight decay and the optimizer of ``cfg.optim``, on the schedule (no rectifier).

  Parameter groups: ``optim.group_lr`` maps a '/'-joined parameter path prefix (e.g.
  ``backbone``) to its own base learning rate on the same schedule (the first matching
  prefix wins; the rest use ``optim.lr``), as a PyTorch optimizer's param groups with
  their own ``lr``. ``trainable`` (``params -> bools``) freezes the leaves it marks
  ``False``: they get no update, no weight decay and no optimizer state.
  """
  groups = dict(cfg.optim.get("group_lr", None) or {})
  if not groups and trainable is None:
    return _optimizer(cfg, learning_rate(cfg))
  transforms = {"default": _optimizer(cfg, learning_rate(cfg)), "frozen": optax.set_to_zero()}
  transforms.update({f"group:{prefix}": _optimizer(cfg, learning_rate(cfg, lr))
                     for prefix, lr in groups.items()})

  def labels(params: Any) -> Any:
    label = jax.tree.map(lambda _: "default", params)
    for prefix in reversed(list(groups)):  # the first matching prefix wins
      label = jax.tree.map(lambda old, hit, p=prefix: f"group:{p}" if hit else old, label,
                           ggr_jax.scope_from_prefix(prefix)(params))
    if trainable is not None:
      label = jax.tree.map(lambda old, keep: old if keep else "frozen", label,
                           trainable(params))
    return label

  return optax.multi_transform(transforms, labels)


def _optimizer(cfg: ml_collections.ConfigDict, schedule: Callable) -> optax.GradientTransformation:
  optim = cfg.optim
  kwargs = dict(optim.kwargs.to_dict()) if "kwargs" in optim else {}
  if optim.name == "sgd":
    kwargs.setdefault("momentum", optim.momentum)
    kwargs.setdefault("nesterov", optim.nesterov)
  factory = optimizer_factory(optim.name)
  params = _parameters(factory)
  mask_key = _DECOUPLED_MASK.get(optim.name, "mask" if "mask" in params else None)
  mask = decay_mask(optim)
  if "weight_decay" in params and mask_key in params and "weight_decay" not in kwargs:
    return factory(schedule, weight_decay=optim.weight_decay, **{mask_key: mask}, **kwargs)
  return optax.chain(optax.add_decayed_weights(optim.weight_decay, mask=mask),
                     factory(schedule, **kwargs))


def make_optimizer(cfg: ml_collections.ConfigDict,
                   trainable: Callable[[Any], Any] | None = None
                   ) -> optax.GradientTransformationExtraArgs:
  """rectify -> the configured optimizer (with its weight decay), on the schedule;
  ``trainable`` as in :func:`make_base_optimizer`."""
  return optax.chain(make_rectifier(cfg.ggr, trainable), make_base_optimizer(cfg, trainable))


def _is_trace(node: Any) -> bool:
  return isinstance(node, optax.TraceState)


def _is_masked(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


def momentum_buffers(state: Any, like: Any) -> Any:
  """The momentum (``optax.trace``) of every parameter in an optimizer state, as a tree
  like the params ``like``; zeros where no trace holds a leaf (frozen parameters). The
  layout PyTorch's SGD keeps as ``momentum_buffer``."""
  merged = jax.tree.map(jnp.zeros_like, like)
  for node in jax.tree.leaves(state, is_leaf=_is_trace):
    if _is_trace(node):
      merged = jax.tree.map(lambda old, new: old if _is_masked(new) else new, merged,
                            node.trace, is_leaf=_is_masked)
  return merged


def with_momentum_buffers(state: Any, buffers: Any) -> Any:
  """``state`` with every trace leaf replaced by ``buffers``' (a params-like tree), e.g.
  to continue a PyTorch run's SGD momentum."""

  def fill(node: Any) -> Any:
    if not _is_trace(node):
      return node
    trace = jax.tree.map(lambda old, new: old if _is_masked(old) else jnp.asarray(new, old.dtype),
                         node.trace, buffers, is_leaf=_is_masked)
    return node._replace(trace=trace)

  return jax.tree.map(fill, state, is_leaf=_is_trace)
