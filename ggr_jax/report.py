"""The report of a sweep: every ``summary.json`` under a root, aggregated over seeds.

Writes into the root:

- ``results.csv``: one row per run (cell, algorithm, dataset, labels, mode, seed,
  closed_acc, open_bacc, auroc, top5_acc (closed-set runs), the official figures (``official_*``, see
  :func:`ggr_jax.train.loop.official_figures`), wall_s, steps, then any config field that tells runs of
  the same group apart, e.g. ``ggr.alpha`` in an alpha ablation).
- ``results.md``: one row per (dataset, labels, algorithm, setting, mode): mean ± sample
  std (ddof=1) over seeds, and the delta of each mode over the ``sum`` baseline of the
  same (dataset, labels, algorithm, setting): ``mean(mode) - mean(sum)``, ± the sample
  std of the per-seed differences (paired over the seeds both have). The honest
  figures (final EMA weights) come first, with deltas; then, where the runs logged them,
  the official figures (best EMA closed accuracy selected on the test split; open-set
  metrics of that step's raw weights), which show the optimism of that selection.
- ``accuracy_by_mode.png``: closed acc, open balanced acc and AUROC per mode, grouped by
  algorithm, error bars = std over seeds; ``learning_curves.png``: ``eval/closed_acc``
  against the step per mode, mean (± std) over seeds, from each run's ``metrics.jsonl``.

The group keys come from the summary's flat ``config`` (``algorithm``, ``ggr.mode``,
``dataset.name``, ``dataset.labels_per_class``, ``train.seed``).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any

import numpy as np

from ggr_jax import rundir, ssl
from ggr_jax.rectify import MODES
from ggr_jax.train.metrics_log import read

# open-set runs report the first three, closed-set runs (dataset shown as <name>_closed)
# the closed accuracy and top-5, category-discovery runs (<name>_gcd) the test All
# accuracy as "closed acc" and the transductive All/Old/New; a table or figure shows the
# metrics some run has
METRICS = {"closed_acc": "closed acc", "open_bacc": "open bal. acc", "auroc": "AUROC",
           "top5_acc": "top-5 acc", "gcd_all": "All (GCD)", "gcd_old": "Old (GCD)",
           "gcd_new": "New (GCD)"}
GCD_METRICS = ("gcd_all", "gcd_old", "gcd_new")
OFFICIAL = {"official_closed_acc": "closed acc (official)",
            "official_open_bacc": "open bal. acc (official)", "official_auroc": "AUROC (official)",
            "official_gcd_all": "All (GCD, official)", "official_gcd_old": "Old (GCD, official)",
            "official_gcd_new": "New (GCD, official)"}
BASELINE = "sum"
KEY_FIELDS = ("algorithm", "dataset.name", "dataset.labels_per_class", "ggr.mode", "train.seed")
# Fields that never tell two runs apart: those a resume may change.
IGNORED = rundir.RESUMABLE_CHANGES
CSV_FIELDS = ("cell", "algorithm", "dataset", "labels", "mode", "seed", "closed_acc", *GCD_METRICS,
              "open_bacc", "auroc", "top5_acc", *OFFICIAL, "wall_s", "steps")


@dataclasses.dataclass
class Run:
  """One finished run (a ``summary.json``); ``setting``/``variant``: its distinguishing fields."""
  cell: str
  algorithm: str
  dataset: str
  labels: Any
  mode: str
  seed: Any
  closed_acc: float
  open_bacc: float
  auroc: float
  wall_s: float
  steps: int
  workdir: pathlib.Path
  config: dict[str, Any]
  top5_acc: float = float("nan")
  gcd_all: float = float("nan")
  gcd_old: float = float("nan")
  gcd_new: float = float("nan")
  official_closed_acc: float = float("nan")
  official_open_bacc: float = float("nan")
  official_gcd_all: float = float("nan")
  official_gcd_old: float = float("nan")
  official_gcd_new: float = float("nan")
  official_auroc: float = float("nan")
  setting: str = ""  # unusual non-ggr fields, e.g. "train.steps=500"
  variant: str = ""  # unusual ggr.* fields, e.g. "ggr.alpha=0.5"

  @property
  def label(self) -> str:
    return f"{self.mode} {self.variant}".strip()


def _float(value: Any) -> float:
  return float(value) if isinstance(value, (int, float)) else float("nan")


def collect(root: str | pathlib.Path) -> list[Run]:
  """Every run under ``root`` (any depth) with a readable ``summary.json``, but the
  reference stages inside EAGC runs (part of their run, not runs of the sweep)."""
  root = pathlib.Path(root)
  runs = []
  for path in sorted(root.rglob(rundir.SUMMARY)):
    if (path.parent.name == rundir.REFERENCE
        and rundir.path(path.parent.parent, rundir.CONFIG).exists()):
      continue
    try:
      s = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
      print(f"report: skipping {path}: {err}", file=sys.stderr)
      continue
    cfg = _own_blocks(s.get("config", {}))
    runs.append(Run(
        cell=str(path.parent.relative_to(root)), algorithm=cfg.get("algorithm", s.get("algorithm")),
        dataset=cfg.get("dataset.name", "?") + {"closed": "_closed", "gcd": "_gcd"}.get(
            cfg.get("dataset.protocol"), ""),
        labels=cfg.get("dataset.labels_per_class"), top5_acc=_float(s.get("top5_acc")),
        mode=cfg.get("ggr.mode", s.get("ggr_mode")), seed=cfg.get("train.seed", s.get("seed")),
        closed_acc=_float(s.get("closed_acc")), open_bacc=_float(s.get("open_bacc")),
        auroc=_float(s.get("auroc")), wall_s=_float(s.get("wall_s")), steps=s.get("steps"),
        workdir=path.parent, config=cfg,
        **{k: _float(s.get(k)) for k in (*OFFICIAL, *GCD_METRICS)}))
  _label_variants(runs)
  return runs


def _own_blocks(cfg: dict[str, Any]) -> dict[str, Any]:
  """The flat config without the blocks of algorithms the run does not train (they tell
  no runs apart, and a block added to the config later must not split a group)."""
  algorithm = cfg.get("algorithm")
  others = set(ssl.names()) - {algorithm}
  return {k: v for k, v in cfg.items() if k.split(".")[0] not in others}


def _context(run: Run) -> tuple:
  return (run.dataset, str(run.labels), run.algorithm)


def distinguishing_fields(runs: list[Run]) -> list[str]:
  """Config fields that differ between runs of one (dataset, labels, algorithm, mode)."""
  groups = collections.defaultdict(list)
  for run in runs:
    groups[(*_context(run), run.mode)].append(run)
  fields = set().union(*(r.config for r in runs)) - set(KEY_FIELDS) - set(IGNORED)
  return sorted(f for f in fields if any(
      len({json.dumps(r.config.get(f), sort_keys=True) for r in group}) > 1
      for group in groups.values()))


def _label_variants(runs: list[Run]) -> None:
  """Names each run's distinguishing fields where they differ from the most common value
  (every value, that one included, when two values are equally common: no row of a
  field goes unnamed by a tie's accident)."""
  for field in distinguishing_fields(runs):
    values = [json.dumps(r.config.get(field), sort_keys=True) for r in runs]
    counts = collections.Counter(values).most_common(2)
    usual = counts[0][0] if len(counts) == 1 or counts[0][1] > counts[1][1] else None
    for run, value in zip(runs, values):
      if value == usual:
        continue
      text = f"{field}={run.config[field] if isinstance(run.config.get(field), str) else value}"
      if field.startswith("ggr."):
        run.variant = f"{run.variant} {text}".strip()
      else:
        run.setting = f"{run.setting} {text}".strip()


def _mode_rank(mode: str) -> tuple:
  return (mode != BASELINE, MODES.index(mode) if mode in MODES else len(MODES), mode)


def _sample_std(values: list[float]) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def aggregate(runs: list[Run]) -> list[dict[str, Any]]:
  """One dict per (dataset, labels, algorithm, setting, mode, variant): n, mean/std per metric,
  and ``delta_<metric>`` (difference of means over the baseline) with its paired std."""
  groups: dict[tuple, list[Run]] = collections.defaultdict(list)
  for run in runs:
    groups[(*_context(run), run.setting, run.mode, run.variant)].append(run)
  keys = sorted(groups, key=lambda k: (k[:4], _mode_rank(k[4]), k[5]))
  out = []
  for key in keys:
    members = groups[key]
    row = {"dataset": key[0], "labels": members[0].labels, "algorithm": key[2], "setting": key[3],
           "mode": key[4], "variant": key[5], "label": members[0].label, "n": len(members),
           "seeds": sorted({str(r.seed) for r in members})}
    base_keys = [k for k in keys if k[:4] == key[:4] and k[4] == BASELINE]
    base_keys.sort(key=lambda k: (k[5] != key[5], len(k[5])))  # same variant, else plainest
    base = groups[base_keys[0]] if base_keys and key[4] != BASELINE else None
    row["baseline"] = base[0].label if base else None
    for metric in (*METRICS, *OFFICIAL):
      values = [getattr(r, metric) for r in members]
      row[f"{metric}_mean"], row[f"{metric}_std"] = float(np.mean(values)), _sample_std(values)
      if base and metric in METRICS:
        here, there = _by_seed(members, metric), _by_seed(base, metric)
        paired = [here[s] - there[s] for s in here if s in there]
        row[f"delta_{metric}"] = row[f"{metric}_mean"] - float(np.mean([getattr(r, metric)
                                                                        for r in base]))
        row[f"delta_{metric}_std"], row["n_pairs"] = _sample_std(paired), len(paired)
    out.append(row)
  return out


def _by_seed(runs: list[Run], metric: str) -> dict[str, float]:
  values = collections.defaultdict(list)
  for run in runs:
    values[str(run.seed)].append(getattr(run, metric))
  return {seed: float(np.mean(v)) for seed, v in values.items()}


def write_csv(runs: list[Run], path: pathlib.Path) -> pathlib.Path:
  extra = distinguishing_fields(runs)
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([*CSV_FIELDS, *extra])
    for run in runs:
      writer.writerow([getattr(run, k) for k in CSV_FIELDS]
                      + [json.dumps(run.config.get(k)) for k in extra])
  return path


def _pct(mean: float, std: float, sign: str = "") -> str:
  text = f"{100 * mean:{sign}.2f}"
  return text + (f" ± {100 * std:.2f}" if math.isfinite(std) else "")


def _shown(groups: list[dict[str, Any]]) -> dict[str, str]:
  """The metrics some group has (closed-set runs have no open-set metrics)."""
  return {m: name for m, name in METRICS.items()
          if any(math.isfinite(g.get(f"{m}_mean", math.nan)) for g in groups)} or METRICS


def write_markdown(groups: list[dict[str, Any]], path: pathlib.Path, root: pathlib.Path,
                   figures: list[pathlib.Path]) -> pathlib.Path:
  with_setting = any(g["setting"] for g in groups)
  metrics = _shown(groups)
  official = [m for m in OFFICIAL if any(math.isfinite(g[f"{m}_mean"]) for g in groups)]
  head = ["dataset", "labels", "algorithm", *(["setting"] if with_setting else []), "mode", "n",
          *metrics.values(), *(f"Δ {name}" for name in metrics.values()),
          *(OFFICIAL[m] for m in official)]
  lines = [f"# Results of {root}", "",
           f"{sum(g['n'] for g in groups)} runs. Mean ± sample std (ddof=1) over seeds, in %. "
           f"Δ = mean(mode) − mean({BASELINE}) of the same dataset, labels, algorithm and "
           "setting, in points, ± the std of the per-seed paired differences."
           + (" The first metrics are the final EMA weights'; the (official) ones are the "
              "official code's selection: the best EMA closed accuracy over the evaluations, "
              "chosen on the test split, and the open-set metrics of that step's raw weights; "
              "for category discovery the best transductive All over the evaluations, "
              "chosen on that split, with its Old and New."
              if official else ""), "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in groups:
    cells = [g["dataset"], str(g["labels"]), g["algorithm"],
             *([g["setting"]] if with_setting else []), g["label"], str(g["n"])]
    cells += [_pct(g[f"{m}_mean"], g[f"{m}_std"]) for m in metrics]
    if g["mode"] == BASELINE:
      cells += ["baseline"] * len(metrics)
    elif g["baseline"] is None:
      cells += ["no baseline"] * len(metrics)
    else:
      cells += [_pct(g[f"delta_{m}"], g[f"delta_{m}_std"], "+") for m in metrics]
    cells += [_pct(g[f"{m}_mean"], g[f"{m}_std"]) for m in official]
    lines.append("| " + " | ".join(cells) + " |")
  lines += [""] + [f"![{p.stem}]({p.name})" for p in figures]
  path.write_text("\n".join(lines) + "\n")
  return path


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_accuracy_by_mode(groups: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
  """Bars per mode grouped by algorithm; one row of panels per (dataset, labels, setting)."""
  plt = _pyplot()
  contexts = list(dict.fromkeys((g["dataset"], str(g["labels"]), g["setting"]) for g in groups))
  metrics = _shown(groups)
  fig, axes = plt.subplots(len(contexts), len(metrics), squeeze=False,
                           figsize=(4.2 * len(metrics), 3.2 * len(contexts)))
  for row, context in zip(axes, contexts):
    members = [g for g in groups if (g["dataset"], str(g["labels"]), g["setting"]) == context]
    algorithms = list(dict.fromkeys(g["algorithm"] for g in members))
    labels = list(dict.fromkeys(g["label"] for g in members))
    width = 0.8 / len(labels)
    for ax, (metric, title) in zip(row, metrics.items()):
      for k, label in enumerate(labels):
        found = {g["algorithm"]: g for g in members if g["label"] == label}
        xs = [i for i, a in enumerate(algorithms) if a in found]
        means = [100 * found[algorithms[i]][f"{metric}_mean"] for i in xs]
        stds = [100 * np.nan_to_num(found[algorithms[i]][f"{metric}_std"]) for i in xs]
        ax.bar(np.array(xs) + (k - (len(labels) - 1) / 2) * width, means, width, yerr=stds,
               capsize=3, label=label)
      ax.set_xticks(range(len(algorithms)), algorithms)
      where = (context[0], context[1] + " labels", context[2])
      ax.set_title(f"{title}: {' '.join(c for c in where if c)}", fontsize=9)
      ax.set_ylabel("%")
    row[0].legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _eval_curve(workdir: pathlib.Path, key: str = "eval/closed_acc") -> dict[int, float]:
  try:
    records = read(workdir)
  except FileNotFoundError:
    return {}
  return {r["step"]: r[key] for r in records
          if r.get("split") == "eval" and isinstance(r.get(key), float)}


def plot_learning_curves(runs: list[Run], path: pathlib.Path) -> pathlib.Path | None:
  """``eval/closed_acc`` against the step per mode (mean ± std over seeds); None without evals."""
  curves = {id(r): _eval_curve(r.workdir) for r in runs}
  if not any(curves.values()):
    return None
  plt = _pyplot()
  contexts = list(dict.fromkeys((*_context(r), r.setting) for r in runs))
  cols = min(3, len(contexts))
  rows = math.ceil(len(contexts) / cols)
  fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(4.5 * cols, 3.3 * rows))
  for ax, context in zip(axes.flat, contexts):
    members = [r for r in runs if (*_context(r), r.setting) == context]
    for label in sorted({r.label for r in members}, key=lambda t: _mode_rank(t.split()[0])):
      series = [curves[id(r)] for r in members if r.label == label and curves[id(r)]]
      steps = sorted(set().union(*series)) if series else []
      if not steps:
        continue
      table = np.array([[s.get(t, np.nan) for t in steps] for s in series]) * 100
      mean = np.nanmean(table, axis=0)
      line, = ax.plot(steps, mean, marker=".", label=f"{label} (n={len(series)})")
      if len(series) > 1:
        std = np.nanstd(table, axis=0, ddof=1)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title(" ".join(c for c in (context[0], context[1] + " labels", context[2], context[3])
                          if c), fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("closed acc (%)")
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(contexts):]:
    ax.set_visible(False)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(root: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes results.csv, results.md and the figures into ``root``; returns their paths."""
  root = pathlib.Path(root)
  runs = collect(root)
  if not runs:
    raise ValueError(f"no summary.json under {root}: train the cells first "
                     f"(ggr-jax sweep SPEC --root {root}).")
  groups = aggregate(runs)
  paths = {"csv": write_csv(runs, root / "results.csv"),
           "accuracy_by_mode": plot_accuracy_by_mode(groups, root / "accuracy_by_mode.png")}
  curves = plot_learning_curves(runs, root / "learning_curves.png")
  if curves is not None:
    paths["learning_curves"] = curves
  figures = [paths["accuracy_by_mode"]] + ([curves] if curves else [])
  paths["markdown"] = write_markdown(groups, root / "results.md", root, figures)
  return paths
