"""The algorithm interface: what one algorithm module describes, and nothing else does.

An algorithm is one :class:`Algorithm` value. The run layer (``ggr_jax.train``, the
bench, the sampler) reads everything algorithm-specific from it: the config block, the
model head, the views per index source and their batch sizes, the loss function with its
named terms and their roles, state carried inside the jitted train state, a host hook at
epoch boundaries, the evaluation score and the data protocol. A new method is a new
module that builds one ``Algorithm`` and registers it (:func:`ggr_jax.ssl.register`).

The loss function gets a :class:`LossContext` and returns :class:`Losses`::

  def losses(ctx: LossContext) -> Losses:
    (lb, w, s), model_state = common.forward_concat(
        ctx.apply_fn, ctx.params, ctx.model_state, [ctx.batch["x_lb"], ...])
    return Losses(supervised={"ce": ...}, auxiliary={"unsup": ...},
                  model_state=model_state, metrics={...}, sample_aux=terms)

The step sums ``supervised`` into the anchor loss and ``auxiliary`` into the loss whose
gradient the rectifier moves; both gradients come from one forward and one ``jax.vjp``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

ApplyFn = Callable[[Any, Any, jax.Array, bool], tuple[dict, Any]]
ViewKind = str  # "weak" | "strong"

# the data protocols (``dataset.protocol``): open-set SSL, closed-set SSL, generalized
# category discovery (labeled Old classes, unlabeled Old + New; ggr_jax.data.gcd)
PROTOCOLS = ("openset", "closed", "gcd")
SSL_PROTOCOLS = ("openset", "closed")
OOD_SCORES = ("msp", "iomatch", "ova")  # see ggr_jax.evaluate.ood_score
SOURCES = ("labeled", "unlabeled", "selected")


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a loss function may read. ``cfg`` is the algorithm's own config block;
  ``state`` its :attr:`Algorithm.init_state` pytree as of this step; ``learning_rate``
  the optimizer's learning rate at this step and ``epoch`` the step's epoch
  (``step // train.steps_per_epoch``; scalars, ``None`` outside a run).

  ``apply_fn(params, model_state, x, train, rng=None)``: a train-mode forward draws its
  dropout from ``rng``, or, without one, from the step's dropout key (the same for every
  such call of the step); pass distinct keys to forwards that need their own masks.
  """

  apply_fn: ApplyFn
  params: Any
  model_state: Any
  batch: Mapping[str, jax.Array]
  rng: jax.Array
  step: jax.Array
  cfg: ml_collections.ConfigDict
  state: Any = None
  learning_rate: jax.Array | None = None
  epoch: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Losses:
  """A loss function's result (a pytree, so a jitted function can return it).

  Attributes:
    supervised: named scalar terms (already weighted) whose sum is the anchor loss.
    auxiliary: named scalar terms whose sum is the auxiliary loss (the rectified one).
    model_state: the new BatchNorm statistics of the training forward.
    metrics: further scalars to log (``losses/*``, ``monitors/*``).
    sample_aux: ``(B,)`` per-sample auxiliary terms summing to the auxiliary loss, for
      per-sample geometry; ``None`` if the algorithm has none.
    sample_is_id: ``(B,)`` analysis labels of those samples (ID or OOD), or ``None``.
    state: the algorithm state after this step (``None``: unchanged).
  """

  supervised: Mapping[str, jax.Array]
  auxiliary: Mapping[str, jax.Array]
  model_state: Any
  metrics: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
  sample_aux: jax.Array | None = None
  sample_is_id: jax.Array | None = None
  state: Any = None

  @property
  def sup(self) -> jax.Array:
    """The anchor loss: the sum of the supervised terms."""
    return _total(self.supervised, self.auxiliary)

  @property
  def aux(self) -> jax.Array:
    """The auxiliary loss: the sum of the auxiliary terms (0 for none)."""
    return _total(self.auxiliary, self.supervised)


def _total(terms: Mapping[str, jax.Array], other: Mapping[str, jax.Array]) -> jax.Array:
  values = list(terms.values())
  if values:
    return functools.reduce(jnp.add, values)
  dtype = next(iter(other.values())).dtype if other else jnp.float32
  return jnp.zeros((), dtype)


@dataclasses.dataclass(frozen=True)
class EpochContext:
  """What an epoch hook may use, on the host, between two steps.

  ``predict_unlabeled(params, batch_stats, key, fn)`` returns, as one numpy array over
  every unlabeled image, ``fn(outputs)`` of the eval-mode forward of each image's weak
  view (each image augmented with its own key from ``key``, so the chunking does not
  change the result), computed in fixed-size jitted chunks.
  """

  step: int
  cfg: ml_collections.ConfigDict
  train_cfg: ml_collections.ConfigDict
  train_state: Any
  key: jax.Array
  predict_unlabeled: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class ViewPair:
  """A weak and a strong view of the same images, and the forward that normalises them.

  ``forward`` lists the views of the forward pass the pair shares (its BatchNorm batch
  statistics), in order; ``source`` is the index source of the images (its analysis
  labels are ``ulb_is_id`` or ``sel_is_id``). Regularisers across views (GGCR) read it.
  """

  weak: str
  strong: str
  forward: tuple[str, ...]
  source: str = "unlabeled"

  @property
  def is_id_key(self) -> str:
    return {"unlabeled": "ulb_is_id", "selected": "sel_is_id"}.get(self.source, "")


def default_batch_sizes(train: ml_collections.ConfigDict,
                        cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """``labeled = batch_size``, ``unlabeled = batch_size * uratio``."""
  del cfg
  return {"labeled": train.batch_size, "unlabeled": train.batch_size * train.uratio}


def no_state(num_unlabeled: int, cfg: ml_collections.ConfigDict) -> dict:
  del num_unlabeled, cfg
  return {}


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One algorithm, as the run layer sees it.

  Attributes:
    name: the registry name and the config block ``cfg.<name>``.
    default_config: the block's defaults.
    losses: ``LossContext -> Losses``.
    views: index source (``labeled``, ``unlabeled``, or ``selected``: unlabeled rows
      drawn from the mask :attr:`source_mask` reads) -> ``{view name: "weak"|"strong"}``,
      in forward order. Label rows come under ``y_lb``, ``ulb_is_id``, ``sel_is_id``.
    labeled_views: the views :attr:`supervised_loss` reads.
    supervised_loss: ``(outputs of labeled_views, batch, cfg) -> scalar``, the same
      anchor ``losses`` returns, for an anchor from a forward of the labeled views alone.
    head: the model head (``ggr_jax.models.heads.OpenSetNet``): none, iomatch, openmatch,
      gcd.
    head_sizes: ``cfg -> {OpenSetNet size field: int}`` from the block (e.g. the GCD
      head's ``gcd_hidden``, ``gcd_bottleneck``).
    batch_sizes: ``(cfg.train, cfg) -> {source: rows}`` for every source of ``views``.
    init_state: ``(num_unlabeled, cfg) -> pytree`` carried in the train state,
      checkpointed, replicated; ``Losses.state`` and :attr:`epoch_hook` replace it.
    source_mask: ``state -> bool (num_unlabeled,)``, the rows ``selected`` draws from.
    epoch_hook: ``EpochContext -> new state or None``, run on the host at every epoch
      boundary (``step % train.steps_per_epoch == 0``) before the step.
    ood_score: how evaluation scores "unknown" (see ``ggr_jax.evaluate.ood_score``).
    protocols: the data protocols it trains on (of :data:`PROTOCOLS`).
    validate: ``(cfg, fail) -> None``; ``fail(field, value, allowed)`` reports a bad
      field of the block (``field`` relative to the block).
    view_pair: the weak and strong view of the same unlabeled images, if it has them
      (:class:`ViewPair`; what a consistency regulariser such as GGCR works on).
    check_run: ``(cfg, counts, fail) -> None``, constraints across the whole run config
      ``cfg`` (``fail`` takes full field names), checked with ``counts = None`` when the
      config is validated and again with ``counts = {"labeled": n, "unlabeled": n}`` once
      the data is loaded, before anything compiles.
  """

  name: str
  default_config: Callable[[], ml_collections.ConfigDict]
  losses: Callable[[LossContext], Losses]
  views: Mapping[str, Mapping[str, ViewKind]]
  labeled_views: tuple[str, ...]
  supervised_loss: Callable[[list, Mapping[str, jax.Array], Any], jax.Array]
  head: str = "none"
  head_sizes: Callable[[ml_collections.ConfigDict], dict[str, int]] = lambda cfg: {}
  batch_sizes: Callable[..., dict[str, int]] = default_batch_sizes
  init_state: Callable[[int, ml_collections.ConfigDict], Any] = no_state
  source_mask: Callable[[Any], jax.Array] | None = None
  epoch_hook: Callable[[EpochContext], Any] | None = None
  ood_score: str = "msp"
  protocols: tuple[str, ...] = SSL_PROTOCOLS
  validate: Callable[[ml_collections.ConfigDict, Callable], None] | None = None
  view_pair: ViewPair | None = None
  check_run: Callable[[ml_collections.ConfigDict, Mapping[str, int] | None, Callable], None] \
      | None = None

  def __post_init__(self):
    unknown = sorted(set(self.views) - set(SOURCES))
    if unknown:
      raise ValueError(f"algorithm {self.name!r}: unknown index sources {unknown}; "
                       f"views are drawn from {SOURCES}.")
    if "selected" in self.views and self.source_mask is None:
      raise ValueError(f"algorithm {self.name!r} draws 'selected' views but has no "
                       "source_mask to select them from.")
    kinds = {k for v in self.views.values() for k in v.values()}
    if kinds - {"weak", "strong"}:
      raise ValueError(f"algorithm {self.name!r}: view kinds must be 'weak' or 'strong', "
                       f"got {sorted(kinds)}.")
    names = [n for v in self.views.values() for n in v]
    missing = sorted(set(self.labeled_views) - set(names))
    if missing:
      raise ValueError(f"algorithm {self.name!r}: labeled_views {missing} are no views.")
    if self.view_pair is not None:
      pair = self.view_pair
      unknown = sorted({pair.weak, pair.strong, *pair.forward} - set(names))
      if unknown or pair.weak not in pair.forward or pair.strong not in pair.forward:
        raise ValueError(f"algorithm {self.name!r}: view_pair names views {unknown} that do "
                         "not exist, or a pair outside its forward.")
    if self.ood_score not in OOD_SCORES:
      raise ValueError(f"algorithm {self.name!r}: ood_score must be one of {OOD_SCORES}.")
    if not self.protocols or set(self.protocols) - set(PROTOCOLS):
      raise ValueError(f"algorithm {self.name!r}: protocols must be a non-empty tuple of "
                       f"{PROTOCOLS}, got {self.protocols!r}.")

  def sizes(self, train: ml_collections.ConfigDict,
            cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Rows per source of one batch, in the order of :attr:`views`."""
    sizes = self.batch_sizes(train, cfg)
    missing = sorted(set(self.views) - set(sizes))
    if missing:
      raise ValueError(f"algorithm {self.name!r}: batch_sizes gives no size for {missing}.")
    return {source: sizes[source] for source in self.views}
