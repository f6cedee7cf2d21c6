"""Default run: FixMatch + GGR (vlr) on the open-set digits split, small CNN, 2 CPU cores.

Every field can be overridden on the command line, e.g.
``ggr-jax train --config.ggr.mode=osr --config.ggr.subspace_dim=10``.
"""

import ml_collections

from ggr_jax import ssl


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.algorithm = "fixmatch"

  # name: digits (embedded), cifar10, cifar100 (num_id_classes 50 or 20), svhn (tfds
  # svhn_cropped, closed-set), imagenet30
  # (in30_labels p1 or p5, images resized to image_size), imagenet (tfds
  # imagenet2012_subset/<imagenet_subset>, closed-set, streamed). protocol: "openset"
  # (id_classes known, the rest OOD) or "closed" (every class known; closed-set SSL, top-1
  # and top-5). data_dir: the tfds data directory or the ImageNet-30 root ("" = the tfds
  # default). max_test_images: evaluate on the first N test images only (0 = all).
  # unlabeled_excludes_labeled: leave the labeled images out of the unlabeled set
  # (SemiMeta's protocol; FixMatch and GGR keep them). protocol "gcd" (category
  # discovery, digits): id_classes are the Old classes, prop_labeled of their training
  # images labeled, the other classes New (ggr_jax.data.gcd). on_bad_image: an ImageNet-30
  # image that fails to decode mid-run stops the run naming it ("stop") or is reported and
  # replaced by the next one ("skip").
  cfg.dataset = ml_collections.ConfigDict(dict(
      name="digits", protocol="openset", id_classes=(0, 1, 2, 3, 4, 5), labels_per_class=5,
      test_fraction=0.3, num_id_classes=50, in30_labels="p1", imagenet_subset="1pct",
      image_size=256, data_dir="", max_test_images=0, unlabeled_excludes_labeled=False,
      on_bad_image="stop",
      prop_labeled=0.5))
  # BatchNorm momentum (PyTorch convention): the official 0.001 averages over ~1000
  # steps, too slow for a 2000-step run; 0.01 keeps eval-mode statistics current.
  # backbone: ggr_jax.models.BACKBONES; the DINO ViTs (vit_tiny, vit_small, vit_base) take
  # vit.patch_size, vit.grad_from_block (the first trained block; earlier ones and the
  # embeddings frozen: no update, no backward) and vit.depth (0: 12), and pretrained, a
  # DINO checkpoint file the user brings (.pth or .npz; "" = from scratch).
  cfg.model = ml_collections.ConfigDict(dict(
      backbone="cnn", bn_momentum=0.01, pretrained="",
      vit=ml_collections.ConfigDict(dict(patch_size=16, grad_from_block=11, depth=0))))
  # crop: 0 keeps the stored size; N > 0 crops N x N windows (weak: random crop, strong:
  # random-resized crop, evaluation: centre crop), as for ImageNet-30 (256 -> 224).
  cfg.augment = ml_collections.ConfigDict(dict(pad=1, flip=False, num_ops=3, cutout=0.5,
                                               crop=0))

  cfg.ggr = ml_collections.ConfigDict(dict(
      mode="vlr", alpha=1.0, aux_weight=1.0, scope="backbone", subspace_dim=10,
      subspace_interval=1, basis_signs="oriented", granularity="global",
      # per-sample geometry: "jvp" or "materialize" (rows; microbatch rows at a time,
      # 0 = all), and ID/OOD conflict diagnostics by one JVP even without per_sample.
      per_sample_method="jvp", microbatch=0, sample_diagnostics=False,
      # False (mode "sum" only): one backward pass of sup + aux, the plain SSL step,
      # without the rectifier's diagnostics; True computes both gradients.
      split_gradients=True,
      # where the supervised anchor comes from: "joint" (the forward shared with the
      # unlabeled views) or "labeled" (a forward of the labeled views alone, with their own
      # BatchNorm statistics: about labeled/total of the cost of a second backward).
      anchor="joint",
      # the first rectified step: before it the update is the plain sum (the official
      # GGR-OpenMatch starts at OpenMatch's start_fix; the grid's OpenMatch cells do too)
      start_step=0))
  # EAGC's gradient coordinator (ggr_jax.train.eagc): terms "off", "eep" (elastic energy
  # projection of the feature cotangent), "aga" (anchoring to the reference), "both";
  # aperture of the conceptor, beta (EEP strength), aga_weight (lambda), momentum of the
  # labeled energy's EMA, reference_steps of supervised-only training for the reference
  # model (0: the initial model) at reference_lr (0: the run's own rates). Official SimGCD
  # scripts: 2.0, 0.5, 0.7, 0.95; the reference at lr 0.02.
  cfg.eagc = ml_collections.ConfigDict(dict(
      terms="off", aperture=2.0, beta=0.5, aga_weight=0.7, momentum=0.95,
      reference_steps=200, reference_lr=0.0))
  # name: sgd (official: coupled L2 then Nesterov SGD), adamw, lion, muon, or any optax
  # optimizer name with kwargs passed on (set them in a config file); momentum and
  # nesterov are SGD's. Weight decay is decoupled where the optimizer takes it
  # (adamw, lion, muon), coupled L2 otherwise (ggr_jax.train.optim).
  # schedule: "usb_cosine" (official GGR), "warmup_step" (linear warm-up over warmup_steps,
  # then x decay_factor after each of milestones), "warmup_cosine" (warm-up, half-cosine),
  # "cosine" (half-cosine to lr * 1e-3, SimGCD's), "constant".
  # decay: weight decay on "kernels" (official GGR) or on "all" parameters (torch SGD).
  # group_lr: {parameter path prefix: base lr} on the same schedule (e.g. SimGCD's
  # backbone at 0.1 beside heads at optim.lr = 1.0); "constant": no schedule.
  cfg.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4, ema=0.999,
      schedule="usb_cosine", warmup_steps=0, milestones=(), decay_factor=0.1, decay="kernels",
      group_lr=ml_collections.ConfigDict(), kwargs=ml_collections.ConfigDict()))

  # input: "device" puts the whole split on device and samples each batch inside the
  # step; "stream" keeps it on the host and streams each step's uint8 batch through a
  # Grain pipeline (every process gathers its own shards; input_workers Grain processes
  # read and decode, 0: a reader thread), prefetch batches ahead (ggr_jax.data.stream).
  # Both feed the same batches. nonfinite_patience: consecutive steps with a non-finite loss
  # or gradient after which the run stops, before evaluating or checkpointing that state.
  cfg.train = ml_collections.ConfigDict(dict(
      seed=0, steps=2000, steps_per_epoch=100, batch_size=32, uratio=7,
      log_every=50, eval_every=500, checkpoint_every=500, eval_batch_size=256,
      input="device", prefetch=2, input_workers=0, nonfinite_patience=1))

  # threshold: the open-set decision rule. "official": the official eval.py's, a fixed
  # 0.95 on the maximum softmax probability (FixMatch, supervised) and Otsu on the test
  # scores (IOMatch, OpenMatch); "otsu": Otsu on the test scores for every algorithm.
  cfg.eval = ml_collections.ConfigDict(dict(threshold="official"))

  epoch = cfg.train.get_ref("steps_per_epoch")
  for name in ssl.names():  # one block per algorithm, registered ones included
    block = cfg[name] = ssl.get(name).default_config()
    if "op_warmup_steps" in block:  # IOMatch's open-set loss after one epoch
      block.op_warmup_steps = epoch
    if "start_fix_steps" in block:  # OpenMatch's FixMatch stage after ten
      block.start_fix_steps = epoch * 10
  return cfg
