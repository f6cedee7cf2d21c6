"""EAGC in the run layer: the reference stage, the coordinator state, the coordinated forward.

With ``eagc.terms`` other than ``"off"``, a run of any algorithm that marks its labeled
rows (``common.forward_concat(..., labeled=...)``) is trained in EAGC's two stages:

1. **Reference.** The same model and algorithm, trained on the supervised loss alone
   (``ggr.mode = "sum"``, ``ggr.aux_weight = 0``) for ``eagc.reference_steps`` steps, in
   ``<workdir>/reference`` (a run of its own: checkpointed, resumable). ``0`` takes the
   initial model as the reference (a pretrained backbone). ``eagc.reference_lr`` (> 0)
   trains it at that rate for every parameter (the official stage: 0.02), else at the
   run's own rates.
2. **Coordinated training.** The training model's backbone starts from the reference's
   (the heads start fresh, as officially); the conceptor ``C`` of the reference features
   of every labeled image (eval mode, no augmentation; computed in float64) and their mean
   energy ``mu_0`` are computed once. Each step, the algorithm's marked forward runs the
   frozen reference on the same rows (``zhat``) and passes the backbone feature through
   :func:`ggr_jax.coordinator.coordinate` at the model's ``FeatureTap``: EEP edits the
   whole feature cotangent (supervised and auxiliary), AGA enters as its equivalent loss
   on the supervised side (:func:`ggr_jax.coordinator.anchoring_loss`), and ``mu`` is
   carried in ``TrainState.coordinator``.

``eagc.terms``: ``"both"`` (EEP and AGA), ``"eep"``, ``"aga"``, ``"off"``. The reference
forward is a full second forward (the official cost) on backbones trained whole; a ViT
trained from block ``k >= 1`` shares its frozen trunk with the reference, which then
runs only the trained blocks (:func:`coordinated_apply`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from ggr_jax import coordinator
from ggr_jax.models.layers import FeatureTap
from ggr_jax.ssl import common

TERMS = ("off", "eep", "aga", "both")


def enabled(cfg: ml_collections.ConfigDict) -> bool:
  return cfg.get("eagc", {}).get("terms", "off") != "off"


def reference_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The stage-1 run: the same model, algorithm and data on the supervised loss alone."""
  ref = ml_collections.ConfigDict(cfg.to_dict())
  steps = cfg.eagc.reference_steps
  ref.eagc.terms = "off"
  ref.ggr.update(mode="sum", aux_weight=0.0, granularity="global", sample_diagnostics=False)
  ref.train.update(steps=steps, eval_every=steps, log_every=min(cfg.train.log_every, steps),
                   checkpoint_every=min(cfg.train.checkpoint_every, steps))
  if cfg.eagc.get("reference_lr", 0.0):  # its own rate, one group (the official stage 0)
    ref.optim.lr = cfg.eagc.reference_lr
    ref.optim.group_lr = ml_collections.ConfigDict()
  return ref


def init_state(feature_dim: int, params: Any, batch_stats: Any) -> dict[str, Any]:
  """The coordinator state's layout (filled by :func:`from_reference`)."""
  return {"c": jnp.zeros((feature_dim, feature_dim), jnp.float32),
          "mu": jnp.zeros((), jnp.float32),
          "reference": {"params": params, "batch_stats": batch_stats}}


def from_reference(state: Any, reference_params: Any, reference_stats: Any,
                   labeled_features: np.ndarray, aperture: float) -> Any:
  """``state`` with the backbone (parameters, statistics, EMA) taken from the reference
  and the coordinator filled: ``C`` and ``mu_0`` of the labeled set's features."""
  with jax.enable_x64(True):
    feats = jnp.asarray(np.asarray(labeled_features, np.float64))
    c = coordinator.conceptor(feats, aperture)
    mu = coordinator.reference_energy(feats, c)
    c, mu = np.asarray(c, np.float32), np.float32(mu)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the step donates every buffer once
  params = {**state.params, "backbone": copy(reference_params["backbone"])}
  stats = dict(state.batch_stats)
  if "backbone" in reference_stats:
    stats["backbone"] = copy(reference_stats["backbone"])
  return state.replace(
      params=params, batch_stats=stats, ema_params=jax.tree.map(jnp.copy, params),
      coordinator={"c": jnp.asarray(c), "mu": jnp.asarray(mu),
                   "reference": {"params": copy(reference_params),
                                 "batch_stats": copy(reference_stats)}})


class Record(NamedTuple):
  """What a coordinated forward computed (read by the step inside the same trace)."""

  step: coordinator.CoordinatorStep
  aga_loss: jax.Array
  known: jax.Array | None  # analysis labels of the rows (True: a known class), if given


def coordinated_apply(apply_fn: Callable, eagc: ml_collections.ConfigDict, state: Any,
                      records: list, model: nn.Module | None = None) -> Callable:
  """``apply_fn`` whose train-mode forwards with ``labeled`` rows are coordinated; each
  appends its :class:`Record` to ``records``.

  The reference features ``zhat`` come from a full forward of the reference model, or,
  when ``model``'s backbone has a frozen trunk (``shares_trunk``: a ViT trained from
  block ``k >= 1``), from the reference's :meth:`tail` on the training forward's own
  trunk output: the two models hold the same frozen trunk (the training model starts
  from the reference and never updates it), so only the trained blocks run twice.
  """
  share = model is not None and getattr(model.backbone, "shares_trunk", False)

  def reference_tail(ref: Any, tokens: jax.Array) -> jax.Array:
    variables = {"params": ref["params"], "batch_stats": ref["batch_stats"]}
    return model.apply(variables, tokens, method=lambda m, h: m.backbone.tail(h))["feat"]

  def apply(params, batch_stats, x, train, rng=None, labeled=None, known=None):
    if not train or labeled is None:
      return apply_fn(params, batch_stats, x, train, rng)
    ref = state["reference"]
    cell: dict[str, Any] = {"inner": False}
    if not share:
      cell["zhat"] = jax.lax.stop_gradient(
          apply_fn(ref["params"], ref["batch_stats"], x, True, rng)[0]["feat"])

    def interceptor(next_fun, args, kwargs, context):
      if cell["inner"]:  # the reference's own tail
        return next_fun(*args, **kwargs)
      if share and context.method_name == "trunk" and context.module is not None and \
          type(context.module) is type(model.backbone):
        tokens = next_fun(*args, **kwargs)
        cell["inner"] = True
        cell["zhat"] = jax.lax.stop_gradient(reference_tail(ref, tokens))
        cell["inner"] = False
        return tokens
      if not isinstance(context.module, FeatureTap) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      z, zhat = next_fun(*args, **kwargs), cell["zhat"]
      step = coordinator.coordinator_step(
          z, zhat, labeled, state["c"], state["mu"], beta=eagc.beta, aga_weight=0.0,
          momentum=eagc.momentum, eep=eagc.terms in ("eep", "both"), aga=False)
      aga = (coordinator.anchoring_loss(z, zhat, labeled, eagc.aga_weight)
             if eagc.terms in ("aga", "both") else jnp.zeros((), z.dtype))
      records.append(Record(step, aga, known))
      return coordinator.coordinate(z, step.edit)

    with nn.intercept_methods(interceptor):
      return apply_fn(params, batch_stats, x, train, rng)

  setattr(apply, common.ROW_ROLES, True)
  return apply


def single_record(records: list, algorithm: str) -> Record:
  """The one coordinated forward of a step (a trace-time error otherwise)."""
  if len(records) != 1:
    raise ValueError(
        f"EAGC coordinates one forward per step, but algorithm {algorithm!r} ran "
        f"{len(records)} forwards marked with labeled rows; mark its main forward "
        "(common.forward_concat(..., labeled=...)) or set --config.eagc.terms=off.")
  return records[0]


def metrics(record: Record) -> dict[str, jax.Array]:
  """``eagc/*``: the running energy, the labeled and unlabeled rows' mean energy and
  ``tau``, the anchoring loss; with analysis labels, ``tau`` of the unlabeled rows of
  known (Old, ID) and of novel (New, OOD) classes apart."""
  step = record.step
  lab = step.edit.labeled
  unl = 1.0 - lab

  def mean(x, m):
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)

  out = {"eagc/mu": step.mu, "eagc/energy_labeled": mean(step.energy, lab),
         "eagc/energy_unlabeled": mean(step.energy, unl),
         "eagc/tau_unlabeled": mean(step.tau, unl), "losses/eagc_aga": record.aga_loss}
  if record.known is not None:
    old = record.known.astype(unl.dtype)
    out["eagc/tau_unlabeled_known"] = mean(step.tau, unl * old)
    out["eagc/tau_unlabeled_novel"] = mean(step.tau, unl * (1.0 - old))
  return out


TAU_QUANTILES = (10, 25, 50, 75, 90)


def feature_diagnostics(features: np.ndarray, is_old: np.ndarray, coordinator_state: Any,
                        cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Evaluation-time diagnostics of the unlabeled training images' features (analysis
  labels ``is_old``: an Old / ID class): ``soc``, EAGC's subspace overlap of New with Old
  (:func:`ggr_jax.coordinator.subspace_overlap`); with the coordinator on, the
  distribution of ``tau`` every image would get now (its energy under ``C``, the running
  ``mu``): ``tau_old`` / ``tau_new`` means and their percentiles ``tau_old_q10``, ...
  (:data:`TAU_QUANTILES`)."""
  features, is_old = np.asarray(features, np.float64), np.asarray(is_old, bool)
  out: dict[str, Any] = {"soc": coordinator.subspace_overlap(features[is_old],
                                                             features[~is_old])}
  if coordinator_state is None or not enabled(cfg):
    return out
  z = jnp.asarray(features, jnp.float32)
  energy = coordinator.known_energy(z, coordinator_state["c"])
  _, tau = coordinator.elastic_coefficient(energy, coordinator_state["mu"],
                                           jnp.zeros(z.shape[:1], bool), cfg.eagc.beta)
  tau = np.asarray(jax.device_get(tau), np.float64)
  for name, rows in (("old", is_old), ("new", ~is_old)):
    if rows.any():
      out[f"tau_{name}"] = float(tau[rows].mean())
      for q, value in zip(TAU_QUANTILES, np.percentile(tau[rows], TAU_QUANTILES)):
        out[f"tau_{name}_q{q}"] = float(value)
  return out
