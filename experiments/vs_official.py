"""The official PyTorch GGR step and ggr_jax's, timed side by side on this machine.

  pip install -e '.[official]'            # torch, for this script only
  python experiments/vs_official.py --official PATH/TO/GGR [--variants plain,vlr,osr,csr]
      [--rounds 2] [--steps 10] [--warmup 3] [--threads N] [--device cpu|cuda]
      [--batch cpu|paper] [--json out.json]

``PATH/TO/GGR`` is a checkout of github.com/JiaheChen2002/GGR; nothing is fetched. The
official side is built from that checkout's own pieces: ``wrn_28_2``
(``semilearn/nets/wrn/wrn.py``) and ``rectify_pair``, ``GradSubspace``,
``select_surgery_params`` and the flatten helpers (``semilearn/algorithms/utils/ggr.py``),
in the order of ``GGRIOMatch.train_step``'s non-DDP branch: one forward over the
concatenated batch, ``autograd.grad`` of the supervised and the auxiliary loss, the
subspace update, the rectification, the surrogate ``sum(p * g.detach())`` backward and
``SGD(nesterov=True).step()`` (weight decay 5e-4 off BatchNorm and biases, as the
official ``get_optimizer``). ``plain`` is the official one-backward update
(``ParamUpdateHook``). ``--losses fixmatch``: cross-entropy on the labeled views and
masked cross-entropy of the strong view against the weak view's hard pseudo-label at
0.95 on the bare WRN; ``iomatch``: the official ``GGRIOMatchNet`` and the losses of
``GGRIOMatch.train_step`` at the shipped settings (its ``mb_sup_loss`` and
``masked_soft_ce``). The batch (``--batch cpu``): 8 labeled + 56 weak + 56 strong 32x32
images, WRN-28-2, 6 classes; ``--batch paper``: 64 + 448 + 448, the official batch size 64 at
uratio 7.

ggr_jax's side is ``ggr-jax bench``'s step on the same batch (``fixmatch`` or ``iomatch``, variants
``sum``, ``vlr``, ``osr_k10``, ``csr_k10``); it also samples the batch and runs
RandAugment on device, which the official step receives done (its data loader's work).

Each (side, variant) runs in a process of its own, so the peak memory is that one step's:
on ``--device cpu`` the peak resident set (``ru_maxrss``); on ``--device cuda`` the peak of
each framework's device allocator (``torch.cuda.max_memory_allocated``; JAX's
``peak_bytes_in_use``, with preallocation off), and each timed step ends on a device
synchronisation. The sides alternate (A, B, A, B, ...) over ``--rounds`` and the reported
time is the median over every timed step of every round.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
import types

VARIANTS = {"plain": "sum", "vlr": "vlr", "osr": "osr_k10", "csr": "csr_k10"}
SUBSPACE_DIM = 10
CLASSES, THRESHOLD = 6, 0.95
BATCHES = {"cpu": (8, 56), "paper": (64, 448)}  # labeled, unlabeled (weak = strong)


def _load(path: pathlib.Path, name: str) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _official_modules(root: pathlib.Path) -> tuple[types.ModuleType, types.ModuleType]:
  """The official ``wrn`` and ``ggr`` modules, loaded from their files (the package's
  ``__init__`` imports the whole framework and its data dependencies)."""
  files = [root / "semilearn/nets/wrn/wrn.py", root / "semilearn/algorithms/utils/ggr.py"]
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    sys.exit(f"vs_official: {', '.join(missing)} not found; --official must be a checkout of "
             "github.com/JiaheChen2002/GGR.")
  stub = types.ModuleType("semilearn.nets.utils")  # wrn.py imports load_checkpoint from it
  stub.load_checkpoint = lambda model, path: model
  for name in ("semilearn", "semilearn.nets"):
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.modules["semilearn.nets.utils"] = stub
  return _load(files[0], "official_wrn"), _load(files[1], "official_ggr")


class _Stub(types.ModuleType):
  """A framework module the IOMatch file imports but its network and losses never use."""

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    return type(name, (), {"register": staticmethod(lambda *a, **k: (lambda cls: cls))})


def _official_iomatch(root: pathlib.Path) -> types.ModuleType:
  """``GGRIOMatchNet`` (``ggriomatch.py``) with ``mb_sup_loss`` and ``masked_soft_ce``
  (``ggriomatch/utils.py``), loaded from their files."""
  folder = root / "semilearn/algorithms/ggriomatch"
  for name in ("semilearn.core", "semilearn.core.algorithmbase", "semilearn.core.utils",
               "semilearn.algorithms", "semilearn.algorithms.hooks",
               "semilearn.algorithms.utils"):
    sys.modules.setdefault(name, _Stub(name))
  package = types.ModuleType("semilearn.algorithms.ggriomatch")
  package.__path__ = [str(folder)]
  sys.modules["semilearn.algorithms.ggriomatch"] = package
  sys.modules["semilearn.algorithms.ggriomatch.utils"] = _load(
      folder / "utils.py", "semilearn.algorithms.ggriomatch.utils")
  return _load(folder / "ggriomatch.py", "semilearn.algorithms.ggriomatch.ggriomatch")


def _fixmatch_losses(model, labeled, x, y):
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  logits = model(x)["logits"]
  logits_w, logits_s = logits[labeled:].chunk(2)
  sup = F.cross_entropy(logits[:labeled], y)
  with torch.no_grad():
    confidence, pseudo = torch.softmax(logits_w, -1).max(-1)
    mask = confidence.ge(THRESHOLD).float()
  return sup, (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()


def _iomatch_losses(io, model, labeled, x, y):
  """The official ``GGRIOMatch.train_step`` losses at its shipped settings (lambda_u,
  lambda_mb and lambda_op 1, no graph or rotation loss, p_cutoff 0.95, q_cutoff 0.5)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  out = model(x)
  logits_w, logits_s = out["logits"][labeled:].chunk(2)
  _, open_s = out["logits_open"][labeled:].chunk(2)
  mb_w, _ = out["logits_mb"][labeled:].chunk(2)
  sup = (F.cross_entropy(out["logits"][:labeled], y)
         + io.mb_sup_loss(out["logits_mb"][:labeled], y))
  with torch.no_grad():
    p = torch.softmax(logits_w, -1)
    r = torch.softmax(mb_w.view(len(mb_w), 2, -1), dim=1)
    in_mask = torch.sum(p * r[:, 0, :], dim=1) < 0.5
    q = torch.cat([p * r[:, 1, :], torch.sum(p * r[:, 0, :], 1, keepdim=True)], 1)
    p_mask = p.max(-1)[0].ge(THRESHOLD).float()
    q_mask = q.max(-1)[0].ge(0.5).float()
  aux = (io.masked_soft_ce(logits_s, p, in_mask.float() * p_mask, norm_mode="mean")
         + io.masked_soft_ce(open_s, q, q_mask, norm_mode="mean"))
  return sup, aux


def _time_official(root: pathlib.Path, mode: str, steps: int, warmup: int,
                   losses: str = "fixmatch", batch: str = "cpu", device: str = "cpu") -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  wrn, ggr = _official_modules(root)
  torch.manual_seed(0)
  labeled, unlabeled = BATCHES[batch]
  model = wrn.wrn_28_2(num_classes=CLASSES)
  compute_losses = functools.partial(_fixmatch_losses, model, labeled)
  if losses == "iomatch":
    io = _official_iomatch(root)
    model = io.GGRIOMatchNet(model, num_classes=CLASSES, proj_size=128, use_rot=False)
    compute_losses = functools.partial(_iomatch_losses, io, model, labeled)
  model.to(device).train()
  # the official get_optimizer's rule: no weight decay on BatchNorm and biases
  no_decay = {n for n, _ in model.named_parameters() if "bn" in n or "bias" in n}
  groups = [{"params": [p for n, p in model.named_parameters() if n not in no_decay]},
            {"params": [p for n, p in model.named_parameters() if n in no_decay],
             "weight_decay": 0.0}]
  opt = torch.optim.SGD(groups, lr=0.03, momentum=0.9, weight_decay=5e-4, nesterov=True)
  subspace = (ggr.GradSubspace(max_dim=SUBSPACE_DIM, device=device)
              if mode in ("osr", "csr") else None)
  x = torch.rand(labeled + 2 * unlabeled, 3, 32, 32, device=device)
  y = torch.randint(0, CLASSES, (labeled,), device=device)
  cuda = device.startswith("cuda")

  def step():
    sup, aux = compute_losses(x, y)
    if mode == "plain":
      (sup + aux).backward()
    else:
      params, selected = ggr.select_surgery_params(model, "backbone")
      g_sup = torch.autograd.grad(sup, params, retain_graph=True, allow_unused=True)
      g_aux = torch.autograd.grad(aux, params, allow_unused=True)
      sel = [p for p, m in zip(params, selected) if m]
      sup_vec, shapes = ggr.flatten_grads_dense(sel, [g for g, m in zip(g_sup, selected) if m],
                                                device)
      aux_vec, _ = ggr.flatten_grads_dense(sel, [g for g, m in zip(g_aux, selected) if m],
                                           device)
      if subspace is not None:
        subspace.update(sup_vec)
      sup_vec, aux_vec = ggr.rectify_pair(sup_vec, aux_vec, mode, grad_subspace=subspace,
                                          subspace_dim=SUBSPACE_DIM)
      safe_sup = iter(ggr.unflatten_like_dense(sup_vec, shapes, device))
      safe_aux = iter(ggr.unflatten_like_dense(aux_vec, shapes, device))
      surrogate = torch.zeros((), device=device)
      for p, gs, gu, m in zip(params, g_sup, g_aux, selected):
        if m:
          gs, gu = next(safe_sup), next(safe_aux)
        g = gu if gs is None else gs if gu is None else gs + gu
        surrogate = surrogate + torch.sum(p * g.detach())
      surrogate.backward()
    opt.step()
    opt.zero_grad()

  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    step()
    if cuda:
      torch.cuda.synchronize()
    if i >= warmup:
      times.append((time.perf_counter() - start) * 1e3)
  out = {"times_ms": times, "threads": torch.get_num_threads(), "torch": torch.__version__}
  if cuda:
    out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out["device_name"] = torch.cuda.get_device_name()
  return out


def _time_jax(variant: str, steps: int, warmup: int, losses: str = "fixmatch",
              batch: str = "cpu") -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from ggr_jax import allocator, bench, xla_flags  # pylint: disable=import-outside-toplevel
  allocator.retain_freed_memory()
  xla_flags.use_eigen_convolutions()
  labeled, unlabeled = BATCHES[batch]
  work = bench.Workload("wrn28_2", (32, 32, 3), labeled, unlabeled // labeled,
                        num_classes=CLASSES)
  figures = bench.time_step(losses, work, bench.VARIANTS[VARIANTS[variant]], steps, warmup)
  out = {"times_ms": figures["step_ms"], "xla_flops": figures.get("xla_flops"),
         "jax": jax.__version__, "device_name": jax.devices()[0].device_kind}
  if figures.get("peak_bytes"):
    out["device_peak_mib"] = figures["peak_bytes"] / 2**20
  return out


def _worker(args: argparse.Namespace) -> None:
  if args.side == "official":
    out = _time_official(pathlib.Path(args.official), args.variant, args.steps, args.warmup,
                         args.losses, args.batch, args.device)
  else:
    out = _time_jax(args.variant, args.steps, args.warmup, args.losses, args.batch)
  out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print("RESULT " + json.dumps(out), flush=True)


def _run_worker(side: str, variant: str, losses: str, args: argparse.Namespace) -> dict:
  command = [sys.executable, __file__, "--worker", side, "--variant", variant, "--losses", losses,
             "--official", args.official, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--batch", args.batch, "--device", args.device]
  env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
  if args.device != "cpu":
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # so that JAX's peak is the step's own
  out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  if out.returncode or not lines:
    sys.exit(f"vs_official: the {side} {variant} worker failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official", required=True, help="a checkout of JiaheChen2002/GGR")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--losses", default="fixmatch,iomatch",
                      help="comma list of fixmatch, iomatch (a worker takes one)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per worker")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--device", default="cpu",
                      help="torch device of the official step (cpu, cuda); JAX uses its default "
                           "backend, which must be the same kind")
  parser.add_argument("--batch", default="cpu", choices=sorted(BATCHES),
                      help="cpu: 8 + 56 + 56 images; paper: 64 + 448 + 448")
  parser.add_argument("--json", default=None)
  parser.add_argument("--worker", choices=("official", "jax"), dest="side",
                      help=argparse.SUPPRESS)
  parser.add_argument("--variant", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    _worker(args)
    return
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    sys.exit(f"vs_official: unknown variants {unknown}; choose from {list(VARIANTS)}.")
  _official_modules(pathlib.Path(args.official))  # a bad checkout stops here
  rows = []
  for losses in args.losses.split(","):
    if losses not in ("fixmatch", "iomatch"):
      sys.exit(f"vs_official: unknown losses {losses!r}; choose fixmatch or iomatch.")
    for variant in variants:
      runs: dict[str, list[dict]] = {"official": [], "jax": []}
      for _ in range(args.rounds):
        for side in ("official", "jax"):
          runs[side].append(_run_worker(side, variant, losses, args))
      row = {"losses": losses, "variant": variant}
      for side, results in runs.items():
        times = sorted(t for r in results for t in r["times_ms"])
        row[f"{side}_median_ms"] = times[len(times) // 2]
        row[f"{side}_max_rss_mib"] = max(r["max_rss_mib"] for r in results)
        if all("device_peak_mib" in r for r in results):
          row[f"{side}_device_peak_mib"] = max(r["device_peak_mib"] for r in results)
        row[f"{side}_device"] = results[0].get("device_name", "cpu")
      memory = "device_peak_mib" if args.device != "cpu" else "max_rss_mib"
      row["time_ratio"] = row["jax_median_ms"] / row["official_median_ms"]
      row["memory_ratio"] = row[f"jax_{memory}"] / row[f"official_{memory}"]
      rows.append(row)
      print(f"{losses:<9}{variant:<6} official {row['official_median_ms']:8.1f} ms "
            f"{row[f'official_{memory}']:6.0f} MiB | ggr_jax {row['jax_median_ms']:8.1f} ms "
            f"{row[f'jax_{memory}']:6.0f} MiB | time x{row['time_ratio']:.2f} "
            f"memory x{row['memory_ratio']:.2f}", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"rows": rows, "threads": args.threads, "device": args.device, "batch": args.batch,
         "memory": memory, "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
  main()
