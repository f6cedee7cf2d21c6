"""MetaSemi (meta-gradient pseudo-labels + mixup) on the closed-set digits.

All ten digits known, 10 labels each (8% of the training images, as CIFAR-10 with 4,000
labels), batches of 32 labeled + 32 unlabeled images, the official optimizer (SGD,
momentum 0.9 without Nesterov, weight decay 1e-4 on every parameter, learning rate 0.1
with a linear warm-up, then x0.1 twice) with its 400k-step schedule scaled to this
2,000-step run: a 20-step warm-up and consistency ramp, decays after steps 1,500 and
1,750. As officially, the unlabeled set leaves the labeled images out. No rectifier
(``--config.ggr.mode=vlr`` composes it with GGR). The paper's data sets are the
``grid``'s cells (``grid:algorithm=metasemi,dataset=cifar10_closed``).

  >>> cfg = get_config()
  >>> cfg.algorithm, cfg.dataset.protocol, cfg.optim.schedule, cfg.train.uratio
  ('metasemi', 'closed', 'warmup_step', 1)
"""

from ggr_jax.configs import default


def get_config(algorithm: str = "metasemi"):
  """``algorithm``: ``metasemi`` or a composition of it with its block (``metasemi_ggcr``)."""
  cfg = default.get_config()
  cfg.algorithm = algorithm
  cfg.dataset.update(protocol="closed", labels_per_class=10, unlabeled_excludes_labeled=True)
  cfg.optim.ema = 0.0  # no EMA officially: evaluation uses the trained weights
  cfg.ggr.mode = "sum"
  cfg.train.update(batch_size=32, uratio=1)
  steps = cfg.train.steps
  cfg.optim.update(lr=0.1, nesterov=False, weight_decay=1e-4, decay="all",
                   schedule="warmup_step", warmup_steps=steps // 100,
                   milestones=(steps * 3 // 4, steps * 7 // 8), decay_factor=0.1)
  cfg[algorithm].ramp_steps = steps // 100
  return cfg
