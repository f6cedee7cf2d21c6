"""DINO's Vision Transformer (Caron et al. 2021) in Flax, with partial fine-tuning.

The layout of DINO's ``VisionTransformer`` (``vit_small``/``vit_base``): a strided
convolution cuts ``p x p`` patches into ``D``-dim tokens, a learned CLS token is
prepended and learned position embeddings added; ``depth`` pre-norm blocks
``x + attn(LN(x))``, ``x + fc2(gelu(fc1(LN(x))))`` (LayerNorm eps 1e-6, exact GELU, MLP
ratio 4, biased qkv); the output is the final LayerNorm of the CLS token.

``grad_from_block = k`` trains blocks ``k, k+1, ...`` only (GCD's partial fine-tuning):
the tokens entering block ``k`` are a stop-gradient, so the frozen trunk (patch
embedding, CLS and position embeddings, blocks ``< k``) costs no backward pass. The
final LayerNorm is frozen too in the official recipe (only names containing ``block``
train); :func:`trainable_mask` says which leaves train, for the optimizer. Position
embeddings are not interpolated: an input whose patch grid differs from the one the
embeddings were made for is an error.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from ggr_jax.models.layers import FeatureTap

LN_EPS = 1e-6


def _gelu(x: jnp.ndarray) -> jnp.ndarray:
  return nn.gelu(x, approximate=False)


class Attention(nn.Module):
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n, t, d = x.shape
    hd = d // self.heads
    qkv = nn.Dense(3 * d, name="qkv")(x).reshape(n, t, 3, self.heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (N, H, T, hd)
    attn = jax.nn.softmax(q @ k.swapaxes(-1, -2) * hd**-0.5, axis=-1)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
    return nn.Dense(d, name="proj")(out)


class Block(nn.Module):
  dim: int
  heads: int
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x + Attention(self.dim, self.heads, name="attn")(
        nn.LayerNorm(LN_EPS, use_fast_variance=False, name="norm1")(x))
    h = nn.LayerNorm(LN_EPS, use_fast_variance=False, name="norm2")(x)
    h = nn.Dense(int(self.dim * self.mlp_ratio), name="fc1")(h)
    return x + nn.Dense(self.dim, name="fc2")(_gelu(h))


class VisionTransformer(nn.Module):
  """A DINO ViT returning ``{"feat": (N, D)}``, the final-norm CLS token, and with
  ``num_classes > 0`` also ``{"logits": ...}`` of a linear classifier ``fc`` on it (the
  closed-set classifier the SSL algorithms read; not part of DINO's weights).

  The forward is :meth:`trunk` (patch and position embeddings, blocks before
  ``grad_from_block``) then :meth:`tail` (the trained blocks, the final norm, the feature
  tap, the classifier). With ``grad_from_block >= 1`` the trunk is frozen, so two models
  that share its parameters (EAGC's training and reference models) can share its output.

  Attributes:
    image_size, patch_size: the patch grid is ``(image_size // patch_size) ** 2``.
    dim, depth, heads, mlp_ratio: the transformer's sizes.
    grad_from_block: the first trained block (``0``: all; ``depth``: none).
    num_classes: the classifier's width (``0``: no classifier).
  """

  image_size: int = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  grad_from_block: int = 0
  num_classes: int = 0

  def setup(self):
    p, grid = self.patch_size, self.image_size // self.patch_size
    self.patch_embed = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID")
    self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.dim))
    self.pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                                (1, grid * grid + 1, self.dim))
    self.blocks = [Block(self.dim, self.heads, self.mlp_ratio) for _ in range(self.depth)]
    self.norm = nn.LayerNorm(LN_EPS, use_fast_variance=False)
    self.feature = FeatureTap()
    if self.num_classes:
      self.fc = nn.Dense(self.num_classes)

  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    del train  # no dropout, no BatchNorm (DINO's drop rates are 0)
    return self.tail(self.trunk(x))

  def trunk(self, x: jnp.ndarray) -> jnp.ndarray:
    """The tokens entering block ``grad_from_block`` (a stop-gradient when it is > 0)."""
    grid = self.image_size // self.patch_size
    if x.shape[1] != x.shape[2] or x.shape[1] // self.patch_size != grid:
      raise ValueError(
          f"VisionTransformer made for {self.image_size}x{self.image_size} images "
          f"(patch {self.patch_size}) got {x.shape[1]}x{x.shape[2]}; resize the images to "
          f"{self.image_size} or set the model's image_size.")
    tokens = self.patch_embed(x).reshape(x.shape[0], -1, self.dim)
    cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, self.dim))
    h = jnp.concatenate([cls, tokens], 1) + self.pos_embed
    for block in self.blocks[:self.grad_from_block]:
      h = block(h)
    return jax.lax.stop_gradient(h) if self.grad_from_block > 0 else h

  def tail(self, h: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """The trained part from the trunk's tokens: ``{"feat"}`` (and ``{"logits"}``)."""
    for block in self.blocks[self.grad_from_block:]:
      h = block(h)
    if self.grad_from_block >= self.depth:
      h = jax.lax.stop_gradient(h)
    feat = self.feature(self.norm(h)[:, 0])
    out = {"feat": feat}
    if self.num_classes:
      out["logits"] = self.fc(feat)
    return out

  @property
  def shares_trunk(self) -> bool:
    """Whether the trunk is frozen (its output can be shared by models of equal trunks)."""
    return self.grad_from_block >= 1


def vit_small(**kwargs: Any) -> VisionTransformer:
  """ViT-S/16 (DINO ``vit_small``): 384-dim, 12 blocks, 6 heads."""
  return VisionTransformer(**{"dim": 384, "depth": 12, "heads": 6, **kwargs})


def vit_base(**kwargs: Any) -> VisionTransformer:
  """ViT-B/16 (DINO ``vit_base``): 768-dim, 12 blocks, 12 heads."""
  return VisionTransformer(**{"dim": 768, "depth": 12, "heads": 12, **kwargs})


def trainable_mask(params: Any, grad_from_block: int) -> Any:
  """``True`` on the leaves of blocks ``>= grad_from_block`` and of the classifier ``fc``,
  ``False`` elsewhere (patch embedding, CLS and position embeddings, earlier blocks, the
  final norm), as the official recipe trains only names containing ``block``."""
  flat = traverse_util.flatten_dict(params)

  def trains(path: tuple[str, ...]) -> bool:
    if path[0] == "fc":
      return True
    block = next((part for part in path if part.startswith("blocks_")), None)
    return block is not None and int(block.split("_")[1]) >= grad_from_block

  return traverse_util.unflatten_dict({path: trains(path) for path in flat})
