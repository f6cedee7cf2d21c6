"""OpenMatch + GGR (vlr) on the digits split (uratio 2, as officially)."""

from ggr_jax.configs import default


def get_config():
  cfg = default.get_config()
  cfg.algorithm = "openmatch"
  cfg.train.uratio = 2
  return cfg
