"""Supervised-only baseline with the same labels as the default run."""

from ggr_jax.configs import default


def get_config():
  cfg = default.get_config()
  cfg.algorithm = "supervised"
  cfg.ggr.mode = "sum"
  return cfg
