"""SimGCD with and without EAGC on digits category discovery (Old 0-4, New 5-9; half of
the Old images labeled), five seeds.

``ggr-jax sweep experiments/sweeps/digits_gcd_eagc.py --root runs/digits_gcd_eagc``

Variants: SimGCD; SimGCD + EAGC (both terms, the released SimGCD settings: aperture 2,
beta 0.5, lambda 0.7) after a 200-step reference; the control ``reference_only`` (the
same reference stage and start, the coordinator at zero strength: what the reference
alone gives); each term alone; SimGCD + GGR (vlr, the unsupervised side rectified
against the supervised one). The protocol is
``configs/simgcd.py``'s: the small CNN from scratch, 2,000 steps of 32 + 32 images in two
views, SGD 0.1 on a cosine, no EMA.
"""

SEEDS = [0, 1, 2, 3, 4]
VARIANTS = [  # (name, overrides)
    ("simgcd", {}),
    ("eagc", {"eagc.terms": "both"}),
    ("reference_only", {"eagc.terms": "eep", "eagc.beta": 0.0}),
    ("eep_only", {"eagc.terms": "eep"}),
    ("aga_only", {"eagc.terms": "aga"}),
    ("ggr_vlr", {"ggr.mode": "vlr"}),
]


def get_sweep(arg=None):
  """Seed by seed, so that a partial sweep covers every variant with fewer seeds."""
  del arg
  return [{"name": f"{name}-s{seed}", "config": "simgcd",
           "overrides": {"train.seed": seed, "train.eval_every": 500, **overrides}}
          for seed in SEEDS for name, overrides in VARIANTS]
