"""Loss pieces shared by the algorithms, each written once.

``apply_fn(params, model_state, x, train) -> (outputs, new_model_state)`` is how every
algorithm calls the model; ``outputs`` is the dict of :class:`~ggr_jax.models.heads.OpenSetNet`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

ApplyFn = Callable[[Any, Any, jax.Array, bool], tuple[dict, Any]]
# the attribute by which an apply_fn declares it takes ``labeled=`` and ``known=`` rows
ROW_ROLES = "takes_row_roles"


def forward_concat(apply_fn: ApplyFn, params, model_state, parts: list[jax.Array], train=True,
                   labeled: Sequence[bool] | None = None,
                   known: Sequence[jax.Array | None] | None = None):
  """One forward on the concatenation of ``parts``; outputs split back per part.

  ``labeled`` (one flag per part) tells the forward which rows are labeled images, for
  a gradient control that treats them apart (EAGC); mark the algorithm's main forward.
  ``known`` (per part: the analysis labels of its rows, True for a known class, or None
  for a labeled part) feeds that control's diagnostics only. Both reach only an
  ``apply_fn`` that declares it takes them (:data:`ROW_ROLES`); any other is called as
  ``apply_fn(params, model_state, x, train)``.
  """
  sizes = [p.shape[0] for p in parts]
  x = jnp.concatenate(parts, axis=0)
  if labeled is None or not getattr(apply_fn, ROW_ROLES, False):
    outputs, new_state = apply_fn(params, model_state, x, train)
  else:
    rows = jnp.concatenate([jnp.full((n,), flag, bool) for n, flag in zip(sizes, labeled)])
    extra = {}
    if known is not None and all(k is not None or flag for k, flag in zip(known, labeled)):
      extra["known"] = jnp.concatenate([jnp.ones((n,), bool) if k is None else k.astype(bool)
                                        for n, k in zip(sizes, known)])
    outputs, new_state = apply_fn(params, model_state, x, train, labeled=rows, **extra)
  bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
  split = [{k: v[bounds[i]:bounds[i + 1]] for k, v in outputs.items()} for i in range(len(parts))]
  return split, new_state


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def soft_cross_entropy_terms(logits: jax.Array, targets: jax.Array, weight: jax.Array) -> jax.Array:
  """Per-sample terms ``w_b * CE(logits_b, targets_b) / B``, shape ``(B,)``."""
  return weight * optax.softmax_cross_entropy(logits, targets) / logits.shape[0]


def masked_soft_cross_entropy(logits: jax.Array, targets: jax.Array, weight: jax.Array) -> jax.Array:
  """``sum_b w_b * CE(logits_b, targets_b) / B``: normalised by the batch, not the mask."""
  return jnp.sum(soft_cross_entropy_terms(logits, targets, weight))


def ova_probs(logits_ova: jax.Array) -> jax.Array:
  """One-vs-all probabilities: softmax over the {outlier, inlier} axis of ``(N, 2, K)``."""
  return jax.nn.softmax(logits_ova, axis=1)


def ova_loss(logits_ova: jax.Array, labels: jax.Array) -> jax.Array:
  """OpenMatch/IOMatch one-vs-all loss with the hardest negative.

  ``mean_b[-log p_in(b, y_b)] + mean_b[max_{k != y_b} -log p_out(b, k)]`` (1e-8 inside
  the logs, as officially; the ``k = y`` entry is zeroed, not removed).
  """
  probs = ova_probs(logits_ova)
  onehot = jax.nn.one_hot(labels, logits_ova.shape[-1], dtype=probs.dtype)
  pos = jnp.mean(jnp.sum(-jnp.log(probs[:, 1, :] + 1e-8) * onehot, axis=1))
  neg = jnp.mean(jnp.max(-jnp.log(probs[:, 0, :] + 1e-8) * (1.0 - onehot), axis=1))
  return pos + neg


def ova_entropy_terms(logits_ova: jax.Array) -> jax.Array:
  """Per-sample terms (summing to :func:`ova_entropy`), shape ``(B,)``."""
  probs = ova_probs(logits_ova)
  entropy = jnp.sum(-probs * jnp.log(probs + 1e-8), axis=1)  # (B, K)
  return jnp.mean(entropy, axis=1) / logits_ova.shape[0]


def ova_entropy(logits_ova: jax.Array) -> jax.Array:
  """Mean binary entropy of the one-vs-all heads (OpenMatch's entropy minimisation)."""
  return jnp.sum(ova_entropy_terms(logits_ova))


def ova_consistency_terms(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """Per-sample terms (summing to :func:`ova_consistency`), shape ``(B,)``."""
  diff = ova_probs(logits_a) - ova_probs(logits_b)
  return jnp.sum(diff ** 2, axis=(1, 2)) / logits_a.shape[0]


def ova_consistency(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """OpenMatch's SOCR: ``mean_b sum_{c,k} (p^a - p^b)^2`` of the one-vs-all probabilities."""
  return jnp.sum(ova_consistency_terms(logits_a, logits_b))


def per_sample_outputs(aux_terms: jax.Array, is_id: jax.Array | None) -> dict[str, jax.Array]:
  """The per-sample auxiliary terms (``sum = aux loss``) under the reserved metric keys.

  ``per_sample/aux`` is differentiated by the step for per-sample geometry and
  ``per_sample/is_id`` (analysis labels) splits the diagnostics; neither is logged.
  """
  ones = jnp.ones(aux_terms.shape, bool)
  return {"per_sample/aux": aux_terms, "per_sample/is_id": ones if is_id is None else is_id}


def ramp(step: jax.Array, start: int, length: int) -> jax.Array:
  """0 before ``start``, then linear to 1 over ``length`` steps (1 at once if length <= 0)."""
  dtype = jnp.result_type(float)  # float64 under jax_enable_x64
  step = jnp.asarray(step, dtype)
  if length <= 0:
    return (step >= start).astype(dtype)
  return jnp.clip((step - start) / length, 0.0, 1.0)


def accepted_ood_fraction(mask: jax.Array, is_id: jax.Array | None) -> dict[str, jax.Array]:
  """Monitors: share of accepted pseudo-labels and how many of those came from OOD images."""
  mask = mask.astype(jnp.float32)
  out = {"monitors/mask_ratio": jnp.mean(mask)}
  if is_id is not None:
    ood = 1.0 - is_id.astype(jnp.float32)
    out["monitors/mask_ood_share"] = jnp.sum(mask * ood) / jnp.maximum(jnp.sum(mask), 1.0)
  return out
