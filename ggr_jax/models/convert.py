"""Conversion between official PyTorch weights (GGR-IOMatch, SemiMeta) and Flax variables.

The official ``GGRIOMatchNet(wrn_28_2(K))`` names (``named_parameters()`` and
``named_buffers()``) map onto ``OpenSetNet(WideResNet(K), K, head="iomatch")``:

* module path: ``.`` becomes a Flax path separator and an index joins its parent
  module (``backbone.block1.layer.0.bn1`` -> ``backbone/block1/layer_0/bn1``,
  ``mlp_proj.2`` -> ``mlp_proj_2``);
* conv ``weight`` (OIHW) -> ``kernel`` (HWIO), Linear ``weight`` ``[out, in]`` ->
  ``kernel`` ``[in, out]``, BatchNorm ``weight`` -> ``scale``, ``bias`` -> ``bias``;
* buffers ``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``;
  ``num_batches_tracked`` is accepted and dropped (the momentum is fixed, so
  PyTorch never reads it).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from ggr_jax.models.heads import OpenSetNet
from ggr_jax.models.wrn import WideResNet

PARAM_PREFIX = "param/"
BUFFER_PREFIX = "buffer/"
_BUFFER_LEAVES = {"running_mean": "mean", "running_var": "var"}
_COUNT_LEAF = "num_batches_tracked"
_INDEXED = re.compile(r"^(.*[^_])_(\d+)$")

Path = tuple[str, ...]


def _flax_module(module: str) -> Path:
  """``backbone.block1.layer.0.bn1`` -> ``("backbone", "block1", "layer_0", "bn1")``."""
  out: list[str] = []
  for part in module.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def _official_module(path: Path) -> str:
  """Inverse of :func:`_flax_module`."""
  return ".".join(_INDEXED.sub(r"\1.\2", part) for part in path)


def official_name(collection: str, path: Path) -> str:
  """The official PyTorch name of the Flax leaf ``path`` in ``collection``.

  ``official_name("params", ("backbone", "block1", "layer_0", "conv1", "kernel"))``
  is ``"backbone.block1.layer.0.conv1.weight"``.
  """
  *module, leaf = path
  if collection == "params":
    name = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf)
  elif collection == "batch_stats":
    name = {"mean": "running_mean", "var": "running_var"}.get(leaf)
  else:
    name = None
  if name is None:
    raise KeyError(f"No official counterpart for {collection}/{'/'.join(path)}.")
  return f"{_official_module(tuple(module))}.{name}"


def _to_flax_layout(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """(flax leaf name, array in flax layout) for an official parameter leaf."""
  if leaf == "bias":
    return "bias", value
  if value.ndim == 4:
    return "kernel", value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return "kernel", value.T
  if value.ndim == 1:
    return "scale", value
  raise ValueError(f"Cannot convert a weight of shape {value.shape}.")


def _to_official_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  """Array in official layout for a Flax parameter leaf."""
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def _split_key(key: str) -> tuple[str | None, str]:
  """(``"param"``/``"buffer"``/None for bare, bare name) of an input key."""
  if key.startswith(PARAM_PREFIX):
    return "param", key[len(PARAM_PREFIX):]
  if key.startswith(BUFFER_PREFIX):
    return "buffer", key[len(BUFFER_PREFIX):]
  return None, key


def default_model(num_classes: int = 6) -> OpenSetNet:
  """The model the official weights describe: ``OpenSetNet(WideResNet(K), K, "iomatch")``."""
  return OpenSetNet(WideResNet(num_classes), num_classes, head="iomatch")


def _template(model: nn.Module, in_channels: int) -> dict[tuple[str, ...], Any]:
  """Flat ``{(collection, *path): ShapeDtypeStruct}`` of the model's variables."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, in_channels)), train=False))
  return traverse_util.flatten_dict(dict(shapes))


def official_to_flax(arrays: Mapping[str, np.ndarray], *, model: nn.Module | None = None,
                     dtype: Any = None, in_channels: int | None = None) -> dict[str, Any]:
  """Flax variables ``{"params", "batch_stats"}`` from official PyTorch arrays.

  Args:
    arrays: official names, either prefixed as in the parity npz
      (``param/<name>``, ``buffer/<name>``) or bare (``<name>``; buffers are
      recognised by their ``running_mean``/``running_var``/``num_batches_tracked``
      leaf). Other keys are an error.
    model: the Flax model to fill (default: :func:`default_model` with ``K`` read
      from ``backbone.fc.weight``).
    dtype: cast every array to this dtype (default: keep the input dtypes).
    in_channels: the model's input channels (default: read from ``backbone.conv1.weight``,
      else 3).

  Returns:
    Nested dicts of numpy arrays, ready for ``model.apply``.

  Raises:
    KeyError: naming every missing and unexpected official key.
    ValueError: naming every key whose shape does not fit the model.
  """
  converted: dict[tuple[str, ...], np.ndarray] = {}
  source: dict[tuple[str, ...], str] = {}
  unexpected: list[str] = []
  for key, value in arrays.items():
    kind, name = _split_key(key)
    module, _, leaf = name.rpartition(".")
    is_buffer = leaf in _BUFFER_LEAVES or leaf == _COUNT_LEAF
    if not module or (kind == "param" and is_buffer) or (kind == "buffer" and not is_buffer) or (
        not is_buffer and leaf not in ("weight", "bias")):
      unexpected.append(key)
      continue
    if leaf == _COUNT_LEAF:
      continue
    value = np.asarray(value)
    if dtype is not None:
      value = value.astype(dtype)
    if is_buffer:
      flat = ("batch_stats", *_flax_module(module), _BUFFER_LEAVES[leaf])
    else:
      flax_leaf, value = _to_flax_layout(leaf, value)
      flat = ("params", *_flax_module(module), flax_leaf)
    if flat in converted:
      unexpected.append(f"{key} (duplicate of {source[flat]})")
      continue
    converted[flat], source[flat] = np.ascontiguousarray(value), key

  if model is None:
    fc = arrays.get("backbone.fc.weight", arrays.get(PARAM_PREFIX + "backbone.fc.weight"))
    model = default_model(6 if fc is None else int(np.shape(fc)[0]))
  if in_channels is None:
    stem = arrays.get("backbone.conv1.weight",
                      arrays.get(PARAM_PREFIX + "backbone.conv1.weight"))
    in_channels = 3 if stem is None else int(np.shape(stem)[1])
  template = _template(model, in_channels)

  missing = [official_name(flat[0], flat[1:]) for flat in template if flat not in converted]
  unexpected += [source[flat] for flat in converted if flat not in template]
  if missing or unexpected:
    raise KeyError(
        f"official_to_flax: {len(missing)} missing and {len(unexpected)} unexpected keys for "
        f"{type(model).__name__}.\n  missing: {sorted(missing)}\n  unexpected: {sorted(unexpected)}")
  bad = [f"{source[flat]}: {converted[flat].shape} -> {tuple(template[flat].shape)} expected"
         for flat in template if converted[flat].shape != tuple(template[flat].shape)]
  if bad:
    raise ValueError("official_to_flax: shape mismatch (shapes in Flax layout):\n  "
                     + "\n  ".join(bad))
  return traverse_util.unflatten_dict({flat: converted[flat] for flat in template})


def flax_to_official(tree: Mapping[str, Any], collection: str = "params") -> dict[str, np.ndarray]:
  """``{official name: numpy array in official layout}`` for a Flax tree.

  ``tree`` is one collection (``params``, or a params-shaped gradient, or
  ``batch_stats``), named by ``collection``. Works as the reverse name map:
  ``flax_to_official(grads)["backbone.fc.weight"]`` is the fc weight gradient
  in PyTorch's ``[out, in]`` layout.
  """
  out = {}
  for path, value in traverse_util.flatten_dict(dict(tree)).items():
    out[official_name(collection, path)] = _to_official_layout(path[-1], np.asarray(value))
  return out


# SemiMeta's ConvLarge (``block<i>.<j>`` at the top level, classifier ``classifier.0``)
_SEMIMETA_CLASSIFIER = "classifier.0."


def semimeta_to_flax(arrays: Mapping[str, np.ndarray], num_classes: int, *,
                     dtype: Any = None) -> dict[str, Any]:
  """Flax variables of ``build_model("convlarge", K)`` from official SemiMeta ConvLarge
  arrays (bare ``named_parameters()``/``named_buffers()`` names, PyTorch layout).

  The official top-level modules move under ``backbone`` and ``classifier.0`` becomes
  ``fc``; everything else is :func:`official_to_flax`.
  """
  from ggr_jax.models import build_model  # pylint: disable=import-outside-toplevel

  renamed = {}
  for name, value in arrays.items():
    if name.startswith(_SEMIMETA_CLASSIFIER):
      name = "fc." + name[len(_SEMIMETA_CLASSIFIER):]
    renamed["backbone." + name] = value
  weight = arrays.get("block1.0.weight")
  return official_to_flax(renamed, model=build_model("convlarge", num_classes), dtype=dtype,
                          in_channels=3 if weight is None else int(np.shape(weight)[1]))


def flax_to_semimeta(tree: Mapping[str, Any], collection: str = "params") -> dict[str, np.ndarray]:
  """Inverse of :func:`semimeta_to_flax` for one collection (or a params-shaped gradient):
  ``{official SemiMeta name: array in PyTorch layout}``."""
  out = {}
  for name, value in flax_to_official(tree, collection).items():
    name = name.removeprefix("backbone.")
    if name.startswith("fc."):
      name = _SEMIMETA_CLASSIFIER + name[len("fc."):]
    out[name] = value
  return out
