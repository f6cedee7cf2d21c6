"""On-device augmentation: PIL-semantics ops against numpy references, and the pipelines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax.data import augment

OPS = {op.name: op for op in augment.OPS}
GRAY = (125 / 255, 123 / 255, 114 / 255)


def _uint8_image(seed: int, shape: tuple[int, ...], low: int = 0, high: int = 256) -> np.ndarray:
  """A float image on the 1/255 grid, as the official uint8 pipeline sees it."""
  levels = np.random.default_rng(seed).integers(low, high, size=shape)
  return (levels / 255.0).astype(np.float32)


def _levels(image) -> np.ndarray:
  return np.rint(np.asarray(image, np.float64) * 255).astype(np.int64)


def _gray(image: np.ndarray) -> np.ndarray:
  """PIL ``convert("L")`` weights (ITU-R 601-2) in float."""
  if image.shape[-1] == 1:
    return image[..., 0].astype(np.float64)
  return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _pil_affine_ref(image: np.ndarray, coeffs, fill) -> np.ndarray:
  """PIL ``transform(AFFINE, NEAREST)``: floor of the mapped pixel centre, in float64."""
  a, b, c, d, e, f = coeffs
  h, w, ch = image.shape
  out = np.empty_like(image)
  for row in range(h):
    for col in range(w):
      x_in = int(np.floor(a * (col + 0.5) + b * (row + 0.5) + c))
      y_in = int(np.floor(d * (col + 0.5) + e * (row + 0.5) + f))
      inside = 0 <= x_in < w and 0 <= y_in < h
      out[row, col] = image[y_in, x_in] if inside else np.broadcast_to(fill, (ch,))
  return out


# ---------------------------------------------------------------- ops vs numpy


def test_identity_returns_the_image():
  x = _uint8_image(0, (8, 8, 3))
  np.testing.assert_array_equal(OPS["Identity"].fn(jnp.asarray(x), 0.7, None), x)


@pytest.mark.parametrize("v, bits", [(4.0, 4), (5.7, 5), (7.99, 7), (8.0, 8)])
def test_posterize_keeps_int_v_high_bits(v, bits):
  x = _uint8_image(1, (6, 6, 3))
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  want = (_levels(x) & mask) / 255.0
  np.testing.assert_allclose(OPS["Posterize"].fn(jnp.asarray(x), v, None), want, atol=1e-7)
  if bits < 8:
    assert not np.allclose(want, x)


@pytest.mark.parametrize("v", [0.0, 100.5, 128.0, 255.0, 256.0])
def test_solarize_inverts_levels_at_or_above_threshold(v):
  x = _uint8_image(2, (8, 8, 3))
  x[0, 0, 0] = 128 / 255  # a pixel exactly at the threshold 128 is inverted (PIL: i < v kept)
  q = _levels(x)
  want = np.where(q < v, q, 255 - q) / 255.0
  np.testing.assert_allclose(OPS["Solarize"].fn(jnp.asarray(x), v, None), want, atol=1e-6)


@pytest.mark.parametrize("factor", [0.05, 0.5, 0.95])
def test_brightness_blends_with_black(factor):
  x = _uint8_image(3, (8, 8, 3))
  np.testing.assert_allclose(OPS["Brightness"].fn(jnp.asarray(x), factor, None), factor * x,
                             atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_blends_with_rounded_gray_mean(channels):
  x = _uint8_image(4, (8, 8, channels))
  factor = 0.3
  mean = np.floor(_gray(x).mean() * 255 + 0.5) / 255
  want = mean + factor * (x - mean)
  np.testing.assert_allclose(OPS["Contrast"].fn(jnp.asarray(x), factor, None), want, atol=1e-5)


def test_color_blends_with_grayscale_and_is_identity_for_one_channel():
  x = _uint8_image(5, (8, 8, 3))
  gray = _gray(x)[..., None]
  want = gray + 0.2 * (x - gray)
  # dm-pix's luma weights (0.2989, 0.587, 0.114) differ from PIL's by 1e-4.
  np.testing.assert_allclose(OPS["Color"].fn(jnp.asarray(x), 0.2, None), want, atol=2e-4)
  x1 = _uint8_image(5, (8, 8, 1))
  np.testing.assert_array_equal(OPS["Color"].fn(jnp.asarray(x1), 0.2, None), x1)


def test_sharpness_blends_with_smooth_filter_and_keeps_the_border():
  x = _uint8_image(6, (7, 9, 3))
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
  smooth = x.astype(np.float64).copy()
  for r in range(1, 6):
    for c in range(1, 8):
      smooth[r, c] = np.einsum("ij,ijk->k", kernel, x[r - 1:r + 2, c - 1:c + 2])
  want = smooth + 0.25 * (x - smooth)
  got = np.asarray(OPS["Sharpness"].fn(jnp.asarray(x), 0.25, None))
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got[0], x[0], atol=1e-6)  # border rows/cols are blended with
  np.testing.assert_allclose(got[:, -1], x[:, -1], atol=1e-6)  # themselves: unchanged


def test_autocontrast_stretches_each_channel_and_skips_constant_ones():
  x = _uint8_image(7, (8, 8, 3), low=40, high=201)
  x[..., 2] = 90 / 255  # constant channel: PIL leaves it as is
  q = _levels(x)
  want = q.copy()
  for ch in range(2):
    lo, hi = q[..., ch].min(), q[..., ch].max()
    want[..., ch] = (q[..., ch] - lo) * 255 // (hi - lo)
  got = np.asarray(OPS["AutoContrast"].fn(jnp.asarray(x), 0.0, None))
  np.testing.assert_allclose(got, want / 255.0, atol=1e-7)
  assert got[..., :2].min() == 0.0 and got[..., :2].max() == 1.0
  # PIL's own double arithmetic is at most one level below the exact floor.
  for ch in range(2):
    lo, hi = q[..., ch].min(), q[..., ch].max()
    scale = 255.0 / (hi - lo)
    pil = np.clip((q[..., ch] * scale - lo * scale).astype(np.int64), 0, 255)
    assert np.all((want[..., ch] - pil >= 0) & (want[..., ch] - pil <= 1))


def _equalize_ref(levels: np.ndarray) -> np.ndarray:
  """PIL ``ImageOps.equalize`` step by step on one channel of integer levels."""
  hist = np.bincount(levels.ravel(), minlength=256)
  occupied = hist[hist > 0]
  if len(occupied) <= 1:
    return levels
  step = (occupied.sum() - occupied[-1]) // 255
  if step == 0:
    return levels
  lut, n = [], step // 2
  for i in range(256):
    lut.append(min(n // step, 255))
    n += hist[i]
  return np.asarray(lut)[levels]


@pytest.mark.parametrize("shape", [(32, 32, 3), (8, 8, 1)])
def test_equalize_matches_pil_rule(shape):
  x = _uint8_image(8, shape, low=30, high=140)
  x.reshape(-1, shape[-1])[:5] = 1.0  # several pixels on the top level
  q = _levels(x)
  want = np.stack([_equalize_ref(q[..., ch]) for ch in range(shape[-1])], -1)
  got = np.asarray(OPS["Equalize"].fn(jnp.asarray(x), 0.0, None))
  np.testing.assert_allclose(got, want / 255.0, atol=1e-7)
  if shape[0] * shape[1] >= 512:  # step >= 1: the histogram really is spread
    assert got.max() == 1.0 and got.min() < 0.1


def test_equalize_leaves_few_pixel_or_flat_images_alone():
  flat = np.full((8, 8, 3), 0.4, np.float32)
  np.testing.assert_allclose(OPS["Equalize"].fn(jnp.asarray(flat), 0.0, None), flat, atol=1e-7)
  small = _uint8_image(9, (8, 8, 1))  # 64 pixels: step = 63 // 255 = 0 -> identity in PIL
  np.testing.assert_allclose(OPS["Equalize"].fn(jnp.asarray(small), 0.0, None), small, atol=1e-7)


@pytest.mark.parametrize("pixels", [3, -2])
def test_translate_by_integer_offsets(pixels):
  x = _uint8_image(10, (8, 8, 3))
  fill = np.array([0.1, 0.2, 0.3], np.float32)
  got = np.asarray(OPS["TranslateX"].fn(jnp.asarray(x), pixels / 8, fill))
  want = np.broadcast_to(fill, x.shape).copy()
  if pixels > 0:  # PIL (1, 0, v, 0, 1, 0): output column c samples input column c + v
    want[:, :-pixels] = x[:, pixels:]
  else:
    want[:, -pixels:] = x[:, :pixels]
  np.testing.assert_allclose(got, want, atol=1e-7)
  got_y = np.asarray(OPS["TranslateY"].fn(jnp.asarray(x), pixels / 8, fill))
  np.testing.assert_allclose(got_y, np.swapaxes(
      OPS["TranslateX"].fn(jnp.asarray(np.swapaxes(x, 0, 1)), pixels / 8, fill), 0, 1), atol=1e-7)


@pytest.mark.parametrize("size, channels", [(8, 1), (7, 3)])
def test_rotate_90_is_a_counter_clockwise_quarter_turn(size, channels):
  x = _uint8_image(11, (size, size, channels))
  got = OPS["Rotate"].fn(jnp.asarray(x), 90.0, None)
  np.testing.assert_array_equal(got, np.rot90(x, k=1, axes=(0, 1)))


@pytest.mark.parametrize("name, v", [("Rotate", 23.0), ("Rotate", -30.0), ("ShearX", 0.3),
                                     ("ShearY", -0.27)])
def test_geometric_ops_match_pil_affine(name, v):
  x = _uint8_image(12, (12, 10, 3))
  fill = np.array(GRAY, np.float32)
  h, w = x.shape[:2]
  if name == "Rotate":
    t = -np.deg2rad(v)
    cx, cy = w / 2, h / 2
    coeffs = (np.cos(t), np.sin(t), cx - np.cos(t) * cx - np.sin(t) * cy,
              -np.sin(t), np.cos(t), cy + np.sin(t) * cx - np.cos(t) * cy)
  elif name == "ShearX":
    coeffs = (1, v, 0, 0, 1, 0)
  else:
    coeffs = (1, 0, 0, v, 1, 0)
  got = np.asarray(OPS[name].fn(jnp.asarray(x), v, fill))
  np.testing.assert_allclose(got, _pil_affine_ref(x, coeffs, fill), atol=1e-7)
  assert np.any(np.all(got == fill, axis=-1))  # some area is uncovered


def test_geometric_fill_defaults_to_black_and_uses_the_mean_for_one_channel():
  x = np.ones((8, 8, 1), np.float32)
  assert float(OPS["TranslateX"].fn(jnp.asarray(x), 0.5, None)[0, -1, 0]) == 0.0
  got = OPS["TranslateX"].fn(jnp.asarray(x), 0.5, jnp.asarray(GRAY))
  np.testing.assert_allclose(got[:, 4:], np.mean(GRAY), atol=1e-7)


def test_apply_ops_dispatches_by_index_under_jit_and_vmap():
  n = len(augment.OPS)
  x = _uint8_image(13, (3 * n, 8, 8, 3))
  x[n], x[n + 1] = 0.0, 1.0
  x = jnp.asarray(x)
  index = jnp.tile(jnp.arange(n), 3)[:, None]
  low, high = (np.array([getattr(op, end) for op in augment.OPS]) for end in ("low", "high"))
  magnitude = jnp.asarray(np.concatenate([0.4 * low + 0.6 * high, low, high]), jnp.float32)
  fill = jnp.asarray(GRAY)
  got = jax.jit(jax.vmap(lambda img, i, m: augment.apply_ops(img, i, m[None], fill)))(
      x, index, magnitude)
  for i, op in enumerate(augment.OPS):  # under vmap every branch runs batched
    np.testing.assert_allclose(got[i], op.fn(x[i], magnitude[i], fill), atol=1e-6,
                               err_msg=op.name)
  # Both ends of every official range keep dtype, shape and [0, 1].
  assert got.dtype == jnp.float32 and got.shape == x.shape
  assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0
  twice = augment.apply_ops(x[0], jnp.array([1, 1]), jnp.array([0.5, 0.5]))  # Brightness x2
  np.testing.assert_allclose(twice, 0.25 * x[0], atol=1e-6)


# ---------------------------------------------------------------- cutout


@pytest.mark.parametrize("size, cx, cy, rows, cols", [
    (5.3, 10.0, 20.0, (17, 23), (7, 13)),  # x0 = int(10 - 2.65) = 7, int(5.3) + 1 = 6 a side
    (10.0, 1.0, 2.5, (0, 11), (0, 11)),  # near the top-left: shifted to 0, not cut
    (10.0, 31.0, 30.0, (25, 32), (26, 32)),  # bottom-right: cut by the border
])
def test_cutout_square_paints_the_pil_rectangle(size, cx, cy, rows, cols):
  x = _uint8_image(15, (32, 32, 3))
  got = np.asarray(augment.cutout_square(jnp.asarray(x), size, cx, cy, jnp.asarray(GRAY)))
  want = x.copy()
  want[rows[0]:rows[1], cols[0]:cols[1]] = GRAY
  np.testing.assert_allclose(got, want, atol=1e-7)
  assert np.all(got == np.float32(GRAY), axis=-1).sum() == (rows[1] - rows[0]) * (cols[1] - cols[0])


def test_cutout_of_size_zero_is_a_no_op():
  x = _uint8_image(16, (8, 8, 3))
  np.testing.assert_array_equal(augment.cutout_square(jnp.asarray(x), 0.0, 4.0, 4.0, GRAY), x)


@pytest.mark.parametrize("shape", [(64, 32, 32, 3), (64, 8, 8, 1)])
def test_strong_without_ops_is_one_random_square_of_fill(shape):
  x = _uint8_image(17, shape, low=1, high=100)  # never equal to the fill colour
  out = np.asarray(augment.strong_augment(jax.random.key(3), x, pad=0, flip=False, num_ops=0))
  fill = np.float32(np.mean(GRAY)) if shape[-1] == 1 else np.float32(GRAY)
  h, w = shape[1:3]
  sides = []
  for img, orig in zip(out, x):
    changed = np.any(img != orig, axis=-1)
    assert np.all(img[changed] == fill) and np.array_equal(img[~changed], orig[~changed])
    rows, cols = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
    assert changed.sum() == len(rows) * len(cols)  # one solid rectangle
    assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
    side = int(0.5 * w) + 1
    assert 1 <= len(rows) <= side and 1 <= len(cols) <= side
    if rows[-1] < h - 1 and cols[-1] < w - 1:  # not cut by the border: a square
      assert len(rows) == len(cols)
      sides.append(len(rows))
  assert len(set(sides)) > 2  # the side is random per sample


# ---------------------------------------------------------------- pipelines


@pytest.mark.parametrize("fn", [augment.weak_augment, augment.strong_augment])
@pytest.mark.parametrize("shape, preset", [((16, 32, 32, 3), "cifar"), ((16, 8, 8, 1), "digits")])
def test_determinism_shape_dtype_and_range(fn, shape, preset):
  x = np.asarray(_uint8_image(18, shape), np.float64)  # any float input comes back float32
  a = fn(jax.random.key(0), x, **augment.PRESETS[preset])
  b = fn(jax.random.key(0), x, **augment.PRESETS[preset])
  c = fn(jax.random.key(1), x, **augment.PRESETS[preset])
  assert a.shape == shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  assert not all(np.array_equal(a[0], a[i]) for i in range(1, shape[0]))  # per sample


def test_strong_stays_in_range_over_many_samples():
  x = _uint8_image(19, (16, 32, 32, 3))
  x[:2] = np.float32(1.0)
  x[2:4] = np.float32(0.0)
  for seed in range(8):  # 128 samples, 384 ops
    out = np.asarray(augment.strong_augment(jax.random.key(seed), x, **augment.PRESETS["cifar"]))
    assert out.min() >= 0.0 and out.max() <= 1.0 and not np.any(np.isnan(out))


def test_strong_view_differs_from_weak_view():
  x = _uint8_image(20, (16, 32, 32, 3))
  key = jax.random.key(7)
  weak = augment.weak_augment(key, x, **augment.PRESETS["cifar"])
  strong = augment.strong_augment(key, x, **augment.PRESETS["cifar"])
  for i in range(16):
    assert not np.array_equal(weak[i], strong[i])


def test_weak_without_pad_or_flip_is_the_identity():
  x = _uint8_image(21, (5, 8, 8, 1))
  np.testing.assert_array_equal(augment.weak_augment(jax.random.key(0), x, pad=0, flip=False), x)


def test_flip_mirrors_about_half_of_the_samples():
  x = _uint8_image(22, (64, 8, 8, 3))
  out = np.asarray(augment.weak_augment(jax.random.key(0), x, pad=0, flip=True))
  flipped = np.array([np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)])
  kept = np.array([np.array_equal(o, xi) for o, xi in zip(out, x)])
  assert np.all(flipped ^ kept)
  assert 16 <= flipped.sum() <= 48


@pytest.mark.parametrize("pad", [1, 4])
def test_weak_crop_is_a_window_of_the_reflect_padded_image(pad):
  x = _uint8_image(23, (48, 8, 8, 1))
  out = np.asarray(augment.weak_augment(jax.random.key(1), x, pad=pad, flip=False))
  offsets = set()
  for o, xi in zip(out, x):
    padded = np.pad(xi, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")  # torchvision 'reflect'
    hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            if np.array_equal(padded[dy:dy + 8, dx:dx + 8], o)]
    assert hits
    offsets.update(hits)
  assert len(offsets) > (2 * pad + 1)  # offsets vary in both axes


def test_compiles_once_per_shape(monkeypatch):
  traces = {"weak": 0, "strong": 0}
  weak_one, strong_one = augment._weak_one, augment._strong_one

  def count(name, fn):
    def wrapped(*args):
      traces[name] += 1
      return fn(*args)
    return wrapped

  monkeypatch.setattr(augment, "_strong_one", count("strong", strong_one))
  # A shape no other test uses, so the first call traces.
  x = _uint8_image(24, (3, 12, 12, 3))
  x = jnp.asarray(x)
  before = augment._strong_batch._cache_size()
  for seed in range(3):
    augment.strong_augment(jax.random.key(seed), x, pad=2, flip=True)
  assert traces["strong"] == 1  # one trace of the per-sample function, for all samples
  assert augment._strong_batch._cache_size() == before + 1
  monkeypatch.setattr(augment, "_weak_one", count("weak", weak_one))
  before = augment._weak_batch._cache_size()
  for seed in range(3):
    augment.weak_augment(jax.random.key(seed), x, pad=2, flip=True).block_until_ready()
  assert traces["weak"] == 1 and augment._weak_batch._cache_size() == before + 1


def test_normalize():
  x = jnp.asarray(_uint8_image(25, (2, 4, 4, 3)))
  got = augment.normalize(x, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
  want = (np.asarray(x) - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_rejected():
  with pytest.raises(ValueError, match="NHWC"):
    augment.weak_augment(jax.random.key(0), np.zeros((8, 8, 3)), pad=1, flip=False)
  with pytest.raises(ValueError, match="fill"):
    augment.strong_augment(jax.random.key(0), np.zeros((2, 8, 8, 3)), pad=1, flip=False,
                           fill=(0.1, 0.2))
