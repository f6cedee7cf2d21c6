"""Hypothesis-generated inputs for the half-space rule: scales from 1e-3 to 1e3, any sign."""

import numpy as np
from hypothesis import assume, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from ggr_jax import geometry

_floats = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)
_vectors = st.integers(1, 12).flatmap(
    lambda n: st.tuples(hnp.arrays(np.float32, n, elements=_floats),
                        hnp.arrays(np.float32, n, elements=_floats)))


@settings(max_examples=150, deadline=None)
@given(_vectors, st.floats(0.0, 1.0))
@example((np.array([-1.9186197e-36], np.float32), np.array([164.0], np.float32)), 1.0)
def test_halfspace_never_increases_the_conflict(pair, alpha):
  src, ref = pair
  out = np.asarray(geometry.halfspace_project(src, ref, alpha), np.float64)
  s, r = src.astype(np.float64), ref.astype(np.float64)
  d_before, d_after = s @ r, out @ r
  # round-off, and the coefficient d / ||r||^2: below float32's smallest normal XLA's CPU
  # flushes it to zero, leaving a conflict of up to tiny * ||r||^2 unprojected
  slack = 1e-4 * (np.linalg.norm(s) * np.linalg.norm(r) + 1e-30) \
      + np.finfo(np.float32).tiny * (r @ r)
  if d_before >= 0:
    np.testing.assert_array_equal(out, src)  # no conflict: untouched
  elif r @ r >= 1e-12:
    assert d_after >= (1 - alpha) * d_before - slack  # conflict shrinks by (1 - alpha)
    assert d_after <= slack


@settings(max_examples=100, deadline=None)
@given(_vectors)
def test_halfspace_is_idempotent_for_alpha_one(pair):
  src, ref = pair
  assume(float(ref.astype(np.float64) @ ref) >= 1e-6)  # below eps the clamp breaks it
  once = geometry.halfspace_project(src, ref)
  twice = geometry.halfspace_project(once, ref)
  scale = 1e-5 * (np.abs(np.asarray(src)).max() + 1.0)
  np.testing.assert_allclose(twice, once, atol=scale * 10)
