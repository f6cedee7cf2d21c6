"""The digits ablation: {FixMatch, IOMatch, OpenMatch} x the six modes x five seeds, plus
FixMatch + vlr with the supervised anchor from the labeled views alone.

``ggr-jax sweep experiments/sweeps/digits_ablation.py --root runs/digits_ablation``

A shortened digits protocol so that the 95 runs fit in about an hour on 2 CPU cores:
``STEPS`` steps (cosine schedule over them), batch 16 labeled + 48 unlabeled images
(``uratio`` 3), an "epoch" of ``STEPS // 20`` steps (IOMatch's open-set loss starts after
one, OpenMatch's FixMatch stage after ten), an EMA of the weights with decay 0.99 (the
default 0.999 would still hold 61% of the random initialisation after 500 steps, and
the evaluation uses the EMA weights), evaluation every ``STEPS // 10`` steps (the final
one gives the reported figures, the best one the official figures). Everything else is
the ``grid`` digits cell (small CNN, 5 labels per known digit; OpenMatch rectifies from
its FixMatch stage on, as officially).

``--only openmatch-`` runs the OpenMatch rows alone.
"""

from ggr_jax import sweep

STEPS = 500
SEEDS = [0, 1, 2, 3, 4]
MODES = ["sum", "vlr", "osr", "csr", "pcgrad_sym", "conflict_drop"]
OVERRIDES = {"train.steps": STEPS, "train.steps_per_epoch": STEPS // 20, "optim.ema": 0.99,
             "train.batch_size": 16,
             "train.uratio": 3, "train.log_every": 50, "train.eval_every": STEPS // 10,
             "train.checkpoint_every": STEPS // 2}


def get_sweep(arg=None):
  """Seed by seed (a partial sweep covers every algorithm and mode with fewer seeds)."""
  del arg
  cells = []
  for seed in SEEDS:
    cells += sweep.product("grid", algorithm=["fixmatch", "iomatch", "openmatch"], ggr=MODES,
                           dataset="digits", seed=seed, overrides=OVERRIDES,
                           name="{algorithm}-{ggr}-s{seed}")
    cells += sweep.product("grid", algorithm="fixmatch", ggr="vlr", anchor="labeled",
                           dataset="digits", seed=seed, overrides=OVERRIDES,
                           name="{algorithm}-{ggr}-anchor_labeled-s{seed}")
  return cells
