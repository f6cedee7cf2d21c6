"""MetaSemi + GGCR on the closed-set digits: ``configs/metasemi.py``'s protocol with
``lambda * L_g`` on a weak and a strong view of the unlabeled images.

MetaSemi trains on weak views only; the strong view (RandAugment) is drawn for ``L_g``
alone (:func:`ggr_jax.ssl.ggcr.with_strong_view`). The GGCR paper's 1,000-step warm-up
of ``L_g`` is scaled to this 2,000-step run (200 steps), as in ``configs/ggcr.py``;
lambda 0.1, tau 0.95. ``--config.ggr.mode=vlr`` rectifies MetaSemi's consistency and
``L_g`` against the labeled anchor.

  >>> cfg = get_config()
  >>> cfg.algorithm, cfg.metasemi_ggcr.ramp_steps, cfg.metasemi_ggcr.consistency.warmup_steps
  ('metasemi_ggcr', 20, 200)
"""

from ggr_jax.configs import metasemi


def get_config():
  cfg = metasemi.get_config("metasemi_ggcr")
  cfg.metasemi_ggcr.consistency.warmup_steps = cfg.train.steps // 10
  return cfg
