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


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_conflict_diagnostics(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None
                              ) -> pathlib.Path:
  """Where conflict comes from over training: ID vs OOD samples (needs per-sample metrics).

  Per-sample diagnostics are logged by runs with ``ggr.sample_diagnostics=True`` or
  ``ggr.granularity=per_sample``. Returns the PNG path (default ``<workdir>/conflict.png``).
  """
  plt = _pyplot()
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


def plot_eagc_diagnostics(workdirs: list[str | pathlib.Path], out: str | pathlib.Path,
                          labels: list[str] | None = None) -> pathlib.Path:
  """EAGC's diagnostics over training for one or more runs (e.g. a base method beside
  it with EAGC): GDC (``diagnostics/gdc``, per logged step), SOC (``eval/eagc_soc``) and,
  for coordinated runs, the median and 25-75% band of ``tau`` over the unlabeled Old / ID
  and New / OOD images (``eval/eagc_tau_*``). Returns the PNG path."""
  plt = _pyplot()
  labels = labels or [pathlib.Path(w).name for w in workdirs]
  fig, (gdc, soc, tau) = plt.subplots(1, 3, figsize=(13, 3.8))
  found = False
  for workdir, label in zip(workdirs, labels):
    records = read(workdir)
    train = [r for r in records if r["split"] == "train" and "diagnostics/gdc" in r]
    evals = [r for r in records if r["split"] == "eval" and "eval/eagc_soc" in r]
    found |= bool(train or evals)
    line, = gdc.plot([r["step"] for r in train], [r["diagnostics/gdc"] for r in train],
                     label=label)
    soc.plot([r["step"] for r in evals], [r["eval/eagc_soc"] for r in evals],
             color=line.get_color(), label=label)
    for group, style in (("old", "-"), ("new", "--")):
      rows = [r for r in evals if f"eval/eagc_tau_{group}_q50" in r]
      if rows:
        steps = [r["step"] for r in rows]
        tau.plot(steps, [r[f"eval/eagc_tau_{group}_q50"] for r in rows], style,
                 color=line.get_color(), label=f"{label}: {group}")
        tau.fill_between(steps, [r[f"eval/eagc_tau_{group}_q25"] for r in rows],
                         [r[f"eval/eagc_tau_{group}_q75"] for r in rows],
                         color=line.get_color(), alpha=0.15)
  if not found:
    raise ValueError(f"none of {[str(w) for w in workdirs]} logged EAGC's diagnostics "
                     "(diagnostics/gdc needs ggr.split_gradients=True; eval/eagc_soc a "
                     "category-discovery run or one with eagc.terms on)")
  for ax, title in ((gdc, "GDC: 1 - cos(g_sup, g_sup + g_unsup)"),
                    (soc, "SOC: New energy in the Old top-16 subspace"),
                    (tau, "tau of unlabeled images (median, 25-75%)")):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  out = pathlib.Path(out)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
