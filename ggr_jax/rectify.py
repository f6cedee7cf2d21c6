"""Geometric Gradient Rectification as optax gradient transformations.

:func:`rectify` takes the supervised gradient as ``updates`` (the optax convention)
and the auxiliary gradient as the extra keyword argument ``aux_grads``, moves the
auxiliary gradient into an admissible region around the supervised anchor, and
returns ``g_sup' + aux_weight * g_aux'`` for the next transformation in the chain.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ggr_jax import geometry
from ggr_jax import rectify_rules as rules

PyTree = Any
Scope = Union[None, PyTree, Callable[[PyTree], PyTree]]

MODES = ("sum", "vlr", "osr", "csr", "pcgrad_sym", "conflict_drop")
SUBSPACE_MODES = ("osr", "csr")
GRANULARITIES = ("global", "per_leaf", "per_sample")
PER_SAMPLE_MODES = ("sum", "vlr", "osr", "csr")
BASIS_SIGNS = ("oriented", "qr")

# Names the official code accepts (``normalize_surgery_mode``), for porting configs.
MODE_ALIASES = {
    "pcgrad": "vlr",
    "pcgrad_asym": "vlr",
    "subspace_orth": "osr",
    "subspace_signed": "csr",
    "pcgrad_symmetric": "pcgrad_sym",
    "pcgrad_standard": "pcgrad_sym",
    "conflictdrop": "conflict_drop",
    "drop_aux": "conflict_drop",
}


class RectifyState(NamedTuple):
  """State of :func:`rectify`; every field is readable with ``optax.tree.get``.

  Attributes:
    count: number of updates applied so far (int32).
    basis: the subspace directions: the params tree with a leading axis ``k`` on
      every scoped leaf and ``optax.MaskedNode()`` elsewhere; ``None`` when
      ``subspace_dim == 0``.
    basis_size: valid directions in ``basis`` (int32; with ``per_leaf`` a tree of
      them shaped like ``basis``).
    tracker_skips: tracker inputs skipped as degenerate so far (int32).
    cos_before: cosine of ``<aux_weight * g_aux, g_sup>`` over the scope, before.
    cos_after: cosine between the rectified supervised and auxiliary gradients.
    conflict: fraction of blocks whose inner product was negative (global
      granularity: 0 or 1).
    aux_norm_kept: ``||rectified aux|| / ||aux||`` over the scope (1 for zero aux).
  """

  count: jax.Array
  basis: PyTree
  basis_size: PyTree
  tracker_skips: jax.Array
  cos_before: jax.Array
  cos_after: jax.Array
  conflict: jax.Array
  aux_norm_kept: jax.Array


def _concrete_int(value: Any, name: str) -> int | None:
  """``value`` as a Python int, or None when it is traced (inject_hyperparams under jit)."""
  try:
    as_float = float(value)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None
  except TypeError as err:
    raise TypeError(f"{name} must be an integer, got {value!r}.") from err
  if as_float != int(as_float):
    raise TypeError(f"{name} must be an integer, got {value!r}.")
  return int(as_float)


def _check_nonnegative(value: Any, name: str) -> None:
  """Validates concrete hyperparameters; traced ones (schedules) pass through."""
  try:
    arr = np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    return  # a traced (scheduled) value is checked by nobody: schedules own their range
  if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"{name} must be a real scalar, got {value!r}.")
  if not (np.isfinite(arr) and arr >= 0):
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")


def _canonical_mode(mode: str) -> str:
  if not isinstance(mode, str):
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  name = MODE_ALIASES.get(mode.lower(), mode.lower())
  if name not in MODES:
    raise ValueError(
        f"Unknown rectification mode {mode!r}. Valid modes: {', '.join(MODES)} "
        f"(official aliases {', '.join(sorted(MODE_ALIASES))} are accepted too).")
  return name


def _scope_mask(scope: Scope, tree: PyTree) -> list[bool]:
  """The scope as one Python bool per leaf of ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  if scope is None:
    return [True] * len(leaves)
  mask = scope(tree) if callable(scope) else scope
  try:
    mask_leaves = treedef.flatten_up_to(mask)
  except (ValueError, TypeError) as err:
    raise ValueError(
        "rectify: scope must be a pytree of bools with the structure of the gradients "
        f"(or a callable returning one).\n  gradients: {treedef}\n  scope: "
        f"{jax.tree.structure(mask)}") from err
  try:
    return [bool(m) for m in mask_leaves]
  except jax.errors.ConcretizationTypeError as err:
    raise TypeError("rectify: scope leaves must be static Python bools, not traced arrays.") from err


def _check_aux(updates: PyTree, aux_grads: PyTree) -> None:
  if aux_grads is None:
    raise TypeError(
        "rectify: missing auxiliary gradient. Call tx.update(g_sup, state, params, "
        "aux_grads=g_aux).")
  s_def, a_def = jax.tree.structure(updates), jax.tree.structure(aux_grads)
  if s_def != a_def:
    raise ValueError(
        "rectify: aux_grads must have the same tree structure as updates (the "
        f"supervised gradient).\n  updates:   {s_def}\n  aux_grads: {a_def}\n"
        "If the rectifier sits inside optax.masked, build it with "
        "optax.masked(inner, mask, mask_compatible_extra_args=True) so aux_grads is "
        "masked like updates.")
  for s, a in zip(jax.tree.leaves(updates), jax.tree.leaves(aux_grads)):
    if jnp.shape(s) != jnp.shape(a):
      raise ValueError(
          f"rectify: aux_grads leaf of shape {jnp.shape(a)} does not match the updates "
          f"leaf of shape {jnp.shape(s)}.")


class _Config(NamedTuple):
  """The validated settings of one :func:`rectify` transformation."""

  mode: str
  k: int  # subspace_dim
  alpha: Any
  aux_weight: Any
  scope: Scope
  interval: Any  # subspace_interval; traced under inject_hyperparams
  basis_signs: str
  granularity: str
  eps: Any
  span_tol: Any
  start_step: Any  # an int, or traced under inject_hyperparams


def _validate(mode: str, *, alpha: Any, aux_weight: Any, scope: Scope, subspace_dim: Any,
              subspace_interval: Any, basis_signs: str, granularity: str, eps: Any,
              span_tol: Any, start_step: Any = 0) -> _Config:
  """Checks the arguments of :func:`rectify`; returns them with the mode canonical."""
  mode = _canonical_mode(mode)
  k = _concrete_int(subspace_dim, "subspace_dim")
  if k is None:
    if mode in SUBSPACE_MODES:
      raise TypeError(
          f"subspace_dim must be a static Python int for mode {mode!r} (it fixes the "
          f"state's shapes), got a traced {subspace_dim!r}. With optax.inject_hyperparams "
          "pass static_args=('subspace_dim',).")
    k = 0  # traced by inject_hyperparams; init (concrete) already validated it
  concrete_interval = _concrete_int(subspace_interval, "subspace_interval")
  if k < 0:
    raise ValueError(f"subspace_dim must be >= 0, got {k}.")
  if concrete_interval is not None and concrete_interval < 1:
    raise ValueError(f"subspace_interval must be >= 1, got {concrete_interval}.")
  if mode in SUBSPACE_MODES and k == 0:
    raise ValueError(
        f"mode {mode!r} projects onto a subspace of recent supervised directions and "
        "needs subspace_dim > 0 (the paper uses 10). The official code silently "
        "applies no rectification here.")
  if mode not in SUBSPACE_MODES and k > 0:
    raise ValueError(
        f"subspace_dim={k} is only used by modes 'osr' and 'csr', not {mode!r}; "
        "set subspace_dim=0 (tracking a subspace nobody reads costs a QR per step in "
        "the official code).")
  if basis_signs not in BASIS_SIGNS:
    raise ValueError(f"basis_signs must be one of {BASIS_SIGNS}, got {basis_signs!r}.")
  if granularity not in GRANULARITIES:
    raise ValueError(
        f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  if granularity == "per_sample" and mode not in PER_SAMPLE_MODES:
    raise ValueError(
        f"granularity='per_sample' supports modes {PER_SAMPLE_MODES}, not {mode!r}: its "
        "aggregate is not a function of the per-sample inner products alone.")
  _check_nonnegative(alpha, "alpha")
  _check_nonnegative(aux_weight, "aux_weight")
  _check_nonnegative(eps, "eps")
  if span_tol is not None:
    _check_nonnegative(span_tol, "span_tol")
  if scope is not None and not callable(scope):
    jax.tree.map(lambda m: None, scope)  # must be a pytree
  start = _concrete_int(start_step, "start_step")
  if start is not None and start < 0:
    raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}.")
  if start is None:  # traced by inject_hyperparams: compared with the count at run time
    start = start_step
  return _Config(mode=mode, k=k, alpha=alpha, aux_weight=aux_weight, scope=scope,
                 interval=subspace_interval, basis_signs=basis_signs,
                 granularity=granularity, eps=eps, span_tol=span_tol, start_step=start)


def _embed_directions(dots_fn: Callable, block: list[int], leaves: list, treedef) -> Callable:
  """Adapts a full-tree ``dots_fn`` to directions given on the block's leaves only."""

  def dots(directions: list) -> jax.Array:
    m = directions[0].shape[0]
    full = [jnp.zeros((m, *jnp.shape(x)), jnp.promote_types(x.dtype, jnp.float32)) for x in leaves]
    for leaf_dir, i in zip(directions, block):
      full[i] = leaf_dir
    return dots_fn(treedef.unflatten(full))

  return dots


def _init_state(cfg: _Config, params: PyTree) -> RectifyState:
  """The initial state: empty bases on the scoped leaves when ``k > 0``."""
  mask = _scope_mask(cfg.scope, params)
  leaves, treedef = jax.tree.flatten(params)
  zeros = jnp.zeros((), jnp.float32)
  basis = size = None
  if cfg.k > 0:
    basis = treedef.unflatten([
        geometry.empty_basis(p, cfg.k) if m else optax.MaskedNode()
        for p, m in zip(leaves, mask)
    ])
    if cfg.granularity != "per_leaf":
      size = jnp.zeros((), jnp.int32)
    else:
      size = treedef.unflatten(
          [jnp.zeros((), jnp.int32) if m else optax.MaskedNode() for m in mask])
  return RectifyState(
      count=jnp.zeros((), jnp.int32), basis=basis, basis_size=size,
      tracker_skips=jnp.zeros((), jnp.int32), cos_before=zeros, cos_after=zeros,
      conflict=zeros, aux_norm_kept=jnp.ones((), jnp.float32))


def _track(basis: list, size: jax.Array, g_sup: list, count: jax.Array, *, interval: Any,
           signs: str, eps: Any, span_tol: Any) -> tuple[list, jax.Array, jax.Array]:
  """Refreshes one block's basis with ``g_sup`` on steps where ``count % interval == 0``."""

  def refresh(operand):
    b, s = operand
    return tuple(geometry.subspace_update(b, s, g_sup, signs=signs, eps=eps, span_tol=span_tol))

  def keep(operand):
    b, s = operand
    return b, s, jnp.ones((), bool)

  return jax.lax.cond(count % interval == 0, refresh, keep, (basis, size))


def _update(cfg: _Config, updates: PyTree, state: RectifyState, aux_grads: PyTree,
            aux_sample_dots: Callable | None) -> tuple[PyTree, RectifyState]:
  """One update; before ``cfg.start_step`` the plain sum with the basis left alone."""
  _check_aux(updates, aux_grads)
  if isinstance(cfg.start_step, int) and cfg.start_step == 0:
    return _rectify_blocks(cfg, updates, state, aux_grads, aux_sample_dots)
  # the sum keeps the block layout of the state; per-sample inner products are not needed
  warmup = cfg._replace(mode="sum", granularity="global" if cfg.granularity == "per_sample"
                        else cfg.granularity)
  return jax.lax.cond(
      state.count >= cfg.start_step,
      lambda: _rectify_blocks(cfg, updates, state, aux_grads, aux_sample_dots),
      lambda: _rectify_blocks(warmup, updates, state, aux_grads, None, track=False))


def _rectify_blocks(cfg: _Config, updates: PyTree, state: RectifyState, aux_grads: PyTree,
                    aux_sample_dots: Callable | None, track: bool = True
                    ) -> tuple[PyTree, RectifyState]:
  """Tracks (if ``track``) and rectifies every block of the scoped leaves."""
  if cfg.granularity == "per_sample" and not callable(aux_sample_dots):
    raise TypeError(
        "granularity='per_sample' needs aux_sample_dots=fn, where fn(directions) returns "
        "the (B, m) inner products of each sample's auxiliary gradient with m directions "
        "(a params-shaped tree with a leading axis m); see ggr_jax.per_sample.sample_dots.")
  mask = _scope_mask(cfg.scope, updates)
  g_leaves, treedef = jax.tree.flatten(updates)
  a_leaves = treedef.flatten_up_to(aux_grads)
  dtype = geometry.compute_dtype(updates)
  weight = jnp.asarray(cfg.aux_weight, dtype)
  g_up = [g.astype(jnp.promote_types(g.dtype, jnp.float32)) for g in g_leaves]
  a_up = [weight * a.astype(jnp.promote_types(a.dtype, jnp.float32)) for a in a_leaves]
  out = [g + a for g, a in zip(g_up, a_up)]  # unscoped leaves: the plain sum

  scoped = [i for i, m in enumerate(mask) if m]
  blocks = [[i] for i in scoped] if cfg.granularity == "per_leaf" else [scoped]
  position = {i: p for p, i in enumerate(scoped)}  # leaf index -> basis leaf index
  basis_leaves = jax.tree.leaves(state.basis) if cfg.k > 0 else None
  size_leaves = jax.tree.leaves(state.basis_size) if cfg.k > 0 else None
  new_basis_leaves, new_sizes, skips = [], [], jnp.zeros((), jnp.int32)
  results = []
  for block_id, block in enumerate(blocks):
    g_s = [g_up[i] for i in block]
    a = [a_up[i] for i in block]
    basis = None
    if cfg.k > 0 and not track:
      new_basis_leaves.extend(basis_leaves[position[i]] for i in block)
      new_sizes.append(size_leaves[block_id])
    elif cfg.k > 0:
      basis, size, accepted = _track(
          [basis_leaves[position[i]] for i in block], size_leaves[block_id], g_s,
          state.count, interval=cfg.interval, signs=cfg.basis_signs, eps=cfg.eps,
          span_tol=cfg.span_tol)
      new_basis_leaves.extend(basis)
      new_sizes.append(size)
      skips = skips + (~accepted).astype(jnp.int32)
    dots = None
    if cfg.granularity == "per_sample":
      dots = _embed_directions(aux_sample_dots, block, g_leaves, treedef)
    res = rules.rectify_block(cfg.mode, g_s, a, basis, weight, dots, alpha=cfg.alpha,
                              eps=cfg.eps)
    results.append(res)
    for j, i in enumerate(block):
      out[i] = res.sup[j] + res.aux[j]

  new_updates = treedef.unflatten([o.astype(g.dtype) for o, g in zip(out, g_leaves)])
  return new_updates, _next_state(state, results, new_basis_leaves, new_sizes, skips, cfg.k)


def _next_state(state: RectifyState, results: list[rules.Block], basis_leaves: list,
                sizes: list, skips: jax.Array, k: int) -> RectifyState:
  """The state after one update: count, tracked bases and the diagnostics of ``results``."""
  tiny = jnp.finfo(jnp.float32).tiny

  def total(field):
    vals = [getattr(r, field) for r in results]
    return sum(vals[1:], vals[0]).astype(jnp.float32) if vals else jnp.zeros((), jnp.float32)

  def cosine(dot, sq1, sq2):
    return dot / jnp.maximum(jnp.sqrt(sq1) * jnp.sqrt(sq2), tiny)

  aux_sq = total("aux_sq")
  # one division under the root: XLA may turn a / sqrt(b) into an inexact a * rsqrt(b)
  kept = jnp.where(aux_sq > 0, jnp.sqrt(total("aux_sq_after") / jnp.maximum(aux_sq, tiny)),
                   1.0)
  conflict = (jnp.mean(jnp.stack([r.conflict for r in results]).astype(jnp.float32))
              if results else jnp.zeros((), jnp.float32))
  basis, basis_size = state.basis, state.basis_size
  if k > 0:
    it = iter(basis_leaves)
    basis = jax.tree.map(lambda _: next(it), state.basis)
    it_size = iter(sizes)
    basis_size = jax.tree.map(lambda _: next(it_size), state.basis_size)
  return RectifyState(
      count=optax.safe_increment(state.count),
      basis=basis,
      basis_size=basis_size,
      tracker_skips=state.tracker_skips + skips,
      cos_before=cosine(total("dot_before"), total("sup_sq"), aux_sq),
      cos_after=cosine(total("dot_after"), total("sup_sq_after"), total("aux_sq_after")),
      conflict=conflict,
      aux_norm_kept=kept.astype(jnp.float32))


def rectify(
    mode: str,
    *,
    alpha: Any = 1.0,
    aux_weight: Any = 1.0,
    scope: Scope = None,
    subspace_dim: int = 0,
    subspace_interval: int = 1,
    basis_signs: str = "oriented",
    granularity: str = "global",
    eps: float = 1e-12,
    span_tol: float | None = None,
    start_step: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Geometric Gradient Rectification of an auxiliary gradient against a supervised one.

  ``updates`` is the supervised gradient ``g_s``; the auxiliary gradient arrives as
  ``aux_grads=g_a`` (same tree structure). With ``a = aux_weight * g_a`` restricted
  to the scoped leaves (one block, or one block per leaf with
  ``granularity="per_leaf"``) and ``d = <a, g_s>``:

  =================  ======================================================
  ``sum``            ``a' = a``
  ``vlr``            ``a' = a - alpha * min(d, 0) / max(||g_s||^2, eps) * g_s``
  ``osr``            ``a' = a - U U^T a``
  ``csr``            ``a' = a - U min(U^T a, 0)``
  ``pcgrad_sym``     both projected against the other's original: ``g_s'`` by
                     the vlr rule with roles swapped, ``a'`` by the vlr rule
  ``conflict_drop``  ``a' = 0`` if ``d < 0`` else ``a``
  =================  ======================================================

  The output is ``g_s' + a'`` on scoped leaves and ``g_s + a`` elsewhere. ``U``
  holds the last ``subspace_dim`` supervised directions (see
  :func:`ggr_jax.geometry.subspace_update`), refreshed with the current ``g_s``
  before it is used, on steps where ``count % subspace_interval == 0`` (the first
  step included). ``alpha`` scales ``vlr`` and ``pcgrad_sym`` only, as in the
  official code. The conflict test is strict (``d == 0`` is no conflict).

  Non-finite input: when an inner product or squared norm of a block is not
  finite, that block gets the plain sum ``g_s + a``, which is itself non-finite, so
  NaN/Inf are never laundered into finite numbers. ``optax.apply_if_finite``
  placed after the rectifier (it checks the updates it receives) skips such a
  step. A non-finite ``g_s`` is also not fed to the tracker.

  Before ``start_step`` updates (``count < start_step``) the output is the plain sum
  ``g_s + a`` and the subspace is not tracked, as in the official GGR-OpenMatch, which
  rectifies only from OpenMatch's ``start_fix`` on. The diagnostics still measure the
  inputs (``cos_before``, ``conflict``; per-sample granularity reports the batch
  conflict there) and describe what was applied (``cos_after = cos_before``,
  ``aux_norm_kept = 1``).

  Args:
    mode: one of ``sum, vlr, osr, csr, pcgrad_sym, conflict_drop`` (official
      aliases such as ``pcgrad`` are accepted).
    alpha: projection step scale (schedulable with ``optax.inject_hyperparams``).
    aux_weight: weight of the auxiliary gradient (schedulable).
    scope: ``None`` (every leaf), a pytree of bools, or ``params -> bools``.
    subspace_dim: ``k`` directions for ``osr``/``csr`` (required > 0 there, 0
      otherwise).
    subspace_interval: refresh the subspace every this many steps (>= 1).
    basis_signs: ``"oriented"`` (default) or ``"qr"`` (official signs, for parity).
    granularity: ``"global"`` (one block), ``"per_leaf"`` (a block per leaf) or
      ``"per_sample"``: each sample's auxiliary gradient ``g_i`` (``g_a = sum_i g_i``)
      is rectified before the sum, from the inner products supplied by the extra
      argument ``aux_sample_dots`` (see :mod:`ggr_jax.per_sample`): ``vlr`` gives
      ``a - alpha * sum_i min(c_i, 0) / max(||g_s||^2, eps) * g_s`` with
      ``c_i = aux_weight * <g_i, g_s>``; ``csr`` removes ``U sum_i min(U^T g_i, 0)``;
      ``osr`` (linear) equals its batch form; ``conflict`` is then the fraction of
      conflicting samples.
    eps: clamp of squared norms in denominators.
    span_tol: tracker threshold for "inside the span" (default: dtype dependent).
    start_step: the first update that is rectified (an int >= 0; schedulable).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`RectifyState`.

  Example:
    >>> import jax.numpy as jnp, optax, ggr_jax
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax.chain(ggr_jax.rectify("vlr"), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> g_sup, g_aux = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([-1.0, 1.0])}
    >>> updates, state = tx.update(g_sup, state, params, aux_grads=g_aux)
    >>> updates["w"]
    Array([-0.1, -0.1], dtype=float32)
    >>> float(optax.tree.get(state, "cos_before"))
    -0.7071...
  """
  cfg = _validate(mode, alpha=alpha, aux_weight=aux_weight, scope=scope,
                  subspace_dim=subspace_dim, subspace_interval=subspace_interval,
                  basis_signs=basis_signs, granularity=granularity, eps=eps,
                  span_tol=span_tol, start_step=start_step)

  def init_fn(params: PyTree) -> RectifyState:
    return _init_state(cfg, params)

  def update_fn(updates: PyTree, state: RectifyState, params: PyTree = None, *,
                aux_grads: PyTree = None, aux_sample_dots: Callable | None = None,
                **extra_args: Any) -> tuple[PyTree, RectifyState]:
    del params, extra_args
    return _update(cfg, updates, state, aux_grads, aux_sample_dots)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def combine(aux_weight: Any = 1.0) -> optax.GradientTransformationExtraArgs:
  """``g_sup + aux_weight * g_aux`` with no projection (same interface and diagnostics).

  For users who partition parameters themselves, e.g. with ``optax.partition``.

  Example:
    >>> import jax.numpy as jnp, ggr_jax
    >>> tx = ggr_jax.combine(aux_weight=0.5)
    >>> g, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)), aux_grads=jnp.ones(2))
    >>> g
    Array([1.5, 1.5], dtype=float32)
  """
  return rectify("sum", aux_weight=aux_weight)


def scope_from_prefix(*prefixes: str) -> Callable[[PyTree], PyTree]:
  """A scope selecting leaves whose '/'-joined key path starts with a prefix.

  Mirrors the official ``surgery_scope='backbone'`` rule (``backbone.*`` names).

  Example:
    >>> import jax.numpy as jnp
    >>> scope_from_prefix("backbone")({"backbone": {"w": jnp.ones(1)}, "head": jnp.ones(1)})
    {'backbone': {'w': True}, 'head': False}
  """

  def mask(tree: PyTree) -> PyTree:
    def select(path, _):
      name = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))
                      for p in path)
      return any(name == p or name.startswith(p + "/") for p in prefixes)

    return jax.tree_util.tree_map_with_path(select, tree)

  return mask

