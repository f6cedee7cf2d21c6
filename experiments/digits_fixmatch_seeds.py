"""FixMatch vs FixMatch + GGR (vlr) vs supervised-only on the default digits split.

Runs ``ggr-jax train`` with the packaged configs for seeds 0..N-1 (resuming finished or
interrupted runs from their workdirs) and prints a Markdown table of mean +- std.

  python experiments/digits_fixmatch_seeds.py --seeds 3 --root runs/digits_seeds
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from ggr_jax.configs import default, sum as sum_config, supervised
from ggr_jax.train import loop

VARIANTS = {"supervised only": supervised, "FixMatch (sum)": sum_config, "FixMatch + GGR (vlr)": default}
METRICS = ("closed_acc", "open_bacc", "auroc")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--root", default="runs/digits_seeds")
  args = parser.parse_args()
  rows = {}
  for name, module in VARIANTS.items():
    results = []
    for seed in range(args.seeds):
      cfg = module.get_config()
      cfg.train.seed = seed
      workdir = pathlib.Path(args.root) / f"{cfg.algorithm}-{cfg.ggr.mode}-seed{seed}"
      summary_path = workdir / "summary.json"
      if summary_path.exists():
        results.append(json.loads(summary_path.read_text()))
      else:
        results.append(loop.train(cfg, workdir, progress=False))
      print(name, seed, {m: round(results[-1][m], 4) for m in METRICS}, flush=True)
    rows[name] = results
  print("\n| variant | closed acc | open bal. acc | AUROC | wall s/run |\n|---|---|---|---|---|")
  for name, results in rows.items():
    cells = [f"{np.mean([r[m] for r in results]):.4f} ± {np.std([r[m] for r in results]):.4f}"
             for m in METRICS]
    wall = np.mean([r["wall_s"] for r in results])
    print(f"| {name} | {' | '.join(cells)} | {wall:.0f} |")


if __name__ == "__main__":
  main()
