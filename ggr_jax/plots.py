"""Figures from a run's ``metrics.jsonl`` (matplotlib, headless)."""

from __future__ import annotations

import pathlib

import numpy as np

from ggr_jax import rundir
from ggr_jax.train.metrics_log import read

CONFLICT_SERIES = (
    ("ggr/sample_conflict_id", "ID samples in conflict"),
    ("ggr/sample_conflict_ood", "OOD samples in conflict"),
    ("ggr/conflict_share_ood", "OOD share of the conflicting component"),
    ("ggr/anchor_share_ood", "OOD share of the component along g_sup"),
)


def plot_conflict_diagnostics(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None
                              ) -> pathlib.Path:
  """Where conflict comes from over training: ID vs OOD samples (needs per-sample metrics).

  Per-sample diagnostics are logged by runs with ``ggr.sample_diagnostics=True`` or
  ``ggr.granularity=per_sample``. Returns the PNG path (default ``<workdir>/conflict.png``).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  workdir = pathlib.Path(workdir)
  records = [r for r in read(workdir) if r["split"] == "train"]
  if not records or CONFLICT_SERIES[0][0] not in records[0]:
    raise ValueError(
        f"{workdir}/metrics.jsonl has no per-sample diagnostics; train with "
        "--config.ggr.sample_diagnostics=True (or --config.ggr.granularity=per_sample).")
  steps = np.array([r["step"] for r in records])
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  for key, label in CONFLICT_SERIES[:2]:
    top.plot(steps, [r[key] for r in records], label=label)
  top.plot(steps, [r["ggr/conflict"] for r in records], "k:", label="steps with batch conflict")
  top.set_ylabel("fraction")
  top.set_ylim(0, 1)
  top.legend(loc="best", fontsize=8)
  for key, label in CONFLICT_SERIES[2:]:
    bottom.plot(steps, [r[key] for r in records], label=label)
  bottom.axhline(_ood_fraction(workdir), color="gray", ls="--", lw=0.8,
                 label="OOD fraction of the unlabeled pool")
  bottom.set_ylabel("share")
  bottom.set_ylim(0, 1)
  bottom.set_xlabel("step")
  bottom.legend(loc="best", fontsize=8)
  fig.suptitle(f"Per-sample conflict with the supervised gradient: {workdir.name}")
  fig.tight_layout()
  out = pathlib.Path(out) if out else workdir / "conflict.png"
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def _ood_fraction(workdir: pathlib.Path) -> float:
  summary = rundir.path(workdir, rundir.SUMMARY)
  if summary.exists():
    return float(rundir.read_json(summary).get("unlabeled_ood_fraction", np.nan))
  return float("nan")
