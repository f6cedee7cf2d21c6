"""``import ggr_jax`` needs only jax and optax; the Flax adapter loads on first access."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
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


def _lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
  """``lint-imports`` with this repository's contracts, on the ggr_jax package under ``root``."""
  env = dict(os.environ, PYTHONPATH=str(root))
  script = ("import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())")
  return subprocess.run([sys.executable, "-c", script, "--config", str(REPO / "pyproject.toml"),
                         "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


def test_the_import_layers_hold():
  pytest.importorskip("importlinter")
  proc = _lint_imports(REPO)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "1 kept, 0 broken" in proc.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path):
  pytest.importorskip("importlinter")
  shutil.copytree(REPO / "ggr_jax", tmp_path / "ggr_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  geometry = tmp_path / "ggr_jax" / "geometry.py"
  geometry.write_text(geometry.read_text() + "\nfrom ggr_jax.train import loop  # noqa\n")
  proc = _lint_imports(tmp_path)
  assert proc.returncode != 0
  assert "ggr_jax.geometry -> ggr_jax.train.loop" in proc.stdout, proc.stdout


def test_only_the_top_layers_import_the_configs():
  allowed = {"cli.py", "bench.py", "sweep"}
  for path in sorted((REPO / "ggr_jax").rglob("*.py")):
    if path.relative_to(REPO / "ggr_jax").parts[0] in allowed:
      continue
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [f"{node.module}.{a.name}" for a in node.names]
               if isinstance(node, ast.ImportFrom) and node.module else [])
      assert not any(n.startswith("ggr_jax.configs") for n in names), (path, names)


def test_the_allocator_setting_takes_on_glibc_and_can_be_declined(monkeypatch):
  import ctypes  # pylint: disable=import-outside-toplevel
  from ggr_jax import allocator  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(allocator.OPT_OUT, "system")
  assert allocator.retain_freed_memory() is False
  monkeypatch.delenv(allocator.OPT_OUT)
  try:
    ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    pytest.skip("not glibc")
  assert allocator.retain_freed_memory() is True
