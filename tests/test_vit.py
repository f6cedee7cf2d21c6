"""DINO's ViT in Flax: conversion, partial fine-tuning, input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ggr_jax.models import convert_gcd, vit


@pytest.fixture(scope="module")
def tiny():
  model = vit.VisionTransformer(image_size=16, patch_size=8, dim=8, depth=3, heads=2,
                                grad_from_block=2)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  return model, x, model.init(jax.random.key(1), x)["params"]


def test_the_official_names_round_trip(tiny):
  _, _, params = tiny
  names = convert_gcd.flax_to_dino_vit(params)
  assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.2.attn.qkv.weight",
          "blocks.0.mlp.fc1.bias", "norm.weight"} <= set(names)
  assert names["patch_embed.proj.weight"].shape == (8, 3, 8, 8)  # OIHW
  back = convert_gcd.dino_vit_to_flax(names)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_frozen_blocks_get_exactly_zero_gradient_and_the_mask_names_the_trained_ones(tiny):
  model, x, params = tiny
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)["feat"] ** 3))(params)
  mask = vit.trainable_mask(params, model.grad_from_block)
  for path, g in traverse_util.flatten_dict(grads).items():
    trained = traverse_util.flatten_dict(mask)[path]
    assert trained == path[0].startswith("blocks_2"), path
    if path[0] != "norm":  # the final norm gets a gradient but is frozen by the mask
      assert bool(jnp.any(g != 0)) == trained, path


def test_an_image_of_another_size_is_refused_before_any_compute(tiny):
  model, _, params = tiny
  with pytest.raises(ValueError, match="resize the images to 16"):
    model.apply({"params": params}, jnp.zeros((1, 24, 24, 3)))


def test_unknown_checkpoint_names_are_refused(tiny):
  _, _, params = tiny
  names = convert_gcd.flax_to_dino_vit(params)
  names["head.weight"] = np.zeros((3, 3))
  with pytest.raises(ValueError, match="head.weight"):
    convert_gcd.dino_vit_to_flax(names)


def test_a_dino_checkpoint_loads_from_npz_and_a_missing_one_names_where_to_get_it(
    tiny, tmp_path):
  _, _, params = tiny
  names = convert_gcd.flax_to_dino_vit(params)
  np.savez(tmp_path / "dino.npz", **names, **{"head.last_layer.weight": np.zeros((2, 2))})
  loaded = convert_gcd.load_dino_checkpoint(tmp_path / "dino.npz")
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
  with pytest.raises(FileNotFoundError, match="dino_vitbase16_pretrain.pth"):
    convert_gcd.load_dino_checkpoint(tmp_path / "missing.pth")
