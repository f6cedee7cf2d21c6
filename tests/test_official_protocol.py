"""Where results depend on it, the official protocol: OpenMatch's forwards, the reported
weights and the open-set threshold (the grid's settings are in test_grid.py, the
rectifier's start step in test_rectify.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ggr_jax.models import build_model
from ggr_jax.ssl import LossContext, common, openmatch
from ggr_jax.train import loop
from ggr_jax.train.state import make_apply_fn
from tests.test_train import _equal_params, _one_step, live_aux_config, tiny_config

START_FIX = 5
MAIN = ("x_lb_w0", "x_lb_w1", "x_ulb_w0", "x_ulb_w1")
SELECTED = ("x_sel_w", "x_sel_s")


def _openmatch(selected_forward):
  cfg = openmatch.default_config()
  cfg.update(start_fix_steps=START_FIX, selected_forward=selected_forward)
  model = build_model("cnn", 6, "openmatch")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
  return cfg, make_apply_fn(model), variables["params"], variables["batch_stats"]


def _batch(seed, selected_shift=0.0):
  rng = np.random.default_rng(seed)
  batch = {name: jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32) for name in MAIN}
  for name in SELECTED:
    batch[name] = jnp.asarray(rng.normal(size=(4, 8, 8, 1)) + selected_shift, jnp.float32)
  batch["y_lb"] = jnp.asarray(rng.integers(0, 6, 4), jnp.int32)
  return batch


def _losses(selected_forward, step, batch):
  cfg, apply_fn, params, stats = _openmatch(selected_forward)
  return openmatch.losses(LossContext(apply_fn, params, stats, batch, None, step, cfg))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def _differ(a, b):
  return any(not np.allclose(x, y, rtol=1e-5, atol=1e-6)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("step", [0, START_FIX - 1, START_FIX, 50])
def test_openmatch_selected_views_never_enter_the_first_forward(step):
  # Officially the labeled and unlabeled views are normalised by their own batch
  # statistics: moving the selected images changes neither supervised nor EM/SOCR terms.
  base, moved = _losses("separate", step, _batch(0)), _losses("separate", step, _batch(0, 3.0))
  for name in ("sup_closed", "sup_ova"):
    _close(base.supervised[name], moved.supervised[name])
  for name in ("em", "socr"):
    _close(base.auxiliary[name], moved.auxiliary[name])
  joint, joint_moved = _losses("joint", step, _batch(0)), _losses("joint", step, _batch(0, 3.0))
  assert _differ(joint.supervised, joint_moved.supervised)  # one forward shares the statistics


def test_openmatch_before_start_fix_the_selected_views_touch_no_statistics():
  cfg, apply_fn, params, stats = _openmatch("separate")
  batch = _batch(1)
  out = _losses("separate", START_FIX - 1, batch)
  _, expected = common.forward_concat(apply_fn, params, stats, [batch[k] for k in MAIN])
  _close(out.model_state, expected)
  assert float(out.auxiliary["fix"]) == 0.0
  joint = _losses("joint", START_FIX - 1, batch)
  assert _differ(joint.model_state, expected)


def test_openmatch_from_start_fix_the_selected_batch_is_a_second_forward():
  cfg, apply_fn, params, stats = _openmatch("separate")
  batch = _batch(2)
  out = _losses("separate", START_FIX, batch)
  _, first = common.forward_concat(apply_fn, params, stats, [batch[k] for k in MAIN])
  (sel_w, sel_s), second = common.forward_concat(apply_fn, params, first,
                                                 [batch[k] for k in SELECTED])
  _close(out.model_state, second)  # two running-average updates, in the official order
  pseudo = jax.nn.one_hot(jnp.argmax(sel_w["logits"], -1), 6)
  fix = cfg.lambda_fix * common.masked_soft_cross_entropy(sel_s["logits"], pseudo,
                                                          jnp.ones(4))
  np.testing.assert_allclose(float(out.auxiliary["fix"]), float(fix), rtol=1e-5)


def test_openmatch_gradients_flow_through_the_second_forward_only_when_it_runs():
  cfg, apply_fn, params, stats = _openmatch("separate")
  batch = _batch(3)

  def fix_loss(p, step):
    return openmatch.losses(LossContext(apply_fn, p, stats, batch, None, step, cfg)).auxiliary["fix"]

  before = jax.grad(fix_loss)(params, START_FIX - 1)
  after = jax.grad(fix_loss)(params, START_FIX)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(before))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(after)) > 0.0


def test_ggr_openmatch_steps_before_start_step_are_the_plain_ssl_step():
  split = loop.load_split(tiny_config())
  plain_state, plain = _one_step(live_aux_config("openmatch", "sum"), split)
  results = {}
  for start in (0, 5):
    cfg = live_aux_config("openmatch", "osr")
    cfg.ggr.update(subspace_dim=2, start_step=start)
    results[start] = _one_step(cfg, split)
  late_state, late = results[5]
  _equal_params(late_state.params, plain_state.params)
  assert float(late["ggr/aux_norm_kept"]) == 1.0
  np.testing.assert_allclose(float(late["ggr/cos_before"]), float(plain["ggr/cos_before"]),
                             rtol=1e-5)
  assert int(optax.tree.get(late_state.opt_state, "basis_size")) == 0  # no tracking before the start
  early_state, early = results[0]
  assert float(early["ggr/aux_norm_kept"]) < 1.0
  assert int(optax.tree.get(early_state.opt_state, "basis_size")) == 1


def test_official_figures_select_the_best_ema_accuracy_and_its_raw_open_metrics():
  evals = [
      {"step": 2, "split": "eval", "eval/closed_acc": 0.5, "eval/open_bacc": 0.4,
       "eval_raw/open_bacc": 0.45, "eval_raw/auroc": 0.6},
      {"step": 4, "split": "eval", "eval/closed_acc": 0.8, "eval/open_bacc": 0.7,
       "eval_raw/open_bacc": 0.65, "eval_raw/auroc": 0.75},
      {"step": 6, "split": "eval", "eval/closed_acc": 0.8, "eval/open_bacc": 0.9,
       "eval_raw/open_bacc": 0.95, "eval_raw/auroc": 0.99},  # a tie keeps the first
      {"step": 8, "split": "eval", "eval/closed_acc": 0.7, "eval/open_bacc": 0.6,
       "eval_raw/open_bacc": 0.6, "eval_raw/auroc": 0.7},
  ]
  assert loop.official_figures(evals) == {
      "official_closed_acc": 0.8, "official_step": 4, "official_open_bacc": 0.65,
      "official_auroc": 0.75}
  assert loop.official_figures([]) == {}


def test_a_run_reports_the_final_ema_and_the_official_figures(tmp_path):
  cfg = tiny_config(steps=4)
  cfg.train.eval_every = 2
  summary = loop.train(cfg, tmp_path, progress=False)
  records = [r for r in loop._read_log(tmp_path) if r["split"] == "eval"]
  assert [r["step"] for r in records] == [2, 4]
  final = records[-1]
  assert summary["closed_acc"] == final["eval/closed_acc"]  # the honest figure: final EMA
  best = max(records, key=lambda r: (r["eval/closed_acc"], -r["step"]))
  assert summary["official_step"] == best["step"]
  assert summary["official_closed_acc"] == best["eval/closed_acc"]
  assert summary["official_open_bacc"] == best["eval_raw/open_bacc"]
  assert summary["official_auroc"] == best["eval_raw/auroc"]
  # after 4 steps the EMA (decay 0.999) still sits near the initialisation
  assert any(r["eval/auroc"] != r["eval_raw/auroc"] for r in records)


@pytest.mark.parametrize("rule", ["official", "otsu"])
def test_fixmatch_runs_threshold_the_msp_by_the_configured_rule(tmp_path, rule):
  cfg = tiny_config(steps=2)
  cfg.eval.threshold = rule
  trainer = loop.Trainer(cfg, tmp_path, progress=False, devices=jax.devices()[:1])
  result = trainer.evaluate(trainer.program.init_state())
  if rule == "official":
    assert result["threshold"] == 0.95
  else:
    assert result["threshold"] != 0.95 and 0.0 < result["threshold"] < 1.0
