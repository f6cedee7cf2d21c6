"""Golden values of the official rectifiers (../shared/vectors/public.npz), float64.

Every case that is not degenerate and has no ``None`` input is replayed twice: through
``ggr_jax.rectify(..., basis_signs="qr")`` over the case's supervised sequence, and
through the ``geometry`` functions on the stored official basis ``U``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ggr_jax
from ggr_jax import geometry
from tests.conftest import shared_file

VECTOR_MODES = ("vlr", "pcgrad_sym", "conflict_drop")


def _load_cases():
  z = np.load(shared_file("vectors", "public.npz"))
  cases = []
  for i in range(int(z["meta_num_cases"])):
    case = {f: z[f"case{i}_{f}"] for f in (
        "mode", "alpha", "kind", "k", "sup", "aux", "sup_seq", "U", "out_sup", "out_aux",
        "degenerate", "sup_is_none", "aux_is_none")}
    case["mode"], case["kind"] = str(case["mode"]), str(case["kind"])
    case["id"] = f"case{i}-{case['mode']}-{case['kind']}"
    cases.append(case)
  return cases


@pytest.fixture(scope="module")
def cases():
  return _load_cases()


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def _usable(case) -> bool:
  return not (bool(case["degenerate"]) or bool(case["sup_is_none"]) or bool(case["aux_is_none"]))


def _assert_close(actual, expected, what):
  actual, expected = np.asarray(actual), np.asarray(expected)
  tol = 1e-10 * max(1.0, float(np.max(np.abs(expected))))
  err = float(np.max(np.abs(actual - expected)))
  assert err <= tol, f"{what}: max |diff| {err:.3e} > tol {tol:.3e}"


def _replay(tx, sup_seq, aux_rows):
  """Feeds sup_seq[:-1] with zero aux, then the last sup with each aux row from one state."""
  update = jax.jit(lambda g, s, a: tx.update(g, s, aux_grads=a))
  state = tx.init(jnp.asarray(sup_seq[0]))
  for sup in sup_seq[:-1]:
    _, state = update(jnp.asarray(sup), state, jnp.zeros_like(jnp.asarray(sup)))
  outs = [update(jnp.asarray(sup_seq[-1]), state, jnp.asarray(a)) for a in aux_rows]
  return [o[0] for o in outs], outs[-1][1]


def test_vector_cases_match_through_rectify(cases):
  checked = 0
  for case in filter(_usable, cases):
    if case["mode"] not in VECTOR_MODES:
      continue
    tx = ggr_jax.rectify(case["mode"], alpha=float(case["alpha"]))
    sup = jnp.asarray(case["sup"])
    state = tx.init(sup)
    for row, aux in enumerate(case["aux"]):
      out, _ = tx.update(sup, state, aux_grads=jnp.asarray(aux))
      _assert_close(out, case["out_sup"][row] + case["out_aux"][row], f"{case['id']} row {row}")
      checked += 1
  assert checked >= 200, checked


def test_vector_cases_match_through_geometry(cases):
  for case in filter(_usable, cases):
    if case["mode"] not in ("vlr", "pcgrad_sym"):
      continue
    alpha, sup = float(case["alpha"]), jnp.asarray(case["sup"])
    for row, aux in enumerate(case["aux"]):
      aux = jnp.asarray(aux)
      _assert_close(geometry.halfspace_project(aux, sup, alpha), case["out_aux"][row],
                    f"{case['id']} aux row {row}")
      if case["mode"] == "pcgrad_sym":
        _assert_close(geometry.halfspace_project(sup, aux, alpha), case["out_sup"][row],
                      f"{case['id']} sup row {row}")


def _subspace_cases(cases):
  return [c for c in cases if _usable(c) and c["mode"] in ("osr", "csr")]


def test_subspace_cases_match_through_rectify_qr(cases):
  subspace = _subspace_cases(cases)
  assert len(subspace) >= 30
  for case in subspace:
    k = int(case["k"])
    tx = ggr_jax.rectify(case["mode"], alpha=float(case["alpha"]), subspace_dim=k,
                         basis_signs="qr")
    outs, state = _replay(tx, case["sup_seq"], case["aux"])
    for row, out in enumerate(outs):
      _assert_close(out, case["out_sup"][row] + case["out_aux"][row], f"{case['id']} row {row}")
    r = case["U"].shape[1]
    assert int(state.basis_size) == r
    _assert_close(np.asarray(state.basis)[:r].T, case["U"], f"{case['id']} basis")


def test_subspace_cases_match_through_geometry_on_official_basis(cases):
  for case in _subspace_cases(cases):
    basis = jnp.asarray(case["U"].T)
    project = geometry.orthogonal_project if case["mode"] == "osr" else geometry.conic_project
    for row, aux in enumerate(case["aux"]):
      _assert_close(project(jnp.asarray(aux), basis), case["out_aux"][row], f"{case['id']} row {row}")


def test_oriented_basis_spans_the_official_subspace(cases):
  """'oriented' differs from the official basis only by column signs: osr is identical."""
  for case in _subspace_cases(cases):
    k = int(case["k"])
    tx = ggr_jax.rectify("osr", subspace_dim=k)
    outs, state = _replay(tx, case["sup_seq"], case["aux"])
    r = case["U"].shape[1]
    oriented = np.asarray(state.basis)[:r]
    np.testing.assert_allclose(np.abs(oriented @ case["U"]), np.eye(r), atol=1e-10)
    if case["mode"] == "osr":
      for row, out in enumerate(outs):
        _assert_close(out, case["out_sup"][row] + case["out_aux"][row], f"{case['id']} row {row}")
