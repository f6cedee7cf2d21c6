"""One build factory: a config (and a mesh) -> model, optimizer, train state, jitted step.

The trainer, ``ggr-jax eval``, ``ggr-jax bench`` and the tests build a run through
:func:`build`, so the chain model -> optimizer -> state -> step is wired once::

  program = build(cfg, DataSpec.of_split(split), make_mesh())
  state = program.init_state()
  feed = program.feed(split_arrays(split), state, start=0)
  state, metrics = program.train_step(state, feed.next(0))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ggr_jax import ssl
from ggr_jax.data import augment

from ggr_jax.models import VITS, build_model, convert_gcd, trainable_leaves
from ggr_jax.ssl.interface import Algorithm, EpochContext
from ggr_jax.train import config as config_lib, eagc, feeds, optim, step as step_lib
from ggr_jax.train.state import TrainState, create_train_state, make_apply_fn


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the build needs to know of the data: stored image shape, classes, the number of
  unlabeled rows and the normalisation."""

  image_shape: tuple[int, ...]
  num_classes: int
  num_unlabeled: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_labeled: int | None = None  # None: not known (no run-wide check of it)

  @classmethod
  def of_split(cls, split: Any) -> "DataSpec":
    """From an :class:`~ggr_jax.data.openset.OpenSetSplit`."""
    return cls(tuple(split.x_labeled.shape[1:]), int(split.num_classes),
               int(split.x_unlabeled.shape[0]), tuple(np.ravel(split.mean).tolist()),
               tuple(np.ravel(split.std).tolist()), int(split.x_labeled.shape[0]))


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The 1-D ``("data",)`` mesh over ``devices`` (default: every device)."""
  return Mesh(np.array(list(jax.devices() if devices is None else devices)), ("data",))


@dataclasses.dataclass(eq=False)  # hashed by identity: a static argument of jitted helpers
class Program:
  """A built run: everything jitted is compiled lazily on first call."""

  cfg: ml_collections.ConfigDict
  algorithm: Algorithm
  data: DataSpec
  model: Any
  tx: optax.GradientTransformationExtraArgs
  mesh: Mesh
  train_step: Callable
  eval_forward: Callable

  @property
  def algo_cfg(self) -> ml_collections.ConfigDict:
    return step_lib.algorithm_config(self.cfg)

  @property
  def input_shape(self) -> tuple[int, ...]:
    """The shape of one image as the model sees it (after ``augment.crop``)."""
    crop = self.cfg.augment.get("crop", 0)
    return (crop, crop, *self.data.image_shape[2:]) if crop else self.data.image_shape

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def init_state(self) -> TrainState:
    """The initial train state, replicated over the mesh."""
    algo, algo_cfg, n = self.algorithm, self.algo_cfg, self.data.num_unlabeled
    state = create_train_state(self.model, self.tx, self.input_shape, self.cfg.train.seed,
                               lambda: algo.init_state(n, algo_cfg),
                               eagc.init_state if eagc.enabled(self.cfg) else None)
    if self.cfg.model.get("pretrained", ""):
      params = pretrained_backbone(self.cfg, state.params)
      state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
      if state.coordinator is not None:
        state = state.replace(coordinator={**state.coordinator, "reference": {
            **state.coordinator["reference"], "params": jax.tree.map(jnp.copy, params)}})
    return jax.device_put(state, self.replicated)

  def feed(self, arrays: dict[str, np.ndarray], state: TrainState, start: int,
           saved: dict | None = None) -> feeds.Feed:
    """The step's input feed from the host ``arrays`` (:func:`feeds.split_arrays`);
    ``saved``: the feed state stored with the checkpoint of step ``start``."""
    return feeds.make_feed(self.cfg.train.input, self.algorithm, step_lib.source_sizes(self.cfg),
                           arrays, state, self.mesh, start, self.cfg.train.prefetch,
                           self.cfg.train.input_workers, saved)

  def epoch_boundary(self, state: TrainState, step: int, images: np.ndarray,
                     feed: feeds.Feed) -> TrainState:
    """Runs the algorithm's epoch hook if ``step`` (``state.step``, known on the host)
    starts an epoch; a new algorithm state is replicated and the feed restarted with it."""
    hook = self.algorithm.epoch_hook
    if hook is None or step % self.cfg.train.steps_per_epoch:
      return state
    key = jax.random.fold_in(jax.random.fold_in(state.key, 3), step)
    predict = functools.partial(self.predict_unlabeled, images)
    new = hook(EpochContext(step, self.algo_cfg, self.cfg.train, state, key, predict))
    if new is None:
      return state
    state = state.replace(algo_state=jax.device_put(new, self.replicated))
    feed.restart(step, state.algo_state)
    return state

  def predict_unlabeled(self, images: np.ndarray, params: Any, batch_stats: Any, key: jax.Array,
                        fn: Callable, *args: Any) -> np.ndarray:
    """``fn(outputs, *args)`` of the eval-mode forward of every image's weak view, in
    chunks of ``train.eval_batch_size`` (each image's view from its own key)."""
    size = self.cfg.train.eval_batch_size
    parts = []
    for begin in range(0, images.shape[0], size):
      part = images[begin:begin + size]
      rows = part.shape[0]
      if rows < size:
        part = np.concatenate([part, np.zeros((size - rows, *part.shape[1:]), part.dtype)])
      out = _weak_view_chunk(self, params, batch_stats, part, key, np.int32(begin), fn, args)
      parts.append(feeds.host_copy(out)[:rows])
    return np.concatenate(parts)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _weak_view_chunk(program: Program, params, batch_stats, images, key, first_row, fn, args):
  aug, apply_fn = program.cfg.augment, make_apply_fn(program.model)
  mean = jnp.asarray(program.data.mean, jnp.float32)
  std = jnp.asarray(program.data.std, jnp.float32)

  def view(k, image):
    x = step_lib.crop_images(k, image[None].astype(jnp.float32) / 255.0, aug.crop, "random")
    return augment.weak_augment(k, x, pad=aug.pad, flip=aug.flip)[0]

  rows = first_row + jnp.arange(images.shape[0])
  x = jax.vmap(view)(jax.vmap(lambda r: jax.random.fold_in(key, r))(rows), images)
  outputs, _ = apply_fn(params, batch_stats, augment.normalize(x, mean, std), False)
  return fn(outputs, *args)


def vit_sizes(cfg: ml_collections.ConfigDict, data: DataSpec) -> dict[str, int] | None:
  """A ViT backbone's sizes: ``model.vit`` and the image size the step feeds it."""
  if cfg.model.backbone not in VITS:
    return None
  crop = cfg.augment.get("crop", 0)
  return {**cfg.model.vit.to_dict(), "image_size": crop or data.image_shape[0]}


def pretrained_backbone(cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """``params`` with the backbone's leaves replaced by ``model.pretrained``'s (DINO ViT
  weights; the classifier ``fc`` keeps its initialisation), checked leaf by leaf."""
  loaded = flatten_dict(convert_gcd.load_dino_checkpoint(cfg.model.pretrained))
  own = flatten_dict(params["backbone"])
  missing = sorted("/".join(k) for k in own if k not in loaded and k[0] != "fc")
  extra = sorted("/".join(k) for k in loaded if k not in own)
  wrong = sorted(f"{'/'.join(k)} {np.shape(v)} (model: {own[k].shape})"
                 for k, v in loaded.items() if k in own and np.shape(v) != own[k].shape)
  if missing or extra or wrong:
    raise ValueError(
        f"model.pretrained = {cfg.model.pretrained} does not fit model.backbone = "
        f"{cfg.model.backbone} (vit {cfg.model.vit.to_dict()}): missing {missing[:4]}, "
        f"unexpected {extra[:4]}, shapes {wrong[:4]}; choose the backbone and "
        "model.vit.depth / patch_size of the checkpoint.")
  merged = {k: jnp.asarray(loaded.get(k, v), v.dtype) for k, v in own.items()}
  return {**params, "backbone": unflatten_dict(merged)}


def build(cfg: ml_collections.ConfigDict, data: DataSpec, mesh: Mesh | None = None,
          model: Any = None) -> Program:
  """The run of ``cfg`` on data of shape ``data`` over ``mesh`` (default: every device).

  ``model`` replaces the one ``cfg.model`` describes (e.g. a converted network).
  """
  mesh = make_mesh() if mesh is None else mesh
  algorithm = ssl.get(cfg.algorithm)
  if data.num_labeled is not None:
    config_lib.check_run(cfg, {"labeled": data.num_labeled, "unlabeled": data.num_unlabeled})
  if model is None:
    model = build_model(cfg.model.backbone, data.num_classes, algorithm.head,
                        bn_momentum=cfg.model.bn_momentum, vit=vit_sizes(cfg, data),
                        **algorithm.head_sizes(step_lib.algorithm_config(cfg)))
  tx = optim.make_optimizer(cfg, trainable_leaves(model))
  train_step = step_lib.make_train_step(cfg, model, tx, data.mean, data.std, mesh)
  eval_forward = step_lib.make_eval_forward(model, data.mean, data.std, cfg.augment.crop)
  return Program(cfg, algorithm, data, model, tx, mesh, train_step, eval_forward)
