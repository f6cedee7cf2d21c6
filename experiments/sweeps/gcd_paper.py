"""EAGC's SimGCD table on the real benchmarks (an accelerator per run): SimGCD and
SimGCD + EAGC on CIFAR-100, CUB, Stanford Cars, ImageNet-100 and Herbarium-19, DINO
ViT-B/16, three seeds (the paper reports the mean of 3 runs).

``ggr-jax sweep experiments/sweeps/gcd_paper.py:pretrained=PATH,data_dir=DIR --root
runs/gcd_paper``; ``PATH`` is DINO's ``dino_vitbase16_pretrain.pth`` (or its ``.npz``),
``DIR`` the tfds data folder (CIFAR-100, ``caltech_birds2011``, ``cars196``). The folder
benchmarks need their own roots: ``imagenet100=ROOT``, ``herbarium19=ROOT`` (a benchmark
without its root is left out). ``only=cub`` keeps one benchmark.

Config: ``configs/simgcd_vit.py`` (the released hyperparameters). Paper figures
(All/Old/New, SimGCD -> + EAGC; best epoch on the evaluation split, mean of 3):
CIFAR-100 80.1/81.2/77.8 -> 83.1/84.1/81.0, CUB 60.3/65.6/57.7 -> 66.5/71.0/64.3,
Cars 53.8/71.9/45.0 -> 62.9/76.0/56.6, ImageNet-100 83.0/93.1/77.9 -> 83.5/93.9/78.3,
Herbarium-19 44.0/58.0/36.4 -> 48.4/59.8/42.4. The runs report the final epoch
(``gcd_all`` ...) and the official best-epoch figure beside it.
"""

SEEDS = [0, 1, 2]
TFDS_BENCHMARKS = ["cifar100", "cub", "scars"]
FOLDER_BENCHMARKS = ["imagenet100", "herbarium19"]
VARIANTS = [("simgcd", {}), ("eagc", {"eagc.terms": "both"})]


def _options(arg):
  options = dict(part.split("=", 1) for part in (arg or "").split(",") if part)
  unknown = set(options) - {"pretrained", "data_dir", "only", *FOLDER_BENCHMARKS}
  if unknown or "pretrained" not in options:
    raise ValueError("gcd_paper.py:pretrained=PATH[,data_dir=DIR][,imagenet100=ROOT]"
                     f"[,herbarium19=ROOT][,only=NAME]; got {arg!r}")
  return options


def get_sweep(arg=None):
  options = _options(arg)
  roots = {name: options.get("data_dir", "") for name in TFDS_BENCHMARKS}
  roots.update({name: options[name] for name in FOLDER_BENCHMARKS if name in options})
  cells = []
  for name, root in roots.items():
    if options.get("only", name) != name:
      continue
    for seed in SEEDS:
      for variant, overrides in VARIANTS:
        cells.append({"name": f"{name}-{variant}-s{seed}", "config": f"simgcd_vit:{name}",
                      "overrides": {"model.pretrained": options["pretrained"],
                                    "dataset.data_dir": root, "train.seed": seed,
                                    **overrides}})
  return cells
