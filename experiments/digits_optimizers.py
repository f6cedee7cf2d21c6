"""FixMatch + GGR (vlr) on the digits split under SGD, AdamW and Muon (issue: optimizer
from the config).

Each optimizer keeps the default run (small CNN, 5 labels per known digit, batch 32 +
224) shortened to ``--steps`` with the EMA scaled to the run length (0.99), and uses its
customary learning rate and decay; the rectifier is first in every chain. Prints a
Markdown table of mean +- std over seeds 0..N-1 (finished workdirs are read back).

  python experiments/digits_optimizers.py --seeds 3 --steps 500 --root runs/digits_optim
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from ggr_jax.configs import default
from ggr_jax.train import loop

# name -> (optim fields, optim.kwargs)
OPTIMIZERS = {
    "sgd (Nesterov, coupled L2 5e-4, lr 0.03)": ("sgd", dict(lr=0.03, weight_decay=5e-4), {}),
    "adamw (decoupled 0.05, lr 3e-3)": ("adamw", dict(lr=3e-3, weight_decay=0.05), {}),
    "muon (decoupled 0.05, lr 0.02; Adam 3e-3 off matrices)": (
        "muon", dict(lr=0.02, weight_decay=0.05), dict(adam_learning_rate=3e-3)),
}
METRICS = ("closed_acc", "open_bacc", "auroc")


def config(name: str, seed: int, steps: int):
  optimizer, fields, kwargs = OPTIMIZERS[name]
  cfg = default.get_config()
  cfg.optim.name = optimizer
  cfg.optim.update(fields)
  cfg.optim.kwargs.update(kwargs)
  cfg.optim.ema = 0.99
  cfg.train.update(dict(seed=seed, steps=steps, eval_every=steps, checkpoint_every=steps))
  return cfg


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--root", default="runs/digits_optim")
  args = parser.parse_args()
  rows = {}
  for name, (optimizer, _, _) in OPTIMIZERS.items():
    results = []
    for seed in range(args.seeds):
      workdir = pathlib.Path(args.root) / f"{optimizer}-seed{seed}"
      summary = workdir / "summary.json"
      results.append(json.loads(summary.read_text()) if summary.exists() else
                     loop.train(config(name, seed, args.steps), workdir, progress=False))
      print(name, seed, {m: round(results[-1][m], 4) for m in METRICS}, flush=True)
    rows[name] = results
  print(f"\n{args.steps} steps, seeds 0-{args.seeds - 1}\n")
  print("| optimizer | closed acc | open bal. acc | AUROC | conflict | wall s/run |")
  print("|---|---|---|---|---|---|")
  for name, results in rows.items():
    cells = [f"{np.mean([r[m] for r in results]):.4f} ± {np.std([r[m] for r in results]):.4f}"
             for m in METRICS]
    conflict = np.mean([r.get("mean_ggr/conflict", np.nan) for r in results])
    wall = np.mean([r["wall_s"] for r in results])
    print(f"| {name} | {' | '.join(cells)} | {conflict:.2f} | {wall:.0f} |")


if __name__ == "__main__":
  main()
