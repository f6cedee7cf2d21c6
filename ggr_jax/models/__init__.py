"""Flax models: backbones (digits CNN, WRN-28-2, ImageNet ResNets) and the open-set heads."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import linen as nn

from ggr_jax.models.heads import OpenSetNet

BACKBONES = ("cnn", "wrn28_2", "wrn28_8", "resnet18", "resnet18_official", "resnet50",
             "convlarge", "vit_tiny", "vit_small", "vit_base")
VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # (dim, heads)


def build_model(backbone: str, num_classes: int, head: str = "none",
                bn_momentum: float = 0.001, vit: dict[str, int] | None = None,
                **head_sizes: int) -> OpenSetNet:
  """``OpenSetNet`` with the named backbone; the backbone's parameters sit under ``backbone``.

  ``bn_momentum`` is the PyTorch-convention share of each batch in the BatchNorm
  running statistics (official: 0.001, a time constant of 1000 steps, for WRN-28-2;
  0.1, PyTorch's default, for the ImageNet-30 ResNets). ``resnet18`` is the BasicBlock
  ResNet-18 (512 features), ``resnet18_official`` the official code's ``resnet18``
  (Bottleneck blocks, layers [2, 2, 2, 2], 2048 features), ``resnet50`` the standard
  ResNet-50 (ImageNet with 1% labels). ``wrn28_8`` is WRN-28-8, the closed-set
  CIFAR-100 backbone of FixMatch. ``convlarge`` is SemiMeta's 13-layer ConvLarge (channel
  dropout: a train-mode forward needs a ``dropout`` rng). ``head_sizes``: further
  :class:`OpenSetNet` sizes (``gcd_hidden``, ``gcd_bottleneck``).
  """
  if backbone == "cnn":
    from ggr_jax.models.cnn import SmallCNN  # pylint: disable=import-outside-toplevel
    net: nn.Module = SmallCNN(num_classes, bn_momentum=bn_momentum)
  elif backbone in ("wrn28_2", "wrn28_8"):
    from ggr_jax.models.wrn import WideResNet  # pylint: disable=import-outside-toplevel
    net = WideResNet(num_classes, widen_factor=int(backbone[-1]), bn_momentum=bn_momentum)
  elif backbone == "convlarge":
    from ggr_jax.models.convlarge import ConvLarge  # pylint: disable=import-outside-toplevel
    net = ConvLarge(num_classes, bn_momentum=bn_momentum)
  elif backbone in ("resnet18", "resnet18_official", "resnet50"):
    from ggr_jax.models import resnet  # pylint: disable=import-outside-toplevel
    net = getattr(resnet, backbone)(num_classes, bn_momentum=bn_momentum)
  elif backbone in VITS:
    from ggr_jax.models.vit import VisionTransformer  # pylint: disable=import-outside-toplevel
    sizes = dict(vit or {})
    dim, heads = VITS[backbone]
    net = VisionTransformer(dim=dim, heads=heads, depth=sizes.pop("depth", 0) or 12,
                            num_classes=0 if head == "gcd" else num_classes, **sizes)
  else:
    raise ValueError(f"Unknown backbone {backbone!r}; choose one of {BACKBONES}.")
  return OpenSetNet(backbone=net, num_classes=num_classes, head=head, **head_sizes)


def trainable_leaves(model: OpenSetNet) -> Callable[[Any], Any] | None:
  """``params -> bools``, False on the leaves the model never trains (a ViT's frozen
  trunk and final norm, :func:`ggr_jax.models.vit.trainable_mask`); None when every leaf
  trains."""
  from ggr_jax.models.vit import VisionTransformer, trainable_mask  # pylint: disable=import-outside-toplevel
  net = model.backbone
  if not isinstance(net, VisionTransformer) or net.grad_from_block == 0:
    return None

  def mask(params: Any) -> Any:
    out = jax.tree.map(lambda _: True, params)
    return {**out, "backbone": trainable_mask(params["backbone"], net.grad_from_block)}

  return mask
