"""Meta-gradient pseudo-labels and the MetaSemi algorithm: the properties they must have."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ggr_jax import meta_labels
from ggr_jax.configs import metasemi as metasemi_config
from ggr_jax.models import build_model
from ggr_jax.ssl import metasemi
from ggr_jax.train import config as config_lib
from ggr_jax.train import loop, optim
from tests.test_train import _one_step, tiny_config


class _SmoothNet(nn.Module):
  """A differentiable-everywhere net (tanh), so the finite difference converges to the JVP."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    h = jnp.tanh(nn.Dense(7)(x.reshape(x.shape[0], -1)))
    return {"logits": nn.Dense(4)(h)}


@pytest.fixture(scope="module")
def smooth():
  with jax.enable_x64(True):
    net = _SmoothNet()
    rng = np.random.default_rng(0)
    x_l, x_u = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(6, 3)))
    y_l = jnp.asarray(rng.integers(0, 4, 5))
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          net.init(jax.random.PRNGKey(0), x_l)["params"])
    apply_fn = lambda p, s, x, train: (net.apply({"params": p}, x), s)
    yield apply_fn, params, x_l, y_l, x_u


def test_the_jvp_is_the_limit_of_the_central_difference_on_a_smooth_net(smooth):
  apply_fn, params, x_l, y_l, x_u = smooth
  with jax.enable_x64(True):
    exact = meta_labels.meta_pseudo_labels(apply_fn, params, {}, x_l, y_l, x_u, 0.3)
    errors = [float(jnp.max(jnp.abs(meta_labels.meta_pseudo_labels(
        apply_fn, params, {}, x_l, y_l, x_u, 0.3, method="finite_difference",
        epsilon=eps).delta - exact.delta))) for eps in (1e-2, 1e-3)]
  assert errors[1] < 1e-3 * float(jnp.max(jnp.abs(exact.delta))), errors
  assert 80 < errors[0] / errors[1] < 120, errors  # O(eps^2): 100x per decade


def test_the_jvp_update_is_the_exact_meta_gradient_of_the_unrolled_mse_step(smooth):
  """With ``ytilde = p`` and the MSE inner loss, ``d L_l(theta - a grad L_u) / d ytilde``
  is ``(2 a / B_u) J g``, so ``p - lr * delta`` is one meta step of size ``lr B_u / a``."""
  apply_fn, params, x_l, y_l, x_u = smooth
  alpha, lr = 0.05, 0.3
  with jax.enable_x64(True):
    out = meta_labels.meta_pseudo_labels(apply_fn, params, {}, x_l, y_l, x_u, lr)
    probs = lambda p: jax.nn.softmax(apply_fn(p, {}, x_u, False)[0]["logits"])
    inner = lambda p, y: jnp.mean(jnp.sum((probs(p) - y) ** 2, -1))
    outer = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply_fn(p, {}, x_l, False)[0]["logits"], y_l).mean()

    def unrolled(y):
      step = jax.grad(inner)(params, y)
      return outer(jax.tree.map(lambda a, b: a - alpha * b, params, step))

    meta_grad = jax.grad(unrolled)(out.p)
  np.testing.assert_allclose(out.delta, x_u.shape[0] / alpha * meta_grad, rtol=1e-9, atol=1e-12)


def test_the_update_stays_on_the_simplex_and_carries_no_gradient(smooth):
  apply_fn, params, x_l, y_l, x_u = smooth
  with jax.enable_x64(True):
    out = meta_labels.meta_pseudo_labels(apply_fn, params, {}, x_l, y_l, x_u, 50.0)
    np.testing.assert_allclose(out.delta.sum(-1), 0.0, atol=1e-12)  # J g rows sum to 0
    assert int(out.clipped) > 0  # a large step clips
    np.testing.assert_allclose(out.yhat.sum(-1), 1.0, rtol=1e-12)
    assert float(jnp.min(out.yhat)) >= 0.0
    grads = jax.grad(lambda p: jnp.sum(meta_labels.meta_pseudo_labels(
        apply_fn, p, {}, x_l, y_l, x_u, 1.0).yhat ** 2))(params)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) == 0.0


def test_a_row_clipped_to_zero_stays_zero():
  out = meta_labels.clip_and_renormalise(jnp.array([[-1.0, -2.0], [1.0, 3.0]]))
  np.testing.assert_array_equal(out, [[0.0, 0.0], [0.25, 0.75]])


def test_the_meta_pass_runs_in_eval_mode_and_leaves_the_statistics_alone():
  model = build_model("convlarge", 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  calls = []

  def apply_fn(params, state, inputs, train):
    calls.append(train)
    return model.apply({"params": params, "batch_stats": state}, inputs, train=False), state

  # traced (every forward of the pass calls apply_fn while tracing), not run op by op
  jax.eval_shape(lambda v: meta_labels.meta_pseudo_labels(
      apply_fn, v["params"], v["batch_stats"], x, jnp.arange(4), x, 0.1,
      method="finite_difference"), variables)
  assert calls and not any(calls)


@pytest.mark.parametrize("method, message", [("nope", "method"), ("jvp", "epsilon")])
def test_bad_meta_arguments_are_refused(smooth, method, message):
  apply_fn, params, x_l, y_l, x_u = smooth
  with pytest.raises(ValueError, match=message):
    meta_labels.meta_pseudo_labels(apply_fn, params, {}, x_l, y_l, x_u, 0.1, method=method,
                                   epsilon=0.0 if message == "epsilon" else 0.01)


def test_convlarge_has_the_official_layout():
  model = build_model("convlarge", 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  convs = [(3, 128, 3), (128, 128, 3), (128, 128, 3), (128, 256, 3), (256, 256, 3),
           (256, 256, 3), (256, 512, 3), (512, 256, 1), (256, 128, 1)]
  expected = sum(k * k * i * o + 2 * o for i, o, k in convs) + 128 * 10 + 10
  assert sum(v.size for v in jax.tree.leaves(variables["params"])) == expected == 3_121_802
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * len(convs)


def test_channel_dropout_drops_whole_channels_and_rescales():
  model = build_model("convlarge", 10)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if type(context.module).__name__ == "ChannelDropout" and context.method_name == "__call__":
      seen.append((args[0], out))
    return out

  with nn.intercept_methods(record):
    model.apply(variables, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.PRNGKey(3)})
  assert len(seen) == 2
  for h, out in seen:
    ratio = np.asarray(out / jnp.where(h == 0, 1.0, h))
    per_map = ratio.reshape(ratio.shape[0], -1, ratio.shape[-1])
    values = np.unique(np.round(per_map, 6))
    assert set(values) <= {0.0, 2.0} and (per_map == per_map[:, :1]).all()


def _metasemi_config(**block):
  cfg = tiny_config("metasemi", "vlr")
  cfg.dataset.update(protocol="closed", labels_per_class=4)
  cfg.train.uratio = 1
  cfg.metasemi.update(block)
  return cfg


@pytest.fixture(scope="module")
def closed_split():
  return loop.load_split(_metasemi_config())


@pytest.mark.parametrize("meta, mixup", [(True, True), (False, False), (True, False)])
def test_one_rectified_step_of_each_ablation(closed_split, meta, mixup):
  cfg = _metasemi_config(meta=meta, mixup=mixup, ramp_steps=0)
  state, metrics = _one_step(cfg, closed_split)
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert float(metrics["losses/cons"]) > 0 and float(metrics["losses/cls"]) > 0
  assert ("monitors/meta_shift" in metrics) == meta
  assert int(state.step) == 1


def test_the_meta_learning_rate_is_the_optimizers(closed_split):
  """At step 0 of a warm-up schedule the learning rate is 0: no meta update at all."""
  cfg = _metasemi_config(ramp_steps=0)
  cfg.optim.update(schedule="warmup_step", warmup_steps=10, milestones=(100,))
  assert float(optim.learning_rate(cfg)(0)) == 0.0
  _, metrics = _one_step(cfg, closed_split)
  assert float(metrics["monitors/meta_shift"]) < 1e-6 and float(metrics["monitors/lr"]) == 0.0
  cfg.optim.warmup_steps = 0
  _, metrics = _one_step(cfg, closed_split)
  assert float(metrics["monitors/meta_shift"]) > 1e-3


def test_the_packaged_config_leaves_the_labeled_images_out_of_the_unlabeled_set():
  cfg = metasemi_config.get_config()
  config_lib.validate(cfg)
  split = loop.load_split(cfg)
  full = loop.load_split(_metasemi_config(labels_per_class=10))
  assert len(split.x_unlabeled) == len(full.x_unlabeled) - len(split.x_labeled)
  labeled = {bytes(x) for x in np.asarray(split.x_labeled)}
  assert not labeled & {bytes(x) for x in np.asarray(split.x_unlabeled)}


def test_the_warmup_step_schedule_decays_after_each_milestone():
  schedule = optim.warmup_step_schedule(0.1, 4000, (300, 350), 0.1)
  assert float(schedule(400)) == pytest.approx(0.01)
  cfg = tiny_config()
  cfg.optim.update(schedule="warmup_step", lr=0.1, warmup_steps=10, milestones=(20, 30))
  lr = optim.learning_rate(cfg)
  values = [float(lr(t)) for t in (0, 5, 10, 20, 21, 30, 31)]
  np.testing.assert_allclose(values, [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("metasemi.mixup_alpha", 0.0, "Beta"), ("metasemi.ramp_steps", -1, "ramp_steps"),
    ("metasemi.epsilon", 0.0, "epsilon"), ("metasemi.method", "central", "jvp"),
    ("train.uratio", 2, "one unlabeled image"), ("optim.milestones", (5, 3), "increasing"),
    ("optim.schedule", "linear", "usb_cosine")])
def test_bad_settings_name_the_field(field, value, message):
  cfg = _metasemi_config()
  section, key = field.split(".")
  cfg[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=rf"config\.{field}.*{message}"):
    config_lib.validate(cfg)


def test_a_labeled_batch_larger_than_the_labeled_set_is_refused_before_compiling(closed_split):
  cfg = _metasemi_config()
  cfg.train.batch_size = len(closed_split.x_labeled) + 8
  from ggr_jax.train import build as build_lib  # pylint: disable=import-outside-toplevel
  with pytest.raises(config_lib.ConfigError, match="train.batch_size.*labeled set has"):
    build_lib.build(cfg, build_lib.DataSpec.of_split(closed_split))


def test_mixup_coefficients_are_per_sample_and_targets_use_the_updated_labels():
  x_l, x_u = jnp.ones((3, 2, 2, 1)), jnp.zeros((3, 2, 2, 1))
  yhat = jnp.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
  lam = jnp.array([[1.0], [0.25], [0.0]])
  apply_fn = lambda p, s, x, train, rng=None: (
      {"logits": jnp.zeros((x.shape[0], 2)) + p}, s)
  out = metasemi.train_terms(apply_fn, jnp.zeros(2), {}, x_l, jnp.array([0, 0, 1]), x_u,
                             yhat, lam)
  np.testing.assert_allclose(out.x_mix[:, 0, 0, 0], [1.0, 0.25, 0.0])
  np.testing.assert_allclose(out.y_mix, [[1.0, 0.0], [0.625, 0.375], [1.0, 0.0]])
