"""Conversion of EAGC's official SimGCD heads (PyTorch names) to :class:`GCDHead` params.

The official projector is ``nn.Sequential(MLP_Head, DINOHead)``: ``0.mlp.0`` (the
projection layer), ``1.mlp.{0,2,4}`` (the DINO MLP; GELUs at the odd indices),
``1.last_layer.weight_v`` ``[K, D]`` and ``1.last_layer.weight_g`` ``[K, 1]`` (frozen at
1). Linear ``weight`` ``[out, in]`` becomes ``kernel`` ``[in, out]``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def simgcd_head_to_flax(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """``GCDHead`` params from the official projector's ``named_parameters()``."""
  gain = arrays.get("1.last_layer.weight_g")
  if gain is not None and not np.allclose(gain, 1.0):
    raise ValueError("1.last_layer.weight_g is not all ones: GCDHead keeps DINO's frozen "
                     "gain of 1 (norm_last_layer=True); retrain or rescale weight_v.")
  params: dict[str, Any] = {
      "projection": _dense(arrays, "0.mlp.0"),
      "prototypes": np.asarray(arrays["1.last_layer.weight_v"]).T,
  }
  layer = 0
  while f"1.mlp.{2 * layer}.weight" in arrays:
    params[f"mlp_{layer}"] = _dense(arrays, f"1.mlp.{2 * layer}")
    layer += 1
  unused = set(arrays) - {f"{p}.{leaf}" for p in ["0.mlp.0"] + [
      f"1.mlp.{2 * i}" for i in range(layer)] for leaf in ("weight", "bias")} - {
          "1.last_layer.weight_v", "1.last_layer.weight_g"}
  if unused:
    raise ValueError(f"unknown SimGCD head parameters {sorted(unused)}; expected the "
                     "official nn.Sequential(MLP_Head, DINOHead) names.")
  return params


def flax_to_simgcd_head(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of :func:`simgcd_head_to_flax` (``weight_g`` written as ones)."""
  prototypes = np.asarray(params["prototypes"])
  out = {"1.last_layer.weight_v": prototypes.T,
         "1.last_layer.weight_g": np.ones((prototypes.shape[1], 1), prototypes.dtype)}
  out.update(_linear(params["projection"], "0.mlp.0"))
  layer = 0
  while f"mlp_{layer}" in params:
    out.update(_linear(params[f"mlp_{layer}"], f"1.mlp.{2 * layer}"))
    layer += 1
  return out


def _dense(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {"kernel": np.asarray(arrays[f"{prefix}.weight"]).T,
          "bias": np.asarray(arrays[f"{prefix}.bias"])}


def _linear(dense: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  return {f"{prefix}.weight": np.asarray(dense["kernel"]).T,
          f"{prefix}.bias": np.asarray(dense["bias"])}
