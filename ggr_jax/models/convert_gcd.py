"""Conversion of EAGC's official SimGCD heads (PyTorch names) to :class:`GCDHead` params.

The official projector is ``nn.Sequential(MLP_Head, DINOHead)``: ``0.mlp.0`` (the
projection layer), ``1.mlp.{0,2,4}`` (the DINO MLP; GELUs at the odd indices),
``1.last_layer.weight_v`` ``[K, D]`` and ``1.last_layer.weight_g`` ``[K, 1]`` (frozen at
1). Linear ``weight`` ``[out, in]`` becomes ``kernel`` ``[in, out]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util


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


_VIT_LEAVES = {"weight": "kernel", "bias": "bias"}
_VIT_NORM_LEAVES = {"weight": "scale", "bias": "bias"}


def dino_vit_to_flax(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """:class:`ggr_jax.models.vit.VisionTransformer` params from a DINO ViT state dict
  (``blocks.3.attn.qkv.weight``, ``patch_embed.proj.weight``, ...; a ``head.*`` or
  ``backbone.`` prefix of a full DINO checkpoint is not accepted: pass the teacher's
  backbone, keys without prefix)."""
  params: dict[str, Any] = {}
  for name, value in arrays.items():
    value = np.asarray(value)
    parts = name.split(".")
    if name in ("cls_token", "pos_embed"):
      params[name] = value
    elif parts[0] == "patch_embed" and parts[1] == "proj":
      leaf = _VIT_LEAVES[parts[2]]
      params.setdefault("patch_embed", {})[leaf] = (
          value.transpose(2, 3, 1, 0) if leaf == "kernel" else value)
    elif parts[0] == "norm":
      params.setdefault("norm", {})[_VIT_NORM_LEAVES[parts[1]]] = value
    elif parts[0] == "blocks":
      block = params.setdefault(f"blocks_{parts[1]}", {})
      if parts[2] in ("norm1", "norm2"):
        block.setdefault(parts[2], {})[_VIT_NORM_LEAVES[parts[3]]] = value
      elif parts[2] in ("attn", "mlp"):
        node = block.setdefault("attn", {}) if parts[2] == "attn" else block
        leaf = _VIT_LEAVES[parts[4]]
        node.setdefault(parts[3], {})[leaf] = value.T if leaf == "kernel" else value
      else:
        raise ValueError(f"unknown DINO ViT parameter {name!r}")
    else:
      raise ValueError(f"unknown DINO ViT parameter {name!r} (expected the backbone's "
                       "state dict: cls_token, pos_embed, patch_embed.*, blocks.*, norm.*)")
  return params


def flax_to_dino_vit(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """DINO ViT state-dict names and layouts of :func:`dino_vit_to_flax`'s params (a
  classifier ``fc``, not part of DINO, is left out)."""
  out: dict[str, np.ndarray] = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value)
    head, leaf = path[0], path[-1]
    if head == "fc":
      continue
    if head in ("cls_token", "pos_embed"):
      out[head] = value
    elif head == "patch_embed":
      out[f"patch_embed.proj.{'weight' if leaf == 'kernel' else 'bias'}"] = (
          value.transpose(3, 2, 0, 1) if leaf == "kernel" else value)
    else:
      torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
      if head == "norm":
        out[f"norm.{torch_leaf}"] = value
        continue
      block = head.split("_")[1]
      inner = path[1:-1]
      module = ({"fc1": "mlp.fc1", "fc2": "mlp.fc2"}.get(inner[0], ".".join(inner)))
      out[f"blocks.{block}.{module}.{torch_leaf}"] = value.T if leaf == "kernel" else value
  return out


DINO_DOWNLOAD = ("https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
                 "dino_vitbase16_pretrain.pth")


def load_dino_checkpoint(path: str | Path) -> dict[str, Any]:
  """:func:`dino_vit_to_flax` params from a DINO checkpoint file the user brings.

  ``.pth`` (read with PyTorch, CPU): a plain state dict, or a full DINO training
  checkpoint whose ``teacher`` entry holds ``backbone.*`` keys (the ``head.*`` of the
  DINO projection head is dropped), as the official GCD code loads it. ``.npz``: the same
  names as arrays (e.g. written once with ``numpy.savez`` where PyTorch is installed).
  Nothing is downloaded.

  Raises:
    FileNotFoundError: the file is missing (the message names the path and where to get
      DINO's weights).
    ImportError: a ``.pth`` file without PyTorch installed.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"DINO checkpoint {path} not found; download {DINO_DOWNLOAD} (or the ViT-S/16 "
        "file dino_deitsmall16_pretrain.pth) from github.com/facebookresearch/dino and "
        "point model.pretrained at it.")
  if path.suffix == ".npz":
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
  else:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError(
          f"reading {path} needs PyTorch (pip install torch), or convert it once where "
          "PyTorch is installed: numpy.savez(out.npz, **{k: v.numpy() for k, v in "
          "state_dict.items()}) and pass the .npz.") from None
    state = torch.load(path, map_location="cpu")
    if isinstance(state, dict) and "teacher" in state:
      state = {k[len("backbone."):]: v for k, v in state["teacher"].items()
               if k.startswith("backbone.")}
    arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
  arrays = {k: v for k, v in arrays.items() if not k.startswith("head.")}
  return dino_vit_to_flax(arrays)
