"""XLA's own figures of bench cells, compiled but not run: FLOPs and planned memory.

Compiling for the CPU shows a step's FLOPs and XLA's buffer plan at batches that do not
run in reasonable time here (the paper batch); the plan tracks a GPU's measured peak
(WRN-28-2, GGCR's exact step: 5.12x FixMatch planned, 4.87x measured on an H200).

  python experiments/xla_plan.py --workload wrn28_2_paper \
      --variants sum,ggcr_fast,ggcr_fast_held --remat on
"""

from __future__ import annotations

import argparse
import copy

from ggr_jax import bench


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workload", default="wrn28_2_paper", choices=sorted(bench.WORKLOADS))
  parser.add_argument("--algorithm", default="fixmatch")
  parser.add_argument("--variants", default="sum,ggcr_fast")
  parser.add_argument("--remat", choices=("auto", "on", "off"), default=None,
                      help="consistency.remat of GGCR cells (on: the GPU default)")
  args = parser.parse_args()
  names = args.variants.split(",")
  bench.check_names([args.workload], names)
  base = None
  for name in names:
    variant = copy.deepcopy(bench.VARIANTS[name])
    if args.remat and "consistency" in variant:
      variant["consistency"]["remat"] = args.remat
    step, state, feed = bench.prepared_step(args.algorithm, bench.WORKLOADS[args.workload],
                                            variant)
    figures = bench.compiled_figures(step.lower(state, feed.next(0)).compile())
    feed.close()
    flops, planned = figures["xla_flops"] / 1e9, figures["xla_planned_bytes"] / 2**20
    base = base or (flops, planned)
    print(f"{args.workload} {args.algorithm} {name:<22} {flops:9.1f} GFLOP ({flops / base[0]:.2f}x)"
          f"  {planned:9.0f} MiB planned ({planned / base[1]:.2f}x)", flush=True)


if __name__ == "__main__":
  main()
