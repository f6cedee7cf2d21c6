"""MetaSemi against one official SemiMeta training step (``semimeta_step_public.npz``).

The reference (``shared/parity/semimeta_step_public.npz``, or the file named by
``GGR_SEMIMETA_STEP``) holds one official step of ConvLarge in float64: weights, batch,
the eval-mode labeled gradient, the finite-difference meta pass, the exact JVP
pseudo-labels (harness), the injected mixup coefficients and dropout masks, every loss,
gradient, and the parameters and BatchNorm buffers after the SGD step. ggr_jax's
``meta_pseudo_labels`` must reproduce the official meta pass with
``method="finite_difference"`` and the ``jvp/*`` keys with ``method="jvp"``; its
training terms, with the official pseudo-labels, coefficients and masks injected, must
reproduce the losses, the gradients, the step's optimizer update (built from the run
config, schedule included) and the BatchNorm buffers. Shapes, step, learning rate and
every setting are read from the reference, so a reference of another seed passes
unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ggr_jax import meta_labels
from ggr_jax.configs import metasemi as metasemi_config
from ggr_jax.models import convert
from ggr_jax.models.convlarge import ConvLarge
from ggr_jax.models.heads import OpenSetNet
from ggr_jax.ssl import common, metasemi
from ggr_jax.train import optim
from ggr_jax.train.state import make_apply_fn
from tests.conftest import float64_convolutions_by_matmul, parity_checker, parity_reference


@pytest.fixture(scope="module")
def golden():
  path = parity_reference("GGR_SEMIMETA_STEP", "semimeta_step_public.npz")
  checker = parity_checker("compare_meta")
  ref = checker.load(str(path))
  cases = [str(c) for c in np.atleast_1d(ref["cases"])]
  with jax.enable_x64(True):
    yield checker, ref, cases


class Case:
  """One case of the reference, in ggr_jax's layout (float64, NHWC)."""

  def __init__(self, ref: dict, case: str):
    self.ref, self.case = ref, case
    r = self.get
    arrays = {k.split("/", 2)[2]: v for k, v in ref.items()
              if k.startswith((f"{case}/param0/", f"{case}/buf0/"))}
    self.num_classes = int(r("cfg/num_classes"))
    variables = convert.semimeta_to_flax(arrays, self.num_classes, dtype=np.float64)
    self.params = jax.tree.map(jnp.asarray, variables["params"])
    self.stats = jax.tree.map(jnp.asarray, variables["batch_stats"])
    self.model = OpenSetNet(ConvLarge(
        self.num_classes, bn_momentum=float(r("cfg/bn_momentum")), bn_eps=float(r("cfg/bn_eps")),
        leaky_slope=float(r("cfg/lrelu_slope")), dropout=float(r("cfg/dropout_p"))),
        self.num_classes)
    self.apply_fn = make_apply_fn(self.model)
    nhwc = lambda a: jnp.asarray(np.asarray(a, np.float64).transpose(0, 2, 3, 1))
    self.x_l, self.x_u = nhwc(r("x_l")), nhwc(r("x_u"))
    self.y_l = jnp.asarray(r("y_l"))
    self.step = int(r("cfg/step"))
    self.cfg = self.run_config()

  def get(self, key: str) -> np.ndarray:
    return self.ref[f"{self.case}/{key}"]

  def run_config(self):
    """The packaged MetaSemi config with the reference's optimizer and schedule."""
    r = self.get
    cfg = metasemi_config.get_config()
    cfg.optim.update(lr=float(r("cfg/lr_max")), momentum=float(r("cfg/momentum")),
                     weight_decay=float(r("cfg/weight_decay")),
                     warmup_steps=int(r("cfg/warmup")),
                     milestones=tuple(int(m) for m in r("cfg/milestones")),
                     decay_factor=float(r("cfg/lr_gamma")))
    cfg.train.steps = int(max(r("cfg/milestones"))) * 2
    cfg.metasemi.update(weight=float(r("cfg/w_max")), ramp_steps=int(r("cfg/warmup")),
                        epsilon=float(r("cfg/epsilon_arg")), mixup=bool(r("cfg/mixup")),
                        mixup_alpha=float(r("cfg/beta_alpha")))
    return cfg

  def keyed(self, values: dict) -> dict:
    return {f"{self.case}/{k}": np.asarray(v) for k, v in values.items()}

  def named(self, family: str, tree, collection: str = "params") -> dict:
    return {f"{self.case}/{family}/{name}": v
            for name, v in convert.flax_to_semimeta(tree, collection).items()}


def _compiled(fn):
  """``fn`` as one program, its float64 convolutions as matmuls (XLA's CPU backend has
  no float64 convolution kernel; :func:`tests.conftest.float64_convolutions_by_matmul`)."""
  jitted = jax.jit(fn)

  def call(*args):
    with float64_convolutions_by_matmul():
      return jitted(*args)

  return call


def _check(checker, ref, cand, patterns):
  ok, rows = checker.check(ref, cand, keys=patterns, required=patterns)
  assert ok, "\n" + checker.format_rows(rows, only_fail=True)


def test_schedule_and_weight_are_the_official_ones_at_the_reference_step(golden):
  checker, ref, cases = golden
  for case in cases:
    c = Case(ref, case)
    lr = optim.learning_rate(c.cfg)(c.step)
    weight = c.cfg.metasemi.weight * common.ramp(c.step, 0, c.cfg.metasemi.ramp_steps)
    _check(checker, ref, c.keyed({"cfg/lr": lr, "cfg/w_t": weight, "loss/w_t": weight}),
           [f"{case}/cfg/lr", f"{case}/cfg/w_t", f"{case}/loss/w_t"])


def test_finite_difference_meta_pass_reproduces_the_official_one(golden):
  checker, ref, cases = golden
  for case in cases:
    c = Case(ref, case)
    lr = optim.learning_rate(c.cfg)(c.step)
    labeled = _compiled(functools.partial(meta_labels.labeled_gradient, c.apply_fn))(
        c.params, c.stats, c.x_l, c.y_l)
    out = _compiled(functools.partial(
        meta_labels.meta_pseudo_labels, c.apply_fn, method="finite_difference",
        epsilon=c.cfg.metasemi.epsilon))(c.params, c.stats, c.x_l, c.y_l, c.x_u, lr)
    relu = jax.nn.relu(out.yhat_pre_relu)
    cand = c.keyed({
        "meta/logits_l": labeled.logits, "meta/loss_l": labeled.loss,
        "meta/g_norm": out.g_norm, "meta/epsilon": out.epsilon, "meta/p": out.p,
        "meta/diff": out.delta * out.epsilon, "meta/delta": out.delta,
        "meta/yhat_pre_relu": out.yhat_pre_relu, "meta/yhat_relu": relu,
        "meta/row_sums": relu.sum(-1), "meta/yhat": out.yhat,
        "meta/n_clipped": np.int64(out.clipped)})
    cand.update(c.named("g", labeled.grad))
    patterns = [f"{case}/meta/{k}" for k in (
        "logits_l", "loss_l", "g_norm", "epsilon", "p", "diff", "delta", "yhat_pre_relu",
        "yhat_relu", "row_sums", "yhat", "n_clipped")] + [f"{case}/g/*"]
    _check(checker, ref, cand, patterns)


def test_jvp_meta_pass_reproduces_the_exact_directional_derivative(golden):
  checker, ref, cases = golden
  for case in cases:
    c = Case(ref, case)
    out = _compiled(functools.partial(meta_labels.meta_pseudo_labels, c.apply_fn, method="jvp"))(
        c.params, c.stats, c.x_l, c.y_l, c.x_u, optim.learning_rate(c.cfg)(c.step))
    cand = c.keyed({"jvp/Jg": out.delta / 2, "jvp/delta": out.delta, "jvp/yhat": out.yhat,
                    "meta/p": out.p})
    _check(checker, ref, cand, [f"{case}/jvp/Jg", f"{case}/jvp/delta", f"{case}/jvp/yhat",
                                f"{case}/meta/p"])
    # the official finite difference is not the JVP on ConvLarge (kinks): they differ
    assert not np.allclose(out.delta, c.get("meta/delta"), rtol=0, atol=1e-6)


def _injected_masks(masks: list[np.ndarray]):
  """An interceptor that hands the official dropout keep-masks out in call order."""
  queue = [jnp.asarray(m.astype(bool)) for m in masks]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "keep_mask":
      return queue.pop(0)
    return next_fun(*args, **kwargs)

  return interceptor


def test_training_step_with_official_pseudo_labels_reproduces_the_official_step(golden):
  checker, ref, cases = golden
  for case in cases:
    c = Case(ref, case)
    mixup = c.cfg.metasemi.mixup
    # keep-masks of the first forward (x_mix, or x_l without mixup), then of x_u
    masks = [c.get(k) for k in ("drop/cls_1", "drop/cls_2", "drop/u_1", "drop/u_2")]
    yhat = jnp.asarray(c.get("meta/yhat"))
    lam = jnp.asarray(c.get("interp/lambda")) if mixup else None
    weight = c.cfg.metasemi.weight * common.ramp(c.step, 0, c.cfg.metasemi.ramp_steps)

    def terms(params):
      with nn.intercept_methods(_injected_masks(masks)):
        return metasemi.train_terms(c.apply_fn, params, c.stats, c.x_l, c.y_l, c.x_u, yhat, lam)

    @_compiled
    def terms_and_gradients(params):
      return (terms(params), jax.grad(lambda p: terms(p).cls)(params),
              jax.grad(lambda p: weight * jnp.sum(terms(p).cons_terms))(params))

    out, g_sup, g_aux = terms_and_gradients(c.params)
    total = optax.tree.add(g_sup, g_aux)

    cfg = c.cfg
    tx = optim.make_optimizer(cfg)
    opt_state = optax.tree.set(tx.init(c.params), count=jnp.asarray(c.step))
    updates, _ = tx.update(g_sup, opt_state, c.params, aux_grads=g_aux)
    params1 = optax.apply_updates(c.params, updates)

    cons = jnp.sum(out.cons_terms)
    cand = c.keyed({"loss/cls": out.cls, "loss/cons": cons, "loss/total": out.cls + weight * cons,
                    "train/logits_u": out.logits_u,
                    "train/p_u": jax.nn.softmax(out.logits_u, -1)})
    if mixup:
      cand.update(c.keyed({"interp/x": out.x_mix.transpose(0, 3, 1, 2), "interp/y": out.y_mix,
                           "interp/logits": out.logits_first}))
    else:
      cand.update(c.keyed({"train/logits_l": out.logits_first}))
    cand.update(c.named("grad", total))
    cand.update(c.named("param1", params1))
    cand.update(c.named("buf_mid", out.model_state_mid, "batch_stats"))
    cand.update(c.named("buf1", out.model_state, "batch_stats"))
    patterns = [f"{case}/{k}" for k in ("loss/cls", "loss/cons", "loss/total", "train/*",
                                        "grad/*", "param1/*", "buf_mid/*running*",
                                        "buf1/*running*")]
    if mixup:
      patterns += [f"{case}/interp/x", f"{case}/interp/y", f"{case}/interp/logits"]
    _check(checker, ref, cand, patterns)
