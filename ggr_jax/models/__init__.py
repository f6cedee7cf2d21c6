"""Flax models: backbones (small CNN for digits, WRN-28-2) and the open-set heads."""

from __future__ import annotations

from flax import linen as nn

from ggr_jax.models.heads import OpenSetNet

BACKBONES = ("cnn", "wrn28_2")


def build_model(backbone: str, num_classes: int, head: str = "none") -> OpenSetNet:
  """``OpenSetNet`` with the named backbone; the backbone's parameters sit under ``backbone``."""
  if backbone == "cnn":
    from ggr_jax.models.cnn import SmallCNN  # pylint: disable=import-outside-toplevel
    net: nn.Module = SmallCNN(num_classes)
  elif backbone == "wrn28_2":
    from ggr_jax.models.wrn import WideResNet  # pylint: disable=import-outside-toplevel
    net = WideResNet(num_classes)
  else:
    raise ValueError(f"Unknown backbone {backbone!r}; choose one of {BACKBONES}.")
  return OpenSetNet(backbone=net, num_classes=num_classes, head=head)
