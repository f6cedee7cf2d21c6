"""Crops for large-image data sets: windows inside the image, torchvision's sampling rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax.data import crops


def _ramp(n=2, h=12, w=10, c=1):
  return jnp.arange(n * h * w * c, dtype=jnp.float32).reshape(n, h, w, c)


def test_center_crop_is_the_centred_window():
  x = _ramp()
  np.testing.assert_array_equal(crops.center_crop(x, 6), x[:, 3:9, 2:8])


def test_random_crop_returns_windows_of_the_image_at_varying_offsets():
  x = _ramp(n=16)
  out = np.asarray(crops.random_crop(jax.random.key(0), x, 5))
  offsets = set()
  for image, crop in zip(np.asarray(x), out):
    top, left = np.argwhere(image[..., 0] == crop[0, 0, 0])[0]
    np.testing.assert_array_equal(crop, image[top:top + 5, left:left + 5])
    offsets.add((int(top), int(left)))
  assert len(offsets) > 4


def test_random_resized_crop_windows_follow_the_scale_and_ratio_bounds():
  keys = jax.random.split(jax.random.key(1), 400)
  top, left, h, w = jax.vmap(lambda k: crops._window(k, 64, 48, (0.08, 1.0), (3 / 4, 4 / 3)))(keys)
  top, left, h, w = map(np.asarray, (top, left, h, w))
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 64).all() and (left + w <= 48).all()
  area = h * w / (64 * 48)
  assert area.min() >= 0.06 and area.max() <= 1.0 and area.std() > 0.1
  aspect = w / h
  assert aspect.min() > 0.7 and aspect.max() < 1.45  # 3/4..4/3 up to rounding


def test_random_resized_crop_falls_back_to_the_centred_allowed_window():
  # No square window of area >= 90% fits a 10x40 image: the fallback is the centred 10x10.
  top, left, h, w = crops._window(jax.random.key(2), 10, 40, (0.9, 1.0), (1.0, 1.0))
  assert (int(top), int(left), int(h), int(w)) == (0, 15, 10, 10)


def test_random_resized_crop_of_the_whole_image_at_its_size_is_the_identity():
  x = jax.random.uniform(jax.random.key(3), (3, 16, 16, 3))
  out = crops.random_resized_crop(jax.random.key(4), x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(out, x, atol=1e-5)


def test_random_resized_crop_keeps_a_constant_image_constant():
  x = jnp.full((2, 40, 30, 3), 0.25)
  out = crops.random_resized_crop(jax.random.key(5), x, 24)
  assert out.shape == (2, 24, 24, 3)
  np.testing.assert_allclose(out, 0.25, atol=1e-5)


@pytest.mark.parametrize("size", [0, 13])
def test_a_crop_larger_than_the_image_is_refused(size):
  with pytest.raises(ValueError, match="crop size"):
    crops.center_crop(_ramp(h=12, w=12), size)
