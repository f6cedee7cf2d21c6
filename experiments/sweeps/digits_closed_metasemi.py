"""MetaSemi on the closed-set digits (all ten digits, 10 labels each: 8% of the training
images, as CIFAR-10 with 4,000 labels): the paper's ablation and GGR on top, five seeds.

``ggr-jax sweep experiments/sweeps/digits_closed_metasemi.py --root runs/digits_closed_metasemi``

Variants: neither component (the eval-mode predictions as targets, no mixup); meta
only; mixup only; both (MetaSemi, JVP pseudo-labels); both with the official finite
difference; both + GGR (vlr); and MetaSemi + GGCR (``metasemi_ggcr``: ``lambda * L_g`` on
a weak and a strong view drawn for it, the exact method, ``L_g`` after a tenth of the
steps), without and with GGR (vlr), and its control with lambda 0 (``both_gc_monitor``:
MetaSemi's training, the cosines logged). The protocol is ``configs/metasemi.py``'s (the ``grid``'s
``algorithm=metasemi,dataset=digits_closed``): batch 32 + 32, SGD 0.1 without Nesterov,
weight decay 1e-4 on every parameter, no EMA, the unlabeled set without the labeled
images, SemiMeta's schedule scaled to ``STEPS`` (1% warm-up and ramp, x0.1 after 75% and
87.5% of the steps).
"""

STEPS = 1000
SEEDS = [0, 1, 2, 3, 4]
OVERRIDES = {"train.steps": STEPS, "train.log_every": 50, "train.eval_every": STEPS // 5,
             "train.checkpoint_every": STEPS // 2, "optim.warmup_steps": STEPS // 100,
             "optim.milestones": (STEPS * 3 // 4, STEPS * 7 // 8)}
VARIANTS = [  # (name, grid keys)
    ("neither", "meta=off,mixup=False,ggr=sum"),
    ("meta_only", "meta=jvp,mixup=False,ggr=sum"),
    ("mixup_only", "meta=off,mixup=True,ggr=sum"),
    ("both", "meta=jvp,mixup=True,ggr=sum"),
    ("both_fd", "meta=finite_difference,mixup=True,ggr=sum"),
    ("both_vlr", "meta=jvp,mixup=True,ggr=vlr"),
    # MetaSemi + L_g (added 2026-12-05)
    ("both_ggcr", "algorithm=metasemi_ggcr,meta=jvp,mixup=True,ggr=sum"),
    ("both_ggcr_vlr", "algorithm=metasemi_ggcr,meta=jvp,mixup=True,ggr=vlr"),
    # the control: MetaSemi's training (lambda 0) with the cosines measured and logged
    ("both_gc_monitor", "algorithm=metasemi_ggcr,meta=jvp,mixup=True,ggr=sum,gc_weight=0"),
]


def _overrides(keys: str) -> dict:
  algorithm = "metasemi_ggcr" if "algorithm=metasemi_ggcr" in keys else "metasemi"
  out = {**OVERRIDES, f"{algorithm}.ramp_steps": STEPS // 100}
  if algorithm == "metasemi_ggcr":
    out[f"{algorithm}.consistency.warmup_steps"] = STEPS // 10
  return out


def get_sweep(arg=None):
  """Seed by seed, so that a partial sweep covers every variant with fewer seeds."""
  del arg
  return [{"name": f"{name}-s{seed}",
           "config": "grid:" + ("" if "algorithm=" in keys else "algorithm=metasemi,")
                     + f"{keys},dataset=digits_closed,seed={seed}",
           "overrides": _overrides(keys)}
          for seed in SEEDS for name, keys in VARIANTS]
