"""EAGC as a second kind of rectification on open-set SSL: FixMatch on the open-set digits
split, with GGR (parameter level), EAGC (feature level) and both, five seeds.

``ggr-jax sweep experiments/sweeps/digits_openset_eagc.py --root runs/digits_openset_eagc``

The shortened digits protocol of ``digits_ablation.py`` (500 steps, 16 labeled + 48
unlabeled images, EMA 0.99). Known classes for EAGC are the labeled (ID) digits, the
reference stage is ``REFERENCE_STEPS`` supervised steps. Variants: FixMatch; FixMatch +
GGR (vlr); the control ``reference_only`` (EAGC's reference stage and start, the
coordinator at zero strength); FixMatch + EAGC (EEP and AGA at the released SimGCD
settings); FixMatch + EAGC + GGR (vlr).
"""

SEEDS = [0, 1, 2, 3, 4]
REFERENCE_STEPS = 100
STEPS = 500
OVERRIDES = {"train.steps": STEPS, "train.steps_per_epoch": STEPS // 20, "optim.ema": 0.99,
             "train.batch_size": 16, "train.uratio": 3, "train.log_every": 50,
             "train.eval_every": STEPS // 10, "train.checkpoint_every": STEPS // 2,
             "eagc.reference_steps": REFERENCE_STEPS}
VARIANTS = [  # (name, overrides)
    ("fixmatch", {"ggr.mode": "sum"}),
    ("ggr_vlr", {"ggr.mode": "vlr"}),
    ("reference_only", {"ggr.mode": "sum", "eagc.terms": "eep", "eagc.beta": 0.0}),
    ("eagc", {"ggr.mode": "sum", "eagc.terms": "both"}),
    ("eagc_ggr_vlr", {"ggr.mode": "vlr", "eagc.terms": "both"}),
]


def get_sweep(arg=None):
  """Seed by seed, so that a partial sweep covers every variant with fewer seeds."""
  del arg
  return [{"name": f"{name}-s{seed}", "config": "default",
           "overrides": {**OVERRIDES, "train.seed": seed, **overrides}}
          for seed in SEEDS for name, overrides in VARIANTS]
