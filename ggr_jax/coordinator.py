"""EAGC's energy-aware gradient coordinator: an edit of the feature cotangent.

EAGC (Zheng et al., CVPR 2026; official code github HaiyangZheng/EAGC) leaves the loss
alone and edits ``G = dL/dZ``, the cotangent at the backbone's output features ``Z`` (one
row per image view), before it flows back into the trainable blocks; heads keep their
ordinary gradients. From the labeled set's features ``F`` (``N x D``, under a frozen
reference model, neither centred nor normalised):

    R   = F^T F / N                      C = R (R + aperture^-2 I)^-1   (a soft projector)
    e_i = clip(z_i^T C z_i / max(|z_i|^2, 1e-12), 0, 1)     energy: known-subspace share
    mu  <- momentum * mu + (1 - momentum) * mean_{labeled i} e_i       (only if any labeled)
    tau_i = beta * clip(1 - e_i / (mu + 1e-6), 0, 1) * (1 - m_i)        (updated mu)
    g_i <- g_i - tau_i C g_i + lambda / (N_l D) * m_i * (z_i - zhat_i)

``m_i`` marks labeled rows, ``N_l`` counts them (AGA is off when there are none), ``zhat``
is the frozen reference model's feature of the same view. EEP (the ``tau`` term) pushes
unlabeled rows that look unlike the labeled data out of the known subspace; AGA (the
``lambda`` term) is the gradient of ``lambda / (2 N_l D) sum_labeled |z_i - sg(zhat_i)|^2``
and anchors labeled features to the reference. The energies use the current (training)
features, detached. ``scale`` multiplies the AGA coefficient when the cotangent carries a
loss scale (the official AMP path); EEP is linear and needs none.

The edit is applied inside one jitted step by :func:`coordinate`, a ``jax.custom_vjp``
identity on ``Z``: the forward is free and the backward is a ``(2B, D) x (D, D)`` product.
No per-sample parameter gradient is formed: a row of ``G`` already is one sample's
gradient at the features.

EAGC's diagnostics: :func:`gradient_deviation` (GDC, how far the unlabeled gradient turns
the supervised one) and :func:`subspace_overlap` (SOC, how much New-class feature energy
lies in the Old classes' principal subspace).

Example:
  >>> import jax, jax.numpy as jnp
  >>> F = jnp.array([[1.0, 0.0], [2.0, 0.0]])          # labeled features span axis 0
  >>> C = conceptor(F, aperture=10.0)
  >>> z = jnp.array([[1.0, 0.0], [0.0, 1.0]])          # known-like, then novel
  >>> labeled = jnp.array([True, False])
  >>> s = coordinator_step(z, jnp.zeros_like(z), labeled, C, 0.9, beta=1.0, aga_weight=0.0)
  >>> [round(float(t), 2) for t in s.tau]               # only the novel row is projected
  [0.0, 1.0]
  >>> g = jax.grad(lambda z: coordinate(z, s.edit).sum())(z)  # cotangent rows (1, 1)
  >>> [[round(float(v), 3) for v in row] for row in g]  # the known axis is removed
  [[1.0, 1.0], [0.004, 1.0]]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ENERGY_EPS = 1e-12  # floor of |z|^2 in the energy
MU_EPS = 1e-6  # added to mu in the elastic coefficient
MU_MOMENTUM = 0.95  # the official EMA momentum of the labeled energy


def conceptor(features: jax.Array, aperture: float) -> jax.Array:
  """``C = R (R + aperture^-2 I)^-1`` with ``R = F^T F / N`` (uncentred) of ``F: (N, D)``.

  ``R`` and ``(R + aperture^-2 I)^-1`` commute, so ``C`` is computed as one solve; its
  eigenvalues ``lambda / (lambda + aperture^-2)`` lie in ``[0, 1)``. Directions with
  ``lambda`` far below ``aperture^-2`` are resolved to the precision of ``R``: with a
  large aperture and rank-deficient features, pass float64 features (under x64).
  """
  if features.ndim != 2 or features.shape[0] == 0:
    raise ValueError(f"conceptor needs features of shape (N >= 1, D), got {features.shape}")
  if not aperture > 0:
    raise ValueError(f"conceptor aperture must be > 0, got {aperture}")
  f = jnp.asarray(features)
  r = f.T @ f / f.shape[0]
  return jnp.linalg.solve(r + aperture**-2 * jnp.eye(r.shape[0], dtype=r.dtype), r)


def known_energy(z: jax.Array, c: jax.Array) -> jax.Array:
  """``e_i = clip(z_i^T C z_i / max(|z_i|^2, 1e-12), 0, 1)`` per row of ``z: (R, D)``."""
  z = jax.lax.stop_gradient(z)
  num = jnp.sum(z * (z @ c), axis=-1)
  den = jnp.maximum(jnp.sum(z * z, axis=-1), ENERGY_EPS)
  return jnp.clip(num / den, 0.0, 1.0)


def reference_energy(features: jax.Array, c: jax.Array) -> jax.Array:
  """``mu_0``: the mean energy of the labeled set's reference features under ``C``."""
  return jnp.mean(known_energy(features, c))


def update_reference_energy(mu: jax.Array, energy: jax.Array, labeled: jax.Array,
                            momentum: float = MU_MOMENTUM) -> tuple[jax.Array, jax.Array]:
  """The EMA of the labeled rows' energy, and the batch's labeled mean (NaN if none).

  A batch without labeled rows leaves ``mu`` unchanged.
  """
  count = jnp.sum(labeled)
  batch = jnp.sum(jnp.where(labeled, energy, 0.0)) / jnp.maximum(count, 1)
  updated = momentum * mu + (1.0 - momentum) * batch
  any_labeled = count > 0
  return (jnp.where(any_labeled, updated, mu).astype(jnp.result_type(mu)),
          jnp.where(any_labeled, batch, jnp.nan))


def elastic_coefficient(energy: jax.Array, mu: jax.Array, labeled: jax.Array,
                        beta: float) -> tuple[jax.Array, jax.Array]:
  """``(ratio, tau)``: ``ratio_i = clip(1 - e_i / (mu + 1e-6), 0, 1)`` and
  ``tau_i = beta * ratio_i`` on unlabeled rows, 0 on labeled ones."""
  ratio = jnp.clip(1.0 - energy / (mu + MU_EPS), 0.0, 1.0)
  return ratio, beta * ratio * (1.0 - labeled.astype(ratio.dtype))


def aga_coefficient(labeled: jax.Array, feature_dim: int, weight: float,
                    scale: float | jax.Array = 1.0) -> jax.Array:
  """``weight / (N_l * D) * scale``; 0 when the batch has no labeled row (AGA off)."""
  count = jnp.sum(labeled)
  return jnp.where(count > 0, weight / (jnp.maximum(count, 1) * feature_dim) * scale, 0.0)


def anchoring_loss(z: jax.Array, zhat: jax.Array, labeled: jax.Array,
                   weight: float) -> jax.Array:
  """``weight / (2 N_l D) * sum_labeled |z_i - sg(zhat_i)|^2`` (0 without labeled rows):
  the loss whose gradient at ``z`` is AGA's term. Adding it to the supervised loss
  instead of editing the cotangent keeps AGA out of the auxiliary gradient when the two
  are pulled back apart (the edit is affine in the cotangent, so it would be added once
  per pullback)."""
  mask = labeled.astype(z.dtype)[:, None]
  count = jnp.sum(labeled)
  sq = jnp.sum(mask * (z - jax.lax.stop_gradient(zhat)) ** 2)
  return jnp.where(count > 0, weight * sq / (2 * jnp.maximum(count, 1) * z.shape[-1]), 0.0)


class CotangentEdit(NamedTuple):
  """What the backward pass of :func:`coordinate` needs (all without gradient)."""

  c: jax.Array  # (D, D) the conceptor
  tau: jax.Array  # (R,) EEP strength per row
  delta: jax.Array  # (R, D) z - zhat (the AGA pull)
  labeled: jax.Array  # (R,) 1.0 on labeled rows
  aga_coef: jax.Array  # () lambda / (N_l D) * scale, 0 when off


def edit_cotangent(g: jax.Array, edit: CotangentEdit) -> jax.Array:
  """``g_i - tau_i (g_i C) + aga_coef * m_i * delta_i`` (EEP, then AGA; disjoint rows)."""
  g = g - edit.tau[:, None].astype(g.dtype) * (g @ edit.c.astype(g.dtype))
  return g + (edit.aga_coef * edit.labeled[:, None] * edit.delta).astype(g.dtype)


@jax.custom_vjp
def coordinate(z: jax.Array, edit: CotangentEdit) -> jax.Array:
  """The identity on features ``z``, whose cotangent is edited by :func:`edit_cotangent`.

  ``edit`` receives no gradient (its cotangent is zero).
  """
  del edit
  return z


def _coordinate_fwd(z, edit):
  return z, edit


def _coordinate_bwd(edit, g):
  return edit_cotangent(g, edit), jax.tree.map(jnp.zeros_like, edit)


coordinate.defvjp(_coordinate_fwd, _coordinate_bwd)


class CoordinatorStep(NamedTuple):
  """One step's coordinator quantities: the edit, the new ``mu`` and diagnostics."""

  edit: CotangentEdit
  mu: jax.Array  # the updated EMA (carried to the next step)
  energy: jax.Array  # (R,)
  ratio: jax.Array  # (R,)
  tau: jax.Array  # (R,)
  batch_energy: jax.Array  # () the labeled rows' mean energy, NaN if none


def coordinator_step(z: jax.Array, zhat: jax.Array, labeled: jax.Array, c: jax.Array,
                     mu: jax.Array | float, *, beta: float, aga_weight: float,
                     momentum: float = MU_MOMENTUM, scale: float | jax.Array = 1.0,
                     eep: bool = True, aga: bool = True) -> CoordinatorStep:
  """Energies of the training features ``z``, the ``mu`` update (before use), ``tau`` and
  the cotangent edit for :func:`coordinate`; ``eep`` / ``aga`` switch either term off.

  Args:
    z: ``(R, D)`` training features (rows: every view of every image).
    zhat: ``(R, D)`` the frozen reference model's features of the same rows.
    labeled: ``(R,)`` bool, labeled rows.
    c: ``(D, D)`` the conceptor of the labeled set (:func:`conceptor`).
    mu: the running labeled energy before this step.
  """
  if z.shape != zhat.shape or z.ndim != 2 or labeled.shape != z.shape[:1]:
    raise ValueError(f"coordinator_step needs z and zhat of one shape (R, D) and labeled of "
                     f"shape (R,); got {z.shape}, {zhat.shape}, {labeled.shape}")
  z = jax.lax.stop_gradient(z)
  energy = known_energy(z, c)
  mu, batch_energy = update_reference_energy(jnp.asarray(mu), energy, labeled, momentum)
  ratio, tau = elastic_coefficient(energy, mu, labeled, beta)
  coef = aga_coefficient(labeled, z.shape[-1], aga_weight, scale)
  edit = CotangentEdit(
      c=c, tau=tau if eep else jnp.zeros_like(tau),
      delta=z - jax.lax.stop_gradient(zhat), labeled=labeled.astype(z.dtype),
      aga_coef=coef if aga else jnp.zeros_like(coef))
  return CoordinatorStep(edit, mu, energy, ratio, tau, batch_energy)


def gradient_deviation(g_sup: Any, g_aux: Any, mask: Any = None) -> jax.Array:
  """EAGC's GDC diagnostic, ``1 - cos(g_sup, g_sup + g_aux)`` over the leaves ``mask``
  marks (all by default): how far the unlabeled side turns the supervised direction
  (0: not at all, 2: reversed). 0 where either gradient is zero."""
  if mask is not None:
    g_sup = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), g_sup, mask)
    g_aux = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), g_aux, mask)
  total = jax.tree.map(jnp.add, g_sup, g_aux)
  dot = optax.tree.vdot(g_sup, total)
  norms = optax.tree.norm(g_sup) * optax.tree.norm(total)
  return jnp.where(norms > 0, 1.0 - dot / jnp.where(norms > 0, norms, 1.0), 0.0)


def subspace_overlap(old: np.ndarray, new: np.ndarray, k: int = 16) -> float:
  """EAGC's SOC diagnostic: ``|P_k (Z_new - m)|_F^2 / |Z_new - m|_F^2`` with the rows of
  both sets L2-normalised, ``m`` the mean Old feature and ``P_k`` the projector on the top
  ``k`` principal directions of the centred Old features (fewer where the Old set varies
  along fewer): the share of New-class feature
  energy inside the Old classes' dominant subspace (host NumPy, float64; NaN without
  Old or New rows)."""
  old, new = (np.asarray(a, np.float64) for a in (old, new))
  if len(old) == 0 or len(new) == 0:
    return float("nan")
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  old, new = unit(old), unit(new)
  mean = old.mean(0)
  _, sv, vt = np.linalg.svd(old - mean, full_matrices=False)
  basis = vt[:k][sv[:k] > sv[0] * 1e-10]  # (<= k, D): directions the Old set varies along
  centred = new - mean
  inside = np.sum((centred @ basis.T) ** 2)
  return float(inside / max(np.sum(centred ** 2), 1e-300))
