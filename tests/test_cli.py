"""The `ggr-jax` command: demo, train and eval, and their input validation."""

import json
import os

import jax
import pytest

from ggr_jax import bench, cli, demo


def test_demo_split_is_open_set():
  cfg = demo.DemoConfig()
  data = demo.load_split(cfg, seed=0)
  assert len(data["y_lab"]) == cfg.labels_per_class * len(cfg.id_classes)
  assert set(data["y_lab"]) == set(range(len(cfg.id_classes)))
  assert 0 < data["ulb_is_id"].mean() < 1  # unlabeled pool holds unknown digits too


def test_demo_runs_every_variant(capsys):
  results = demo.main(demo.DemoConfig(steps=5, seeds=(0,)))
  assert set(results) == set(demo.VARIANTS)
  assert all(0.0 <= runs[0]["acc"] <= 1.0 for runs in results.values())
  assert "vlr" in capsys.readouterr().out


def test_cli_rejects_a_bad_value(capsys):
  with pytest.raises(SystemExit):
    cli.main(["demo", "--steps", "0"])
  assert "must be a positive integer" in capsys.readouterr().err


def test_train_rejects_a_bad_config_value_before_compiling(tmp_path, capsys):
  rc = cli.main(["train", "--config.ggr.mode=foo", f"--workdir={tmp_path}"])
  err = capsys.readouterr().err
  assert rc == 2
  assert "config.ggr.mode = 'foo' is invalid: allowed values are 'sum', 'vlr'" in err
  assert not (tmp_path / "checkpoints").exists()


def test_train_rejects_an_unknown_packaged_config():
  with pytest.raises(SystemExit, match="unknown config 'nope'; packaged configs: default"):
    cli.main(["train", "--config", "nope"])


def test_train_and_eval_commands_on_digits(tmp_path, capsys):
  args = ["train", "--config", "default", "--config.train.steps=2", "--config.train.batch_size=8",
          "--config.train.uratio=1", "--config.train.eval_batch_size=128", f"--workdir={tmp_path}"]
  assert cli.main(args) == 0
  assert "closed-set acc (ID test)" in capsys.readouterr().out
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert cli.main(["eval", f"--workdir={tmp_path}"]) == 0
  evaluated = json.loads((tmp_path / "eval.json").read_text())
  assert evaluated["closed_acc"] == summary["closed_acc"] and evaluated["steps"] == 2


def test_bench_runs_end_to_end_and_writes_valid_json(tmp_path, capsys):
  path = tmp_path / "bench.json"
  rc = cli.main(["bench", "--workloads", "tiny", "--algorithms", "fixmatch", "--variants",
                 "sum,sum_stream,vlr,vlr_per_sample_jvp,ggcr_fast", "--steps", "2",
                 "--warmup", "1",
                 "--pipeline", "--json", str(path)])
  assert rc == 0
  report = json.loads(path.read_text())
  assert report["platform"] == "cpu" and report["jax_version"]
  rows = {r["variant"]: r for r in report["results"]}
  assert set(rows) == {"sum", "sum_stream", "vlr", "vlr_per_sample_jvp", "ggcr_fast"}
  pipeline, = report["pipeline"]
  assert pipeline["images_per_batch"] == 16 and pipeline["images_per_s"] > 0
  assert pipeline["pipeline_to_step"] == pytest.approx(
      pipeline["images_per_s"] / (16 / (rows["sum"]["median_ms"] / 1e3)))
  assert all(r["compilations"] == 1 and r["median_ms"] > 0 for r in rows.values())
  assert rows["vlr"]["ratio_to_sum"] > 0 and rows["sum"]["ratio_to_sum"] == 1.0
  # XLA's own accounting: GGCR's second-order step does more work and plans more memory
  assert rows["ggcr_fast"]["flops_ratio_to_sum"] > 1.5
  assert rows["ggcr_fast"]["planned_memory_ratio_to_sum"] > 1.0
  assert "vlr_per_sample_jvp" in capsys.readouterr().out
  assert cli.main(["bench", "--workloads", "huge"]) == 2


def test_bench_isolated_cells_run_in_their_own_process(tmp_path):
  path = tmp_path / "bench.json"
  report = bench.run(["tiny"], ["fixmatch"], ["sum"], steps=1, warmup=1, verbose=False,
                     isolate=True, json_path=str(path))
  row, = report["results"]
  assert report["isolated"] and row["pid"] != os.getpid() and row["median_ms"] > 0
  assert json.loads(path.read_text()) == json.loads(json.dumps(report))


def test_bench_a_failing_cell_becomes_an_error_row_and_the_next_runs(tmp_path, monkeypatch):
  real = bench.time_step

  def out_of_memory_for_vlr(algorithm, work, variant, *args):
    if variant.get("mode") == "vlr":
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 146 GiB")
    return real(algorithm, work, variant, *args)
  monkeypatch.setattr(bench, "time_step", out_of_memory_for_vlr)
  path = tmp_path / "bench.json"
  bench.run(["tiny"], ["fixmatch"], ["sum", "vlr", "osr_k10"], steps=1, warmup=1,
            verbose=False, isolate=False, json_path=str(path))
  rows = {r["variant"]: r for r in json.loads(path.read_text())["results"]}
  assert rows["vlr"]["error"].startswith("RESOURCE_EXHAUSTED") and "median_ms" not in rows["vlr"]
  assert rows["osr_k10"]["ratio_to_sum"] > 0
  assert "failed: RESOURCE_EXHAUSTED" in bench.format_row(rows["vlr"])


def test_diagnostics_plot_from_a_run_with_per_sample_metrics(tmp_path, capsys):
  base = ["train", "--config.train.steps=2", "--config.train.batch_size=8",
          "--config.train.uratio=1", "--config.train.log_every=1",
          "--config.train.eval_batch_size=128"]
  assert cli.main(base + ["--config.ggr.sample_diagnostics=True", f"--workdir={tmp_path / 'a'}"]) == 0
  assert cli.main(["diagnostics", f"--workdir={tmp_path / 'a'}"]) == 0
  png = tmp_path / "a" / "conflict.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert cli.main(base + [f"--workdir={tmp_path / 'b'}"]) == 0
  capsys.readouterr()
  assert cli.main(["diagnostics", f"--workdir={tmp_path / 'b'}"]) == 2
  assert "sample_diagnostics=True" in capsys.readouterr().err


def test_a_config_resolves_alike_from_the_checkout_path_and_by_name(monkeypatch):
  from ggr_jax import configs  # pylint: disable=import-outside-toplevel
  from tests.conftest import REPO  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(REPO)
  by_path = configs.load(["--config", "configs/fixmatch_ggr.py", "--config.train.seed=3"])
  by_name = configs.load(["--config", "fixmatch_ggr", "--config.train.seed=3"])
  assert by_path.to_dict() == by_name.to_dict() and by_name.train.seed == 3
  assert configs.CONFIG_DIR == REPO / "configs"  # the installed package is the top-level folder


def test_every_packaged_config_is_valid():
  import importlib  # pylint: disable=import-outside-toplevel
  from ggr_jax import configs  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  assert "ggcr" in configs.names()
  for name in configs.names():
    config_lib.validate(importlib.import_module(f"ggr_jax.configs.{name}").get_config(),
                        num_devices=1)
