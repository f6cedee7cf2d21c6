"""The demo (current main job) runs end to end and its CLI validates input."""

import pytest

from ggr_jax import cli, demo


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
