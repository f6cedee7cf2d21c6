"""Semantics of ggr_jax.rectify: modes, scope, granularity, state, diagnostics, errors."""

from __future__ import annotations

import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ggr_jax
from ggr_jax import geometry, rectify_rules
from ggr_jax.rectify import PER_SAMPLE_MODES
from tests.conftest import TREE_SHAPES, random_tree

SUITE = list(itertools.product(range(len(TREE_SHAPES)), range(5)))
SUBSPACE = dict(subspace_dim=3)


def _flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def _grads(shape_id, seed, conflict=True):
  rng = np.random.default_rng(seed)
  g_sup = random_tree(rng, TREE_SHAPES[shape_id])
  g_aux = random_tree(rng, TREE_SHAPES[shape_id])
  if conflict:
    g_aux = jax.tree.map(lambda a, s: a - 2.0 * s, g_aux, g_sup)
  return g_sup, g_aux


def _apply(tx, g_sup, g_aux, state=None):
  state = tx.init(g_sup) if state is None else state
  return tx.update(g_sup, state, aux_grads=g_aux)


def _kwargs(mode):
  return SUBSPACE if mode in ("osr", "csr") else {}


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_vlr_rectified_aux_does_not_oppose_the_anchor(shape_id, seed):
  g_sup, g_aux = _grads(shape_id, seed)
  out, state = _apply(ggr_jax.rectify("vlr", aux_weight=0.7), g_sup, g_aux)
  aux_after = _flat(out) - _flat(g_sup)
  assert aux_after @ _flat(g_sup) >= -1e-5 * np.linalg.norm(aux_after) * np.linalg.norm(_flat(g_sup))
  assert float(optax.tree.get(state, "cos_before")) < 0
  assert float(optax.tree.get(state, "cos_after")) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_sum_is_the_weighted_sum(shape_id, seed):
  g_sup, g_aux = _grads(shape_id, seed)
  out, _ = _apply(ggr_jax.rectify("sum", aux_weight=0.3), g_sup, g_aux)
  np.testing.assert_allclose(_flat(out), _flat(g_sup) + 0.3 * _flat(g_aux), rtol=1e-6, atol=1e-6)
  out_c, _ = _apply(ggr_jax.combine(aux_weight=0.3), g_sup, g_aux)
  np.testing.assert_array_equal(_flat(out_c), _flat(out))


@pytest.mark.parametrize("conflict", [True, False])
@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_conflict_drop_zeroes_exactly_on_conflict(shape_id, seed, conflict):
  g_sup, g_aux = _grads(shape_id, seed, conflict)
  if not conflict:
    g_aux = jax.tree.map(lambda a, s: a + 2.0 * s, g_aux, g_sup)
  d = _flat(g_aux) @ _flat(g_sup)
  out, state = _apply(ggr_jax.rectify("conflict_drop"), g_sup, g_aux)
  expected = _flat(g_sup) if d < 0 else _flat(g_sup) + _flat(g_aux)
  np.testing.assert_allclose(_flat(out), expected, rtol=1e-6, atol=1e-6)
  assert float(optax.tree.get(state, "conflict")) == float(d < 0)


@pytest.mark.parametrize("shape_id,seed", SUITE)
def test_pcgrad_sym_projects_both_against_the_originals(shape_id, seed):
  g_sup, g_aux = _grads(shape_id, seed)
  out, _ = _apply(ggr_jax.rectify("pcgrad_sym", alpha=0.5), g_sup, g_aux)
  expected = (_flat(geometry.halfspace_project(g_sup, g_aux, 0.5))
              + _flat(geometry.halfspace_project(g_aux, g_sup, 0.5)))
  np.testing.assert_allclose(_flat(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero", ["aux", "anchor"])
@pytest.mark.parametrize("mode", ggr_jax.MODES)
def test_a_zero_input_passes_the_other_through(mode, zero):
  g_sup, g_aux = _grads(1, 0)
  if zero == "aux":
    g_aux = jax.tree.map(jnp.zeros_like, g_aux)
  else:
    g_sup = jax.tree.map(jnp.zeros_like, g_sup)
  out, state = _apply(ggr_jax.rectify(mode, **_kwargs(mode)), g_sup, g_aux)
  np.testing.assert_allclose(_flat(out), _flat(g_sup) + _flat(g_aux), rtol=1e-6)
  if zero == "aux":
    assert float(optax.tree.get(state, "aux_norm_kept")) == 1.0
  elif mode in ("osr", "csr"):  # the zero anchor was not stored as a direction
    assert int(state.basis_size) == 0 and int(state.tracker_skips) == 1


@pytest.mark.parametrize("seed", range(5))
def test_osr_output_is_orthogonal_to_every_direction(seed):
  rng = np.random.default_rng(seed)
  tx = ggr_jax.rectify("osr", subspace_dim=4)
  state = tx.init(random_tree(rng, TREE_SHAPES[2]))
  for _ in range(6):
    g_sup, g_aux = random_tree(rng, TREE_SHAPES[2]), random_tree(rng, TREE_SHAPES[2])
    out, state = tx.update(g_sup, state, aux_grads=g_aux)
    coeffs = geometry.basis_coefficients(
        jax.tree.map(jnp.subtract, out, g_sup), state.basis)
    np.testing.assert_allclose(coeffs, 0.0, atol=1e-5 * np.linalg.norm(_flat(g_aux)))


@pytest.mark.parametrize("seed", range(5))
def test_csr_output_has_non_negative_oriented_coefficients(seed):
  rng = np.random.default_rng(seed)
  tx = ggr_jax.rectify("csr", subspace_dim=3)
  state = tx.init(random_tree(rng, TREE_SHAPES[1]))
  for _ in range(5):
    g_sup, g_aux = _grads(1, int(rng.integers(1 << 30)))
    out, state = tx.update(g_sup, state, aux_grads=g_aux)
    coeffs = np.asarray(geometry.basis_coefficients(
        jax.tree.map(jnp.subtract, out, g_sup), state.basis))
    assert np.all(coeffs >= -1e-5 * np.linalg.norm(_flat(g_aux)))
    # the newest direction is oriented along the anchor, so that anchor is not opposed
    newest = jax.tree.map(lambda u: u[int(state.basis_size) - 1], state.basis)
    assert float(geometry.tree_vdot(newest, g_sup)) > 0


def test_csr_before_the_window_fills_equals_vlr_at_alpha_one():
  g_sup, g_aux = _grads(2, 3)
  out_csr, _ = _apply(ggr_jax.rectify("csr", subspace_dim=5), g_sup, g_aux)
  out_vlr, _ = _apply(ggr_jax.rectify("vlr"), g_sup, g_aux)
  np.testing.assert_allclose(_flat(out_csr), _flat(out_vlr), rtol=1e-5, atol=1e-5)


def test_global_and_per_leaf_granularity_differ_on_a_crafted_case():
  g_sup = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0, 0.0])}
  g_aux = {"a": jnp.array([-1.0, 1.0]), "b": jnp.array([5.0, 0.0])}  # global dot = +4
  out_g, st_g = _apply(ggr_jax.rectify("vlr"), g_sup, g_aux)
  out_l, st_l = _apply(ggr_jax.rectify("vlr", granularity="per_leaf"), g_sup, g_aux)
  np.testing.assert_allclose(out_g["a"], [0.0, 1.0])  # no global conflict: plain sum
  np.testing.assert_allclose(out_l["a"], [1.0, 1.0])  # leaf "a" conflicts on its own
  np.testing.assert_allclose(out_l["b"], out_g["b"])
  assert float(st_g.conflict) == 0.0 and float(st_l.conflict) == 0.5


def test_per_leaf_subspace_keeps_one_basis_per_leaf():
  g_sup = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 0.0, 2.0])}
  tx = ggr_jax.rectify("osr", subspace_dim=2, granularity="per_leaf")
  out, state = _apply(tx, g_sup, {"a": jnp.array([3.0, 1.0]), "b": jnp.array([1.0, 1.0, 1.0])})
  assert int(state.basis_size["a"]) == 1 and int(state.basis_size["b"]) == 1
  np.testing.assert_allclose(out["a"], [1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(out["b"], [1.0, 1.0, 2.0], atol=1e-6)


@pytest.mark.parametrize("scope_kind", ["tree", "callable", "prefix"])
def test_unscoped_leaves_get_the_plain_sum(scope_kind):
  g_sup = {"backbone": {"w": jnp.array([1.0, 0.0])}, "head": jnp.array([1.0, 0.0])}
  g_aux = {"backbone": {"w": jnp.array([-1.0, 1.0])}, "head": jnp.array([-1.0, 1.0])}
  scope = {
      "tree": {"backbone": {"w": True}, "head": False},
      "callable": lambda t: {"backbone": {"w": True}, "head": False},
      "prefix": ggr_jax.scope_from_prefix("backbone"),
  }[scope_kind]
  tx = ggr_jax.rectify("vlr", scope=scope, aux_weight=2.0)
  out, state = _apply(tx, g_sup, g_aux)
  np.testing.assert_allclose(out["backbone"]["w"], [1.0, 2.0])
  np.testing.assert_allclose(out["head"], [-1.0, 2.0])
  assert float(state.cos_before) == pytest.approx(-np.sqrt(0.5), rel=1e-6)  # scope only


def test_diagnostics_on_a_known_case():
  g_sup, g_aux = jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])
  _, state = _apply(ggr_jax.rectify("vlr"), g_sup, g_aux)
  assert float(optax.tree.get(state, "cos_before")) == pytest.approx(-np.sqrt(0.5))
  assert float(optax.tree.get(state, "cos_after")) == pytest.approx(0.0, abs=1e-7)
  assert float(optax.tree.get(state, "conflict")) == 1.0
  assert float(optax.tree.get(state, "aux_norm_kept")) == pytest.approx(np.sqrt(0.5))
  assert int(optax.tree.get(state, "count")) == 1


def test_subspace_interval_schedules_tracker_updates():
  tx = ggr_jax.rectify("osr", subspace_dim=5, subspace_interval=2)
  state = tx.init(jnp.zeros(6))
  sizes = []
  for i in range(5):
    _, state = tx.update(jnp.eye(6)[i], state, aux_grads=jnp.ones(6))
    sizes.append(int(state.basis_size))
  assert sizes == [1, 1, 2, 2, 3]  # refreshed on steps 0, 2, 4


@pytest.mark.parametrize("mode", ["vlr", "csr", "conflict_drop"])
@pytest.mark.parametrize("granularity", ["global", "per_leaf"])
def test_before_start_step_the_update_is_the_plain_sum_and_untracked(mode, granularity):
  g_sup, g_aux = _grads(2, 0)
  start = 3
  kwargs = dict(_kwargs(mode), granularity=granularity)
  late = jax.jit(ggr_jax.rectify(mode, start_step=start, **kwargs).update)
  plain, fresh = ggr_jax.rectify("sum"), ggr_jax.rectify(mode, **kwargs)
  state = ggr_jax.rectify(mode, start_step=start, **kwargs).init(g_sup)
  for _ in range(start):
    out, state = late(g_sup, state, aux_grads=g_aux)
    np.testing.assert_allclose(_flat(out), _flat(_apply(plain, g_sup, g_aux)[0]), rtol=1e-6)
    assert float(state.aux_norm_kept) == 1.0
    assert float(state.cos_before) < 0 and float(state.conflict) > 0  # the conflict is measured
    np.testing.assert_allclose(float(state.cos_after), float(state.cos_before), rtol=1e-6)
  if mode == "csr":
    assert jax.tree.leaves(state.basis_size) and all(
        int(n) == 0 for n in jax.tree.leaves(state.basis_size))
  # from start_step on: exactly what the rectifier does on its own first step
  out, state = late(g_sup, state, aux_grads=g_aux)
  np.testing.assert_allclose(_flat(out), _flat(_apply(fresh, g_sup, g_aux)[0]), rtol=1e-6)
  assert not np.allclose(_flat(out), _flat(_apply(plain, g_sup, g_aux)[0]))
  assert int(state.count) == start + 1


@pytest.mark.parametrize("mode", ggr_jax.MODES)
@pytest.mark.parametrize("where", ["sup", "aux"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_never_laundered(mode, where, bad):
  g_sup, g_aux = jnp.array([1.0, 0.0, 2.0]), jnp.array([-3.0, 1.0, 0.0])
  if where == "sup":
    g_sup = g_sup.at[0].set(bad)
  else:
    g_aux = g_aux.at[0].set(bad)
  out, _ = _apply(ggr_jax.rectify(mode, **_kwargs(mode)), g_sup, g_aux)
  assert not np.all(np.isfinite(out))


@pytest.mark.parametrize("mode", ["vlr", "conflict_drop", "csr"])
@pytest.mark.parametrize("where", ["sup", "aux"])
def test_apply_if_finite_after_the_rectifier_skips_a_non_finite_step(mode, where):
  """apply_if_finite checks its own input: placed after the rectifier it sees both."""
  params = {"w": jnp.ones(3)}
  tx = optax.chain(ggr_jax.rectify(mode, **_kwargs(mode)),
                   optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), max_consecutive_errors=5))
  state = tx.init(params)
  good = {"w": jnp.array([1.0, 0.0, 0.0])}
  bad = {"w": jnp.array([-jnp.inf, 0.0, 0.0])}
  g_sup, g_aux = (bad, good) if where == "sup" else (good, bad)
  updates, state = tx.update(g_sup, state, params, aux_grads=g_aux)
  np.testing.assert_array_equal(updates["w"], 0.0)
  assert int(optax.tree.get(state, "notfinite_count")) == 1
  updates, state = tx.update(good, state, params, aux_grads=good)
  np.testing.assert_allclose(updates["w"], [-0.2, 0.0, 0.0])  # momentum was not polluted
  assert int(optax.tree.get(state, "notfinite_count")) == 0


def test_apply_if_finite_around_the_chain_skips_a_non_finite_anchor():
  params = {"w": jnp.ones(3)}
  tx = optax.apply_if_finite(optax.chain(ggr_jax.rectify("vlr"), optax.sgd(0.1)), 5)
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([jnp.nan, 0.0, 0.0])}, state, params,
                             aux_grads={"w": jnp.ones(3)})
  np.testing.assert_array_equal(updates["w"], 0.0)
  assert int(state.notfinite_count) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="nope"), "Unknown rectification mode 'nope'"),
    (dict(mode="osr"), "needs subspace_dim > 0"),
    (dict(mode="csr", subspace_dim=-1), "subspace_dim must be >= 0"),
    (dict(mode="vlr", subspace_dim=4), "only used by modes 'osr' and 'csr'"),
    (dict(mode="osr", subspace_dim=4, subspace_interval=0), "subspace_interval must be >= 1"),
    (dict(mode="osr", subspace_dim=2.5), "must be an integer"),
    (dict(mode="vlr", basis_signs="lapack"), "basis_signs must be one of"),
    (dict(mode="vlr", granularity="per_row"), "granularity must be one of"),
    (dict(mode="vlr", alpha=-1.0), "alpha must be finite and >= 0"),
    (dict(mode="vlr", aux_weight=float("nan")), "aux_weight must be finite"),
    (dict(mode="vlr", start_step=-1), "start_step must be an integer >= 0"),
    (dict(mode="vlr", start_step=1.5), "start_step must be an integer"),
])
def test_bad_configuration_fails_at_construction(kwargs, match):
  mode = kwargs.pop("mode")
  with pytest.raises((ValueError, TypeError), match=match):
    ggr_jax.rectify(mode, **kwargs)


def test_every_mode_has_exactly_one_rule():
  assert tuple(rectify_rules.RULES) == ggr_jax.MODES
  assert set(rectify_rules.SAMPLE_RULES) == set(PER_SAMPLE_MODES)


def test_official_mode_aliases_are_accepted():
  g_sup, g_aux = _grads(0, 1)
  out_alias, _ = _apply(ggr_jax.rectify("PCGrad"), g_sup, g_aux)
  out_vlr, _ = _apply(ggr_jax.rectify("vlr"), g_sup, g_aux)
  np.testing.assert_array_equal(_flat(out_alias), _flat(out_vlr))


def test_mismatched_aux_structure_names_both_and_the_fix():
  tx = ggr_jax.rectify("vlr")
  g_sup = {"a": jnp.ones(2), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match="mask_compatible_extra_args=True") as info:
    tx.update(g_sup, tx.init(g_sup), aux_grads={"a": jnp.ones(2)})
  assert "'b'" in str(info.value) and "updates:" in str(info.value)
  with pytest.raises(ValueError, match="does not match the updates leaf"):
    tx.update(g_sup, tx.init(g_sup), aux_grads={"a": jnp.ones(2), "b": jnp.ones(4)})
  with pytest.raises(TypeError, match="aux_grads=g_aux"):
    tx.update(g_sup, tx.init(g_sup))


def test_bad_scope_structure_is_reported():
  tx = ggr_jax.rectify("vlr", scope={"a": True})
  with pytest.raises(ValueError, match="scope must be a pytree of bools"):
    tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
