"""SimGCD's heads as EAGC's code builds them: a projection layer, then DINO's head.

``z`` (the backbone's output feature) goes through

    h      = relu(W_p z + b_p)                                   projection (EAGC's addition)
    proj   = L3(gelu(L2(gelu(L1(h)))))                            bottleneck MLP (256-d)
    logits = normalize(h) @ normalize_rows(V)^T                   cosine prototypes (K)

``proj`` feeds the contrastive losses; the prototype layer sees the L2-normalised
*projection* output ``h``, not the bottleneck. DINO's weight-normalised prototype layer
``g * v / |v|`` has ``g`` frozen at 1, so only ``v`` is a parameter here (stored
transposed, ``(D, K)``, as Flax kernels are); its gradient goes through the row
normalisation. GELU is the exact (erf) form. Initialisation as the official code: the MLP
trunc-normal(0.02) with zero biases, the projection and prototypes PyTorch's default
Linear init (the official ``MLP_Head._init_weights`` is never called).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from ggr_jax.models import inits

NORM_EPS = 1e-12  # F.normalize's floor on the norm


def l2_normalize(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """``x / max(|x|, 1e-12)`` along ``axis`` (``torch.nn.functional.normalize``)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), NORM_EPS)


def _gelu(x: jnp.ndarray) -> jnp.ndarray:
  return nn.gelu(x, approximate=False)


class GCDHead(nn.Module):
  """Projection layer + DINO head; returns ``{"proj", "logits", "hidden"}``.

  Attributes:
    num_classes: prototypes ``K`` (Old + New classes).
    hidden_dim, bottleneck_dim, mlp_layers: DINO head's MLP (official 2048, 256, 3).
  """

  num_classes: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  mlp_layers: int = 3

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> dict[str, jnp.ndarray]:
    width = z.shape[-1]
    h = nn.relu(nn.Dense(width, kernel_init=inits.torch_default_kernel,
                         bias_init=inits.torch_default_bias(width), name="projection")(z))
    trunc = nn.initializers.truncated_normal(0.02)
    x = h
    sizes = [self.hidden_dim] * (self.mlp_layers - 1) + [self.bottleneck_dim]
    for i, size in enumerate(sizes):
      x = nn.Dense(size, kernel_init=trunc, bias_init=nn.initializers.zeros,
                   name=f"mlp_{i}")(x)
      if i < len(sizes) - 1:
        x = _gelu(x)
    v = self.param("prototypes", inits.torch_default_kernel, (width, self.num_classes))
    logits = l2_normalize(h) @ l2_normalize(v, axis=0)
    return {"proj": x, "logits": logits, "hidden": h}
