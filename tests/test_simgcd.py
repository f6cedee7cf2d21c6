"""SimGCD and the category-discovery protocol: splits, losses, one step, a short run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax.configs import simgcd as simgcd_config
from ggr_jax.data.digits import digits_gcd_split
from ggr_jax.data.gcd import make_gcd_split
from ggr_jax.ssl import simgcd
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop
from tests.test_train import _one_step


def gcd_config(steps: int = 2):
  cfg = simgcd_config.get_config()
  cfg.simgcd.update(hidden_dim=32, bottleneck_dim=16)
  cfg.train.update(steps=steps, steps_per_epoch=2, batch_size=8, log_every=1,
                   eval_every=steps, checkpoint_every=steps, eval_batch_size=128)
  return cfg


@pytest.mark.parametrize("seed", [0, 3])
def test_the_labeled_set_is_the_given_share_of_old_images_and_the_rest_is_unlabeled(seed):
  split = digits_gcd_split(old_classes=(7, 1, 4), prop_labeled=0.5, seed=seed)
  old = np.isin(split.id_classes, (7, 1, 4))
  assert split.id_classes[:3] == (7, 1, 4) and not old[3:].any()
  n_old = int(np.sum(split.y_unlabeled < 3)) + len(split.y_labeled)
  assert len(split.y_labeled) == int(0.5 * n_old)
  assert set(split.y_labeled.tolist()) == {0, 1, 2}
  assert len(split.y_labeled) + len(split.y_unlabeled) == 1257  # every training image once
  assert split.unlabeled_is_id.tolist() == (split.y_unlabeled < 3).tolist()
  assert sorted(set(split.y_test_id.tolist())) == list(range(10)) and split.is_closed_set


def test_gcd_splits_refuse_what_they_cannot_make():
  x, y = np.zeros((20, 1, 1, 1), np.uint8), np.repeat(np.arange(4), 5)
  common = dict(seed=0, mean=(0.5,), std=(0.5,), name="toy")
  with pytest.raises(ValueError, match="no New class"):
    make_gcd_split(x, y, x, y, old_classes=(0, 1, 2, 3), prop_labeled=0.5, **common)
  with pytest.raises(ValueError, match="distinct classes"):
    make_gcd_split(x, y, x, y, old_classes=(0, 0), prop_labeled=0.5, **common)
  with pytest.raises(ValueError, match="labels some but not all"):
    make_gcd_split(x, y, x, y, old_classes=(0,), prop_labeled=0.1, **common)


@pytest.mark.parametrize("epoch", [0, 1, 7, 28, 29, 30, 100])
def test_the_teacher_temperature_is_the_official_linspace_then_constant(epoch):
  official = np.concatenate([np.linspace(0.07, 0.04, 30), np.full(200, 0.04)])[epoch]
  assert float(simgcd.teacher_temperature(epoch)) == pytest.approx(official, rel=1e-6)


def test_a_batch_without_labels_has_zero_supervised_terms_and_finite_gradients():
  rng = np.random.default_rng(0)
  logits, proj = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, 5), (8, 3)))
  labels, labeled = jnp.zeros(4, jnp.int32), jnp.zeros(4, bool)

  def total(logits, proj):
    terms = simgcd.simgcd_terms(logits, proj, labels, labeled, 0.05, memax_weight=2.0)
    return terms["total"], terms

  (_, terms), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(logits, proj)
  assert float(terms["cls"]) == 0.0 and float(terms["supcon"]) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_the_mean_entropy_penalty_is_zero_for_uniform_use_of_the_prototypes():
  logits = jnp.eye(4) * 3.0  # each prototype the argmax of one row: the mean is uniform
  assert float(simgcd.mean_entropy_penalty(logits)) == pytest.approx(0.0, abs=1e-6)
  assert float(simgcd.mean_entropy_penalty(jnp.tile(logits[:1], (4, 1)))) > 0.5


def test_the_protocol_and_the_algorithm_must_match():
  cfg = gcd_config()
  cfg.algorithm = "fixmatch"
  with pytest.raises(config_lib.ConfigError, match="trains on openset, closed"):
    config_lib.validate(cfg)
  cfg = gcd_config()
  cfg.dataset.protocol = "openset"
  with pytest.raises(config_lib.ConfigError, match="trains on gcd"):
    config_lib.validate(cfg)


def test_one_step_splits_the_supervised_anchor_from_the_unsupervised_side():
  cfg = gcd_config()
  cfg.ggr.mode = "vlr"
  config_lib.validate(cfg)
  state, metrics = _one_step(cfg, loop.load_split(cfg))
  for name in ("losses/sup", "losses/aux", "losses/distill", "losses/me_max"):
    assert np.isfinite(float(metrics[name])), name
  assert float(metrics["monitors/teacher_temp"]) == pytest.approx(0.07)
  assert int(state.step) == 1


def test_a_short_digits_run_reports_all_old_and_new_accuracy(tmp_path):
  summary = loop.train(gcd_config(steps=3), tmp_path, progress=False)
  assert summary["protocol"] == "gcd"
  for split in ("", "test_"):
    for part in ("all", "old", "new"):
      assert 0.0 <= summary[f"gcd_{split}{part}"] <= 1.0
  assert summary["closed_acc"] == summary["gcd_test_all"]
