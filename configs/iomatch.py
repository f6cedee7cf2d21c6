"""IOMatch + GGR (vlr) on the digits split."""

from ggr_jax.configs import default


def get_config():
  cfg = default.get_config()
  cfg.algorithm = "iomatch"
  return cfg
