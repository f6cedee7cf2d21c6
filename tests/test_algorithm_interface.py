"""A new algorithm plugs in through ``ggr_jax.ssl.Algorithm`` alone (no edit of train/)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ggr_jax import ssl
from ggr_jax.ssl import Algorithm, EpochContext, LossContext, Losses, common
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop
from ggr_jax.train.checkpoint import Checkpointer
from ggr_jax.train.metrics_log import read as read_metrics
from tests.test_train import tiny_config


def _entropy_min_losses(ctx: LossContext) -> Losses:
  """Toy method: labeled CE plus entropy minimisation on the weak unlabeled view, counting
  its steps in the algorithm state."""
  (lb, ulb), model_state = common.forward_concat(
      ctx.apply_fn, ctx.params, ctx.model_state, [ctx.batch["x_lb"], ctx.batch["x_ulb"]])
  probs = jax.nn.softmax(ulb["logits"])
  terms = -jnp.sum(probs * jnp.log(probs + 1e-8), axis=-1) / probs.shape[0]
  return Losses(
      supervised={"ce": common.cross_entropy(lb["logits"], ctx.batch["y_lb"])},
      auxiliary={"entropy": ctx.cfg.weight * jnp.sum(terms)},
      model_state=model_state, sample_aux=ctx.cfg.weight * terms,
      state={"steps": ctx.state["steps"] + 1, "epochs": ctx.state["epochs"]})


def _count_epochs(ctx: EpochContext) -> dict:
  mean_conf = ctx.predict_unlabeled(ctx.train_state.ema_params, ctx.train_state.batch_stats,
                                    ctx.key, _max_prob)
  assert mean_conf.ndim == 1 and np.all((mean_conf > 0) & (mean_conf <= 1))  # one per image
  return {"steps": ctx.train_state.algo_state["steps"],
          "epochs": ctx.train_state.algo_state["epochs"] + 1}


def _max_prob(outputs):
  return jnp.max(jax.nn.softmax(outputs["logits"]), axis=-1)


TOY = Algorithm(
    name="toy_entropy_min",
    default_config=lambda: ml_collections.ConfigDict({"weight": 0.5}),
    losses=_entropy_min_losses,
    views={"labeled": {"x_lb": "weak"}, "unlabeled": {"x_ulb": "weak"}},
    labeled_views=("x_lb",),
    supervised_loss=lambda outputs, batch, cfg: common.cross_entropy(outputs[0]["logits"],
                                                                     batch["y_lb"]),
    init_state=lambda n, cfg: {"steps": jnp.zeros((), jnp.int32),
                               "epochs": jnp.zeros((), jnp.int32)},
    epoch_hook=_count_epochs,
    validate=lambda cfg, fail: None if cfg.weight >= 0 else fail("weight", cfg.weight, ">= 0"),
)


@pytest.fixture(scope="module", autouse=True)
def registered():
  ssl.register(TOY, replace=True)
  yield
  ssl._REGISTERED.pop(TOY.name)  # pylint: disable=protected-access


def _toy_config(steps=4):
  cfg = tiny_config(steps=steps)
  cfg.algorithm = TOY.name
  cfg[TOY.name] = TOY.default_config()
  return cfg


def test_a_registered_toy_algorithm_trains_through_the_run_layer(tmp_path):
  cfg = _toy_config(steps=4)  # steps_per_epoch = 2: epoch boundaries at steps 0 and 2
  trainer = loop.Trainer(cfg, tmp_path, progress=False)
  summary = trainer.run()
  assert summary["steps"] == 4 and summary["algorithm"] == TOY.name
  state = trainer.restore(Checkpointer(tmp_path))
  assert int(state.algo_state["steps"]) == 4  # Losses.state is carried and checkpointed
  assert int(state.algo_state["epochs"]) == 2  # the epoch hook ran at steps 0 and 2
  records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert {"losses/ce", "losses/entropy", "ggr/cos_before"} <= set(records[-1])
  np.testing.assert_allclose(records[-1]["losses/total"],
                             records[-1]["losses/ce"] + records[-1]["losses/entropy"], rtol=1e-5)


def test_the_toy_algorithm_takes_per_sample_geometry(tmp_path):
  cfg = _toy_config(steps=2)
  cfg.ggr.update(dict(granularity="per_sample", per_sample_method="jvp"))
  summary = loop.train(cfg, tmp_path, progress=False)
  assert summary["steps"] == 2


def test_its_config_block_is_validated_by_its_own_rule():
  cfg = _toy_config()
  cfg[TOY.name].weight = -1.0
  with pytest.raises(config_lib.ConfigError, match=f"config.{TOY.name}.weight = -1.0"):
    config_lib.validate(cfg, num_devices=1)
  del cfg[TOY.name]
  with pytest.raises(config_lib.ConfigError, match=f"config.{TOY.name} is missing"):
    config_lib.validate(cfg, num_devices=1)


@pytest.mark.parametrize("change, message", [
    (dict(views={"test": {"x": "weak"}}), "unknown index sources"),
    (dict(views={"labeled": {"x_lb": "weak"}, "selected": {"x_s": "weak"}}), "no source_mask"),
    (dict(views={"labeled": {"x_lb": "mixed"}}), "view kinds"),
    (dict(labeled_views=("x_missing",)), "are no views"),
    (dict(ood_score="energy"), "ood_score"),
])
def test_a_malformed_algorithm_is_refused_when_built(change, message):
  fields = {f: getattr(TOY, f) for f in TOY.__dataclass_fields__}
  with pytest.raises(ValueError, match=message):
    Algorithm(**{**fields, **change})


def test_names_are_unique_unless_replaced():
  with pytest.raises(ValueError, match="exists"):
    ssl.register(TOY)
  assert TOY.name in ssl.names() and ssl.get(TOY.name) is TOY
