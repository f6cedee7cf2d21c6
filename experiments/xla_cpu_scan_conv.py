"""XLA's CPU backend: a convolution's gradient inside a loop (``lax.map``/``lax.scan``)
runs far slower than the same gradient outside one.

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution \
        python experiments/xla_cpu_scan_conv.py

Prints the forward and gradient time of ``sum(conv(x_i, w) ** 2)`` over 8 chunks of 32
8x8x32 images, as a loop (``lax.map``), a ``vmap`` and an unrolled Python loop, and the
``dim_labels`` of the kernel-gradient convolution XLA compiled in each case. Why
``consistency.sketch_chunk`` (a ``lax.map`` over chunks of directions) is slow on the CPU.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
from jax import lax


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main() -> None:
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 8, 8, 32))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 32))
  ways = {
      "lax.map": lambda w: jnp.sum(lax.map(lambda xi: conv(xi, w), x) ** 2),
      "vmap": lambda w: jnp.sum(jax.vmap(lambda xi: conv(xi, w))(x) ** 2),
      "unrolled": lambda w: sum(jnp.sum(conv(x[i], w) ** 2) for i in range(x.shape[0])),
  }
  for name, f in ways.items():
    times = {}
    for what, g in (("forward", jax.jit(f)), ("gradient", jax.jit(jax.grad(f)))):
      jax.block_until_ready(g(w))
      start = time.perf_counter()
      for _ in range(5):
        jax.block_until_ready(g(w))
      times[what] = (time.perf_counter() - start) / 5 * 1e3
    hlo = jax.jit(jax.grad(f)).lower(w).compile().as_text()
    labels = sorted(set(re.findall(r"dim_labels=(\S+?),", hlo)))
    print(f"{name:9s} forward {times['forward']:7.1f} ms  gradient {times['gradient']:7.1f} ms"
          f"  convolutions {', '.join(labels)}")


if __name__ == "__main__":
  main()
