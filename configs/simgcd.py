"""SimGCD on digits category discovery: Old digits 0-4, New digits 5-9.

Half of the Old digits' training images are labeled; the unlabeled set holds the rest and
every New digit. Two weak views of 32 labeled and 32 unlabeled images per batch, the
small CNN from scratch (there is no DINO for 8x8 digits) with a scaled-down head
(256 hidden, 64 bottleneck), the official optimizer (SGD, momentum 0.9 without
Nesterov, weight decay 5e-5 on kernels, a cosine schedule, no EMA) and the teacher
temperature's 30-of-200-epoch warm-up scaled to this 2,000-step run (3 epochs of 100
steps). No rectifier (``--config.ggr.mode=vlr`` rectifies the unsupervised side against
the supervised one).

  >>> cfg = get_config()
  >>> cfg.algorithm, cfg.dataset.protocol, tuple(cfg.dataset.id_classes)
  ('simgcd', 'gcd', (0, 1, 2, 3, 4))
"""

from ggr_jax.configs import default


def get_config():
  cfg = default.get_config()
  cfg.algorithm = "simgcd"
  cfg.dataset.update(protocol="gcd", id_classes=(0, 1, 2, 3, 4), prop_labeled=0.5)
  cfg.ggr.mode = "sum"
  cfg.train.update(batch_size=32, uratio=1)
  cfg.optim.update(lr=0.1, nesterov=False, weight_decay=5e-5, ema=0.0, schedule="cosine")
  cfg.simgcd.update(hidden_dim=256, bottleneck_dim=64, memax_weight=2.0,
                    teacher_warmup_epochs=max(1, cfg.train.steps * 15 // 100
                                              // cfg.train.steps_per_epoch))
  return cfg
