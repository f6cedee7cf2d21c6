"""FixMatch + GGR (vlr) on the open-set digits split: the default run, named.

``ggr-jax train --config configs/fixmatch_ggr.py`` from a checkout, or
``--config fixmatch_ggr`` from anywhere.
"""

from ggr_jax.configs import default


def get_config():
  cfg = default.get_config()
  cfg.algorithm = "fixmatch"
  cfg.ggr.mode = "vlr"
  return cfg
