"""The jitted train step: sample, augment, one forward, two gradients, rectify, update.

Everything between two host interactions is one ``jax.jit`` call with the state
donated. Data stays on device (uint8); the batch is sharded over the ``("data",)``
mesh, parameters are replicated, so gradients come out as global means and the
rectifier needs no collectives.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ggr_jax import per_sample, ssl
from ggr_jax.coordinator import gradient_deviation
from ggr_jax.data import augment, crops, sampling
from ggr_jax.models import trainable_leaves
from ggr_jax.ssl.interface import Algorithm, LossContext, Losses
from ggr_jax.train import eagc, optim
from ggr_jax.train.state import TrainState, make_apply_fn

DIAGNOSTICS = ("cos_before", "cos_after", "conflict", "aux_norm_kept")
RESERVED_TERMS = ("sup", "aux", "total")


def algorithm_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config block of ``cfg.algorithm`` (empty if the config has none)."""
  return cfg[cfg.algorithm] if cfg.algorithm in cfg else ml_collections.ConfigDict()


def source_sizes(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Rows per index source of one batch, in the algorithm's source order."""
  return ssl.get(cfg.algorithm).sizes(cfg.train, algorithm_config(cfg))


def source_mask(algo: Algorithm, algo_state: Any) -> jax.Array | None:
  """The rows the ``selected`` source draws from, if the algorithm has one."""
  return None if algo.source_mask is None else algo.source_mask(algo_state)


def make_augment_views(cfg: ml_collections.ConfigDict, mean, std, mesh: Mesh | None) -> Callable:
  """``views(key, step, raw) -> batch``: augmentation and normalisation of a raw batch.

  ``raw`` is :func:`ggr_jax.data.sampling.gather_rows`'s output: uint8 images per
  source and their label rows, gathered on device or streamed from the host.
  """
  spec = ssl.get(cfg.algorithm).views
  aug = cfg.augment
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  def shard(x):
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))

  def views(key, step, raw):
    aug_key = jax.random.fold_in(jax.random.fold_in(key, 1), step)
    batch = {name: shard(raw[name]) for name in raw if name not in spec}  # labels, is_id
    for s, (source, names) in enumerate(spec.items()):
      images = shard(raw[source].astype(jnp.float32) / 255.0)
      for v, (name, view) in enumerate(names.items()):
        k = jax.random.fold_in(aug_key, 10 * s + v)
        if view == "weak":
          out = augment.weak_augment(k, crop_images(k, images, aug.crop, "random"), pad=aug.pad,
                                     flip=aug.flip)
        else:
          out = augment.strong_augment(k, crop_images(k, images, aug.crop, "random_resized"),
                                       pad=aug.pad, flip=aug.flip, num_ops=aug.num_ops,
                                       cutout=aug.cutout)
        batch[name] = shard(augment.normalize(out, mean, std))
    return batch

  return views


def make_views(cfg: ml_collections.ConfigDict, mean, std, mesh: Mesh | None) -> Callable:
  """``views(key, step, data, mask) -> batch``: sample from device data, then augment."""
  augment_views = make_augment_views(cfg, mean, std, mesh)
  return lambda key, step, data, mask: augment_views(
      key, step, sample_on_device(cfg, key, step, data, mask))


def sample_on_device(cfg: ml_collections.ConfigDict, key, step, data, mask) -> dict:
  """The raw batch of ``step`` gathered from the device-resident ``data``."""
  counts = {name: data[name].shape[0] for name in ("x_labeled", "x_unlabeled")}
  indices = sampling.batch_indices(key, step, source_sizes(cfg), counts, mask)
  return sampling.gather_rows(data, indices)


def crop_images(key: jax.Array, images: jax.Array, size: int, kind: str) -> jax.Array:
  """``images`` cropped to ``size`` (0: unchanged) by ``crops.<kind>_crop``."""
  if not size:
    return images
  if kind == "center":
    return crops.center_crop(images, size)
  key = jax.random.fold_in(key, 7)
  if kind == "random":
    return crops.random_crop(key, images, size)
  if kind == "random_resized":
    return crops.random_resized_crop(key, images, size)
  raise ValueError(f"unknown crop kind {kind!r}")


def loss_metrics(out: Losses) -> dict[str, jax.Array]:
  """``losses/<term>`` of every named term; the names must be unique and not reserved."""
  names = [*out.supervised, *out.auxiliary]
  clash = sorted({n for n in names if names.count(n) > 1} | set(names) & set(RESERVED_TERMS))
  if clash:
    raise ValueError(f"loss term names {clash} are repeated or reserved ({RESERVED_TERMS}); "
                     "rename them in the algorithm's Losses.")
  return {f"losses/{name}": value for name, value in {**out.supervised, **out.auxiliary}.items()}


def make_train_step(cfg: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                    mean, std, mesh: Mesh | None = None) -> Callable:
  """A jitted ``train_step(state, data) -> (state, metrics)`` with the state donated.

  ``tx`` is :func:`ggr_jax.train.optim.make_optimizer`'s chain: its rectifier comes
  first, so the per-sample anchor products measured here are those of its anchor.
  ``data`` is the whole split on device (``train.input="device"``: the step samples its
  batch) or the raw batch of this step (``"stream"``: :class:`ggr_jax.data.stream.HostStream`).
  """
  algo, algo_cfg = ssl.get(cfg.algorithm), algorithm_config(cfg)
  views = make_augment_views(cfg, mean, std, mesh)
  schedule = optim.learning_rate(cfg)
  ema_keep = cfg.optim.ema

  ggr = cfg.ggr
  per_sample_on = ggr.granularity == "per_sample" or ggr.sample_diagnostics

  labeled_anchor = ggr.anchor == "labeled"
  eagc_on = eagc.enabled(cfg)
  trained_scope = optim.trained_scope_fn(ggr, trainable_leaves(model))

  streamed = cfg.train.input == "stream"

  def train_step(state: TrainState, data: dict[str, jax.Array]):
    key = jax.random.fold_in(state.key, 0)
    raw = data if streamed else sample_on_device(cfg, key, state.step, data,
                                                 source_mask(algo, state.algo_state))
    batch = views(key, state.step, raw)
    rng = jax.random.fold_in(jax.random.fold_in(state.key, 2), state.step)
    step_apply = make_apply_fn(model, dropout_key=jax.random.fold_in(rng, 3))

    def anchor_grad(batch):
      # The supervised gradient of a forward of the labeled views alone; the BatchNorm
      # statistics it computes are discarded (the joint forward's are kept).
      sup_only = lambda p: ssl.labeled_loss(cfg.algorithm, step_apply, p, state.batch_stats,
                                            batch, algo_cfg)[0]
      return jax.grad(sup_only)(state.params)

    def loss_fn(params):
      records: list = []
      apply = step_apply
      if eagc_on:
        apply = eagc.coordinated_apply(step_apply, cfg.eagc, state.coordinator, records, model)
      out = algo.losses(LossContext(apply, params, state.batch_stats, batch, rng,
                                    state.step, algo_cfg, state.algo_state,
                                    learning_rate=schedule(state.step),
                                    epoch=state.step // cfg.train.steps_per_epoch))
      sup, aux = out.sup, out.aux
      metrics = {**out.metrics, **loss_metrics(out)}
      coordinator = state.coordinator
      if eagc_on:
        record = eagc.single_record(records, algo.name)
        sup = sup + record.aga_loss  # AGA is an anchoring loss on the labeled rows
        metrics.update(eagc.metrics(record))
        coordinator = {**state.coordinator, "mu": record.step.mu}
      terms = out.sample_aux
      if terms is None:
        if per_sample_on:
          raise ValueError(f"algorithm {algo.name!r} returns no per-sample auxiliary terms "
                           "(Losses.sample_aux); per-sample geometry needs them.")
        terms = jnp.zeros((0,), sup.dtype)
      is_id = out.sample_is_id if out.sample_is_id is not None else \
          jnp.ones(terms.shape, bool)
      new_algo_state = state.algo_state if out.state is None else out.state
      return (sup, aux, terms), (out.model_state, metrics, is_id,
                                 (new_algo_state, coordinator))

    extra = {}
    if per_sample_on:
      # One linearisation serves everything: its transpose gives both gradients, its
      # JVPs give every sample's inner products with any direction.
      (sup, aux, terms), lin_fn, (new_stats, metrics, is_id, carried) = jax.linearize(
          loss_fn, state.params, has_aux=True)
      transpose = jax.linear_transpose(lin_fn, state.params)
      zero_terms = jnp.zeros_like(terms)
      g_aux, = transpose((jnp.zeros_like(sup), jnp.ones_like(aux), zero_terms))
      g_sup = anchor_grad(batch) if labeled_anchor else \
          transpose((jnp.ones_like(sup), jnp.zeros_like(aux), zero_terms))[0]
      dots = _sample_dots_fn(ggr, lin_fn, transpose, terms)
      # the rectifier's own anchor (it is first in the chain, on the trained scoped
      # leaves): XLA then computes the JVP once for these diagnostics and the rectifier
      anchor = jax.tree.map(lambda g, m: g[None] if m else jnp.zeros_like(g)[None],
                            g_sup, trained_scope(g_sup))
      metrics.update(per_sample.conflict_diagnostics(dots(anchor)[:, 0], is_id, weight=terms))
      if ggr.granularity == "per_sample":
        extra["aux_sample_dots"] = dots
    else:
      (sup, aux, terms), vjp_fn, (new_stats, metrics, _, carried) = jax.vjp(
          loss_fn, state.params, has_aux=True)
      one, zero, zero_terms = jnp.ones_like(sup), jnp.zeros_like(sup), jnp.zeros_like(terms)
      if ggr.split_gradients:
        g_aux, = vjp_fn((zero, one, zero_terms))
        g_sup = anchor_grad(batch) if labeled_anchor else vjp_fn((one, zero, zero_terms))[0]
      else:  # plain SSL: one backward pass of sup + aux_weight * aux
        g_sup, = vjp_fn((one, jnp.asarray(ggr.aux_weight, sup.dtype), zero_terms))
        g_aux = jax.tree.map(jnp.zeros_like, g_sup)
    updates, opt_state = tx.update(g_sup, state.opt_state, state.params, aux_grads=g_aux,
                                   **extra)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_keep)
    metrics = {
        **metrics,
        "losses/sup": sup, "losses/aux": aux, "losses/total": sup + aux,
        **({f"ggr/{name}": optax.tree.get(opt_state, name) for name in DIAGNOSTICS}
           if ggr.split_gradients else {}),
        # EAGC's GDC: 1 - cos(g_sup, g_sup + g_aux) over the trained leaves in scope
        **({"diagnostics/gdc": gradient_deviation(
            g_sup, g_aux, trained_scope(g_sup))}
           if ggr.split_gradients else {}),
        "monitors/lr": schedule(state.step),
        # 1 when the loss and both gradients are finite (the loop's divergence guard)
        "monitors/finite": (jnp.isfinite(sup + aux) & jnp.isfinite(optax.tree.norm(g_sup))
                            & jnp.isfinite(optax.tree.norm(g_aux))).astype(jnp.float32),
    }
    algo_state, coordinator = carried
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state, ema_params=ema_params,
                              algo_state=algo_state, coordinator=coordinator)
    return new_state, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def _sample_dots_fn(ggr: ml_collections.ConfigDict, lin_fn: Callable, transpose: Callable,
                    terms: jax.Array) -> Callable:
  """``directions -> (B, m)`` per-sample inner products, by JVP or materialised rows."""
  if ggr.per_sample_method == "jvp":
    return lambda directions: jax.vmap(lambda d: lin_fn(d)[2])(directions).T
  zero = jnp.zeros((), terms.dtype)
  rows = per_sample.rows_from_pullback(lambda e: transpose((zero, zero, e))[0],
                                       terms.shape[0], terms.dtype, ggr.microbatch or None)
  return lambda directions: per_sample.dots_from_rows(rows, directions)


def make_eval_forward(model, mean, std, crop: int = 0) -> Callable:
  """Jitted eval-mode forward of uint8 images (centre-cropped to ``crop`` if > 0)."""
  apply_fn = make_apply_fn(model)
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  @jax.jit
  def forward(params, batch_stats, images):
    images = crop_images(None, images.astype(jnp.float32), crop, "center")
    x = augment.normalize(images / 255.0, mean, std)
    outputs, _ = apply_fn(params, batch_stats, x, False)
    return outputs

  return forward


def predict(forward: Callable, params: Any, batch_stats: Any, images, batch_size: int) -> dict:
  """Outputs for every image, in fixed-size (padded) batches so nothing recompiles."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  n = images.shape[0]
  chunks = []
  for start in range(0, n, batch_size):
    part = images[start:start + batch_size]
    pad = batch_size - part.shape[0]
    if pad:
      part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
    out = forward(params, batch_stats, part)
    chunks.append({k: np.asarray(v)[:batch_size - pad] for k, v in out.items()})
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
