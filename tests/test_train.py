"""The training system: one step of every algorithm, the loop, resume, devices, config errors."""

from __future__ import annotations

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax import ssl
from ggr_jax.configs import default
from ggr_jax.models import build_model
from ggr_jax.ssl import LossContext
from ggr_jax.train import build as build_lib
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop, step as step_lib
from ggr_jax.train.checkpoint import Checkpointer
from ggr_jax.train.feeds import split_arrays


# the base algorithms; the GGCR compositions (ggcr, iomatch_ggcr, openmatch_ggcr) have their
# own step tests in test_ggcr.py
BASE_ALGORITHMS = sorted(n for n in ssl.ALGORITHMS if n in ("supervised", "fixmatch",
                                                             "iomatch", "openmatch"))


def tiny_config(algorithm="fixmatch", mode="vlr", steps=4):
  cfg = default.get_config()
  cfg.algorithm = algorithm
  cfg.ggr.mode = mode
  cfg.model.backbone = "cnn"
  cfg.train.update(dict(steps=steps, steps_per_epoch=2, batch_size=8, uratio=2, log_every=2,
                        eval_every=steps, checkpoint_every=2, eval_batch_size=128))
  cfg.openmatch.start_fix_steps = 2  # exercise selection and the FixMatch stage
  return cfg


def live_aux_config(algorithm="fixmatch", mode="vlr"):
  """``tiny_config`` accepting every pseudo-label, so the auxiliary loss is live at init."""
  cfg = tiny_config(algorithm, mode)
  cfg.fixmatch.p_cutoff = cfg.iomatch.p_cutoff = cfg.iomatch.q_cutoff = 0.0
  cfg.iomatch.op_warmup_steps = cfg.openmatch.start_fix_steps = 0
  return cfg


def _equal_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.fixture(scope="module")
def split():
  return loop.load_split(tiny_config())


@pytest.mark.parametrize("mode", ["sum", "vlr"])
@pytest.mark.parametrize("algorithm", BASE_ALGORITHMS)
def test_one_step_of_every_algorithm(algorithm, mode, split):
  cfg = live_aux_config(algorithm, mode)
  program = _program(cfg, split)
  state = program.init_state()
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = program.train_step(state, program.feed(split_arrays(split), state, 0).next(0))
  assert int(state.step) == 1
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, before)
  assert max(jax.tree.leaves(moved)) > 0
  if algorithm == "supervised":
    assert float(metrics["losses/aux"]) == 0.0
  else:
    assert float(metrics["losses/aux"]) > 0.0
  if mode == "vlr" and float(metrics["ggr/cos_before"]) < 0:
    assert abs(float(metrics["ggr/cos_after"])) < 1e-4


def test_two_step_loop_on_digits_writes_its_outputs_and_its_startup(tmp_path, capsys):
  cfg = tiny_config(steps=2)
  summary = loop.train(cfg, tmp_path, progress=False)
  took = summary["startup"]  # where the time to the first step went
  parts = [took[k] for k in ("data_s", "build_s", "state_s", "first_step_s")]
  assert all(p >= 0 for p in parts) and took["first_step_s"] > 0
  assert took["to_first_step_s"] == pytest.approx((took["before_trainer_s"] or 0) + sum(parts))
  from ggr_jax import cli  # pylint: disable=import-outside-toplevel
  cli._print_results("run", summary)  # pylint: disable=protected-access
  assert "to the first step (s)" in capsys.readouterr().out
  for name in ("closed_acc", "open_bacc", "auroc", "steps", "wall_s", "config"):
    assert name in summary
  assert summary["steps"] == 2 and 0.0 <= summary["closed_acc"] <= 1.0
  assert len(summary["closed_per_class_acc"]) == 6 and len(summary["open_per_class_acc"]) == 7
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in records} == {"train", "eval"}
  assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


@pytest.mark.parametrize("algorithm, data_input", [("fixmatch", "device"),
                                                    ("openmatch", "stream")])
def test_interrupted_run_resumes_exactly(tmp_path, algorithm, data_input):
  """The reference is always the uninterrupted device-sampled run, so the streamed case
  (OpenMatch re-selecting inliers at every epoch: every kind of source) also shows that
  the Grain pipeline feeds the batches the step samples on device, across a resume."""
  cfg = tiny_config(algorithm, "vlr", steps=6)
  full = loop.train(cfg, tmp_path / "full", progress=False)
  cfg.train.input = data_input

  def interrupt(step):
    if step == 3:
      signal.raise_signal(signal.SIGTERM)

  stopped = loop.Trainer(cfg, tmp_path / "resumed", progress=False, on_step=interrupt).run()
  assert stopped is None and (tmp_path / "resumed" / "checkpoints").exists()
  feed_state = tmp_path / "resumed" / "checkpoints" / "3" / "input_state.json"
  assert feed_state.exists() == (data_input == "stream")  # the Grain pipeline's state
  resumed = loop.train(cfg, tmp_path / "resumed", progress=False)
  assert resumed["resumed_from"] == 3
  for key in ("closed_acc", "open_bacc", "auroc", "closed_per_class_acc"):
    assert resumed[key] == full[key], key
  train_full = [r for r in _records(tmp_path / "full") if r["split"] == "train"]
  train_res = [r for r in _records(tmp_path / "resumed") if r["split"] == "train"]
  assert [r["step"] for r in train_res] == [r["step"] for r in train_full]
  assert train_res[-1]["losses/total"] == train_full[-1]["losses/total"]
  trainer = loop.Trainer(cfg, tmp_path / "resumed", progress=False)
  assert trainer.program.train_step._cache_size() <= 1  # pylint: disable=protected-access
  finals = []
  for name in ("full", "resumed"):
    ckpt = Checkpointer(tmp_path / name)
    finals.append(jax.device_get(trainer.restore(ckpt).params))
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, *finals)


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resuming_with_another_config_is_refused(tmp_path):
  loop.train(tiny_config(steps=2), tmp_path, progress=False)
  with pytest.raises(config_lib.ConfigError, match="ggr.mode"):
    loop.train(tiny_config(mode="sum", steps=2), tmp_path, progress=False)


@pytest.mark.parametrize("algorithm, consistency", [
    ("fixmatch", None), ("iomatch", None),
    # every other pair of a batch sharded over the devices, in two chunks
    pytest.param("ggcr", dict(warmup_steps=0, mask="all", pair_fraction=0.5, pair_chunks=2),
                 id="ggcr-half-the-pairs-in-chunks")])
def test_one_and_eight_devices_agree(tmp_path, algorithm, consistency):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  cfg = tiny_config(algorithm, "vlr", steps=2)
  if consistency:
    cfg[algorithm].consistency.update(consistency)
  states = []
  for n in (1, 8):
    program = build_lib.build(cfg, build_lib.DataSpec.of_split(loop.load_split(cfg)),
                              build_lib.make_mesh(jax.devices()[:n]))
    state = program.init_state()
    feed = program.feed(split_arrays(loop.load_split(cfg)), state, 0)
    for i in range(2):
      state, metrics = program.train_step(state, feed.next(i))
    states.append((jax.device_get(state.params), jax.device_get(metrics)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5),
               states[0], states[1])


@pytest.mark.parametrize("field,value,message", [
    ("ggr.mode", "foo", "config.ggr.mode = 'foo' is invalid: allowed values are 'sum', 'vlr'"),
    ("algorithm", "mixmatch", "config.algorithm = 'mixmatch' is invalid: allowed values are"),
    ("train.batch_size", 0, "config.train.batch_size = 0 is invalid: must be a positive integer"),
    ("fixmatch.p_cutoff", 1.5, "config.fixmatch.p_cutoff = 1.5 is invalid: must be a number in [0"),
    ("train.batch_size", 12, "not divisible by the 8 devices"),
])
def test_bad_config_value_fails_before_compiling(field, value, message):
  cfg = tiny_config()
  section, _, name = field.rpartition(".")
  (cfg[section] if section else cfg)[name] = value
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(cfg, num_devices=8)
  assert message in str(info.value) and f"--config.{field}=" in str(info.value)


def _program(cfg, split):
  return build_lib.build(cfg, build_lib.DataSpec.of_split(split),
                         build_lib.make_mesh(jax.devices()[:1]))


def _one_step(cfg, split):
  program = _program(cfg, split)
  state = program.init_state()
  return program.train_step(state, program.feed(split_arrays(split), state, 0).next(0))


def losses_at_init(cfg, split, rng=None):
  """The algorithm's ``Losses`` for one augmented digits batch at the CNN's initialisation."""
  algorithm = cfg.algorithm
  model = build_model("cnn", split.num_classes, ssl.head(algorithm))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
  views = step_lib.make_views(cfg, split.mean, split.std, None)
  data = {"x_labeled": split.x_labeled, "y_labeled": split.y_labeled.astype(np.int32),
          "x_unlabeled": split.x_unlabeled, "unlabeled_is_id": split.unlabeled_is_id}
  batch = views(jax.random.PRNGKey(1), 0, data, jnp.ones(split.x_unlabeled.shape[0], bool))
  return ssl.get(algorithm).losses(LossContext(
      step_lib.make_apply_fn(model), variables["params"], variables["batch_stats"], batch, rng,
      0, step_lib.algorithm_config(cfg)))


@pytest.mark.parametrize("algorithm", BASE_ALGORITHMS)
def test_per_sample_terms_sum_to_the_auxiliary_loss(algorithm, split):
  out = losses_at_init(live_aux_config(algorithm), split)
  terms, is_id = out.sample_aux, out.sample_is_id
  assert terms.shape == is_id.shape and terms.ndim == 1
  aux = sum(out.auxiliary.values(), 0.0)
  np.testing.assert_allclose(float(jnp.sum(terms)), float(aux), rtol=1e-5, atol=1e-7)
  assert 0 < float(jnp.mean(is_id)) < 1  # the unlabeled batch mixes ID and OOD images


@pytest.mark.parametrize("algorithm", ["iomatch"])  # the heads beside the backbone too
def test_per_sample_step_by_jvp_and_by_rows_agree(algorithm, split):
  results = []
  for method in ("jvp", "materialize"):
    cfg = live_aux_config(algorithm, "vlr")
    cfg.ggr.update(dict(granularity="per_sample", per_sample_method=method, microbatch=8))
    state, metrics = _one_step(cfg, split)
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  _equal_params(*results)
  metrics = results[0][1]
  for name in ("ggr/sample_conflict", "ggr/sample_conflict_id", "ggr/sample_conflict_ood",
               "ggr/anchor_share_ood", "ggr/conflict_share_ood"):
    assert 0.0 <= float(metrics[name]) <= 1.0, name
  assert float(metrics["ggr/conflict"]) == pytest.approx(float(metrics["ggr/sample_conflict"]))


def test_sample_diagnostics_leave_a_global_step_unchanged(split):
  cfg = live_aux_config("fixmatch", "vlr")
  plain_state, plain = _one_step(cfg, split)
  cfg.ggr.sample_diagnostics = True
  diag_state, diag = _one_step(cfg, split)
  _equal_params(plain_state.params, diag_state.params)
  assert "ggr/sample_conflict_ood" in diag and "ggr/sample_conflict_ood" not in plain


def test_plain_sum_step_with_one_backward_equals_the_split_sum_step(split):
  cfg = live_aux_config("fixmatch", "sum")
  cfg.ggr.aux_weight = 0.5
  split_state, _ = _one_step(cfg, split)
  cfg.ggr.split_gradients = False
  plain_state, metrics = _one_step(cfg, split)
  _equal_params(split_state.params, plain_state.params)
  assert "ggr/cos_before" not in metrics
  cfg.ggr.mode = "vlr"
  with pytest.raises(config_lib.ConfigError, match="config.ggr.split_gradients = False"):
    config_lib.validate(cfg, num_devices=8)

