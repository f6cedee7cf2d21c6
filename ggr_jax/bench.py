"""The step benchmark: the jitted train step of every rectifier variant, timed on device.

The baseline ``sum`` is the plain semi-supervised step (one backward pass of
``sup + aux``); ``sum_split`` computes both gradients without projecting, which
isolates the cost of the second backward pass from the cost of the geometry; the
``*_labeled`` variants take the anchor from a forward and backward of the labeled views
alone (``ggr.anchor="labeled"``). For ``metasemi`` the ``meta_*`` variants time the
meta pass: ``meta_off`` (no meta pass; the base of the ratios when listed first),
``meta_jvp`` and ``meta_fd`` (the official finite difference). ``eagc`` is EAGC's
coordinated step (``--algorithms simgcd --workloads digits_gcd --variants sum,eagc``).
Compilation is timed apart; then ``warmup`` steps, then ``steps`` steps each timed to
``block_until_ready`` (median and 10/90th percentiles). The step function must not
recompile inside the loop: its jit cache size is checked and reported. Peak device
memory comes from ``Device.memory_stats()`` where the backend exposes it (GPU/TPU; CPU
reports none); that peak is the process's high-water mark, so with ``isolate`` (the
default on such backends) each cell runs in a fresh process of its own. On every
backend the compiled step's own accounting is reported beside it: XLA's flop and bytes-accessed counts (``cost_analysis``) and its buffer plan
(``memory_analysis``: arguments + outputs + temporaries - donated aliases), an estimate
of peak memory that a CPU can give for an accelerator-sized step without running it.

``sum_stream`` is the ``sum`` step fed by the host input pipeline (``train.input =
"stream"``: uint8 batches from the Grain pipeline, prefetched to device), so its ratio
to ``sum`` shows whether the step waits for its input. The pipeline rows (``--pipeline``)
time the host pipeline alone, draining prefetched batches without a step, and set its
images/s against the images/s the ``sum`` step consumes; at 224 pixels and more it reads
JPEG files, decoded by ``--pipeline-workers`` Grain processes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import pathlib
import tempfile
import time
from typing import Any

import jax
import numpy as np

from ggr_jax import allocator, rundir
from ggr_jax.configs import default
from ggr_jax.data.stream import HostStream
from ggr_jax.ssl import ggcr
from ggr_jax.train import build as build_lib, step as step_lib

VARIANTS: dict[str, dict[str, Any]] = {
    "sum": dict(mode="sum", split_gradients=False),  # the plain SSL step: one backward
    "sum_split": dict(mode="sum"),  # both gradients, no projection
    "sum_stream": dict(mode="sum", split_gradients=False, input="stream"),
    "vlr": dict(mode="vlr"),
    "vlr_labeled": dict(mode="vlr", anchor="labeled"),  # anchor from the labeled views alone
    "osr_k10": dict(mode="osr", subspace_dim=10),
    "csr_k10": dict(mode="csr", subspace_dim=10),
    "csr_k10_labeled": dict(mode="csr", subspace_dim=10, anchor="labeled"),
    "vlr_per_sample_jvp": dict(mode="vlr", granularity="per_sample", per_sample_method="jvp"),
    "vlr_per_sample_rows": dict(mode="vlr", granularity="per_sample",
                                per_sample_method="materialize"),
    # GGCR: the algorithm plus L_g (its ggcr composition, on from the first step) with the
    # per-sample geometry of each method; the ratio is to the algorithm's plain step
    "ggcr_vmap": dict(mode="sum", split_gradients=False, consistency=dict(method="vmap")),
    "ggcr_fast": dict(mode="sum", split_gradients=False, consistency=dict(method="exact")),
    # the fast exact method with the batch statistics held in the second-order term too,
    # so that its geometry takes a forward and backward pass of its own
    "ggcr_fast_held": dict(mode="sum", split_gradients=False,
                           consistency=dict(method="exact", statistics="held")),
    # the fast exact method keeping the convolutions' patches for the backward
    "ggcr_fast_keep_patches": dict(mode="sum", split_gradients=False,
                                   consistency=dict(method="exact", remat="off")),
    # the fast exact method on a quarter or an eighth of the pairs (consistency.pair_fraction)
    "ggcr_fast_quarter": dict(mode="sum", split_gradients=False,
                              consistency=dict(method="exact", pair_fraction=0.25)),
    "ggcr_fast_eighth": dict(mode="sum", split_gradients=False,
                             consistency=dict(method="exact", pair_fraction=0.125)),
    # the exact method on every pair, in 4 or 8 chunks one after the other (pair_chunks)
    **{f"ggcr_fast_chunks{c}": dict(mode="sum", split_gradients=False,
                                    consistency=dict(method="exact", pair_chunks=c))
       for c in (4, 8, 16)},
    "ggcr_sketch_k64": dict(mode="sum", split_gradients=False,
                            consistency=dict(method="sketch", sketch_dim=64)),
    # the same sketch, 8, 4 or 2 directions per pass: each pass holds its directions'
    # tangents of every activation (chunks of 8 ran out of an H200's memory at the paper batch)
    **{f"ggcr_sketch_k64_chunk{c}": dict(mode="sum", split_gradients=False,
                                         consistency=dict(method="sketch", sketch_dim=64,
                                                          sketch_chunk=c))
       for c in (8, 4, 2)},
    # MetaSemi (algorithm metasemi): the plain consistency step (the eval-mode predictions
    # as targets: no meta pass), then the meta pass by JVP and by the official central
    # difference; the ratio is to meta_off when it is listed first
    "meta_off": dict(mode="sum", split_gradients=False, block=dict(meta=False)),
    "meta_jvp": dict(mode="sum", split_gradients=False, block=dict(meta=True, method="jvp")),
    "meta_fd": dict(mode="sum", split_gradients=False,
                    block=dict(meta=True, method="finite_difference")),
    # EAGC's coordinated step (the reference forward, energies, the edit, AGA's loss)
    # against the algorithm's plain step ("sum"); e.g. --algorithms simgcd
    "eagc": dict(mode="sum", split_gradients=False, eagc=dict(terms="both")),
}


DEFAULT_VARIANTS = tuple(v for v in VARIANTS if not v.startswith(("ggcr_", "meta_", "eagc")))


@dataclasses.dataclass(frozen=True)
class Workload:
  """A step shape; ``rows`` unlabeled images of synthetic data (0: four batches' worth),
  stored at ``image_shape`` and cropped to ``crop`` on device (0: no crop)."""
  backbone: str
  image_shape: tuple[int, int, int]
  batch_size: int
  uratio: int
  num_classes: int = 6
  crop: int = 0
  rows: int = 0


WORKLOADS = {
    "digits_cnn": Workload("cnn", (8, 8, 1), 32, 7),
    "wrn28_2_cpu": Workload("wrn28_2", (32, 32, 3), 4, 7),
    "wrn28_2_paper": Workload("wrn28_2", (32, 32, 3), 64, 7, rows=50_000),  # CIFAR's size
    # ImageNet-30's protocol: 256 x 256 storage, 224 crops, uratio 3 (a fifth of its rows)
    "resnet18_in30": Workload("resnet18", (256, 256, 3), 64, 3, num_classes=20, crop=224,
                              rows=8_000),
    "tiny": Workload("cnn", (8, 8, 1), 8, 1),
    # SemiMeta's: ConvLarge, 128 labeled + 128 unlabeled CIFAR-sized images
    "convlarge_paper": Workload("convlarge", (32, 32, 3), 128, 1, num_classes=10),
    "convlarge_cpu": Workload("convlarge", (32, 32, 3), 16, 1, num_classes=10),
    # category discovery on digits (SimGCD's 50/50 batches, ten classes)
    "digits_gcd": Workload("cnn", (8, 8, 1), 32, 1, num_classes=10),
    # SimGCD on DINO ViTs at 224 x 224, the last block trained (grad_from_block 11):
    # ViT-S/16 at a CPU-sized batch, ViT-B/16 at the released batch (128 images, CIFAR-100)
    "vit_s16_cpu": Workload("vit_small", (224, 224, 3), 4, 1, num_classes=100),
    "vit_b16_paper": Workload("vit_base", (224, 224, 3), 64, 1, num_classes=100),
}


def _synthetic_data(work: Workload, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  n_lab = max(4 * work.batch_size, 64)
  n_ulb = work.rows or max(4 * work.batch_size * work.uratio, 256)
  return {
      "x_labeled": rng.integers(0, 256, (n_lab, *work.image_shape), dtype=np.uint8),
      "y_labeled": rng.integers(0, work.num_classes, n_lab).astype(np.int32),
      "x_unlabeled": rng.integers(0, 256, (n_ulb, *work.image_shape), dtype=np.uint8),
      "unlabeled_is_id": rng.random(n_ulb) < 0.6,
  }


def _config(algorithm: str, work: Workload, variant: dict[str, Any]):
  cfg = default.get_config()
  cfg.algorithm = algorithm
  cfg.model.backbone = work.backbone
  cfg.train.update(dict(batch_size=work.batch_size, uratio=work.uratio, steps=100_000))
  if work.image_shape[0] >= 32:
    cfg.augment.update(dict(pad=4, flip=True, crop=work.crop))
  variant = dict(variant)
  cfg.train.input = variant.pop("input", "device")
  consistency = variant.pop("consistency", None)
  if consistency is not None:
    cfg.algorithm = ggcr.COMPOSITIONS[algorithm]
    cfg[cfg.algorithm].consistency.update(dict(warmup_steps=0, **consistency))
  cfg.eagc.update(variant.pop("eagc", {}))
  block = variant.pop("block", None)
  if block is not None:
    if not set(block) <= set(cfg[cfg.algorithm]):
      raise ValueError(f"variant settings {sorted(block)} are not fields of algorithm "
                       f"{cfg.algorithm!r}; the meta_* variants are metasemi's.")
    cfg[cfg.algorithm].update(block)
  cfg.ggr.update(variant)
  return cfg


def _mesh():
  return build_lib.make_mesh(jax.local_devices()[:1])


def prepared_step(algorithm: str, work: Workload, variant: dict[str, Any]):
  """The cell's jitted train step, its initial state and its batch feed (on synthetic
  data; the caller closes the feed)."""
  cfg = _config(algorithm, work, variant)
  host = _synthetic_data(work)
  channels = work.image_shape[-1]
  data = build_lib.DataSpec(work.image_shape, work.num_classes, host["x_unlabeled"].shape[0],
                            (0.5,) * channels, (0.25,) * channels)
  program = build_lib.build(cfg, data, _mesh())
  state = program.init_state()
  return program.train_step, state, program.feed(host, state, 0)


def time_step(algorithm: str, work: Workload, variant: dict[str, Any], steps: int = 20,
              warmup: int = 3) -> dict[str, Any]:
  """Times one (algorithm, workload, variant) cell; returns its figures."""
  step, state, feed = prepared_step(algorithm, work, variant)
  batch = feed.next(0)
  start = time.perf_counter()
  xla = compiled_figures(step.lower(state, batch).compile())
  allocator.return_freed_memory()  # as the trainer does after its compile
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    state, _ = step(state, feed.next(1 + i))
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, _ = step(state, feed.next(1 + warmup + i))
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  feed.close()
  stats = jax.devices()[0].memory_stats() or {}
  ms = np.array(times) * 1e3
  return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
          "p90_ms": float(np.percentile(ms, 90)), "compile_s": compile_s,
          "compilations": step._cache_size(),  # pylint: disable=protected-access
          "pid": os.getpid(),
          "peak_bytes": stats.get("peak_bytes_in_use"), "step_ms": ms.tolist(), **xla}


def compiled_figures(compiled) -> dict[str, float | None]:
  """XLA's own figures of a compiled step: flops, bytes accessed, planned bytes."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  memory = compiled.memory_analysis()
  planned = None if memory is None else float(
      memory.argument_size_in_bytes + memory.output_size_in_bytes
      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {"xla_flops": cost.get("flops"), "xla_bytes_accessed": cost.get("bytes accessed"),
          "xla_planned_bytes": planned}


def _jpeg_tables(work: Workload, folder: pathlib.Path, files: int = 256,
                 seed: int = 0) -> dict[str, Any]:
  """The synthetic split as JPEG files on disk (``files`` distinct 500x375 images, smooth
  with noise like photographs, cycled to the split's rows) read through ImageNet-30's
  tables, so the pipeline decodes and resizes every row as on the real data set."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from ggr_jax.data.imagenet30 import ImageFileTable  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  h, w = 375, 500
  grid = np.add.outer(np.linspace(0, 1, h), np.linspace(0, 1, w))
  paths = []
  for i in range(files):
    phase = rng.uniform(0, 6, 3)
    image = 127 + 100 * np.sin(3 * grid[..., None] + phase) + rng.normal(0, 12, (h, w, 3))
    path = folder / f"{i:04d}.jpg"
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
    paths.append(path)
  host = _synthetic_data(work, seed)
  size = work.image_shape[0]

  def table(n: int) -> ImageFileTable:
    return ImageFileTable([paths[i % files] for i in range(n)], size, centre_crop=False,
                          num_workers=2)
  return {**host, "x_labeled": table(len(host["y_labeled"])),
          "x_unlabeled": table(len(host["unlabeled_is_id"]))}


def time_pipeline(algorithm: str, work: Workload, steps: int = 20, warmup: int = 3,
                  prefetch: int = 2, workers: int = 0) -> dict[str, Any]:
  """The host pipeline alone: raw batches per second drained from a prefetching stream.

  Workloads stored at 224 pixels or more read JPEG files (:func:`_jpeg_tables`), decoded
  by ``workers`` Grain processes (0: a reader thread); the others index arrays."""
  cfg = _config(algorithm, work, {})
  cfg.train.prefetch = prefetch
  sizes = step_lib.source_sizes(cfg)
  with tempfile.TemporaryDirectory(prefix="ggr_jax_bench_jpeg_") as folder:
    jpeg = work.image_shape[0] >= 224
    host = _jpeg_tables(work, pathlib.Path(folder)) if jpeg else _synthetic_data(work)
    n_ulb = len(host["unlabeled_is_id"])
    selected = np.ones(n_ulb, bool) if "selected" in sizes else None
    with HostStream(host, jax.random.PRNGKey(0), sizes, _mesh(), 0, selected=selected,
                    prefetch=prefetch, workers=workers) as stream:
      for i in range(warmup):
        jax.block_until_ready(stream.next(i))
      start = time.perf_counter()
      for i in range(warmup, warmup + steps):
        jax.block_until_ready(stream.next(i))
      elapsed = time.perf_counter() - start
  images = sum(sizes.values())
  return {"images_per_batch": images, "batches_per_s": steps / elapsed,
          "images_per_s": images * steps / elapsed, "jpeg": jpeg, "workers": workers,
          "mib_per_s": images * np.prod(work.image_shape) * steps / elapsed / 2**20}


def _figures_or_error(*args) -> dict[str, Any]:
  """:func:`time_step`'s figures, or ``{"error": ...}`` when XLA fails at run time."""
  try:
    return time_step(*args)
  except jax.errors.JaxRuntimeError as err:
    return {"error": str(err).splitlines()[0][:500]}


def _isolated_cell(*args) -> dict[str, Any]:
  allocator.retain_freed_memory()  # what the entry point does before the first step
  return _figures_or_error(*args)


def _time_cell(isolate: bool, *args) -> dict[str, Any]:
  if not isolate:
    return _figures_or_error(*args)
  spawn = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
    try:
      return pool.submit(_isolated_cell, *args).result()
    except concurrent.futures.process.BrokenProcessPool:
      return {"error": "the cell's process died (killed, e.g. for memory)"}


def check_names(workloads: list[str], variants: list[str]) -> None:
  """A ValueError naming the first unknown workload or variant and the known ones."""
  for name in workloads:
    if name not in WORKLOADS:
      raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
  for name in variants:
    if name not in VARIANTS:
      raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")


def run(workloads: list[str], algorithms: list[str], variants: list[str], steps: int = 20,
        warmup: int = 3, verbose: bool = True, pipeline: bool = False,
        pipeline_workers: int = 0, isolate: bool | None = None,
        json_path: str | None = None) -> dict[str, Any]:
  """Benchmarks every cell and returns the JSON-ready report.

  ``isolate`` runs each step cell in a fresh process, so that its peak device memory is
  its own (None: where the backend reports device memory, i.e. not on CPU). A cell that
  fails at run time (e.g. out of device memory) becomes a row with its ``error`` and the
  next cell runs. With ``json_path`` the report is rewritten after every row, so a run cut
  short keeps the rows it finished."""
  check_names(workloads, variants)
  if isolate is not False:  # device memory on demand: the parent leaves the card to the cells
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  device = jax.devices()[0]
  if isolate is None:
    isolate = device.platform != "cpu"
  report: dict[str, Any] = {
      "device_kind": device.device_kind, "platform": device.platform,
      "jax_version": jax.__version__, "steps": steps, "warmup": warmup, "isolated": isolate,
      "date": time.strftime("%Y-%m-%d"), "results": []}
  for wname in workloads:
    work = WORKLOADS[wname]
    for algorithm in algorithms:
      base = None
      for vname in variants:
        row = {"workload": wname, "algorithm": algorithm, "variant": vname,
               "workload_config": dataclasses.asdict(work), "variant_config": VARIANTS[vname]}
        figures = _time_cell(isolate, algorithm, work, VARIANTS[vname], steps, warmup)
        if "error" in figures:
          _add_row(report, {**row, **figures}, json_path, verbose)
          continue
        if vname == "sum" or (vname == "meta_off" and base is None):
          base = figures
        row.update(figures)
        if base is not None:
          row["ratio_to_sum"] = figures["median_ms"] / base["median_ms"]
          for key, name in (("peak_bytes", "memory_ratio_to_sum"),
                            ("xla_flops", "flops_ratio_to_sum"),
                            ("xla_planned_bytes", "planned_memory_ratio_to_sum")):
            if base[key] and figures[key]:
              row[name] = figures[key] / base[key]
        _add_row(report, row, json_path, verbose)
      if pipeline:
        row = {"workload": wname, "algorithm": algorithm, "workload_config": dataclasses.asdict(work),
               **time_pipeline(algorithm, work, steps, warmup, workers=pipeline_workers)}
        if base is not None:
          row["step_images_per_s"] = row["images_per_batch"] / (base["median_ms"] / 1e3)
          row["pipeline_to_step"] = row["images_per_s"] / row["step_images_per_s"]
        report.setdefault("pipeline", []).append(row)
        if json_path:
          rundir.write_json(json_path, report)
        if verbose:
          print(format_pipeline_row(row), flush=True)
  return report


def _add_row(report: dict[str, Any], row: dict[str, Any], json_path: str | None,
             verbose: bool) -> None:
  report["results"].append(row)
  if json_path:
    rundir.write_json(json_path, report)
  if verbose:
    print(format_row(row), flush=True)


def format_pipeline_row(row: dict[str, Any]) -> str:
  step = (f"  step consumes {row['step_images_per_s']:9.0f} img/s  pipeline/step "
          f"x{row['pipeline_to_step']:.1f}" if "step_images_per_s" in row else "")
  name = "host pipeline" + (f" jpeg w{row['workers']}" if row.get("jpeg") else "")
  return (f"{row['workload']:<14}{row['algorithm']:<10}{name:<22}"
          f"{row['images_per_s']:9.0f} img/s ({row['mib_per_s']:.0f} MiB/s){step}")


def format_row(row: dict[str, Any]) -> str:
  if "error" in row:
    return f"{row['workload']:<14}{row['algorithm']:<10}{row['variant']:<22}failed: {row['error']}"
  mem = f"{row['peak_bytes'] / 2**20:8.0f} MiB" if row.get("peak_bytes") else "       n/a"
  ratio = f"{row['ratio_to_sum']:5.2f}" if "ratio_to_sum" in row else "  -  "
  flops = f"{row['xla_flops'] / 1e9:8.2f} GFLOP" if row.get("xla_flops") else "    n/a GFLOP"
  plan = f"{row['xla_planned_bytes'] / 2**20:8.0f} MiB planned" \
      if row.get("xla_planned_bytes") else "     n/a planned"
  return (f"{row['workload']:<14}{row['algorithm']:<10}{row['variant']:<22}"
          f"{row['median_ms']:9.1f} ms [{row['p10_ms']:.1f}, {row['p90_ms']:.1f}]  x{ratio}"
          f"  {mem}  {flops}  {plan}  compiles={row['compilations']}")
