"""Input pipelines: on-device augmentation (:mod:`ggr_jax.data.augment`)."""
