"""EAGC's coordinator against the official code (``eagc_coordinator_public.npz``).

The reference (``shared/parity/eagc_coordinator_public.npz``, or the file named by
``GGR_EAGC_COORDINATOR``) holds standalone cases computed by the official
``compute_conceptor``, ``compute_known_energy_ratio``, ``compute_labeled_energy_reference``,
the ``mu``/``tau`` block of ``train()`` and ``GradientCoordinator``'s backward hook, in
float64: apertures, feature sizes, rank-deficient and rank-1 features, batches with no,
one or only labeled rows, zero rows, ``mu`` at its clamps, loss scales, a given
non-conceptor matrix, EAGC disabled. Every case is rebuilt from its ``in/*`` keys only
(its count, sizes and values are read from the file), pushed through
:mod:`ggr_jax.coordinator` (the edit through :func:`coordinate`'s own VJP) and checked
with the shared checker's tolerances.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ggr_jax import coordinator
from ggr_jax.configs import default as default_config
from ggr_jax.models import convert_gcd
from ggr_jax.models import vit
from ggr_jax.models.gcd_head import GCDHead
from ggr_jax.ssl import simgcd
from ggr_jax.train import config as config_lib
from ggr_jax.train import optim
from tests.conftest import parity_checker, parity_reference


@pytest.fixture(scope="module")
def coordinator_golden():
  path = parity_reference("GGR_EAGC_COORDINATOR", "eagc_coordinator_public.npz")
  checker = parity_checker("compare_eagc")
  ref = checker.load(str(path))
  cases = sorted({key.split("/")[0] for key in ref if key.startswith("case")})
  assert cases, f"no case in {path}"
  return checker, ref, cases


def pullback(z, g, edit):
  """``g`` pulled back through :func:`coordinator.coordinate` at ``z``."""
  _, vjp = jax.vjp(lambda z: coordinator.coordinate(z, edit), z)
  return vjp(g)[0]


def candidate(inputs: dict) -> dict:
  """The coordinator's outputs for one case, by ggr_jax alone."""
  z, zhat, g = (jnp.asarray(inputs[k]) for k in ("Z", "Zref", "G"))
  labeled = jnp.asarray(inputs["mask_lab_2v"])
  given = inputs["C_given"]
  c = jnp.asarray(given) if given.size else coordinator.conceptor(
      jnp.asarray(inputs["feats"]), float(inputs["aperture"]))
  common = dict(beta=float(inputs["beta"]), aga_weight=float(inputs["aga_weight"]),
                scale=float(inputs["scaler_scale"]))
  step = coordinator.coordinator_step(z, zhat, labeled, c, jnp.asarray(inputs["mu_in"]),
                                      **common)
  only_eep = coordinator.coordinator_step(z, zhat, labeled, c, inputs["mu_in"], **common,
                                          aga=False)
  only_aga = coordinator.coordinator_step(z, zhat, labeled, c, inputs["mu_in"], **common,
                                          eep=False)
  enabled = bool(inputs["enabled"])
  edited = {name: pullback(z, g, s.edit) if enabled else g
            for name, s in (("G_edited", step), ("G_eep_only", only_eep),
                            ("G_aga_only", only_aga))}
  mu0 = (coordinator.reference_energy(jnp.asarray(inputs["feats"]), c) if not given.size
         else jnp.nan)
  out = dict(C=c, mu0_official=mu0, e=step.energy, mu_batch=step.batch_energy,
             mu_out=step.mu, ratio=step.ratio, tau=step.tau,
             aga_active=jnp.any(labeled), aga_coef=step.edit.aga_coef, **edited)
  return {k: np.asarray(v) for k, v in out.items()}


def test_every_coordinator_case_matches_the_official_code(coordinator_golden):
  checker, ref, cases = coordinator_golden
  with jax.enable_x64(True):
    cand = {}
    for case in cases:
      inputs = {k.split("/")[-1]: ref[k] for k in ref if k.startswith(f"{case}/in/")}
      cand.update({f"{case}/out/{k}": v for k, v in candidate(inputs).items()})
  ok, rows = checker.check(ref, cand)
  assert ok, checker.format_rows(rows, failures_only=True)


@pytest.fixture(scope="module")
def step_golden():
  path = parity_reference("GGR_EAGC_STEP", "eagc_step_public.npz")
  checker = parity_checker("compare_eagc")
  return checker, checker.load(str(path))


def prefixed(ref: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


def heads_and_coordinator(ref: dict, z: jax.Array, zhat: jax.Array
                          ) -> tuple[dict, dict, dict]:
  """The official step from the backbone's output on (training features ``z``, reference
  features ``zhat``): SimGCD's heads and losses, the feature cotangent, the head
  gradients, and EAGC's coordinator on that cotangent. Also the feature cotangent of
  each variant (``noeagc``, ``eagc``) and the head gradients (Flax layout)."""
  cfg = prefixed(ref, "cfg/")
  head_params = convert_gcd.simgcd_head_to_flax(prefixed(ref, "init/projector/"))
  mlp_layers = sum(1 for k in head_params if k.startswith("mlp_"))
  head = GCDHead(num_classes=int(cfg["num_classes_K"]),
                 hidden_dim=head_params["mlp_0"]["kernel"].shape[1],
                 bottleneck_dim=head_params[f"mlp_{mlp_layers - 1}"]["kernel"].shape[1],
                 mlp_layers=mlp_layers)
  labels, mask = jnp.asarray(ref["batch/labels"]), jnp.asarray(ref["batch/mask_lab"])
  teacher_temp = simgcd.teacher_temperature(int(cfg["epoch"]))
  assert float(teacher_temp) == pytest.approx(float(cfg["teacher_temp"]), rel=1e-12)

  def loss_fn(z, params):
    out = head.apply({"params": params}, z)
    terms = simgcd.simgcd_terms(out["logits"], out["proj"], labels, mask, teacher_temp,
                                memax_weight=float(cfg["memax_weight"]),
                                sup_weight=float(cfg["sup_weight"]),
                                n_views=int(cfg["n_views"]))
    return terms["total"], (terms, out)

  params = jax.tree.map(jnp.asarray, head_params)
  (_, (terms, out)), (g_z, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                        has_aux=True)(z, params)
  c = coordinator.conceptor(jnp.asarray(ref["conceptor/feats"]), float(cfg["aperture"]))
  rows_labeled = jnp.asarray(ref["batch/mask_lab_2v"])
  settings = dict(beta=float(cfg["eep_weight_beta"]),
                  aga_weight=float(cfg["aga_weight_lambda"]),
                  momentum=float(cfg["mu_momentum"]))
  step = coordinator.coordinator_step(z, zhat, rows_labeled, c, ref["mu/before"], **settings)
  eep_only, aga_only = (coordinator.coordinator_step(z, zhat, rows_labeled, c,
                                                     ref["mu/before"], **settings, **off)
                        for off in ({"aga": False}, {"eep": False}))
  grads = {f"grad/projector/{k}": v for k, v in convert_gcd.flax_to_simgcd_head(g_head).items()
           if k != "1.last_layer.weight_g"}
  cand = {
      "fwd/mlp_head_out": out["hidden"], "fwd/student_proj": out["proj"],
      "fwd/student_out": out["logits"],
      "fwd/last_layer_weight": (params["prototypes"]
                                / jnp.linalg.norm(params["prototypes"], axis=0)).T,
      **{f"loss/{k}": v for k, v in terms.items()},
      "noeagc/gZ": g_z, "eagc/gZ_pre": g_z,
      **{f"noeagc/{k}": v for k, v in grads.items()},
      **{f"eagc/{k}": v for k, v in grads.items()},
      "conceptor/C": c, "fwd/e": step.energy, "fwd/ratio": step.ratio, "fwd/tau": step.tau,
      "fwd/aga_coef": step.edit.aga_coef, "mu/after": step.mu,
      "mu/batch_labeled_mean": step.batch_energy,
      "eagc/gZ_post": pullback(z, g_z, step.edit),
      "eagc/gZ_eep_term": pullback(z, g_z, eep_only.edit) - g_z,
      "eagc/gZ_aga_term": pullback(z, g_z, aga_only.edit) - g_z,
  }
  return cand, {"noeagc": g_z, "eagc": cand["eagc/gZ_post"]}, g_head


def test_the_official_simgcd_eagc_step_from_images_to_gradients(step_golden):
  checker, ref = step_golden
  with jax.enable_x64(True):
    cand = official_step(ref)
  missing = sorted(set(cand) - set(ref))
  assert not missing, f"keys not in the reference: {missing}"
  ok, rows = checker.check(ref, cand, keys=sorted(cand))
  assert ok, checker.format_rows(rows, failures_only=True)


def vit_for(ref: dict) -> vit.VisionTransformer:
  """The reference's tiny DINO ViT, its sizes read from the stored weights."""
  meta, cfg = ref["__meta__"], prefixed(ref, "cfg/")
  weights = prefixed(ref, "init/backbone/")
  dim, _, patch, _ = weights["patch_embed.proj.weight"].shape
  depth = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
  return vit.VisionTransformer(image_size=ref["batch/x"].shape[-1], patch_size=patch,
                               dim=dim, depth=depth, heads=int(meta["cfg"]["heads"]),
                               grad_from_block=int(cfg["grad_from_block"]))


def backbone_gradients(ref: dict, g_z_by_variant: dict) -> tuple[dict, dict]:
  """The training ViT's features and, per variant, the gradient of every backbone leaf
  pulling back that variant's feature cotangent (Flax layout); the reference ViT's
  features."""
  model = vit_for(ref)
  x = jnp.asarray(ref["batch/x"]).transpose(0, 2, 3, 1)
  params = jax.tree.map(jnp.asarray,
                        convert_gcd.dino_vit_to_flax(prefixed(ref, "init/backbone/")))
  reference = jax.tree.map(jnp.asarray,
                           convert_gcd.dino_vit_to_flax(prefixed(ref, "init/reference/")))
  z, pull = jax.vjp(lambda p: model.apply({"params": p}, x)["feat"], params)
  features = {"fwd/Z": z, "fwd/Zref": model.apply({"params": reference}, x)["feat"]}
  return features, {variant: pull(g_z)[0] for variant, g_z in g_z_by_variant.items()}


def sgd_step(ref: dict, grads: dict) -> dict:
  """The official SGD step (param groups, momentum, coupled decay on >= 2-D leaves, the
  frozen trunk untouched) through ggr_jax's optimizer, from the stored momentum."""
  cfg_ref = prefixed(ref, "cfg/")
  cfg = default_config.get_config()
  cfg.optim.update(name="sgd", momentum=float(cfg_ref["momentum"]), nesterov=False,
                   weight_decay=float(cfg_ref["weight_decay"]), schedule="constant",
                   lr=float(cfg_ref["lr_group2"]), decay="kernels")
  cfg.optim.group_lr = ml_collections.ConfigDict({"backbone": float(cfg_ref["lr_group0"])})
  config_lib.validate(cfg)
  torch_backbone = prefixed(ref, "init/backbone/")
  params = jax.tree.map(jnp.asarray, {
      "backbone": convert_gcd.dino_vit_to_flax(torch_backbone),
      "head": convert_gcd.simgcd_head_to_flax(prefixed(ref, "init/projector/"))})
  block = int(cfg_ref["grad_from_block"])
  tx = optim.make_base_optimizer(cfg, lambda p: {
      "backbone": vit.trainable_mask(p["backbone"], block),
      "head": jax.tree.map(lambda _: True, p["head"])})
  stored = prefixed(ref, "init/momentum/backbone/")
  momentum = {
      "backbone": convert_gcd.dino_vit_to_flax(
          {k: stored.get(k, np.zeros_like(v)) for k, v in torch_backbone.items()}),
      "head": convert_gcd.simgcd_head_to_flax(prefixed(ref, "init/momentum/projector/"))}
  state = optim.with_momentum_buffers(tx.init(params), momentum)
  updates, state = tx.update(grads, state, params)
  after = optax.apply_updates(params, updates)
  buffers = optim.momentum_buffers(state, params)
  trained = set(stored)
  out = {}
  for name, tree in (("after", after), ("after/momentum", buffers)):
    out.update({f"{name}/backbone/{k}": v
                for k, v in convert_gcd.flax_to_dino_vit(tree["backbone"]).items()
                if k in trained})
    out.update({f"{name}/projector/{k}": v
                for k, v in convert_gcd.flax_to_simgcd_head(tree["head"]).items()
                if k != "1.last_layer.weight_g"})
  return out


def official_step(ref: dict) -> dict:
  """Every output of the official step, by ggr_jax alone, from the stored inputs."""
  features, _ = backbone_gradients(ref, {})
  cand, g_z, head_grads = heads_and_coordinator(ref, features["fwd/Z"], features["fwd/Zref"])
  _, backbone_grads = backbone_gradients(ref, g_z)
  trained = set(prefixed(ref, "init/momentum/backbone/"))
  cand.update(features)
  for variant, grads in backbone_grads.items():
    cand.update({f"{variant}/grad/backbone/{k}": v
                 for k, v in convert_gcd.flax_to_dino_vit(grads).items() if k in trained})
    step = sgd_step(ref, {"backbone": grads, "head": head_grads})
    cand.update({f"{variant}/{k}": v for k, v in step.items()})
  return {k: np.asarray(v) for k, v in cand.items()}
