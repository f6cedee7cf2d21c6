"""GGCR (FixMatch + gradient consistency across views) on the closed-set digits.

All ten digits known, 4 labels each (the analogue of CIFAR-10 with 40 labels), the
paper's lambda 0.1 and tau 0.95, the exact per-sample method, no rectifier (``ggr.mode
= "sum"``; ``--config.ggr.mode=vlr`` composes it with GGR). The paper's 1,000-step
warm-up of ``L_g`` and 5,000-step ramp of the unlabeled weight are scaled to this
2,000-step run (200 and 500 steps). ``ggr-jax train --config ggcr``; the paper's data
sets are the ``grid``'s closed-set cells (``grid:algorithm=ggcr,dataset=cifar10_closed``).

  >>> cfg = get_config()
  >>> cfg.algorithm, cfg.dataset.protocol, cfg.dataset.labels_per_class
  ('ggcr', 'closed', 4)
"""

from ggr_jax.configs import default


def get_config():
  cfg = default.get_config()
  cfg.algorithm = "ggcr"
  cfg.dataset.update(protocol="closed", labels_per_class=4)
  cfg.ggr.mode = "sum"
  cfg.ggcr.unsup_warmup_steps = cfg.train.steps // 4
  cfg.ggcr.consistency.warmup_steps = cfg.train.steps // 10
  return cfg
