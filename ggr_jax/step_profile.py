"""Where a train step's time goes: XLA's executed operations, timed and grouped.

``ggr-jax bench --profile`` runs a bench cell's compiled step under ``jax.profiler``,
takes every executed operation's time from the trace (events carrying an ``hlo_op``
stat: the CPU runtime's thunks, the GPU's kernels) and names each one from the optimised
HLO of the same program:

* ``phase``: ``forward`` (the model's forward), ``backward`` (any transpose of it: the
  gradients, second-order terms), ``other`` (sampling, augmentation, the rectifier,
  the optimizer);
* ``layer``: the Flax module path inside the model (``backbone/block1a_bn``), or ``-``;
* ``kind``: ``conv forward``, ``conv input grad``, ``conv kernel grad`` (a backward
  convolution whose output has a kernel's shape; its layer is that kernel's module where
  no other kernel has the shape), ``matmul``, ``reduction fusion``,
  ``elementwise fusion``, ``copy/transpose``, ``control`` (loops, calls), or the opcode.

Times are per step, summed over the operation's executions; while several operations
are in flight at once (the runtime runs independent ones concurrently) their time is
split equally among them, so the times add up to ``busy_ms``, the time per step the
program had work in flight (a mean over the traced steps; ``wall_ms`` is their median, so
a slow step can put the first above the second; the rest of the wall time is launch,
host and transfers). XLA's
cost analysis gives no per-operation times; XProf's op profile reads the same trace in
its own viewer, but does not sort convolutions into forward, input and kernel gradients
or name operations by Flax module, which is what the parser here is for, in the
terminal and in the bench's JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
import time
from typing import Any

import jax
import numpy as np
from jax.profiler import ProfileData

from ggr_jax import allocator, bench, rundir

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
# a Flax module's class name (capitalised), its closing parentheses, then its path
_MODEL_PATH = re.compile(r"(?:^|[/(])[A-Z]\w*\)*/(.+)/[^/]+$")


@dataclasses.dataclass(frozen=True)
class Operation:
  """One top-level HLO instruction of the compiled program, as the profile names it."""
  name: str
  opcode: str
  shape: str
  op_name: str
  calls: str | None


def _shape_and_rest(text: str) -> tuple[str, str]:
  if not text.startswith("("):
    shape, _, rest = text.partition(" ")
    return shape, rest
  depth = 0
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return text[:i + 1], text[i + 2:]
  return text, ""


def parse_hlo(text: str) -> tuple[dict[str, Operation], dict[str, set[str]]]:
  """The instructions of an optimised HLO module's text by name, and each computation's
  set of opcodes (to see what a fusion holds)."""
  ops: dict[str, Operation] = {}
  opcodes: dict[str, set[str]] = collections.defaultdict(set)
  computation = ""
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head and line.rstrip().endswith("{"):
      computation = head.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    shape, rest = _shape_and_rest(line[match.end():])
    opcode = rest.split("(", 1)[0]
    opcodes[computation].add(opcode)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    calls = re.search(r"calls=%([\w.\-]+)", rest)
    ops[match.group(1)] = Operation(match.group(1), opcode, shape,
                                    op_name.group(1) if op_name else "",
                                    calls.group(1) if calls else None)
  return ops, opcodes


def _dims(shape: str) -> tuple[int, ...]:
  found = re.match(r"\w+\[([\d,]*)\]", shape)
  return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()


def kernel_layers(params: Any) -> dict[tuple[int, ...], str]:
  """The module path of each kernel (a parameter of 2 or more dimensions) by its sorted
  shape, ``-`` where several kernels share a shape."""
  layers: dict[tuple[int, ...], str] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if np.ndim(leaf) >= 2:
      shape = tuple(sorted(np.shape(leaf)))
      module = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
      layers[shape] = module if shape not in layers else "-"
  return layers


def classify(op: Operation, opcodes: dict[str, set[str]],
             kernel_shapes: dict[tuple[int, ...], str]) -> tuple[str, str, str]:
  """``(phase, layer, kind)`` of one operation (see the module's docstring);
  ``kernel_shapes`` as :func:`kernel_layers` gives them."""
  in_model = _MODEL_PATH.search(op.op_name)
  layer = "-"
  if in_model:  # the module path, up to a function scope (jit(...)) or a method (bn.normalize)
    parts = in_model.group(1).split("/")
    layer = "/".join(parts[:next((i for i, p in enumerate(parts) if "(" in p or "." in p),
                                 len(parts))]) or "-"
  phase = "other" if not in_model else (
      "backward" if "transpose(" in op.op_name else "forward")
  inside = opcodes.get(op.calls, set()) if op.calls else {op.opcode}
  if "convolution" in inside:
    # XLA's rewrites of a kernel gradient's convolution may drop its metadata
    if phase != "forward" and tuple(sorted(_dims(op.shape))) in kernel_shapes:
      phase, kind = "backward", "conv kernel grad"
      if layer == "-":
        layer = kernel_shapes[tuple(sorted(_dims(op.shape)))]
    elif phase != "backward":
      kind = "conv forward"
    else:
      kind = "conv input grad"
  elif "dot" in inside:
    kind = "matmul"
  elif op.opcode in ("while", "call", "conditional"):
    kind = "control"
  elif "reduce" in inside or "reduce-window" in inside:
    kind = "reduction fusion" if op.opcode == "fusion" else "reduction"
  elif op.opcode in ("copy", "transpose") or inside <= {"copy", "transpose", "bitcast",
                                                         "parameter", "reshape"}:
    kind = "copy/transpose"
  elif op.opcode == "fusion":
    kind = "elementwise fusion"
  else:
    kind = op.opcode
  return phase, layer, kind


def _op_times(trace_dir: str, module: str) -> dict[str, float]:
  """Nanoseconds per ``hlo_op`` of ``module`` in the trace under ``trace_dir``, with the
  time during which several operations were in flight split equally among them (so the
  times add up to the time the program had work in flight).
  Where device planes (``/device:...``) carry operations, only theirs count.

  The CPU runtime's thunks may finish asynchronously (Eigen's convolutions run on its
  pool after the thunk returns): a start event carries a producer id ``_p``, and the
  ``end: ...`` event with the same consumer id ``_c`` marks completion; an operation is
  in flight from its start to its end event where there is one."""
  by_plane: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
  for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
    for plane in ProfileData.from_file(path).planes:
      starts, ends = {}, {}
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          if "hlo_op" in stats and str(stats.get("hlo_module", "")).endswith(module):
            key = stats.get("_p", id(event))
            starts[key] = (str(stats["hlo_op"]), event.start_ns, event.duration_ns)
          elif event.name.startswith("end: ") and "_c" in stats:
            ends[stats["_c"]] = event.start_ns
      by_plane[plane.name] += [(start, start + max(duration, ends.get(key, start) - start),
                                name) for key, (name, start, duration) in starts.items()]
  # on an accelerator the device's kernels, not the host's launches of them
  device = [name for name, found in by_plane.items() if name.startswith("/device:") and found]
  intervals = [i for name in (device or by_plane) for i in by_plane[name]]
  boundaries = sorted([(start, 1, i) for i, (start, _, _) in enumerate(intervals)]
                      + [(end, -1, i) for i, (_, end, _) in enumerate(intervals)])
  totals: dict[str, float] = collections.defaultdict(float)
  active: set[int] = set()
  last = boundaries[0][0] if boundaries else 0.0
  for when, change, index in boundaries:
    for i in active:
      totals[intervals[i][2]] += (when - last) / len(active)
    last = when
    (active.add if change > 0 else active.discard)(index)
  return totals


def profile_step(algorithm: str, work: bench.Workload, variant: dict[str, Any],
                 steps: int = 10, warmup: int = 3) -> dict[str, Any]:
  """Runs ``steps`` traced steps of one bench cell; returns per-operation rows (ms per
  step, largest first) and the step's median wall time."""
  step, state, feed = bench.prepared_step(algorithm, work, variant)
  batch = feed.next(0)
  compiled = step.lower(state, batch).compile()
  allocator.return_freed_memory()
  ops, opcodes = parse_hlo(compiled.as_text())
  kernel_shapes = kernel_layers(state.params)
  for i in range(warmup):
    state, _ = step(state, feed.next(i))
  jax.block_until_ready(state)
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for i in range(steps):
      start = time.perf_counter()
      state, _ = step(state, feed.next(warmup + i))
      jax.block_until_ready(state)
      walls.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    times = _op_times(trace_dir, "train_step")
  feed.close()
  rows = []
  for name, ns in times.items():
    op = ops.get(name, Operation(name, "?", "", "", None))
    phase, layer, kind = classify(op, opcodes, kernel_shapes)
    rows.append({"op": name, "ms": ns / steps / 1e6, "phase": phase, "layer": layer,
                 "kind": kind, "shape": op.shape, "op_name": op.op_name})
  rows.sort(key=lambda r: -r["ms"])
  return {"wall_ms": float(np.median(walls) * 1e3), "busy_ms": sum(r["ms"] for r in rows),
          "operations": rows}


def summary(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[tuple, float, int]]:
  """``(key values, ms per step, operation count)`` grouped by ``keys``, largest first."""
  groups: dict[tuple, list[float]] = collections.defaultdict(list)
  for row in rows:
    groups[tuple(row[k] for k in keys)].append(row["ms"])
  return sorted(((k, sum(v), len(v)) for k, v in groups.items()), key=lambda g: -g[1])


def format_profile(title: str, profile: dict[str, Any], top: int = 15) -> str:
  """The profile as text: by phase and kind, by layer, then the ``top`` operations."""
  rows, busy = profile["operations"], profile["busy_ms"]
  lines = [f"{title}: wall {profile['wall_ms']:.1f} ms/step (median), operations in flight "
           f"{busy:.1f} ms/step"]
  for keys in (("phase", "kind"), ("layer",)):
    lines.append(f"  by {' and '.join(keys)}:")
    for values, ms, count in summary(rows, keys)[:top]:
      lines.append(f"    {' / '.join(values):<40} {ms:8.2f} ms {100 * ms / busy:5.1f}%  "
                   f"({count} ops)")
  lines.append(f"  top {top} operations:")
  for row in rows[:top]:
    lines.append(f"    {row['ms']:8.2f} ms  {row['kind']:<18} {row['shape'][:28]:<28} "
                 f"{row['op_name'][-70:]}")
  return "\n".join(lines)


def run(workloads: list[str], algorithms: list[str], variants: list[str], steps: int = 10,
        warmup: int = 3, top: int = 15, json_path: str | None = None) -> dict[str, Any]:
  """Profiles every (workload, algorithm, variant) cell, printing each as it finishes;
  returns the report (and writes it to ``json_path``)."""
  bench.check_names(workloads, variants)
  report: dict[str, Any] = {"platform": jax.devices()[0].platform, "jax_version": jax.__version__,
                            "steps": steps, "date": time.strftime("%Y-%m-%d"), "results": []}
  for wname in workloads:
    for algorithm in algorithms:
      for vname in variants:
        profile = profile_step(algorithm, bench.WORKLOADS[wname], bench.VARIANTS[vname],
                               steps, warmup)
        print(format_profile(f"{wname} {algorithm} {vname}", profile, top), flush=True)
        report["results"].append({"workload": wname, "algorithm": algorithm,
                                  "variant": vname, **profile})
        if json_path:
          rundir.write_json(json_path, report)
  return report
