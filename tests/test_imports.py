"""``import ggr_jax`` needs only jax and optax; the Flax adapter loads on first access."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ggr_jax
from tests.conftest import REPO


def _fresh_python(code: str) -> subprocess.CompletedProcess:
  """Runs ``code`` in a new interpreter that imports the ggr_jax under test."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def test_core_imports_without_flax():
  code = ("import sys, ggr_jax\n"
          f"assert ggr_jax.__file__.startswith({str(REPO)!r}), ggr_jax.__file__\n"
          "import ggr_jax.geometry, ggr_jax.per_sample, ggr_jax.rectify_rules\n"
          "ggr_jax.rectify('vlr')\n"
          "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'flax')\n"
          "assert not loaded, loaded\n")
  proc = _fresh_python(code)
  assert proc.returncode == 0, proc.stderr


def test_train_state_adapter_loads_flax_on_first_access():
  code = ("import sys, ggr_jax\n"
          "assert 'flax' not in sys.modules\n"
          "assert 'RectifiedTrainState' in ggr_jax.__all__\n"
          "cls = ggr_jax.RectifiedTrainState\n"
          "from ggr_jax import RectifiedTrainState\n"
          "from ggr_jax.interop import RectifiedTrainState as direct\n"
          "from flax.training import train_state\n"
          "assert cls is RectifiedTrainState is direct\n"
          "assert issubclass(cls, train_state.TrainState)\n"
          "assert 'RectifiedTrainState' in dir(ggr_jax)\n")
  proc = _fresh_python(code)
  assert proc.returncode == 0, proc.stderr


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_name"):
    getattr(ggr_jax, "no_such_name")
