"""The GGCR paper's table and ablations, on the real data (an accelerator per run).

``ggr-jax sweep experiments/sweeps/ggcr_paper.py --root runs/ggcr_paper`` (every cell);
``... ggcr_paper.py:table`` or ``:ablation`` for one part. Needs the tfds data prepared
in array_record format (CIFAR-10, CIFAR-100, ImageNet with ``imagenet2012_subset``; see
the README) and the ``grid``'s closed-set protocol (FixMatch's: 2^20 steps, WRN-28-2 on
CIFAR-10, WRN-28-8 on CIFAR-100, ResNet-50 on ImageNet).

* ``table``: FixMatch and GGCR on CIFAR-10 with 40 labels (paper: 91.8 and 93.2),
  CIFAR-100 with 400 (GGCR 56.8) and ImageNet with 1% (GGCR 60.3, ResNet-50), each
  also with GGR (vlr) on top; three seeds (ImageNet one).
* ``ablation`` (CIFAR-10, 40 labels, three seeds): without warm-up (paper 92.1), a
  gradient-norm penalty instead of the cosine (``gc_penalty=grad_norm``, paper 92.5; our
  definition, see :mod:`ggr_jax.ssl.ggcr`) and ``lambda`` in {0.01, 0.05, 0.1, 0.5, 1.0}.
  (Without ``L_g`` is the ``fixmatch`` row of the table.)
"""

SEEDS = [0, 1, 2]
TABLE = [("cifar10_closed", "4", SEEDS), ("cifar100_closed", "4", SEEDS),
         ("imagenet", "1pct", [0])]
LAMBDAS = ["0.01", "0.05", "0.1", "0.5", "1.0"]


def _cell(name: str, cell: str) -> dict:
  return {"name": name, "config": f"grid:{cell}", "overrides": {}}


def _table() -> list[dict]:
  cells = []
  for dataset, labels, seeds in TABLE:
    for seed in seeds:
      for algorithm in ("fixmatch", "ggcr"):
        for mode in ("sum", "vlr"):
          cells.append(_cell(f"{dataset}-{labels}-{algorithm}-{mode}-s{seed}",
                             f"algorithm={algorithm},dataset={dataset},labels={labels},"
                             f"seed={seed},ggr={mode}"))
  return cells


def _ablation() -> list[dict]:
  base = "algorithm=ggcr,dataset=cifar10_closed,labels=4,ggr=sum"
  cells = []
  for seed in SEEDS:
    cells.append(_cell(f"ablation-no_warmup-s{seed}", f"{base},seed={seed},gc_warmup=0"))
    cells.append(_cell(f"ablation-grad_norm-s{seed}", f"{base},seed={seed},gc_penalty=grad_norm"))
    cells += [_cell(f"ablation-lambda{weight}-s{seed}", f"{base},seed={seed},gc_weight={weight}")
              for weight in LAMBDAS if weight != "0.1"]  # 0.1 is the table's GGCR row
  return cells


def get_sweep(arg=None):
  parts = {"table": _table, "ablation": _ablation}
  if arg not in (None, "", *parts):
    raise ValueError(f"ggcr_paper.py:{arg}: choose table or ablation (or nothing for both).")
  return [c for name, part in parts.items() if arg in (None, "", name) for c in part()]
