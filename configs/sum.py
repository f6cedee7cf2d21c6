"""The default run without rectification (plain FixMatch, the GGR baseline)."""

from ggr_jax.configs import default


def get_config():
  cfg = default.get_config()
  cfg.ggr.mode = "sum"
  return cfg
