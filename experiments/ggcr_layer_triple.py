"""Time of one layer's per-row kernel-gradient triple, forward and second-order backward.

GGCR's exact geometry needs, per row and layer, ``<G_w, G_s>``, ``||G_w||^2`` and
``||G_s||^2`` of the kernel gradients ``G = a^T d`` (``a``: ``P x K`` patches, ``d``:
``P x O`` output cotangents). ``ggr_jax.layer_geometry`` takes them from Gram matrices
(``P^2 (K + O)`` multiplications per row) or from the formed ``G`` (``P K O``), whichever
costs fewer; this prints both routes' time and GFLOP/s for given shapes, value and
gradient with respect to all four inputs (what the step's backward runs).

  python experiments/ggcr_layer_triple.py 224x64x288x32 224x16x576x64 28x64x1152x128

Shapes are ``N x P x K x O`` (rows, positions, patch size ``kh*kw*cin``, output channels):
the defaults are the digits CNN's layers at the bench batch and WRN-28-2's stages at the
CPU batch.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from ggr_jax import allocator, layer_geometry

DEFAULT_SHAPES = ("224x64x9x32", "224x64x288x32", "224x16x288x64", "224x16x576x64",
                  "28x1024x144x32", "28x256x288x64", "28x64x576x128", "28x64x1152x128")


def _gram(a_w, a_s, d_w, d_s):
  cross = layer_geometry._cross  # pylint: disable=protected-access
  return (jnp.sum(cross(a_w, a_s) * cross(d_w, d_s), axis=(1, 2)),
          jnp.sum(cross(a_w, a_w) * cross(d_w, d_w), axis=(1, 2)),
          jnp.sum(cross(a_s, a_s) * cross(d_s, d_s), axis=(1, 2)))


def _formed(a_w, a_s, d_w, d_s):
  triple = layer_geometry._triple  # pylint: disable=protected-access
  return triple(jnp.einsum("npk,npo->nko", a_w, d_w), jnp.einsum("npk,npo->nko", a_s, d_s))


ROUTES = {"gram": (_gram, lambda p, k, o: 3 * p * p * (k + o)),
          "formed": (_formed, lambda p, k, o: 2 * p * k * o + 3 * k * o)}


def _median_ms(fn, args, repeats: int = 7) -> float:
  jax.block_until_ready(fn(*args))
  allocator.return_freed_memory()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[repeats // 2] * 1e3


def main(shapes: list[str]) -> None:
  for spec in shapes:
    n, p, k, o = (int(v) for v in spec.split("x"))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    args = [jax.random.normal(keys[0], (n, p, k)), jax.random.normal(keys[1], (n, p, k)),
            jax.random.normal(keys[2], (n, p, o)), jax.random.normal(keys[3], (n, p, o))]
    chosen = "gram" if p * (k + o) <= k * o else "formed"
    line = f"N={n:4d} P={p:5d} K={k:5d} O={o:4d} (rule: {chosen:6s})"
    for name, (route, mults) in ROUTES.items():
      def objective(*xs, route=route):
        dot, sq_w, sq_s = route(*xs)
        return jnp.sum(dot * jax.lax.rsqrt(sq_w * sq_s))
      ms = _median_ms(jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3))), args)
      gflops = 3 * 2 * n * mults(p, k, o) / ms / 1e6  # forward and a backward of ~2x
      line += f"  {name} {ms:8.2f} ms ({gflops:5.1f} GFLOP/s)"
    print(line, flush=True)


if __name__ == "__main__":
  main(sys.argv[1:] or list(DEFAULT_SHAPES))
