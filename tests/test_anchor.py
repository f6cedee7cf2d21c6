"""The supervised anchor: from the joint forward, or from the labeled views alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggr_jax import ssl
from ggr_jax.models import build_model
from ggr_jax.ssl import LossContext
from ggr_jax.train import config as config_lib
from ggr_jax.train import step as step_lib
from tests.test_train import BASE_ALGORITHMS as ALGORITHMS
from tests.test_train import _one_step, live_aux_config, split  # noqa: F401  (fixture)


def _model_and_variables(algorithm):
  model = build_model("cnn", 6, ssl.head(algorithm))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
  return step_lib.make_apply_fn(model), variables["params"], variables["batch_stats"]


def _batch_repeating_the_labeled_images(algorithm, images, labels, repeat):
  """Every view of the batch holds the same images: labeled views once, others ``repeat`` times."""
  batch = {"y_lb": labels}
  for source, names in ssl.get(algorithm).views.items():
    for name in names:
      batch[name] = images if source == "labeled" else jnp.tile(images, (repeat, 1, 1, 1))
  return batch


def _sup(algorithm, apply_fn, params, stats, batch, cfg):
  return ssl.get(algorithm).losses(LossContext(apply_fn, params, stats, batch, None, 0, cfg)).sup


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_supervised_loss_of_the_joint_outputs_is_the_sup_of_losses(algorithm, split):
  cfg = step_lib.algorithm_config(live_aux_config(algorithm))
  apply_fn, params, stats = _model_and_variables(algorithm)
  views = step_lib.make_views(live_aux_config(algorithm), split.mean, split.std, None)
  data = {"x_labeled": split.x_labeled, "y_labeled": split.y_labeled.astype(np.int32),
          "x_unlabeled": split.x_unlabeled, "unlabeled_is_id": split.unlabeled_is_id}
  batch = views(jax.random.PRNGKey(3), 0, data, jnp.ones(split.x_unlabeled.shape[0], bool))
  sup = _sup(algorithm, apply_fn, params, stats, batch, cfg)
  # In train mode the labeled-only forward normalises with other statistics, so the two
  # differ; in eval mode (running statistics) the labeled rows see the same function.
  eval_apply = lambda p, s, x, train: apply_fn(p, s, x, False)
  sup_eval = _sup(algorithm, eval_apply, params, stats, batch, cfg)
  lab_eval, _ = ssl.labeled_loss(algorithm, eval_apply, params, stats, batch, cfg)
  lab_train, _ = ssl.labeled_loss(algorithm, apply_fn, params, stats, batch, cfg)
  np.testing.assert_allclose(float(lab_eval), float(sup_eval), rtol=1e-6)
  assert abs(float(lab_train) - float(sup)) > 1e-6


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_labeled_anchor_equals_joint_anchor_when_the_batch_statistics_coincide(algorithm):
  # With every unlabeled view a copy of the labeled images, the joint batch has the
  # labeled batch's BatchNorm statistics as a function of the parameters, so both
  # anchors are the same gradient.
  cfg = step_lib.algorithm_config(live_aux_config(algorithm))
  apply_fn, params, stats = _model_and_variables(algorithm)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((6, 8, 8, 1)), jnp.float32)
  batch = _batch_repeating_the_labeled_images(algorithm, images, jnp.arange(6) % 6, 2)
  joint = jax.grad(lambda p: _sup(algorithm, apply_fn, p, stats, batch, cfg))
  labeled = jax.grad(lambda p: ssl.labeled_loss(algorithm, apply_fn, p, stats, batch, cfg)[0])
  g_joint, g_labeled = joint(params), labeled(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               g_joint, g_labeled)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_joint)) > 1e-3


@pytest.mark.parametrize("algorithm", ["openmatch"])  # two labeled views
def test_labeled_anchor_changes_the_update(algorithm, split):
  cfg = live_aux_config(algorithm, "sum")
  cfg.ggr.aux_weight = 0.0  # the update is the anchor alone
  joint_state, _ = _one_step(cfg, split)
  cfg.ggr.anchor = "labeled"
  labeled_state, metrics = _one_step(cfg, split)
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       joint_state.params, labeled_state.params)
  assert max(jax.tree.leaves(diffs)) > 1e-6
  assert np.isfinite(float(metrics["losses/total"]))


def test_labeled_anchor_with_per_sample_geometry_runs(split):
  cfg = live_aux_config("fixmatch", "vlr")
  cfg.ggr.update(dict(anchor="labeled", granularity="per_sample", per_sample_method="jvp"))
  _, metrics = _one_step(cfg, split)
  assert 0.0 <= float(metrics["ggr/sample_conflict"]) <= 1.0


def test_labeled_anchor_needs_split_gradients():
  cfg = live_aux_config("fixmatch", "sum")
  cfg.ggr.update(dict(anchor="labeled", split_gradients=False))
  with pytest.raises(config_lib.ConfigError, match="ggr.anchor"):
    config_lib.validate(cfg, num_devices=1)
  cfg.ggr.update(dict(anchor="both", split_gradients=True))
  with pytest.raises(config_lib.ConfigError, match="'joint', 'labeled'"):
    config_lib.validate(cfg, num_devices=1)
