"""XLA settings of the CPU backend that ggr-jax applies at start-up, before JAX starts it.

Since jaxlib 0.10, XLA's CPU backend hands every convolution to YNNPACK
(``__ynn_fusion``). On the 2-core AMD EPYC (AVX-512) CPU of this project's measurements
that path runs single-threaded for most of a small network's shapes and computes the
weight gradient at 30-50 GFLOP/s; the Eigen convolutions it replaced run the same
shapes at 135-160 GFLOP/s forward and 70-160 GFLOP/s for the weight gradient
(``experiments/README.md``, "XLA's CPU convolutions"). The default job's FixMatch + GGR
step goes from 92.6 to 62.7 ms with Eigen's convolutions, the WRN-28-2 step from 1,519
to 1,151 ms. :func:`use_eigen_convolutions` removes ``individual_convolution`` from XLA's
YNN fusion types; dots, element-wise code and every other backend are untouched.

XLA reads ``XLA_FLAGS`` once, when JAX creates its first backend, so this must run
before anything touches a device. ``ggr-jax`` calls it first thing; a user's own
training loop can call it before its first JAX computation. It does nothing when
``XLA_FLAGS`` already chooses the YNN fusion types, when ``GGR_JAX_XLA_CPU=default``,
or when the installed XLA does not know the flag (it has no YNN fusions to turn off),
since XLA aborts the process on a flag it does not know.

  >>> import os
  >>> use_eigen_convolutions() == (EIGEN_CONVOLUTIONS in os.environ.get("XLA_FLAGS", ""))
  True
"""

from __future__ import annotations

import mmap
import os
import pathlib

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS = f"--{YNN_FUSION_FLAG}=-individual_convolution"
OPT_OUT = "GGR_JAX_XLA_CPU"


def xla_knows_flag(name: str) -> bool:
  """Whether the installed jaxlib's XLA defines the flag ``name``.

  XLA has no API to list its flags before a backend starts, and it aborts on an unknown
  one; the flag's name, null-terminated, is in the library's read-only data when it
  is defined (about 30 ms to scan the 350 MB library once it is in the page cache).
  """
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  needle = name.encode() + b"\0"
  for library in pathlib.Path(jaxlib.__file__).parent.glob("*.so"):
    try:
      with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(needle) >= 0:
          return True
    except (OSError, ValueError):  # unreadable or empty
      continue
  return False


def backend_started() -> bool:
  """Whether JAX has created a backend already (then new XLA flags no longer apply)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return bool(getattr(xla_bridge, "_backends", None))


def use_eigen_convolutions() -> bool:
  """Appends :data:`EIGEN_CONVOLUTIONS` to ``XLA_FLAGS``; True where it is in effect.

  False, with ``XLA_FLAGS`` unchanged, when the user chose otherwise (``XLA_FLAGS``
  names the YNN fusion types, or ``GGR_JAX_XLA_CPU=default``), when this XLA does not
  know the flag, or when a JAX backend exists already (the flag would not be read).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if EIGEN_CONVOLUTIONS in flags.split():
    return True
  if (os.environ.get(OPT_OUT, "") == "default" or YNN_FUSION_FLAG in flags
      or backend_started() or not xla_knows_flag(YNN_FUSION_FLAG)):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
  return True
