"""SimGCD (and with ``--config.eagc.terms=both`` SimGCD + EAGC) on a GCD benchmark with
DINO's ViT-B/16, at the released hyperparameters (EAGC's SimGCD scripts).

``ggr-jax train --config configs/simgcd_vit.py:cub --config.model.pretrained=PATH``, the
argument one of ``cifar100``, ``cub``, ``scars``, ``imagenet100``, ``herbarium19``
(:mod:`ggr_jax.data.gcd_sources`). ``PATH`` is DINO's ``dino_vitbase16_pretrain.pth``
(or an ``.npz`` of it), brought by the user.

The recipe: 224 x 224 crops of images stored at 256 (shorter side, centre square),
flips, two views per image; batches of 128 images, half labeled (SimGCD's weighted
sampler, as batch_size = 64 labeled + 64 unlabeled); blocks 11 and up trained
(``grad_from_block`` 11), the rest frozen; SGD momentum 0.9, weight decay 5e-5, 200
epochs on a cosine to lr x 1e-3, lr 0.1 for the backbone and 1.0 for the heads (a
parameter group); teacher temperature 0.07 -> 0.04 over 30 epochs; memax weight 2 on
CIFAR-100, 1 elsewhere. EAGC: aperture 2, beta 0.5 (3 on Stanford Cars), lambda 0.7,
the reference trained at lr 0.02 for 30 epochs of the labeled set (CIFAR-100: 3). An
epoch is ``ceil(train images / 128)`` steps, as the official sampler draws one dataset's
length per epoch; the labeled-set sizes behind the reference's length are the split's
rounded counts.

  >>> cfg = get_config("cub")
  >>> cfg.dataset.name, cfg.train.steps_per_epoch, cfg.train.steps, cfg.eagc.reference_steps
  ('cub', 47, 9400, 703)
  >>> cfg.model.backbone, cfg.model.vit.grad_from_block, dict(cfg.optim.group_lr)
  ('vit_base', 11, {'backbone': 0.1})
"""

import math

from ggr_jax.configs import simgcd

# name: (training images, labeled images at prop 0.5, memax weight, EEP beta,
#        reference epochs)
BENCHMARKS = {
    "cifar100": (50_000, 20_000, 2.0, 0.5, 3),
    "cub": (5_994, 1_498, 1.0, 0.5, 30),
    "scars": (8_144, 2_000, 1.0, 3.0, 30),
    "imagenet100": (127_115, 31_860, 1.0, 0.5, 30),
    "herbarium19": (34_225, 8_869, 1.0, 0.5, 30),
}
EPOCHS = 200
BATCH = 128


def get_config(arg: str = "cub"):
  if arg not in BENCHMARKS:
    raise ValueError(f"simgcd_vit takes one of {sorted(BENCHMARKS)}, got {arg!r}")
  images, labeled, memax, beta, reference_epochs = BENCHMARKS[arg]
  cfg = simgcd.get_config()
  cfg.dataset.update(name=arg, image_size=256, prop_labeled=0.5, id_classes=())
  cfg.model.update(backbone="vit_base", pretrained="")
  cfg.model.vit.update(patch_size=16, grad_from_block=11, depth=0)
  cfg.augment.update(pad=0, flip=True, crop=224)
  epoch = math.ceil(images / BATCH)
  cfg.train.update(batch_size=BATCH // 2, uratio=1, steps_per_epoch=epoch,
                   steps=EPOCHS * epoch, eval_every=10 * epoch, checkpoint_every=epoch,
                   log_every=50, eval_batch_size=256)
  cfg.optim.update(lr=1.0, momentum=0.9, nesterov=False, weight_decay=5e-5, ema=0.0,
                   schedule="cosine", decay="all")
  cfg.optim.group_lr.backbone = 0.1
  cfg.simgcd.update(hidden_dim=2048, bottleneck_dim=256, memax_weight=memax,
                    teacher_warmup_epochs=30)
  cfg.eagc.update(aperture=2.0, beta=beta, aga_weight=0.7, momentum=0.95, reference_lr=0.02,
                  reference_steps=math.ceil(reference_epochs * labeled / (BATCH // 2)))
  return cfg
