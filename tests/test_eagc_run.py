"""EAGC in the run layer: the reference stage, the coordinated step, resuming, refusals."""

from __future__ import annotations

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax import cli
from ggr_jax.train import config as config_lib
from ggr_jax.train import eagc, loop
from ggr_jax.train.feeds import split_arrays
from tests.test_simgcd import gcd_config
from tests.test_train import _program, tiny_config


def eagc_config(terms="both", steps=4, algorithm="simgcd"):
  cfg = gcd_config(steps) if algorithm == "simgcd" else tiny_config(algorithm, "vlr", steps)
  cfg.eagc.update(terms=terms, reference_steps=2)
  return cfg


def coordinated_state(cfg, split, drift=1.0):
  """A built program and a state started from a reference: the initial model, its
  parameters scaled by ``drift`` (1: ``z = zhat`` at the first step, AGA exactly 0)."""
  program = _program(cfg, split)
  state = program.init_state()
  rng = np.random.default_rng(0)  # a 2-d "known" subspace: real features mostly outside
  feats = rng.normal(size=(40, 2)) @ rng.normal(size=(2, state.coordinator["c"].shape[0]))
  state = eagc.from_reference(state, state.params, state.batch_stats, feats, 2.0)
  reference = jax.tree.map(lambda p: p * drift, state.coordinator["reference"]["params"])
  return program, state.replace(coordinator={
      **state.coordinator, "reference": {**state.coordinator["reference"], "params": reference}})


def _step(program, state, batch):
  """One step on a copy of ``state`` (the step donates its input)."""
  return program.train_step(jax.tree.map(jnp.copy, state), batch)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.parametrize("algorithm", ["simgcd", "fixmatch"])
def test_a_coordinator_of_zero_strength_leaves_the_step_unchanged(algorithm):
  cfg = eagc_config("eep", algorithm=algorithm)
  cfg.eagc.beta = 0.0
  split = loop.load_split(cfg)
  program, state = coordinated_state(cfg, split)
  batch = program.feed(split_arrays(split), state, 0).next(0)
  zero, metrics = _step(program, state, batch)
  off = cfg.copy_and_resolve_references()
  off.eagc.terms = "off"
  plain_program = _program(off, split)
  plain, _ = _step(plain_program, state.replace(coordinator=None), batch)
  for a, b in zip(_leaves(zero.params), _leaves(plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(metrics["eagc/mu"])) and float(metrics["eagc/tau_unlabeled"]) == 0
  assert any(not np.allclose(a, b) for a, b in zip(_leaves(zero.params), _leaves(state.params)))
  # the analysis labels split the unlabeled rows' tau into known and novel classes
  assert {"eagc/tau_unlabeled_known", "eagc/tau_unlabeled_novel"} <= set(metrics)


def test_each_term_moves_the_backbone_and_leaves_the_heads_gradient_alone():
  results = {}
  for terms in ("eep", "aga"):
    cfg = eagc_config(terms)
    cfg.eagc.beta = 3.0
    split = loop.load_split(cfg)
    program, state = coordinated_state(cfg, split, drift=1.2)
    batch = program.feed(split_arrays(split), state, 0).next(0)
    results[terms] = _step(program, state, batch)
  off = eagc_config("eep")
  off.eagc.beta = 0.0
  program, state = coordinated_state(off, split, drift=1.2)
  base, _ = _step(program, state, program.feed(split_arrays(split), state, 0).next(0))
  for terms, (new, metrics) in results.items():
    moved = [not np.allclose(a, b) for a, b in zip(_leaves(new.params["backbone"]),
                                                   _leaves(base.params["backbone"]))]
    assert any(moved), terms
  # EEP edits only the cotangent below the feature: the head's update is unchanged
  for a, b in zip(_leaves(results["eep"][0].params["gcd_head"]),
                  _leaves(base.params["gcd_head"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_run_trains_its_reference_first_and_resumes_exactly(tmp_path):
  cfg = eagc_config("both", steps=4)
  full = loop.train(cfg, tmp_path / "full", progress=False)
  reference = json.loads((tmp_path / "full" / "reference" / "summary.json").read_text())
  assert reference["steps"] == 2 and reference["config"]["eagc.terms"] == "off"

  def interrupt(step):
    if step == 2:
      signal.raise_signal(signal.SIGTERM)

  assert loop.Trainer(cfg, tmp_path / "resumed", progress=False, on_step=interrupt).run() is None
  resumed = loop.train(cfg, tmp_path / "resumed", progress=False)
  assert resumed["resumed_from"] == 2
  for key in ("gcd_all", "gcd_old", "gcd_new", "gcd_test_all", "official_gcd_all"):
    assert resumed[key] == full[key], key
  # the official figure is the best transductive All over the evaluations, the last included
  assert full["official_gcd_all"] >= full["gcd_all"] and full["official_gcd_step"] <= 4
  records = [json.loads(line) for line in
             (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["eagc/mu"]) for r in records if r["split"] == "train")
  # EAGC's diagnostics are logged over training and plot
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert all(0 <= r["diagnostics/gdc"] <= 2 for r in train)
  assert all(0 <= r["eval/eagc_soc"] <= 1 for r in evals)
  last = evals[-1]
  assert 0 <= last["eval/eagc_tau_new_q10"] <= last["eval/eagc_tau_new_q50"] \
      <= last["eval/eagc_tau_new_q90"] <= cfg.eagc.beta
  out = tmp_path / "eagc.png"
  assert cli.main(["diagnostics", "--eagc", f"--workdir={tmp_path / 'full'}",
                   f"--workdir={tmp_path / 'resumed'}", f"--out={out}"]) == 0
  assert out.stat().st_size > 10_000


def test_settings_eagc_cannot_serve_are_refused():
  cfg = eagc_config()
  cfg.ggr.update(mode="vlr", anchor="labeled")
  with pytest.raises(config_lib.ConfigError, match="ggr.anchor=joint"):
    config_lib.validate(cfg)
  cfg = eagc_config()
  cfg.ggr.update(mode="vlr", granularity="per_sample")
  with pytest.raises(config_lib.ConfigError, match="forward-mode"):
    config_lib.validate(cfg)
  cfg = eagc_config()
  cfg.eagc.aperture = 0.0
  with pytest.raises(config_lib.ConfigError, match="eagc.aperture"):
    config_lib.validate(cfg)


def test_an_algorithm_that_marks_no_labeled_rows_is_named():
  cfg = eagc_config(algorithm="supervised")
  split = loop.load_split(cfg)
  program, state = coordinated_state(cfg, split)
  with pytest.raises(ValueError, match="'supervised' ran 0 forwards marked"):
    program.train_step(state, program.feed(split_arrays(split), state, 0).next(0))


def test_the_bench_times_the_coordinated_step_as_its_own_variant():
  from ggr_jax import bench  # pylint: disable=import-outside-toplevel
  cfg = bench._config("simgcd", bench.WORKLOADS["digits_gcd"], bench.VARIANTS["eagc"])
  assert cfg.eagc.terms == "both" and cfg.ggr.mode == "sum"
  assert "eagc" not in bench.DEFAULT_VARIANTS


def test_a_signal_during_the_reference_run_stops_both_and_the_rerun_finishes(tmp_path,
                                                                            monkeypatch):
  cfg = eagc_config("both", steps=2)
  cfg.eagc.reference_steps = 4
  cfg.train.checkpoint_every = 2
  fired = []
  original = loop.Trainer.__init__

  def init(self, *args, **kwargs):  # the reference trainer receives SIGTERM at its step 2
    original(self, *args, **kwargs)
    if self.workdir.name == "reference" and not fired:
      def stop(step):
        if step == 2:
          fired.append(step)
          signal.raise_signal(signal.SIGTERM)
      self.on_step = stop

  monkeypatch.setattr(loop.Trainer, "__init__", init)
  assert loop.Trainer(cfg, tmp_path, progress=False).run() is None
  monkeypatch.undo()
  assert fired and not (tmp_path / "summary.json").exists()
  summary = loop.train(cfg, tmp_path, progress=False)
  reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
  assert reference["resumed_from"] == 2 and summary["steps"] == 2
