"""A DINO ViT as the run's backbone: frozen trunk, pretrained weights, EAGC's shared trunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ggr_jax import coordinator
from ggr_jax.models import build_model, convert_gcd
from ggr_jax.train import config as config_lib
from ggr_jax.train import eagc, loop
from ggr_jax.train.build import DataSpec, build
from ggr_jax.train.feeds import split_arrays
from tests.test_simgcd import gcd_config

VIT = {"patch_size": 4, "depth": 2, "grad_from_block": 1}


def vit_config(steps=2, terms="off"):
  cfg = gcd_config(steps)
  cfg.model.update(backbone="vit_tiny")
  cfg.model.vit.update(VIT)
  cfg.eagc.update(terms=terms, reference_steps=0)
  return cfg


def _dino_file(tmp_path):
  """Another initialisation of the backbone, written as a DINO ``.npz``."""
  other = build_model("vit_tiny", 10, "gcd", vit={**VIT, "image_size": 8})
  weights = other.init(jax.random.key(7), jnp.zeros((1, 8, 8, 1)))["params"]["backbone"]
  path = tmp_path / "dino.npz"
  np.savez(path, **convert_gcd.flax_to_dino_vit(weights))
  return weights, path


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_pretrained_weights_load_and_training_moves_only_the_trained_blocks_and_heads(tmp_path):
  cfg = vit_config()
  split = loop.load_split(cfg)
  weights, path = _dino_file(tmp_path)
  cfg.model.pretrained = str(path)
  config_lib.validate(cfg)
  program = build(cfg, DataSpec.of_split(split))
  state = program.init_state()
  loaded = _flat(state.params["backbone"])
  for key, value in _flat(weights).items():
    np.testing.assert_array_equal(loaded[key], value)
  np.testing.assert_array_equal(_flat(state.ema_params["backbone"])[("pos_embed",)],
                                np.asarray(weights["pos_embed"]))
  before = _flat(state.params)
  feed = program.feed(split_arrays(split), state, 0)
  for step in range(2):
    state, _ = program.train_step(state, feed.next(step))
  after = _flat(state.params)
  for path_, value in before.items():
    trained = path_[0] != "backbone" or path_[1] == "blocks_1"
    assert (not np.array_equal(value, after[path_])) == trained, path_


def test_a_pretrained_file_that_does_not_fit_or_is_missing_is_named(tmp_path):
  cfg = vit_config()
  split = loop.load_split(cfg)
  _, path = _dino_file(tmp_path)
  cfg.model.pretrained = str(path)
  cfg.model.vit.depth = 3
  with pytest.raises(ValueError, match="missing .*blocks_2.*choose the backbone"):
    build(cfg, DataSpec.of_split(split)).init_state()
  cfg.model.pretrained = str(tmp_path / "absent.pth")
  with pytest.raises(config_lib.ConfigError, match="absent.pth.*dino_vitbase16_pretrain"):
    config_lib.validate(cfg)
  cfg.model.update(backbone="cnn", pretrained=str(path))
  with pytest.raises(config_lib.ConfigError, match="model.pretrained.*'cnn'"):
    config_lib.validate(cfg)


def test_the_shared_trunk_gives_the_full_reference_forward_and_the_same_gradients():
  model = build_model("vit_tiny", 6, "gcd", vit={**VIT, "image_size": 8}, gcd_hidden=16,
                      gcd_bottleneck=8)
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
  params = model.init(jax.random.key(1), x)["params"]
  # the reference differs from the training model in the trained block only
  ref = {**params, "backbone": {**params["backbone"], "blocks_1": jax.tree.map(
      lambda p: p * 1.3 + 0.01, params["backbone"]["blocks_1"])}}
  feats = np.random.default_rng(0).normal(size=(20, 192))
  c = coordinator.conceptor(jnp.asarray(feats[:, :4] @ np.ones((4, 192)) / 4), 2.0)
  cfg = vit_config(terms="both").eagc
  labeled = jnp.asarray([1, 1, 0, 0, 0, 0], jnp.float32)

  def apply_fn(p, bs, images, train, rng=None):
    return model.apply({"params": p}, images, train=train), bs

  def run(shared, p0=params, images=x, reference=ref):
    records: list = []
    state = {"c": c, "mu": jnp.asarray(0.5),
             "reference": {"params": reference, "batch_stats": {}}}
    apply = eagc.coordinated_apply(apply_fn, cfg, state, records, model if shared else None)

    def loss(p):
      out, _ = apply(p, {}, images, True, labeled=labeled)
      aga = records[-1].aga_loss
      return jnp.sum(jnp.sin(out["logits"])) + aga, (aga, records[-1].step.tau)

    return jax.grad(loss, has_aux=True)(p0)

  (g_shared, (aga_shared, tau_shared)), (g_full, (aga_full, tau_full)) = run(True), run(False)
  assert aga_shared > 0  # the reference differs, so the anchoring is active
  np.testing.assert_allclose(aga_shared, aga_full, rtol=1e-5)
  np.testing.assert_allclose(tau_shared, tau_full, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  # and the shared program runs the trained block once more, not the whole network
  flops = {shared: jax.jit(lambda *a, s=shared: run(s, *a)[0]).lower(params, x, ref)
           .compile().cost_analysis() for shared in (True, False)}
  assert flops[True]["flops"] < flops[False]["flops"]
