"""On-device weak and strong augmentation for SSL, jit-compiled and vmapped over the batch.

Images are float32 NHWC in ``[0, 1]`` with 1 or 3 channels; every random choice comes
from the PRNG key, one subkey per sample, so the same key gives the same batch.

* :func:`weak_augment`: reflect-pad by ``pad`` pixels and crop back at a random offset
  (torchvision ``RandomCrop(size, padding=pad, padding_mode="reflect")``), then an
  optional horizontal flip with p = 0.5.
* :func:`strong_augment`: the same crop and flip, then the official RandAugment variant
  (``num_ops`` ops drawn with replacement from :data:`OPS`, each with a magnitude
  uniform in its own range), then always Cutout.

Presets (:data:`PRESETS`): CIFAR uses ``pad=4`` (``int(32 * 0.125)``) and ``flip=True``
as the official code; the 8x8 digits use ``pad=1`` (``int(8 * 0.125)``) and
``flip=False`` since mirrored digits are other digits.

The ops follow PIL on uint8 images, which the official code runs. Where this port
differs (float arithmetic, no per-op rounding to uint8) the op's docstring says so.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import dm_pix
import jax
import jax.numpy as jnp

ArrayLike = jax.typing.ArrayLike

PRESETS = {
    "digits": {"pad": 1, "flip": False},
    "cifar": {"pad": 4, "flip": True},
}

# Cutout colour of the official RandAugment, (125, 123, 114) on the 0-255 scale.
CUTOUT_FILL = (125 / 255, 123 / 255, 114 / 255)
# PIL's ``rotate``/``transform`` without ``fillcolor`` (as the official code calls them)
# paint the uncovered area black.
GEOMETRIC_FILL = (0.0, 0.0, 0.0)

# Normalisation of the official code: CIFAR-10 (and ImageNet-30) use the ImageNet
# statistics, CIFAR-100 its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The closed-set SSL codebases (FixMatch, USB) normalise CIFAR-10 by its own statistics.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (129.3 / 255, 124.1 / 255, 112.4 / 255)
CIFAR100_STD = (68.2 / 255, 65.4 / 255, 70.4 / 255)
# SVHN (svhn_cropped train split), as the closed-set SSL codebases normalise it
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)


def normalize(images: ArrayLike, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """``(images - mean) / std`` over the channel (last) axis.

  Example:
    >>> import jax.numpy as jnp
    >>> normalize(jnp.full((1, 2, 2, 3), 0.5), (0.5, 0.25, 0.0), (0.5, 0.5, 0.5))[0, 0, 0]
    Array([0. , 0.5, 1. ], dtype=float32)
  """
  images = jnp.asarray(images, jnp.float32)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ----------------------------------------------------------------------------------
# Per-image ops: ``op(image, v, fill)`` on one HWC image with a scalar magnitude ``v``;
# ``fill`` (shape (C,)) is the colour of uncovered area and only used by geometric ops.


def _levels(image: jax.Array) -> jax.Array:
  """The image on PIL's 256 integer levels."""
  return jnp.clip(jnp.round(image * 255.0), 0, 255).astype(jnp.int32)


def _grayscale(image: jax.Array) -> jax.Array:
  """PIL ``convert("L")`` (ITU-R 601-2 luma) as an HW1 image; 1-channel images as is."""
  if image.shape[-1] == 1:
    return image
  return dm_pix.rgb_to_grayscale(image)


def _blend(degenerate: jax.Array, image: jax.Array, factor: ArrayLike) -> jax.Array:
  """PIL ``ImageEnhance``: ``degenerate + factor * (image - degenerate)``, clipped."""
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _floor_div(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """``numerator // denominator`` for non-negative integer-valued float32 arrays.

  Faster than int32 division on CPU. XLA may divide by multiplying with a reciprocal,
  so an exact quotient can come out a hair low; half a unit on the numerator keeps the
  floor exact while ``quotient * denominator < 2**21`` (here: images below 2M pixels).
  """
  return jnp.floor((numerator + 0.5) / denominator)


def identity(image: jax.Array, v: ArrayLike = 0.0, fill: ArrayLike | None = None) -> jax.Array:
  """Returns ``image`` unchanged."""
  del v, fill
  return image


def auto_contrast(image: jax.Array, v: ArrayLike = 0.0,
                  fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``ImageOps.autocontrast``: per channel, stretch ``[lo, hi]`` to ``[0, 255]``.

  On uint8 levels with the exact ``floor((q - lo) * 255 / (hi - lo))``; PIL's double
  arithmetic (``int(q * scale + offset)``) lands one level lower on about 0.4% of
  (lo, hi, level) triples. Constant channels are left as is.
  """
  del v, fill
  q = _levels(image).astype(jnp.float32)
  lo = jnp.min(q, axis=(0, 1))
  hi = jnp.max(q, axis=(0, 1))
  stretched = _floor_div((q - lo) * 255.0, jnp.maximum(hi - lo, 1.0))
  return jnp.where(hi > lo, stretched, q) / 255.0


def equalize(image: jax.Array, v: ArrayLike = 0.0, fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``ImageOps.equalize``: per-channel histogram equalisation on 256 levels.

  PIL's rule: ``step = (n - count of the top occupied level) // 255``; level ``i`` maps
  to ``(step // 2 + #pixels below i) // step`` (capped at 255), identity when
  ``step == 0``. Counts are float32 (exact below 2**24 pixels), which runs faster on
  CPU than int32 division.
  """
  del v, fill
  h, w, c = image.shape
  q = _levels(image).reshape(h * w, c)
  slot = q + 256 * jnp.arange(c)  # (pixel, channel) -> channel * 256 + level
  # jnp.histogram bins one channel at a time; one flat scatter-add counts all of them.
  hist = jnp.zeros(256 * c, jnp.float32).at[slot.reshape(-1)].add(1.0).reshape(c, 256)
  top_count = jnp.take_along_axis(hist, jnp.max(q, axis=0)[:, None], axis=1)[:, 0]
  step = _floor_div(h * w - top_count, 255.0)[:, None]
  below = jnp.cumsum(hist, axis=1) - hist
  lut = jnp.minimum(_floor_div(jnp.floor(step / 2.0) + below, jnp.maximum(step, 1.0)), 255.0)
  lut = jnp.where(step > 0, lut, jnp.arange(256, dtype=jnp.float32))
  return jnp.take(lut.reshape(-1), slot).reshape(h, w, c) / 255.0


def posterize(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``ImageOps.posterize`` keeping ``int(v)`` bits (official: ``max(1, int(v))``)."""
  del fill
  bits = jnp.clip(jnp.floor(v), 1, 8).astype(jnp.int32)
  shift = 8 - bits
  q = jnp.left_shift(jnp.right_shift(_levels(image), shift), shift)
  return q.astype(jnp.float32) / 255.0


def solarize(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``ImageOps.solarize``: invert values ``>= v``, ``v`` on the 0-255 scale."""
  del fill
  return dm_pix.solarize(image, jnp.asarray(v, image.dtype) / 255.0)


def brightness(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``ImageEnhance.Brightness``: blend with black, i.e. ``v * image``.

  Written out because ``dm_pix.adjust_brightness`` adds a delta instead.
  """
  del fill
  return _blend(jnp.zeros_like(image), image, v)


def color(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``ImageEnhance.Color``: blend with the grayscale image (identity for 1 channel).

  Written out because ``dm_pix.adjust_saturation`` scales HSV saturation instead.
  """
  del fill
  if image.shape[-1] == 1:
    return image
  return _blend(_grayscale(image), image, v)


def contrast(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``ImageEnhance.Contrast``: blend with the grayscale mean rounded to a level.

  Written out because ``dm_pix.adjust_contrast`` uses a per-channel mean.
  """
  del fill
  mean = jnp.floor(jnp.mean(_grayscale(image)) * 255.0 + 0.5) / 255.0
  return _blend(jnp.full_like(image, mean), image, v)


def sharpness(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``ImageEnhance.Sharpness``: blend with ``ImageFilter.SMOOTH`` of the image.

  SMOOTH is the 3x3 kernel ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` on interior
  pixels; PIL leaves the one-pixel border unfiltered. dm-pix only has a Gaussian blur,
  so the kernel is written as a separable 3x3 box sum plus 4x the centre.
  """
  del fill
  rows = image[:-2] + image[1:-1] + image[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  smooth = image.at[1:-1, 1:-1].set((box + 4.0 * image[1:-1, 1:-1]) / 13.0)
  return _blend(smooth, image, v)


def _fill_vector(fill: ArrayLike | None, channels: int) -> jax.Array:
  """``fill`` as a (channels,) vector: zeros for None, the mean for one channel."""
  if fill is None:
    return jnp.zeros((channels,), jnp.float32)
  fill = jnp.asarray(fill, jnp.float32).reshape(-1)
  if channels == 1:
    return jnp.mean(fill, keepdims=True)
  return jnp.broadcast_to(fill, (channels,))


def _pil_affine(image: jax.Array, coeffs: Sequence[ArrayLike], fill: ArrayLike | None) -> jax.Array:
  """PIL ``Image.transform(size, AFFINE, coeffs)`` with NEAREST resampling.

  PIL samples input point ``(a x + b y + c, d x + e y + f)`` for output pixel centre
  ``(x, y) = (col + 0.5, row + 0.5)``, takes the pixel containing it (a floor), and
  paints ``fill`` where that pixel is outside the image.
  """
  # Not dm_pix.affine_transform: with order=0 it runs jax.scipy.ndimage.map_coordinates
  # over all three axes (a coordinate per channel value, scalar cval, round half away
  # from zero); one 2-D index gather is ~6x faster under vmap on CPU and floors as PIL.
  a, b, c, d, e, f = coeffs
  h, w, channels = image.shape
  x = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
  y = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
  col = jnp.floor(a * x + b * y + c)
  row = jnp.floor(d * x + e * y + f)
  inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
  index = (jnp.clip(row, 0, h - 1) * w + jnp.clip(col, 0, w - 1)).astype(jnp.int32)
  warped = jnp.take(image.reshape(h * w, channels), index.reshape(-1), axis=0)
  return jnp.where(inside[..., None], warped.reshape(h, w, channels),
                   _fill_vector(fill, channels))


def rotate(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL ``Image.rotate(v)``: ``v`` degrees counter-clockwise about the image centre."""
  h, w, _ = image.shape
  theta = -jnp.deg2rad(jnp.asarray(v, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cx, cy = w / 2.0, h / 2.0
  coeffs = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
  return _pil_affine(image, coeffs, fill)


def shear_x(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL affine ``(1, v, 0, 0, 1, 0)``: row ``y`` samples column ``x + v * y``."""
  return _pil_affine(image, (1.0, v, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL affine ``(1, 0, 0, v, 1, 0)``: column ``x`` samples row ``y + v * x``."""
  return _pil_affine(image, (1.0, 0.0, 0.0, v, 1.0, 0.0), fill)


def translate_x(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL affine ``(1, 0, v * width, 0, 1, 0)``: content moves left for ``v > 0``."""
  return _pil_affine(image, (1.0, 0.0, v * image.shape[1], 0.0, 1.0, 0.0), fill)


def translate_y(image: jax.Array, v: ArrayLike, fill: ArrayLike | None = None) -> jax.Array:
  """PIL affine ``(1, 0, 0, 0, 1, v * height)``: content moves up for ``v > 0``."""
  return _pil_affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, v * image.shape[0]), fill)


class Op(NamedTuple):
  """A RandAugment op and its magnitude range (official ``augment_list``)."""

  name: str
  fn: Callable[[jax.Array, ArrayLike, ArrayLike | None], jax.Array]
  low: float
  high: float


OPS: tuple[Op, ...] = (
    Op("AutoContrast", auto_contrast, 0.0, 1.0),
    Op("Brightness", brightness, 0.05, 0.95),
    Op("Color", color, 0.05, 0.95),
    Op("Contrast", contrast, 0.05, 0.95),
    Op("Equalize", equalize, 0.0, 1.0),
    Op("Identity", identity, 0.0, 1.0),
    Op("Posterize", posterize, 4.0, 8.0),
    Op("Rotate", rotate, -30.0, 30.0),
    Op("Sharpness", sharpness, 0.05, 0.95),
    Op("ShearX", shear_x, -0.3, 0.3),
    Op("ShearY", shear_y, -0.3, 0.3),
    Op("Solarize", solarize, 0.0, 256.0),
    Op("TranslateX", translate_x, -0.3, 0.3),
    Op("TranslateY", translate_y, -0.3, 0.3),
)
OP_NAMES = tuple(op.name for op in OPS)


def cutout_square(image: jax.Array, size: ArrayLike, center_x: ArrayLike, center_y: ArrayLike,
                  fill: ArrayLike) -> jax.Array:
  """Official ``CutoutAbs`` (PIL ``ImageDraw.rectangle``) on one HWC image.

  Top-left ``x0 = int(max(0, center_x - size / 2))`` (likewise ``y0``); PIL draws the
  corners inclusively, so the square covers ``int(size) + 1`` pixels a side, cut at the
  right and bottom borders. ``size <= 0`` leaves the image unchanged.
  """
  h, w, c = image.shape
  x0 = jnp.floor(jnp.maximum(0.0, center_x - size / 2.0))
  y0 = jnp.floor(jnp.maximum(0.0, center_y - size / 2.0))
  side = jnp.floor(size) + 1.0
  rows = jnp.arange(h, dtype=jnp.float32)[:, None]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :]
  inside = ((size > 0) & (rows >= y0) & (rows < y0 + side)
            & (cols >= x0) & (cols < x0 + side))
  return jnp.where(inside[..., None], _fill_vector(fill, c), image)


def _channel_fill(fill: Sequence[float], channels: int) -> tuple[float, ...]:
  """``fill`` for ``channels``: its mean for 1 channel, else one value per channel."""
  fill = tuple(float(x) for x in fill)
  if channels == 1:
    return (sum(fill) / len(fill),)
  if len(fill) == 1:
    return fill * channels
  if len(fill) != channels:
    raise ValueError(f"fill has {len(fill)} values for {channels} channels.")
  return fill


def _check_images(images: ArrayLike) -> jax.Array:
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}.")
  return images


# ----------------------------------------------------------------------------------
# Per-sample pipelines (vmapped by the public functions).


def _weak_one(key: jax.Array, image: jax.Array, pad: int, flip: bool) -> jax.Array:
  k_crop, k_flip = jax.random.split(key)
  if pad > 0:
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    image = dm_pix.random_crop(k_crop, padded, image.shape)
  if flip:
    image = dm_pix.random_flip_left_right(k_flip, image)
  return image


def apply_ops(image: jax.Array, index: ArrayLike, magnitude: ArrayLike,
              fill: ArrayLike | None = None) -> jax.Array:
  """Applies ``OPS[index[i]]`` with ``magnitude[i]`` for i = 0, 1, ... to one HWC image.

  Dispatch is ``jax.lax.switch`` (under vmap every op is computed and one selected), so
  it jits once for any indices. ``fill`` is the geometric ops' border colour.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.full((4, 4, 1), 0.5)
    >>> float(apply_ops(x, jnp.array([OP_NAMES.index("Brightness")]), jnp.array([0.5]))[0, 0, 0])
    0.25
  """
  fill = _fill_vector(fill, image.shape[-1])
  branches = [functools.partial(lambda fn, img, v: fn(img, v, fill), op.fn) for op in OPS]

  def apply(img, op_and_magnitude):
    i, v = op_and_magnitude
    return jax.lax.switch(i, branches, img, v), None

  index = jnp.asarray(index, jnp.int32)
  magnitude = jnp.asarray(magnitude, jnp.float32)
  # A rolled loop: as fast as unrolled on CPU, and three unrolled switches take XLA ~6x
  # longer to compile than one.
  image, _ = jax.lax.scan(apply, image, (index, magnitude))
  return image


def _strong_one(key: jax.Array, image: jax.Array, pad: int, flip: bool, num_ops: int,
                cutout: float, fill: tuple[float, ...],
                geometric_fill: tuple[float, ...]) -> jax.Array:
  k_view, k_ops, k_mag, k_cut = jax.random.split(key, 4)
  image = _weak_one(k_view, image, pad, flip)
  if num_ops > 0:
    index = jax.random.randint(k_ops, (num_ops,), 0, len(OPS))
    low = jnp.asarray([op.low for op in OPS], jnp.float32)[index]
    high = jnp.asarray([op.high for op in OPS], jnp.float32)[index]
    magnitude = low + (high - low) * jax.random.uniform(k_mag, (num_ops,))
    image = apply_ops(image, index, magnitude, geometric_fill)
  k_size, k_x, k_y = jax.random.split(k_cut, 3)
  h, w, _ = image.shape
  size = jax.random.uniform(k_size, (), maxval=cutout) * w  # official: v * width, both sides
  # The official centre is np.random.uniform(w), i.e. U(1, w) (low=w, high=1.0); the
  # intended U(0, w) is used here.
  center_x = jax.random.uniform(k_x, (), maxval=w)
  center_y = jax.random.uniform(k_y, (), maxval=h)
  image = cutout_square(image, size, center_x, center_y, fill)
  return jnp.clip(image, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("pad", "flip"))
def _weak_batch(key, images, *, pad, flip):
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: _weak_one(k, x, pad, flip))(keys, images)


@functools.partial(jax.jit, static_argnames=("pad", "flip", "num_ops", "cutout", "fill",
                                             "geometric_fill"))
def _strong_batch(key, images, *, pad, flip, num_ops, cutout, fill, geometric_fill):
  keys = jax.random.split(key, images.shape[0])
  one = lambda k, x: _strong_one(k, x, pad, flip, num_ops, cutout, fill, geometric_fill)
  return jax.vmap(one)(keys, images)


def weak_augment(key: jax.Array, images: ArrayLike, *, pad: int, flip: bool) -> jax.Array:
  """Random reflect-pad-and-crop translation, then a random horizontal flip if ``flip``.

  Each sample gets its own offsets in ``[-pad, pad]`` and its own coin. Compiled once
  per (shape, pad, flip).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.linspace(0, 1, 64).reshape(1, 8, 8, 1)
    >>> y = weak_augment(jax.random.key(0), x, **PRESETS["digits"])
    >>> y.shape, y.dtype
    ((1, 8, 8, 1), dtype('float32'))
  """
  images = _check_images(images)
  return _weak_batch(key, images, pad=int(pad), flip=bool(flip))


def strong_augment(key: jax.Array, images: ArrayLike, *, pad: int, flip: bool,
                   num_ops: int = 3, cutout: float = 0.5,
                   fill: tuple[float, ...] = CUTOUT_FILL,
                   geometric_fill: tuple[float, ...] = GEOMETRIC_FILL) -> jax.Array:
  """The weak transform, then the official RandAugment and Cutout, per sample.

  ``num_ops`` ops are drawn with replacement from :data:`OPS`, each with a magnitude
  uniform in its ``[low, high)``; then a Cutout square of side ``v * width``,
  ``v ~ U(0, cutout)``, centred uniformly in the image, painted with ``fill``.
  Geometric ops paint uncovered area with ``geometric_fill``, black by default as
  PIL does when the official code passes no ``fillcolor``; pass ``geometric_fill=fill``
  for a grey border. One-channel images use the mean of each fill.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.linspace(0, 1, 64).reshape(1, 8, 8, 1)
    >>> y = strong_augment(jax.random.key(0), x, **PRESETS["digits"])
    >>> y.shape, bool((y >= 0).all() & (y <= 1).all())
    ((1, 8, 8, 1), True)
  """
  images = _check_images(images)
  channels = images.shape[-1]
  return _strong_batch(
      key, images, pad=int(pad), flip=bool(flip), num_ops=int(num_ops),
      cutout=float(cutout), fill=_channel_fill(fill, channels),
      geometric_fill=_channel_fill(geometric_fill, channels))


def _benchmark(repeats: int = 20) -> None:
  """Prints jitted throughput for the CIFAR and digits shapes (batch 448)."""
  import time  # pylint: disable=g-import-not-at-top

  for shape, preset in (((448, 32, 32, 3), "cifar"), ((448, 8, 8, 1), "digits")):
    images = jax.random.uniform(jax.random.key(1), shape)
    for name, fn in (("weak", weak_augment), ("strong", strong_augment)):
      fn(jax.random.key(0), images, **PRESETS[preset]).block_until_ready()
      start = time.perf_counter()
      for i in range(repeats):
        out = fn(jax.random.key(i), images, **PRESETS[preset])
      out.block_until_ready()
      per_batch = (time.perf_counter() - start) / repeats
      print(f"{name:6s} {shape}: {per_batch * 1e3:7.1f} ms/batch, "
            f"{shape[0] / per_batch:9.0f} images/s")


if __name__ == "__main__":
  _benchmark()
