"""Open-set heads around a backbone, with the official parameter layout.

The backbone is a Linen module mapping ``(x, train)`` to ``{"feat": (N, F),
"logits": (N, K)}``; its closed-set classifier lives inside it (official
``backbone.fc``), so the GGR scope ``"backbone"`` includes that classifier, as in the
official code. Every parameter outside ``backbone`` is a head parameter.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from flax import linen as nn

from ggr_jax.models import inits
from ggr_jax.models.gcd_head import GCDHead

HeadKind = Literal["none", "iomatch", "openmatch", "gcd"]


class OpenSetNet(nn.Module):
  """A backbone plus the heads one open-set algorithm needs.

  Outputs (a dict): ``feat`` and ``logits`` always; with ``head="iomatch"`` also
  ``feat_proj`` (projection MLP, ReLU), ``logits_open`` (K+1 classes) and
  ``logits_mb`` (multi-binary, ``(N, 2, K)``: index 0 outlier, 1 inlier); with
  ``head="openmatch"`` also ``logits_ova`` (one-vs-all, ``(N, 2, K)``, same layout).
  With ``head="gcd"`` (category discovery) ``logits`` are the cosine prototypes of
  SimGCD's head (:class:`~ggr_jax.models.gcd_head.GCDHead`, ``gcd_hidden`` and
  ``gcd_bottleneck`` wide) on ``feat``, and ``proj`` its bottleneck features; the
  backbone's own classifier is not used.
  """

  backbone: nn.Module
  num_classes: int
  head: HeadKind = "none"
  proj_size: int = 128
  gcd_hidden: int = 2048
  gcd_bottleneck: int = 256

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    out = dict(self.backbone(x, train=train))
    feat, k = out["feat"], self.num_classes
    if self.head == "iomatch":
      width = feat.shape[-1]
      hidden = nn.Dense(width, kernel_init=inits.torch_default_kernel,
                        bias_init=inits.torch_default_bias(width), name="mlp_proj_0")(feat)
      proj = nn.Dense(self.proj_size, kernel_init=inits.torch_default_kernel,
                      bias_init=inits.torch_default_bias(width), name="mlp_proj_2")(nn.relu(hidden))
      out["feat_proj"] = proj
      out["logits_open"] = nn.Dense(k + 1, kernel_init=inits.xavier_normal,
                                    name="openset_classifier")(proj)
      mb = nn.Dense(2 * k, use_bias=False, kernel_init=inits.xavier_normal,
                    name="mb_classifiers")(proj)
      out["logits_mb"] = mb.reshape(mb.shape[0], 2, k)
    elif self.head == "openmatch":
      ova = nn.Dense(2 * k, use_bias=False, kernel_init=inits.xavier_normal,
                     name="ova_classifier")(feat)
      out["logits_ova"] = ova.reshape(ova.shape[0], 2, k)
    elif self.head == "gcd":
      gcd = GCDHead(k, hidden_dim=self.gcd_hidden, bottleneck_dim=self.gcd_bottleneck,
                    name="gcd_head")(feat)
      out["logits"], out["proj"] = gcd["logits"], gcd["proj"]
    elif self.head != "none":
      raise ValueError(f"head must be 'none', 'iomatch', 'openmatch' or 'gcd', got "
                       f"{self.head!r}.")
    return out
