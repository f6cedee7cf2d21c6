"""The jitted train step's time per XLA operation on this machine's backend.

Runs one ``ggr-jax bench`` cell (same workload, config and synthetic data) under
``jax.profiler.trace`` with XLA's per-thunk trace events on, then sums the events of
each HLO instruction over the traced steps and prints them by kind (forward
convolution, input gradient, weight gradient, dot, loop fusion, ...) and the slowest
instructions, with XLA's FLOP count for the convolutions and dots. The kinds of a
convolution come from the JAX operation that emitted it (``transpose(jvp(...))``
marks the backward pass; its input-gradient and weight-gradient convolutions are told
apart by their output shape)::

  python experiments/profile_step.py --workload digits_cnn --algorithm fixmatch \\
      --variant vlr --steps 10 [--json out.json]

On the CPU backend the events are the thunks of XLA's runtime (one per fusion, custom
fusion, convolution, dot or copy), timed on the thread that ran them; their sum can
exceed the step's wall time when two thunks run at once.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import sys
import tempfile
import time

# Per-thunk events (before JAX starts XLA); the project's CPU settings as ggr-jax applies.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()
from ggr_jax import allocator, xla_flags  # noqa: E402  pylint: disable=wrong-import-position

allocator.retain_freed_memory()
xla_flags.use_eigen_convolutions()

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from ggr_jax import bench  # noqa: E402  pylint: disable=wrong-import-position
from ggr_jax.train import build as build_lib  # noqa: E402  pylint: disable=wrong-import-position

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w\-]*)\(")


def instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """Name -> {opcode, shape, op_name, kind} of every instruction of the optimised HLO,
  the kind taken from the fused computation for a fusion."""
  table, computations, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    op_name = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    table[name] = {"opcode": opcode, "shape": shape, "op_name": op_name.group(1) if op_name
                   else "", "calls": calls.group(1) if calls else "", "line": line.strip()}
    if current:
      computations[current].append(name)
  for entry in table.values():  # a fusion's kind: the heaviest operation it calls
    inner = [table[n] for n in computations.get(entry["calls"], []) if n in table]
    heavy = [i for i in inner if i["opcode"] in ("convolution", "dot")]
    entry["inner"] = heavy[0] if heavy else None
  return table


def kind_of(entry: dict | None) -> str:
  """forward / input-gradient / weight-gradient convolution, dot, fusion, copy, ..."""
  if entry is None:
    return "other"
  core = entry["inner"] or entry
  opcode = core["opcode"]
  if opcode == "convolution":
    if "transpose(" not in core["op_name"]:
      return "conv forward"
    # the weight gradient's output is the kernel: its leading dims are the window
    dims = [int(d) for d in re.findall(r"\d+", core["shape"].split("]")[0])]
    window = re.search(r"window=\{size=(\d+)x(\d+)", core["line"])
    small = window and int(window.group(1)) * int(window.group(2)) > 9 and len(dims) == 4
    return "conv weight grad" if small or (dims and dims[0] <= 7 and dims[1] <= 7) \
        else "conv input grad"
  if opcode == "dot":
    return "dot"
  if opcode == "fusion":
    return "fusion (" + ("custom" if "kind=kCustom" in entry["line"] else
                         re.search(r"kind=(\w+)", entry["line"]).group(1)) + ")"
  return opcode


def profile(workload: str, algorithm: str, variant: str, steps: int, warmup: int) -> dict:
  work = bench.WORKLOADS[workload]
  cfg = bench._config(algorithm, work, bench.VARIANTS[variant])  # pylint: disable=protected-access
  host = bench._synthetic_data(work)  # pylint: disable=protected-access
  channels = work.image_shape[-1]
  data = build_lib.DataSpec(work.image_shape, work.num_classes, host["x_unlabeled"].shape[0],
                            (0.5,) * channels, (0.25,) * channels)
  program = build_lib.build(cfg, data, bench._mesh())  # pylint: disable=protected-access
  state = program.init_state()
  feed = program.feed(host, state, 0)
  step = program.train_step
  compiled = step.lower(state, feed.next(0)).compile()
  table = instructions(compiled.as_text())
  for i in range(warmup):
    state, _ = step(state, feed.next(i))
  jax.block_until_ready(state)
  folder = tempfile.mkdtemp(prefix="ggr_jax_profile_")
  walls = []
  with jax.profiler.trace(folder):
    for i in range(steps):
      start = time.perf_counter()
      state, _ = step(state, feed.next(warmup + i))
      jax.block_until_ready(state)
      walls.append(time.perf_counter() - start)
  feed.close()
  trace = next(pathlib.Path(folder).rglob("*.xplane.pb"))
  data_ = jax.profiler.ProfileData.from_file(str(trace))
  per_name = collections.Counter()
  for plane in data_.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in table:
          per_name[event.name] += event.duration_ns / 1e6 / steps
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  by_kind = collections.Counter()
  for name, ms in per_name.items():
    by_kind[kind_of(table[name])] += ms
  return {"workload": workload, "algorithm": algorithm, "variant": variant, "steps": steps,
          "step_ms_median": float(np.median(walls) * 1e3), "xla_flops": cost.get("flops"),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "by_kind_ms": dict(by_kind.most_common()),
          "top": [{"name": n, "ms": ms, "kind": kind_of(table[n]),
                   "shape": table[n]["shape"], "op_name": (table[n]["inner"] or table[n])["op_name"]}
                  for n, ms in per_name.most_common(25)]}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", default="digits_cnn", choices=sorted(bench.WORKLOADS))
  parser.add_argument("--algorithm", default="fixmatch")
  parser.add_argument("--variant", default="vlr", choices=sorted(bench.VARIANTS))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  report = profile(args.workload, args.algorithm, args.variant, args.steps, args.warmup)
  traced = sum(report["by_kind_ms"].values())
  print(f"{args.workload} {args.algorithm} {args.variant}: step {report['step_ms_median']:.1f} ms "
        f"(traced, median of {args.steps}); thunk time {traced:.1f} ms per step; "
        f"XLA flags: {report['xla_flags'] or '(none)'}")
  for kind, ms in report["by_kind_ms"].items():
    print(f"  {kind:24s} {ms:8.2f} ms  {100 * ms / traced:5.1f}%")
  print("slowest instructions:")
  for row in report["top"]:
    print(f"  {row['ms']:8.2f} ms  {row['kind']:22s} {row['shape']:28s} {row['op_name'][-70:]}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
