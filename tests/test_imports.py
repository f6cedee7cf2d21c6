"""``import ggr_jax`` needs only jax and optax; the Flax adapter loads on first access."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
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


def test_the_suite_compiles_convolutions_to_eigen_not_ynnpack():
  import jax  # pylint: disable=import-outside-toplevel
  from ggr_jax import xla_flags  # pylint: disable=import-outside-toplevel
  if not xla_flags.xla_knows_flag(xla_flags.YNN_FUSION_FLAG):
    pytest.skip("this XLA has no YNN fusions")
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  hlo = conv.lower(jax.numpy.ones((2, 8, 8, 4)), jax.numpy.ones((3, 3, 4, 4))).compile()
  assert "__ynn_fusion" not in hlo.as_text()


def test_the_convolution_setting_yields_to_the_users_flags(monkeypatch):
  from ggr_jax import xla_flags  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(xla_flags, "backend_started", lambda: False)
  monkeypatch.setattr(xla_flags, "xla_knows_flag", lambda name: True)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert xla_flags.use_eigen_convolutions() is True
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=2", xla_flags.EIGEN_CONVOLUTIONS]
  assert xla_flags.use_eigen_convolutions() is True  # idempotent
  assert os.environ["XLA_FLAGS"].count(xla_flags.YNN_FUSION_FLAG) == 1
  for chosen in (f"--{xla_flags.YNN_FUSION_FLAG}=individual_dot", ""):
    monkeypatch.setenv("XLA_FLAGS", chosen)
    monkeypatch.setenv(xla_flags.OPT_OUT, "" if chosen else "default")
    assert xla_flags.use_eigen_convolutions() is False
    assert os.environ["XLA_FLAGS"] == chosen
  monkeypatch.delenv(xla_flags.OPT_OUT)
  monkeypatch.setattr(xla_flags, "xla_knows_flag", lambda name: False)
  assert xla_flags.use_eigen_convolutions() is False and os.environ["XLA_FLAGS"] == ""
  monkeypatch.setattr(xla_flags, "xla_knows_flag", lambda name: True)
  monkeypatch.setattr(xla_flags, "backend_started", lambda: True)
  assert xla_flags.use_eigen_convolutions() is False and os.environ["XLA_FLAGS"] == ""


def test_the_installed_xla_knows_its_own_flags_and_not_made_up_ones():
  from ggr_jax import xla_flags  # pylint: disable=import-outside-toplevel
  assert xla_flags.xla_knows_flag("xla_force_host_platform_device_count")
  assert not xla_flags.xla_knows_flag("xla_cpu_no_such_flag_in_any_version")


def test_returning_freed_memory_shrinks_the_resident_set_the_thresholds_keep():
  import ctypes  # pylint: disable=import-outside-toplevel
  from ggr_jax import allocator  # pylint: disable=import-outside-toplevel
  try:
    ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    pytest.skip("not glibc")

  def resident_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
      return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) / 1024

  assert allocator.retain_freed_memory() is True  # 256 MiB now come from the heap
  block = np.ones(256 << 18, np.float32)  # touched, so resident
  del block
  kept = resident_mib()
  allocator.return_freed_memory()
  assert resident_mib() < kept - 200


def test_the_compilation_cache_goes_to_the_user_cache_unless_one_is_chosen(tmp_path,
                                                                             monkeypatch):
  from ggr_jax import compile_cache  # pylint: disable=import-outside-toplevel
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv(compile_cache.SETTING, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  try:
    jax.config.update("jax_compilation_cache_dir", "/somewhere/the/user/chose")
    assert compile_cache.use_compilation_cache() is None  # a cache set in jax.config stays
    assert jax.config.jax_compilation_cache_dir == "/somewhere/the/user/chose"
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.use_compilation_cache() is None  # so does one in the environment
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    folder = tmp_path / "ggr_jax" / "xla"
    assert compile_cache.use_compilation_cache() == folder and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(compile_cache.SETTING, str(tmp_path / "mine"))
    assert compile_cache.use_compilation_cache() == tmp_path / "mine"
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(compile_cache.SETTING, "off")
    assert compile_cache.use_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_compilation_cache_max_size", before[1])
