"""How close the three per-sample methods of GGCR come to each other, printed.

``python experiments/ggcr_sketch_error.py [--x64] [--backbones cnn,wrn28_2] [--dims 16,64,256]``

For the digits CNN (real digits: 16 weak/strong pairs and 4 labeled rows, the strong
view a one-pixel shift plus Gaussian noise of the weak one) and WRN-28-2 (random 32x32
inputs, 4 pairs and 2 labeled rows), both at initialisation and in train mode
(BatchNorm batch statistics frozen inside the per-sample gradients), it prints:

* the largest relative difference of the ``exact`` and ``vmap`` inner products and
  squared norms (the same number by two routes: round-off only);
* for the sketch with ``k`` in ``--dims`` (default 16, 64, 256; WRN on the CPU: 16,
  64) over ``KEYS`` random draws: the mean and largest ``|cos_sketch - cos_exact|``,
  and the scale ``(1 - cos^2) / sqrt(k)`` that the error of a Gaussian sketch's cosine
  follows. Each ``k`` compiles once (the key is an argument).

In float64 on the CPU, convolutions run as shifted windows and a matmul
(:mod:`ggr_jax.models.float64_conv`). On a GPU, run it with ``JAX_DEFAULT_MATMUL_PRECISION=highest``: float32 convolutions
otherwise run in TF32 there, and ``exact`` and ``vmap`` differ by its round-off.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ggr_jax import consistency
from ggr_jax.data.digits import digits_closed_split
from ggr_jax.models import build_model
from ggr_jax.models.float64_conv import float64_convolutions_by_matmul
from ggr_jax.ssl.ggcr import encoder_scope
from ggr_jax.train.state import make_apply_fn

KEYS = 10


def _digits_pairs(n_lb: int, n: int) -> np.ndarray:
  split = digits_closed_split(labels_per_class=4, seed=0)
  x = (split.x_test_id[: n_lb + n].astype(np.float64) / 255.0 - split.mean[0]) / split.std[0]
  rng = np.random.default_rng(0)
  strong = np.roll(x[n_lb:], 1, axis=2) + 0.3 * rng.normal(size=x[n_lb:].shape)
  return np.concatenate([x, strong])


def _problem(backbone: str, dtype, n_lb: int, n: int):
  model = build_model(backbone, 10, "none")
  side, channels = (8, 1) if backbone == "cnn" else (32, 3)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, side, side, channels)))
  params = jax.tree.map(lambda a: a.astype(dtype), variables["params"])
  stats, apply_fn = variables["batch_stats"], make_apply_fn(model)
  if backbone == "cnn":
    x = jnp.asarray(_digits_pairs(n_lb, n), dtype)
  else:
    x = jax.random.normal(jax.random.PRNGKey(1), (n_lb + 2 * n, side, side, channels), dtype)
    x = x.at[n_lb + n:].set(jnp.roll(x[n_lb:n_lb + n], 2, axis=2) * 1.2)
  rows = (n_lb + jnp.arange(n), n_lb + n + jnp.arange(n))

  def losses(p):
    logits = apply_fn(p, stats, x, True)[0]["logits"]
    yhat = jnp.argmax(jax.lax.stop_gradient(logits[rows[0]]), -1)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return ce(logits[rows[0]], yhat), ce(logits[rows[1]], yhat)

  return losses, params, rows


def _report(backbone: str, dtype, n_lb: int, n: int, dims: tuple[int, ...]) -> None:
  losses, params, rows = _problem(backbone, dtype, n_lb, n)
  geometry = lambda method, **kw: jax.jit(lambda p: consistency.view_geometry(
      losses, p, scope=encoder_scope, method=method, **kw))(params)
  exact = geometry("exact", view_rows=rows)
  vmap = geometry("vmap")

  def sketch(k: int):
    return jax.jit(lambda p, key: consistency.view_geometry(
        losses, p, scope=encoder_scope, method="sketch", key=key, sketch_dim=k).cos)
  rel = max(float(np.max(np.abs(np.asarray(getattr(exact, f)) - np.asarray(getattr(vmap, f)))
                      / np.maximum(np.abs(np.asarray(getattr(vmap, f))), 1e-30)))
            for f in ("dot", "sq_w", "sq_s"))
  cos = np.asarray(exact.cos)
  print(f"{backbone} {jnp.dtype(dtype).name}: {n} pairs, exact cos in "
        f"[{cos.min():+.3f}, {cos.max():+.3f}], exact vs vmap max rel diff {rel:.1e}")
  for k in dims:
    t0 = time.perf_counter()
    cos_k = sketch(k)
    errors = np.stack([np.abs(np.asarray(cos_k(params, jax.random.PRNGKey(s))) - cos)
                       for s in range(KEYS)])
    scale = (1.0 - cos ** 2) / np.sqrt(k)
    print(f"  sketch k={k:>3}: |cos error| mean {errors.mean():.4f} max {errors.max():.4f}; "
          f"mean (1-cos^2)/sqrt(k) {scale.mean():.4f}; mean error / scale "
          f"{(errors / np.maximum(scale, 1e-12)).mean():.2f} ({time.perf_counter() - t0:.0f} s)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--x64", action="store_true", help="float64 (default float32)")
  parser.add_argument("--backbones", default="cnn,wrn28_2", help="comma list of cnn, wrn28_2")
  parser.add_argument("--dims", default="", help="comma list of k (default: 16,64,256; "
                      "WRN on the CPU 16,64)")
  args = parser.parse_args()
  unknown = set(args.backbones.split(",")) - {"cnn", "wrn28_2"}
  if unknown:
    parser.error(f"--backbones: unknown {sorted(unknown)}; choose from cnn, wrn28_2")
  dims = tuple(int(k) for k in args.dims.split(",")) if args.dims else None
  on_cpu = jax.default_backend() == "cpu"
  if args.x64:
    jax.config.update("jax_enable_x64", True)
  dtype = jnp.float64 if args.x64 else jnp.float32
  # XLA's CPU backend has no float64 convolution kernel; see ggr_jax.models.float64_conv.
  by_matmul = float64_convolutions_by_matmul() if args.x64 and on_cpu else contextlib.nullcontext()
  with by_matmul:
    for backbone in args.backbones.split(","):
      default = (16, 64) if backbone == "wrn28_2" and on_cpu else (16, 64, 256)
      n_lb, n = (4, 16) if backbone == "cnn" else (2, 4)
      _report(backbone, dtype, n_lb, n, dims or default)


if __name__ == "__main__":
  main()
