"""MetaSemi on the closed-set digits (all ten digits, 10 labels each: 8% of the training
images, as CIFAR-10 with 4,000 labels): the paper's ablation and GGR on top, five seeds.

``ggr-jax sweep experiments/sweeps/digits_closed_metasemi.py --root runs/digits_closed_metasemi``

Variants: neither component (the eval-mode predictions as targets, no mixup); meta
only; mixup only; both (MetaSemi, JVP pseudo-labels); both with the official finite
difference; both + GGR (vlr). The protocol is ``configs/metasemi.py``'s (the ``grid``'s
``algorithm=metasemi,dataset=digits_closed``): batch 32 + 32, SGD 0.1 without Nesterov,
weight decay 1e-4 on every parameter, no EMA, the unlabeled set without the labeled
images, SemiMeta's schedule scaled to ``STEPS`` (1% warm-up and ramp, x0.1 after 75% and
87.5% of the steps).
"""

STEPS = 1000
SEEDS = [0, 1, 2, 3, 4]
OVERRIDES = {"train.steps": STEPS, "train.log_every": 50, "train.eval_every": STEPS // 5,
             "train.checkpoint_every": STEPS // 2, "optim.warmup_steps": STEPS // 100,
             "optim.milestones": (STEPS * 3 // 4, STEPS * 7 // 8),
             "metasemi.ramp_steps": STEPS // 100}
VARIANTS = [  # (name, grid keys)
    ("neither", "meta=off,mixup=False,ggr=sum"),
    ("meta_only", "meta=jvp,mixup=False,ggr=sum"),
    ("mixup_only", "meta=off,mixup=True,ggr=sum"),
    ("both", "meta=jvp,mixup=True,ggr=sum"),
    ("both_fd", "meta=finite_difference,mixup=True,ggr=sum"),
    ("both_vlr", "meta=jvp,mixup=True,ggr=vlr"),
]


def get_sweep(arg=None):
  """Seed by seed, so that a partial sweep covers every variant with fewer seeds."""
  del arg
  return [{"name": f"{name}-s{seed}",
           "config": f"grid:algorithm=metasemi,dataset=digits_closed,{keys},seed={seed}",
           "overrides": dict(OVERRIDES)}
          for seed in SEEDS for name, keys in VARIANTS]
