"""Per-sample gradient inner products from layer inputs and output cotangents.

The ``"exact"`` method of :func:`ggr_jax.consistency.view_geometry`. A Flax method
interceptor records, for every ``nn.Dense``, ``nn.Conv`` and normalisation layer called
inside the loss function, the layer's input (convolutions: its patches; normalisation:
its normalised input) and adds a zero perturbation to its output, whose gradient is the
output cotangent of every row. With rows independent, row ``r``'s parameter gradient is

  kernel:  G_r = sum_p a_rp d_rp^T      (p: positions; one position for a dense layer)
  bias:    b_r = sum_p d_rp
  scale:   s_r = sum_p xhat_rp * d_rp   (normalisation layers)

and the inner product of two rows' kernel gradients is either ``sum_pq <a_ip, a_jq>
<d_ip, d_jq>`` (two ``P x P`` Gram matrices) or ``<G_i, G_j>`` with ``G`` formed
(``K x O``); the cheaper of the two is taken per layer (``P^2 (K + O)`` against
``P K O`` multiplications).
Everything is differentiable, second order included.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

PyTree = Any
Rows = jax.Array | slice  # a view's rows in the batch: indices, or a static slice


def _path(context) -> tuple[str, ...]:
  return tuple(context.module.path)


def _kind(module: nn.Module) -> str | None:
  if isinstance(module, nn.Dense):
    return "dense"
  if isinstance(module, nn.Conv):
    return "conv"
  if callable(getattr(module, "batch_statistics", None)) and callable(
      getattr(module, "normalize", None)):
    return "norm"
  return None


def _conv_padding(module: nn.Conv, spatial: int):
  pad = module.padding
  if isinstance(pad, str):
    if pad.upper() not in ("SAME", "VALID"):
      raise ValueError(f"exact per-sample geometry: conv {'/'.join(module.path)} uses padding "
                       f"{pad!r}; only SAME, VALID or explicit pairs are supported (use "
                       "method='vmap').")
    return pad.upper()
  if isinstance(pad, int):
    return [(pad, pad)] * spatial
  return [(p, p) if isinstance(p, int) else tuple(p) for p in pad]


def _tuple(value, spatial: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * spatial
  return (value,) * spatial if isinstance(value, int) else tuple(value)


def _conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
  """``(N, positions, kh*kw*cin)``: the receptive field of every output position.

  2-D convolutions without input dilation gather the ``kh * kw`` shifted windows of the
  padded input (copies, no multiplications); others use
  ``lax.conv_general_dilated_patches``, a convolution with an identity kernel that costs
  ``kh*kw*cin`` times more multiplications than the layer itself.
  """
  if module.feature_group_count != 1:
    raise ValueError(f"exact per-sample geometry: conv {'/'.join(module.path)} has "
                     f"feature_group_count={module.feature_group_count}; use method='vmap'.")
  spatial = len(module.kernel_size)
  kernel, strides = tuple(module.kernel_size), _tuple(module.strides, spatial)
  dilation, input_dilation = _tuple(module.kernel_dilation, spatial), _tuple(
      module.input_dilation, spatial)
  padding = _conv_padding(module, spatial)
  if spatial == 2 and input_dilation == (1, 1):
    window = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    pads = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding) \
        if isinstance(padding, str) else padding
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = [(xp.shape[1 + i] - window[i]) // strides[i] + 1 for i in range(2)]
    windows = [xp[:, i * dilation[0]:i * dilation[0] + (out[0] - 1) * strides[0] + 1:strides[0],
                  j * dilation[1]:j * dilation[1] + (out[1] - 1) * strides[1] + 1:strides[1], :]
               for i in range(kernel[0]) for j in range(kernel[1])]
    return jnp.concatenate(windows, axis=-1).reshape(x.shape[0], out[0] * out[1], -1)
  letters = "HWD"[:spatial]
  dims = ("N" + letters + "C", letters + "IO", "N" + letters + "C")
  patches = jax.lax.conv_general_dilated_patches(
      x, kernel, strides, padding, lhs_dilation=input_dilation, rhs_dilation=dilation,
      dimension_numbers=dims)
  return patches.reshape(patches.shape[0], -1, patches.shape[-1])


def _positions(x: jax.Array) -> jax.Array:
  """``(N, ..., C) -> (N, positions, C)``."""
  return x.reshape(x.shape[0], -1, x.shape[-1])


def _record(losses_fn: Callable, params: PyTree, perturb: dict | None, layers: dict,
            arrays: dict):
  """Runs ``losses_fn`` under the recording interceptor.

  Without ``perturb`` (the shape pass) it fills ``layers`` with each layer's static
  description; with it, it adds ``perturb[path]`` to each layer's output and fills
  ``arrays`` with the inputs (dense, conv) and normalised inputs (normalisation).
  """

  def interceptor(next_fun, args, kwargs, context):
    kind = _kind(context.module)
    name = context.method_name
    if kind is None or name not in ("__call__", "normalize"):
      return next_fun(*args, **kwargs)
    path = _path(context)
    out = next_fun(*args, **kwargs)
    if name == "normalize":
      if perturb is not None:
        arrays.setdefault(path, {})["xhat"] = out
      return out
    if perturb is None:
      if path in layers:
        raise ValueError(f"exact per-sample geometry: layer {'/'.join(path)} is called "
                         "more than once in the loss function; use method='vmap'.")
      layers[path] = {"kind": kind, "module": context.module,
                      "out": jax.ShapeDtypeStruct(out.shape, out.dtype)}
      return out
    if kind in ("dense", "conv"):
      arrays.setdefault(path, {})["input"] = args[0] if args else kwargs["inputs"]
    return out + perturb[path]

  with nn.intercept_methods(interceptor):
    return losses_fn(params)


def _cross(u: jax.Array, v: jax.Array) -> jax.Array:
  """``(N, P, C) x (N, Q, C) -> (N, P, Q)`` Gram matrices of two rows' positions."""
  return jnp.einsum("npc,nqc->npq", u, v)


def _triple(u_w: jax.Array, u_s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(<u_w, u_s>, ||u_w||^2, ||u_s||^2)`` per row of two ``(N, ...)`` arrays."""
  axes = tuple(range(1, u_w.ndim))
  return (jnp.sum(u_w * u_s, axes), jnp.sum(u_w * u_w, axes), jnp.sum(u_s * u_s, axes))


def _kernel_triple(a_w, a_s, d_w, d_s):
  """The kernel gradients' triple, by Gram matrices or formed gradients, whichever takes
  fewer multiplications: ``P^2 (K + O)`` against ``P K O`` per row."""
  positions, k, o = a_w.shape[1], a_w.shape[2], d_w.shape[2]
  if positions * (k + o) <= k * o:
    return (jnp.sum(_cross(a_w, a_s) * _cross(d_w, d_s), axis=(1, 2)),
            jnp.sum(_cross(a_w, a_w) * _cross(d_w, d_w), axis=(1, 2)),
            jnp.sum(_cross(a_s, a_s) * _cross(d_s, d_s), axis=(1, 2)))
  return _triple(jnp.einsum("npk,npo->nko", a_w, d_w), jnp.einsum("npk,npo->nko", a_s, d_s))


def _kernel_part(layer: dict, x: jax.Array, d: jax.Array, rows_w: Rows, rows_s: Rows,
                 remat: bool):
  """The kernel's triple; a convolution's patches (``kh * kw`` times its input) are
  rebuilt in the backward rather than kept for it when ``remat``."""
  if layer["kind"] == "dense":
    return _kernel_triple(_positions(x[rows_w]), _positions(x[rows_s]), d[rows_w], d[rows_s])
  module = layer["module"]
  # the views' rows before the patches: the patches of other rows are never formed
  by_patches = lambda x_w, x_s, d_w, d_s: _kernel_triple(
      _conv_patches(module, x_w), _conv_patches(module, x_s), d_w, d_s)
  return (jax.checkpoint(by_patches) if remat else by_patches)(
      x[rows_w], x[rows_s], d[rows_w], d[rows_s])


def _layer_triple(layer: dict, arrays: dict, cot: jax.Array, scoped: dict[str, bool],
                  rows_w: Rows, rows_s: Rows, remat: bool) -> list:
  """The layer's contribution to ``(dot, sq_w, sq_s)`` (its scoped leaves only)."""
  dtype = jnp.promote_types(cot.dtype, jnp.float32)
  d = _positions(cot.astype(dtype))
  parts = []
  if layer["kind"] in ("dense", "conv") and scoped["kernel"]:
    parts.append(_kernel_part(layer, arrays["input"].astype(dtype), d, rows_w, rows_s, remat))
  if scoped["bias"]:
    b = jnp.sum(d, axis=1)
    parts.append(_triple(b[rows_w], b[rows_s]))
  if layer["kind"] == "norm" and scoped["scale"]:
    sc = jnp.sum(_positions(arrays["xhat"].astype(dtype)) * d, axis=1)
    parts.append(_triple(sc[rows_w], sc[rows_s]))
  return [sum(values) for values in zip(*parts)] if parts else []


def _scoped_leaves(mask: PyTree) -> dict[tuple[str, ...], bool]:
  flat, _ = jax.tree_util.tree_flatten_with_path(mask)
  return {tuple(str(getattr(k, "key", k)) for k in path): bool(m) for path, m in flat}


def view_geometry_from_layers(losses_fn: Callable, params: PyTree, mask: PyTree,
                              view_rows: tuple[Rows, Rows] | None, remat: bool = True
                              ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """``(dot, sq_w, sq_s, aux)`` per sample, exactly (see the module docstring), for
  ``losses_fn(params) -> ((loss_w, loss_s), aux)``; ``remat``: rebuild convolutions'
  patches in the backward (less memory, more time) rather than keep them."""
  layers: dict = {}
  jax.eval_shape(lambda p: _record(losses_fn, p, None, layers, {}), params)
  perturb = {path: jnp.zeros(e["out"].shape, e["out"].dtype) for path, e in layers.items()}

  def total(p, eps):
    arrays: dict = {}
    (loss_w, loss_s), aux = _record(losses_fn, p, eps, layers, arrays)
    return jnp.sum(loss_w) + jnp.sum(loss_s), (arrays, loss_w.shape[0], aux)

  cotangents, (arrays, batch, aux) = jax.grad(total, argnums=1, has_aux=True)(params, perturb)
  rows_w, rows_s = view_rows if view_rows is not None else (
      slice(0, batch), slice(batch, 2 * batch))

  scoped = _scoped_leaves(mask)
  covered = set()
  sums = [0.0, 0.0, 0.0]
  for path, layer in layers.items():
    leaves = {name: scoped.get((*path, name), False) for name in ("kernel", "bias", "scale")}
    covered |= {(*path, name) for name, on in leaves.items() if on}
    for n, value in enumerate(_layer_triple(layer, arrays.get(path, {}), cotangents[path],
                                            leaves, rows_w, rows_s, remat)):
      sums[n] = sums[n] + value
  missing = sorted("/".join(p) for p, on in scoped.items() if on and p not in covered)
  if missing:
    raise ValueError(
        "exact per-sample geometry covers nn.Dense, nn.Conv and normalisation layers "
        f"called once; these scoped parameters belong to none: {', '.join(missing)}. "
        "Use method='vmap' (any model) or narrow the scope.")
  return sums[0], sums[1], sums[2], aux
