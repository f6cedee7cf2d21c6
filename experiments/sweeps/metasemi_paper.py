"""The SemiMeta paper's table and ablation, on the real data (an accelerator per run).

``ggr-jax sweep experiments/sweeps/metasemi_paper.py --root runs/metasemi_paper`` (every
cell); ``... metasemi_paper.py:table``, ``:ablation`` or ``:ggcr`` for one part. Needs the tfds
data prepared in array_record format (``svhn_cropped``, CIFAR-10, CIFAR-100, ImageNet with
``imagenet2012_subset/10pct``) and follows SemiMeta's protocol (the ``grid``'s
``algorithm=metasemi`` cells: ConvLarge, 128 + 128, 400k steps; ResNet-18 on ImageNet).

* ``table``: MetaSemi (JVP pseudo-labels, mixup) on SVHN with 1,000 labels (paper error
  3.15%), CIFAR-10 with 4,000 (7.78%), CIFAR-100 with 10,000 (30.74%), ImageNet with 10%
  (top-1/top-5 error 44.87/18.88, ResNet-18), each also with the official finite
  difference and with GGR (vlr) on top; the paper's seeds (ImageNet one run).
* ``ablation`` (SVHN, CIFAR-10, CIFAR-100; the paper's seed): neither component (paper
  9.76 / 15.43 / 38.74), meta only (3.68 / 11.63 / 35.40), mixup only (5.60 / 11.10 /
  32.67); "both" is the table's row.
* ``ggcr`` (SVHN, CIFAR-10, CIFAR-100; the paper's seed): MetaSemi + GGCR's ``L_g``
  (``metasemi_ggcr``: a strong view drawn for it, the exact method, lambda 0.1, 1,000
  warm-up steps), without and with GGR (vlr); no paper figure, against the table's
  ``jvp-sum`` and ``jvp-vlr`` rows.
"""

DATASETS = [("svhn_closed", 7788), ("cifar10_closed", 8469), ("cifar100_closed", 7788)]
VARIANTS = [("jvp", "meta=jvp"), ("fd", "meta=finite_difference")]
ABLATION = [("neither", "meta=off,mixup=False"), ("meta_only", "meta=jvp,mixup=False"),
            ("mixup_only", "meta=off,mixup=True")]


def _cell(name: str, cell: str, algorithm: str = "metasemi") -> dict:
  return {"name": name, "config": f"grid:algorithm={algorithm},{cell}", "overrides": {}}


def _table() -> list[dict]:
  cells = []
  for dataset, seed in [*DATASETS, ("imagenet", 0)]:
    for variant, keys in VARIANTS:
      cells.append(_cell(f"{dataset}-{variant}-sum", f"dataset={dataset},{keys},seed={seed},ggr=sum"))
    cells.append(_cell(f"{dataset}-jvp-vlr", f"dataset={dataset},meta=jvp,seed={seed},ggr=vlr"))
  return cells


def _ablation() -> list[dict]:
  return [_cell(f"ablation-{dataset}-{name}", f"dataset={dataset},{keys},seed={seed},ggr=sum")
          for dataset, seed in DATASETS for name, keys in ABLATION]


def _ggcr() -> list[dict]:
  return [_cell(f"{dataset}-jvp-ggcr-{mode}", f"dataset={dataset},meta=jvp,seed={seed},ggr={mode}",
                "metasemi_ggcr")
          for dataset, seed in DATASETS for mode in ("sum", "vlr")]


def get_sweep(arg=None):
  parts = {"table": _table, "ablation": _ablation, "ggcr": _ggcr}
  if arg not in (None, "", *parts):
    raise ValueError(f"metasemi_paper.py:{arg}: choose table, ablation or ggcr (or nothing "
                     "for all).")
  return [c for name, part in parts.items() if arg in (None, "", name) for c in part()]
