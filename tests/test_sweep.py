"""Sweeps: spec parsing and its errors, placement, the runner's statuses and signals, the
report's aggregation, and skip/resume on two tiny real digits cells."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import threading

import numpy as np
import pytest

from ggr_jax import cli, report, sweep

# The cheapest real run to compile: supervised, one backward pass, 4 steps, 2 checkpoints.
TINY = {"algorithm": "supervised", "ggr.mode": "sum", "ggr.split_gradients": False,
        "train.steps": 4, "train.batch_size": 8, "train.uratio": 1, "train.eval_batch_size": 128,
        "train.log_every": 2, "train.eval_every": 4, "train.checkpoint_every": 2}


# -- spec -------------------------------------------------------------------------------
def test_product_expands_list_axes_and_keeps_other_values_fixed():
  cells = sweep.product("grid", algorithm=["fixmatch", "iomatch"], seed=[0, 1, 2], labels=25,
                        overrides={"ggr.mode": ["sum", "vlr"], "dataset.id_classes": (0, 1)})
  assert len(cells) == 2 * 3 * 2
  assert cells[0] == {"config": "grid:algorithm=fixmatch,seed=0,labels=25",
                      "overrides": {"ggr.mode": "sum", "dataset.id_classes": (0, 1)}}
  assert cells[-1]["config"] == "grid:algorithm=iomatch,seed=2,labels=25"
  names = [c.name for c in sweep.parse_cells(cells)]
  assert len(set(names)) == len(names) and all("/" not in n for n in names)


def test_product_name_template_errors_name_the_available_keys():
  with pytest.raises(sweep.SweepError, match="uses 'mode'.*keys: algorithm, train_seed"):
    sweep.product("grid", algorithm=["fixmatch"], overrides={"train.seed": [0]}, name="{mode}")


@pytest.mark.parametrize("raw, message", [
    ({"config": "default"}, "returned a dict; it must return a list"),
    ([], "returned no cells"),
    (["default"], "cell #0 is a str, not a dict"),
    ([{"config": "default", "seed": 1}], r"unknown keys \['seed'\]; allowed keys: name, config"),
    ([{"name": "a"}], "cell #0 needs 'config'"),
    ([{"config": "default", "overrides": {"--config.train.steps": 3}}], "no config field path"),
    ([{"config": "default", "overrides": {"train.steps": [1, {}]}}], "must be a bool, int"),
    ([{"config": "default", "name": "../up"}], "not filesystem-safe"),
    ([{"config": "default", "name": "a"}, {"config": "sum", "name": "a"}],
     r"duplicate cell names \['a'\]"),
])
def test_bad_cells_are_rejected_with_the_problem_named(raw, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.parse_cells(raw)


def test_spec_file_without_get_sweep_is_rejected(tmp_path):
  spec = tmp_path / "spec.py"
  spec.write_text("CELLS = []\n")
  with pytest.raises(sweep.SweepError, match="defines no get_sweep"):
    sweep.load_spec(str(spec))
  with pytest.raises(sweep.SweepError, match="not found"):
    sweep.load_spec("no_such_sweep")


def test_spec_argument_reaches_get_sweep(tmp_path):
  spec = tmp_path / "spec.py"
  spec.write_text("def get_sweep(arg='0'):\n"
                  "  return [{'config': 'default', 'overrides': {'train.seed': int(s)}}\n"
                  "          for s in arg.split(',')]\n")
  cells = sweep.load_spec(f"{spec}:3,4")
  assert [c.overrides for c in cells] == [{"train.seed": 3}, {"train.seed": 4}]
  assert [c.name for c in cells] == ["default_train.seed-3", "default_train.seed-4"]


def test_plan_rejects_every_bad_config_before_running(tmp_path):
  cells = sweep.parse_cells([{"config": "default", "name": "typo", "overrides": {"train.stepz": 3}},
                             {"config": "default", "name": "bad", "overrides": {"ggr.mode": "x"}},
                             {"config": "default", "name": "ok"}])
  with pytest.raises(sweep.SweepError, match=r"2 of 3 cells(.|\n)*typo(.|\n)*bad: .*ggr.mode"):
    sweep.plan(cells, tmp_path)
  assert not any(tmp_path.iterdir())


# -- placement --------------------------------------------------------------------------
def test_slots_put_one_cell_per_gpu_and_split_cpu_cores_disjointly():
  gpus = sweep.make_slots("auto", None, ("gpu", ["2", "5"]))
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["2", "5"]
  assert len(sweep.make_slots("auto", 1, ("gpu", ["0", "1"]))) == 1
  assert sweep.make_slots("all", None, ("gpu", ["0", "1"]))[0].env == {}
  tpus = sweep.make_slots("per-run", None, ("tpu", ["0", "1"]))
  assert [s.env["TPU_VISIBLE_CHIPS"] for s in tpus] == ["0", "1"]
  assert len({s.env["TPU_PROCESS_PORT"] for s in tpus}) == 2
  cpus = sweep.make_slots("auto", 3, ("cpu", []), cpus=list(range(8)))
  shares = [set(s.cpus) for s in cpus]
  assert set().union(*shares) == set(range(8)) and sum(map(len, shares)) == 8
  assert sweep.make_slots("auto", None, ("cpu", []))[0].cpus is None


@pytest.mark.parametrize("devices, parallel, accelerators, message", [
    ("per-run", None, ("cpu", []), "needs GPUs"),
    ("all", 2, ("gpu", ["0", "1"]), "one cell at a time over every device"),
    ("auto", 3, ("cpu", []), "exceeds the 2 CPU cores"),
    ("auto", 0, ("cpu", []), "must be a positive integer"),
])
def test_impossible_placements_are_rejected(devices, parallel, accelerators, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.make_slots(devices, parallel, accelerators, cpus=[0, 1])


# -- the runner with stand-in commands ---------------------------------------------------
def _fake_outcomes(tmp_path, monkeypatch, scripts):
  """Outcomes whose command runs a Python one-liner instead of ggr-jax train."""
  by_name = dict(scripts)
  monkeypatch.setattr(sweep.Cell, "command",
                      lambda self, workdir: [sys.executable, "-c", by_name[self.name]])
  return [sweep.Outcome(sweep.Cell(name, "default"), tmp_path / name, "new") for name in by_name]


def test_failed_cells_are_reported_with_their_log(tmp_path, monkeypatch):
  outcomes = _fake_outcomes(tmp_path, monkeypatch, [
      ("fails", "import sys; print('boom'); sys.exit(3)"),
      ("ok", f"open({str(tmp_path / 'ok' / 'summary.json')!r}, 'w').write('{{}}')")])
  lines = []
  assert not sweep.run_sweep(outcomes, [sweep.Slot("a"), sweep.Slot("b")], echo=lines.append)
  assert [o.status for o in outcomes] == ["failed", "trained"]
  assert outcomes[0].rc == 3 and "boom" in outcomes[0].log.read_text()
  table = sweep.status_table(outcomes)
  assert str(outcomes[0].log) in table.splitlines()[1] and "trained" in table.splitlines()[2]


def test_a_signal_stops_running_cells_with_sigterm_and_starts_no_more(tmp_path, monkeypatch):
  waits = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))\n"
           "print('ready'.upper(), flush=True); time.sleep(60)")
  outcomes = _fake_outcomes(tmp_path, monkeypatch, [("first", waits), ("second", waits)])

  def interrupt_once_started():
    log = outcomes[0].log
    for _ in range(200):
      if log.exists() and "READY" in log.read_text():  # the handler is installed
        break
      threading.Event().wait(0.05)
    os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=interrupt_once_started, daemon=True).start()
  assert sweep.run_sweep(outcomes, [sweep.Slot("only")], echo=lambda line: None)
  assert [o.status for o in outcomes] == ["interrupted", "pending"] and outcomes[0].rc == 130
  assert not (tmp_path / "second").exists()


# -- the report on hand-made workdirs ------------------------------------------------------
def _fake_run(root, name, algorithm, mode, seed, accs, curve=(), **fields):
  workdir = root / name
  workdir.mkdir(parents=True)
  config = {"algorithm": algorithm, "ggr.mode": mode, "dataset.name": "digits",
            "dataset.labels_per_class": 5, "train.seed": seed, "train.steps": 8,
            "train.log_every": seed + 1, **fields}
  closed, open_bacc, auroc = accs
  (workdir / "summary.json").write_text(json.dumps(
      {"closed_acc": closed, "open_bacc": open_bacc, "auroc": auroc, "wall_s": 1.5, "steps": 8,
       "algorithm": algorithm, "ggr_mode": mode, "seed": seed, "config": config}))
  records = [{"step": s, "split": "eval", "eval/closed_acc": v} for s, v in curve]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


RESULTS = {  # (algorithm, mode) -> closed acc per seed 0, 1, 2
    ("fixmatch", "sum"): [0.60, 0.70, 0.65],
    ("fixmatch", "vlr"): [0.66, 0.71, 0.70],
    ("iomatch", "sum"): [0.50, 0.52, 0.60],
    ("iomatch", "csr"): [0.55, 0.50, 0.61],
}


@pytest.fixture
def fake_root(tmp_path):
  for (algorithm, mode), accs in RESULTS.items():
    for seed, acc in enumerate(accs):
      _fake_run(tmp_path, f"{algorithm}-{mode}-s{seed}", algorithm, mode, seed,
                (acc, acc / 2, 1 - acc), curve=[(4, acc - 0.1), (8, acc)])
  return tmp_path


def test_report_means_sample_stds_and_paired_deltas(fake_root):
  groups = {(g["algorithm"], g["mode"]): g for g in report.aggregate(report.collect(fake_root))}
  assert set(groups) == set(RESULTS)
  for key, accs in RESULTS.items():
    g = groups[key]
    assert g["n"] == 3 and g["closed_acc_mean"] == pytest.approx(np.mean(accs))
    assert g["closed_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert g["open_bacc_mean"] == pytest.approx(np.mean(accs) / 2)
    base = RESULTS[(key[0], "sum")]
    if key[1] != "sum":
      diffs = np.subtract(accs, base)
      assert g["delta_closed_acc"] == pytest.approx(np.mean(accs) - np.mean(base))
      assert g["delta_closed_acc_std"] == pytest.approx(np.std(diffs, ddof=1))
      assert g["delta_auroc"] == pytest.approx(np.mean(base) - np.mean(accs))
      assert g["n_pairs"] == 3
    else:
      assert "delta_closed_acc" not in g


def test_report_writes_csv_markdown_and_figures(fake_root):
  paths = report.write_report(fake_root)
  with paths["csv"].open() as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == report.CSV_FIELDS  # train.log_every differs but tells nothing apart
  assert len(rows) == 12 and {r["mode"] for r in rows} == {"sum", "vlr", "csr"}
  md = paths["markdown"].read_text()
  vlr = next(line for line in md.splitlines() if "| vlr |" in line)
  vlr_accs, sum_accs = RESULTS[("fixmatch", "vlr")], RESULTS[("fixmatch", "sum")]
  mean, std = 100 * np.mean(vlr_accs), 100 * np.std(vlr_accs, ddof=1)
  delta = 100 * (np.mean(vlr_accs) - np.mean(sum_accs))
  assert f"| 3 | {mean:.2f} ± {std:.2f} |" in vlr and f"| {delta:+.2f} ± " in vlr
  assert md.index("| sum |") < md.index("| vlr |") and "baseline" in md
  for name in ("accuracy_by_mode", "learning_curves"):
    png = paths[name].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert f"({name}.png)" in md


def test_report_separates_runs_that_differ_in_a_config_field(tmp_path):
  for seed in (0, 1):
    _fake_run(tmp_path, f"sum-s{seed}", "fixmatch", "sum", seed, (0.5,) * 3,
              **{"ggr.alpha": 1.0})
    for alpha, acc in ((0.5, 0.6), (1.0, 0.7)):
      _fake_run(tmp_path, f"vlr-a{alpha}-s{seed}", "fixmatch", "vlr", seed, (acc + seed / 100,) * 3,
                **{"ggr.alpha": alpha})
  groups = report.aggregate(report.collect(tmp_path))
  labels = {g["label"]: g for g in groups}
  assert set(labels) == {"sum", "vlr ggr.alpha=0.5", "vlr"}  # the usual value goes unnamed
  assert labels["vlr ggr.alpha=0.5"]["delta_closed_acc"] == pytest.approx(0.605 - 0.5)
  assert labels["vlr"]["delta_closed_acc"] == pytest.approx(0.705 - 0.5)
  assert all(g["n"] == 2 for g in groups)


def test_a_field_whose_values_tie_is_named_on_every_row(tmp_path):
  for seed in (0, 1):
    for name, terms in (("base", "off"), ("eagc", "both")):
      _fake_run(tmp_path, f"{name}-s{seed}", "fixmatch", "sum", seed, (0.5,) * 3,
                **{"eagc.terms": terms})
  labels = {(r.setting, r.cell) for r in report.collect(tmp_path)}
  assert {setting for setting, _ in labels} == {"eagc.terms=off", "eagc.terms=both"}
  assert ("eagc.terms=off", "base-s0") in labels


def test_a_closed_set_report_shows_top5_and_no_open_set_columns(tmp_path):
  for seed in (0, 1):
    for mode, acc in (("sum", 0.80), ("vlr", 0.84)):
      _fake_run(tmp_path, f"{mode}-s{seed}", "fixmatch", mode, seed, (acc + seed / 100, None, None),
                **{"dataset.protocol": "closed"})
      summary = json.loads((tmp_path / f"{mode}-s{seed}" / "summary.json").read_text())
      summary["top5_acc"] = acc + 0.1
      (tmp_path / f"{mode}-s{seed}" / "summary.json").write_text(json.dumps(summary))
  paths = report.write_report(tmp_path)
  md = paths["markdown"].read_text()
  assert "top-5 acc" in md and "AUROC" not in md and "open bal. acc" not in md
  vlr = next(line for line in md.splitlines() if "| vlr |" in line)
  assert vlr == ("| digits_closed | 5 | fixmatch | vlr | 2 | 84.50 ± 0.71 | 94.00 ± 0.00 "
                 "| +4.00 ± 0.00 | +4.00 ± 0.00 |")


def test_report_of_an_empty_root_says_what_to_run(tmp_path):
  with pytest.raises(ValueError, match="no summary.json under .*ggr-jax sweep SPEC"):
    report.write_report(tmp_path)
  assert cli.main(["sweep", "--report-only", "--root", str(tmp_path)]) == 2


# -- two tiny real cells: train, skip when done, resume from a checkpoint -----------------
def test_sweep_trains_then_skips_done_cells_and_resumes_an_interrupted_one(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device per cell: the fastest compile
  spec = tmp_path / "spec.py"
  overrides = {**TINY, "train.seed": [0, 1]}
  spec.write_text("from ggr_jax import sweep\n"
                  "def get_sweep():\n"
                  f"  return sweep.product('default', overrides={overrides!r}, name='s{{train_seed}}')\n")
  root = tmp_path / "root"
  args = ["sweep", str(spec), "--root", str(root), "--parallel", "2"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  summaries = [root / name / "summary.json" for name in ("s0", "s1")]
  assert all(p.exists() for p in summaries)
  assert len(re.findall(r"^s[01] +trained +4 ", out, re.MULTILINE)) == 2  # the status table
  assert (root / "results.md").exists() and (root / "s0" / "log.txt").exists()
  mtimes = [p.stat().st_mtime_ns for p in summaries]

  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "2 done, 0 to resume, 0 to train" in out and "[1/" not in out
  assert [p.stat().st_mtime_ns for p in summaries] == mtimes

  # s1 as if stopped after its step-2 checkpoint: no summary, no step-4 checkpoint.
  summaries[1].unlink()
  for step in (root / "s1" / "checkpoints").glob("4*"):
    shutil.rmtree(step)
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "1 done, 1 to resume, 0 to train" in out and "s1: resume from step 2" in out
  resumed = json.loads(summaries[1].read_text())
  assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
  assert summaries[0].stat().st_mtime_ns == mtimes[0]


@pytest.mark.parametrize("spec", ["experiments/sweeps/digits_closed_ggcr.py",
                                  "experiments/sweeps/ggcr_paper.py",
                                  "experiments/sweeps/digits_closed_metasemi.py",
                                  "experiments/sweeps/metasemi_paper.py"])
def test_the_closed_set_experiment_specs_are_valid_configs(spec):
  from ggr_jax.sweep import spec as spec_lib  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(__file__).resolve().parents[1]
  cells = spec_lib.load_spec(str(root / spec))
  assert len({c.name for c in cells}) == len(cells) >= 15
  for cell in cells:
    cfg = spec_lib.resolve_config(cell)
    config_lib.validate(cfg, num_devices=1)
    assert cfg.dataset.protocol == "closed"


@pytest.mark.parametrize("spec", ["digits_gcd_eagc.py", "digits_openset_eagc.py",
                                  "gcd_paper.py:pretrained={tmp}/dino.npz,herbarium19={tmp}"])
def test_the_eagc_experiment_specs_are_valid_configs(spec, tmp_path):
  from ggr_jax.sweep import spec as spec_lib  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  (tmp_path / "dino.npz").write_bytes(b"")
  root = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "sweeps"
  cells = spec_lib.load_spec(str(root / spec.format(tmp=tmp_path)))
  assert len({c.name for c in cells}) == len(cells) >= 15
  terms = set()
  for cell in cells:
    cfg = spec_lib.resolve_config(cell)
    config_lib.validate(cfg, num_devices=1)
    terms.add(cfg.eagc.terms)
  assert {"off", "both"} <= terms


def test_a_gcd_report_shows_all_old_new_and_leaves_out_eagc_reference_stages(tmp_path):
  for seed in (0, 1):
    _fake_run(tmp_path, f"eagc-s{seed}", "simgcd", "sum", seed, (0.8, None, None),
              **{"dataset.protocol": "gcd"})
    summary = json.loads((tmp_path / f"eagc-s{seed}" / "summary.json").read_text())
    summary.update(gcd_all=0.7 + seed / 10, gcd_old=0.9, gcd_new=0.6)
    (tmp_path / f"eagc-s{seed}" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / f"eagc-s{seed}" / "config.json").write_text("{}")
    _fake_run(tmp_path / f"eagc-s{seed}", "reference", "simgcd", "sum", seed, (0.4, None, None),
              **{"dataset.protocol": "gcd"})
  runs = report.collect(tmp_path)
  assert sorted(r.cell for r in runs) == ["eagc-s0", "eagc-s1"]  # no reference stages
  group, = report.aggregate(runs)
  assert group["dataset"] == "digits_gcd" and group["gcd_all_mean"] == pytest.approx(0.75)
  assert group["gcd_new_mean"] == pytest.approx(0.6)
