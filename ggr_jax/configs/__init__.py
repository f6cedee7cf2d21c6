"""Packaged ``ml_collections`` configs; variants inherit from :mod:`default` by import.

``ggr-jax train --config NAME`` accepts the file name of one of these (``default``,
``sum``, ``supervised``, ``iomatch``, ``openmatch``) or a path to your own file, which
can start from ``from ggr_jax.configs import default``.
"""
