"""The ``ggr-jax`` command: ``train``, ``eval``, ``sweep``, ``diagnostics``, ``bench``, ``demo``.

``ggr-jax train [--config NAME|PATH] [--config.a.b=value ...] [--workdir DIR]``
trains (resuming when ``DIR`` holds a checkpoint of the same config; add
``--coordinator HOST:PORT --num-processes N --process-id I`` on each machine of a
multi-host run, see ``ggr_jax.train.distributed``); ``ggr-jax eval
--workdir DIR`` evaluates the newest checkpoint of a run; ``ggr-jax diagnostics
--workdir DIR`` plots where gradient conflict comes from (ID vs OOD samples);
``ggr-jax sweep SPEC --root DIR`` trains every cell of a sweep spec (one workdir each,
skipping finished and resuming interrupted ones) and writes the report (``ggr_jax.sweep``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any, Sequence

from ggr_jax import allocator, compile_cache, xla_flags


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def _parse_train_flags(argv: list[str]) -> tuple[Any, str | None]:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ggr_jax import configs  # pylint: disable=import-outside-toplevel

  values = flags.FlagValues()
  try:
    full_argv = configs.define_config_flag(values, argv)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, summary)",
                        flag_values=values)
    values(full_argv)
  except configs.UnknownConfig as err:
    raise SystemExit(f"ggr-jax: {err}") from None
  except (AttributeError, KeyError) as err:  # an override of a field the config lacks
    raise SystemExit(f"ggr-jax train: {_unknown_field(argv, err)}") from None
  except (flags.Error, ValueError, TypeError) as err:  # a bad value, a bad grid: key
    raise SystemExit(f"ggr-jax train: {_one_line(err)}") from None
  return values.config, values.workdir


def _one_line(err: Exception) -> str:
  """``err``'s message; a config file's error that absl wraps with its traceback becomes
  the wrapping's first line and the error itself."""
  text = str(err).strip()
  if "Traceback (most recent call last)" not in text:
    return text
  lines = [line for line in text.splitlines() if line.strip()]
  return f"{lines[0].removesuffix(':')}: {lines[-1]}"


def _unknown_field(argv: list[str], err: Exception) -> str:
  """The message for a ``--config.a.b=...`` naming a field the config does not have."""
  name = str(err).strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  flag = next((o for o in overrides if name in o.split(".")), f"--config...{name}")
  return (f"{flag} names a field the config does not have ({name!r}); check its spelling "
          "against the config file (configs/default.py lists every field).")


def _default_workdir(cfg) -> str:
  return f"runs/{cfg.algorithm}-{cfg.ggr.mode}-seed{cfg.train.seed}"


def _print_results(title: str, result: dict[str, Any]) -> None:
  if result.get("protocol") == "closed":
    rows = [("top-1 acc (test)", result.get("closed_acc")),
            ("top-5 acc (test)", result.get("top5_acc")),
            ("mean class acc (test)", result.get("mean_class_acc"))]
  else:
    rows = [("closed-set acc (ID test)", result.get("closed_acc")),
            ("open-set balanced acc", result.get("open_bacc")),
            ("AUROC ID vs OOD", result.get("auroc"))]
  print(f"\n{title}")
  for name, value in rows:
    print(f"  {name:<26}{value:.4f}" if isinstance(value, float) else f"  {name:<26}{value}")
  for key in ("steps", "wall_s"):
    if key in result:
      print(f"  {key:<26}{result[key]:.1f}" if key == "wall_s" else f"  {key:<26}{result[key]}")
  took = result.get("startup", {})
  if "to_first_step_s" in took:
    parts = ", ".join(f"{name[:-2].replace('_', ' ')} {took[name]:.1f}" for name in (
        "before_trainer_s", "data_s", "build_s", "state_s", "first_step_s")
                      if isinstance(took.get(name), float))
    print(f"  {'to the first step (s)':<26}{took['to_first_step_s']:.1f} ({parts})")


def _split_distributed_flags(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
  """Takes ``--coordinator/--num-processes/--process-id`` out of the train arguments."""
  parser = argparse.ArgumentParser(prog="ggr-jax train", add_help=False, allow_abbrev=False)
  parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
  parser.add_argument("--num-processes", type=_positive_int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  known, rest = parser.parse_known_args(argv)
  return rest, vars(known)


def train_main(argv: list[str]) -> int:
  from ggr_jax import rundir  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import distributed  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import loop  # pylint: disable=import-outside-toplevel
  from ggr_jax.train.checkpoint import CheckpointWriteError  # pylint: disable=import-outside-toplevel

  argv, multi_process = _split_distributed_flags(argv)
  cfg, workdir = _parse_train_flags(argv)
  workdir = workdir or _default_workdir(cfg)
  try:
    distributed.initialize(**multi_process)
    summary = loop.train(cfg, workdir)
  except CheckpointWriteError as err:
    print(f"ggr-jax train: {err}", file=sys.stderr, flush=True)
    if __name__ == "__main__" or sys.argv[0].endswith("ggr-jax"):
      # orbax's failed writer threads would print their tracebacks at exit, after this
      # line; everything of this run is closed or on disk already
      os._exit(2)  # pylint: disable=protected-access
    return 2
  except (config_lib.ConfigError, distributed.DistributedError, rundir.WorkdirError,
          loop.Diverged) as err:
    print(f"ggr-jax train: {err}", file=sys.stderr)
    return 2
  if summary is None:  # stopped by a signal after saving
    return 130
  if not distributed.is_primary():
    return 0
  _print_results(f"{cfg.algorithm} + {cfg.ggr.mode}, seed {cfg.train.seed} ({workdir})", summary)
  return 0


def eval_main(argv: list[str]) -> int:
  from ggr_jax import rundir  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import loop  # pylint: disable=import-outside-toplevel
  from ggr_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(prog="ggr-jax eval")
  parser.add_argument("--workdir", required=True, help="a directory written by ggr-jax train")
  args = parser.parse_args(argv)
  try:
    cfg = loop.load_run_config(args.workdir)
  except (FileNotFoundError, rundir.WorkdirError) as err:
    print(f"ggr-jax eval: {err}", file=sys.stderr)
    return 2
  trainer = loop.Trainer(cfg, args.workdir, progress=False)
  ckpt = Checkpointer(args.workdir)
  if ckpt.latest_step() is None:
    print(f"ggr-jax eval: no checkpoint in {args.workdir}/checkpoints", file=sys.stderr)
    return 2
  try:
    state = trainer.restore(ckpt)
  except rundir.WorkdirError as err:
    print(f"ggr-jax eval: {err}", file=sys.stderr)
    return 2
  result = {**trainer.evaluate(state), "steps": int(state.step)}
  rundir.write_json(rundir.path(args.workdir, rundir.EVAL), result, default=float)
  _print_results(f"eval of {args.workdir} at step {int(state.step)}", result)
  return 0


def diagnostics_main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="ggr-jax diagnostics",
      description="plot per-sample conflict (ID vs OOD) over training for a workdir, or "
      "with --eagc EAGC's diagnostics (GDC, SOC, tau) for one or more workdirs")
  parser.add_argument("--workdir", required=True, action="append",
                      help="a run trained with per-sample metrics (--eagc: repeatable)")
  parser.add_argument("--out", default=None, help="PNG path (default WORKDIR/conflict.png, "
                      "with --eagc WORKDIR/eagc_diagnostics.png of the first)")
  parser.add_argument("--eagc", action="store_true",
                      help="EAGC's GDC, SOC and tau over training, one curve per workdir")
  args = parser.parse_args(argv)
  from ggr_jax import plots  # pylint: disable=import-outside-toplevel
  try:
    if args.eagc:
      out = args.out or str(pathlib.Path(args.workdir[0]) / "eagc_diagnostics.png")
      path = plots.plot_eagc_diagnostics(args.workdir, out)
    elif len(args.workdir) > 1:
      raise ValueError("per-sample conflict plots one --workdir at a time")
    else:
      path = plots.plot_conflict_diagnostics(args.workdir[0], args.out)
  except (ValueError, FileNotFoundError) as err:
    print(f"ggr-jax diagnostics: {err}", file=sys.stderr)
    return 2
  print(path)
  return 0


def bench_main(argv: list[str]) -> int:
  from ggr_jax import bench  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="ggr-jax bench", description=bench.__doc__.split("\n")[0])
  parser.add_argument("--workloads", default="digits_cnn,wrn28_2_cpu",
                      help=f"comma list of {sorted(bench.WORKLOADS)}")
  parser.add_argument("--algorithms", default="fixmatch,iomatch", help="comma list")
  parser.add_argument("--variants", default=",".join(bench.DEFAULT_VARIANTS),
                      help="comma list ('' for none, e.g. with --pipeline)")
  parser.add_argument("--pipeline", action="store_true",
                      help="also time the host input pipeline alone against the sum step")
  parser.add_argument("--pipeline-workers", type=int, default=0,
                      help="Grain worker processes of the timed pipeline (0: a reader thread)")
  parser.add_argument("--steps", type=_positive_int, default=20, help="timed steps per cell")
  parser.add_argument("--warmup", type=_positive_int, default=3)
  parser.add_argument("--json", default=None, help="write the report here")
  parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                      help="each cell in a fresh process, so peak device memory is its own "
                           "(auto: yes where the backend reports device memory)")
  parser.add_argument("--profile", type=_positive_int, default=None, metavar="TOP",
                      help="instead of timing, trace --steps steps of each cell and print "
                           "where the time goes: by phase and kind of operation, by layer, "
                           "and the TOP slowest operations (ggr_jax.step_profile)")
  args = parser.parse_args(argv)
  if args.profile:
    from ggr_jax import step_profile  # pylint: disable=import-outside-toplevel
    try:
      step_profile.run(args.workloads.split(","), args.algorithms.split(","),
                       [v for v in args.variants.split(",") if v], args.steps, args.warmup,
                       top=args.profile, json_path=args.json)
    except ValueError as err:
      print(f"ggr-jax bench: {err}", file=sys.stderr)
      return 2
    return 0
  try:
    bench.run(args.workloads.split(","), args.algorithms.split(","),
              [v for v in args.variants.split(",") if v], args.steps, args.warmup,
              pipeline=args.pipeline, pipeline_workers=args.pipeline_workers,
              isolate={"auto": None, "yes": True, "no": False}[args.isolate],
              json_path=args.json)
  except ValueError as err:
    print(f"ggr-jax bench: {err}", file=sys.stderr)
    return 2
  return 0


def demo_main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="ggr-jax demo")
  parser.add_argument("--steps", type=_positive_int, default=600, help="SGD steps per run")
  parser.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (0..N-1)")
  parser.add_argument("--labels-per-class", type=_positive_int, default=5,
                      help="labeled images per known digit (0-5)")
  args = parser.parse_args(argv)
  from ggr_jax import demo  # pylint: disable=import-outside-toplevel
  demo.main(demo.DemoConfig(steps=args.steps, seeds=tuple(range(args.seeds)),
                            labels_per_class=args.labels_per_class))
  return 0


def sweep_main(argv: list[str]) -> int:
  from ggr_jax import sweep  # pylint: disable=import-outside-toplevel
  return sweep.main(argv)


COMMANDS = {"train": train_main, "eval": eval_main, "sweep": sweep_main,
            "diagnostics": diagnostics_main, "bench": bench_main, "demo": demo_main}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    print(__doc__.strip() + f"\n\ncommands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  allocator.retain_freed_memory()  # before the first step's buffers (see the module)
  xla_flags.use_eigen_convolutions()  # before JAX starts its backend (see the module)
  compile_cache.use_compilation_cache()  # before the first compile (see the module)
  try:
    return COMMANDS[argv[0]](argv[1:])
  except KeyboardInterrupt:  # before a trainer installs its handlers (imports, set-up)
    print(f"ggr-jax {argv[0]}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
