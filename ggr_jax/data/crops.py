"""Crops to a smaller square for large-image data sets (ImageNet-30), on device, per sample.

The official ImageNet-30 pipeline stores nothing: it resizes each image to 256x256 and
then takes, for the weak view, a random 224 crop and a flip; for the strong view a
``RandomResizedCrop(224, scale=(0.08, 1))``, a flip and RandAugment; for evaluation a
centre 224 crop. ggr_jax keeps the images resized once to ``image_size`` (uint8 on
device) and crops here, before :mod:`ggr_jax.data.augment` flips and RandAugments:

* :func:`random_crop`: a uniformly placed ``size x size`` window.
* :func:`random_resized_crop`: torchvision's rule: up to 10 draws of an area fraction
  ``s ~ U(scale)`` and an aspect ratio ``r`` log-uniform in ``ratio``, window ``w =
  round(sqrt(s A r))``, ``h = round(sqrt(s A / r))``; the first draw that fits the
  image is used at a uniform offset, else the centred window of the clamped ratio;
  resized to ``size x size`` by antialiased bilinear interpolation (as PIL's bilinear
  resize, which the official code uses, antialiases when shrinking).
* :func:`center_crop`: the centred window, static slicing.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.zeros((2, 32, 32, 3))
  >>> random_crop(jax.random.key(0), x, 28).shape, random_resized_crop(jax.random.key(1), x, 24).shape
  ((2, 28, 28, 3), (2, 24, 24, 3))
  >>> center_crop(x, 28).shape
  (2, 28, 28, 3)
"""

from __future__ import annotations

import math

import dm_pix
import jax
import jax.numpy as jnp

ATTEMPTS = 10  # torchvision's number of tries before the centred fallback


def _check(images: jax.Array, size: int) -> None:
  if images.ndim != 4:
    raise ValueError(f"expected NHWC images, got shape {images.shape}.")
  h, w = images.shape[1:3]
  if not 0 < size <= min(h, w):
    raise ValueError(f"crop size {size} must lie in [1, {min(h, w)}] for {h}x{w} images; "
                     "lower augment.crop or raise dataset.image_size.")


def center_crop(images: jax.Array, size: int) -> jax.Array:
  """The centred ``size x size`` window of every image (offsets rounded down)."""
  _check(images, size)
  top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
  return images[:, top:top + size, left:left + size]


def random_crop(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """A ``size x size`` window at a uniform offset, its own per sample."""
  _check(images, size)
  keys = jax.random.split(key, images.shape[0])
  shape = (size, size, images.shape[-1])
  return jax.vmap(lambda k, x: dm_pix.random_crop(k, x, shape))(keys, images)


def _window(key: jax.Array, height: int, width: int, scale: tuple[float, float],
            ratio: tuple[float, float]) -> tuple[jax.Array, ...]:
  """``(top, left, h, w)`` of one random-resized-crop window, torchvision's rule."""
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (ATTEMPTS,), minval=scale[0],
                                              maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (ATTEMPTS,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  w = jnp.round(jnp.sqrt(area * jnp.exp(log_r)))
  h = jnp.round(jnp.sqrt(area / jnp.exp(log_r)))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits)
  # Fallback: the whole image cut to the nearest allowed aspect ratio, centred.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fb_h, fb_w = round(width / ratio[0]), width
  elif in_ratio > ratio[1]:
    fb_h, fb_w = height, round(height * ratio[1])
  else:
    fb_h, fb_w = height, width
  ok = fits[first]
  h = jnp.where(ok, h[first], fb_h)
  w = jnp.where(ok, w[first], fb_w)
  top = jnp.where(ok, jnp.floor(jax.random.uniform(k_top) * (height - h + 1)),
                  (height - fb_h) // 2)
  left = jnp.where(ok, jnp.floor(jax.random.uniform(k_left) * (width - w + 1)),
                   (width - fb_w) // 2)
  return top, left, h, w


def random_resized_crop(key: jax.Array, images: jax.Array, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """A random window (area share ``scale``, aspect ``ratio``) resized to ``size x size``."""
  if images.ndim != 4:
    raise ValueError(f"expected NHWC images, got shape {images.shape}.")
  if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1] and size > 0):
    raise ValueError(f"need size > 0, 0 < scale[0] <= scale[1] and 0 < ratio[0] <= "
                     f"ratio[1]; got size={size}, scale={scale}, ratio={ratio}.")
  height, width = images.shape[1:3]

  def one(k, image):
    top, left, h, w = _window(k, height, width, scale, ratio)
    factor = jnp.stack([size / h, size / w]).astype(jnp.float32)
    shift = -jnp.stack([top, left]).astype(jnp.float32) * factor
    return jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1),
                                         factor, shift, method="linear", antialias=True)

  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(one)(keys, images.astype(jnp.float32))
