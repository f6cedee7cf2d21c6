"""Kill a short digits run at random moments, resume it, and count bit-identical endings.

    python experiments/kill_resume.py --trials 20 --root /tmp/kill_resume

One uninterrupted reference run, then ``--trials`` runs of the same config, each killed
once with SIGKILL at a uniformly random moment of the reference's wall time (so during
start-up and compilation as well as mid-training and around checkpoint writes) and then
run again with the same command until it finishes. A trial counts as identical when its
``summary.json`` (every field but the wall time and the resume step) and every
``metrics.jsonl`` record (every field but the measured steps per second) equal the
reference's exactly.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

VOLATILE_SUMMARY = ("wall_s", "resumed_from")
VOLATILE_RECORD = ("monitors/steps_per_s",)


def _command(workdir: pathlib.Path, steps: int) -> list[str]:
  return [sys.executable, "-m", "ggr_jax.cli", "train", "--workdir", str(workdir),
          f"--config.train.steps={steps}", "--config.train.checkpoint_every=25",
          "--config.train.log_every=10", f"--config.train.eval_every={steps // 2}"]


def _outcome(workdir: pathlib.Path) -> tuple[dict, list[dict]]:
  summary = json.loads((workdir / "summary.json").read_text())
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return ({k: v for k, v in summary.items() if k not in VOLATILE_SUMMARY},
          [{k: v for k, v in r.items() if k not in VOLATILE_RECORD} for r in records])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0, help="of the kill moments")
  parser.add_argument("--root", default="/tmp/kill_resume")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)

  start = time.perf_counter()
  subprocess.run(_command(root / "reference", args.steps), check=True, capture_output=True)
  full_s = time.perf_counter() - start
  reference = _outcome(root / "reference")
  print(f"reference: {args.steps} steps in {full_s:.1f} s", flush=True)

  rng = np.random.default_rng(args.seed)
  identical = 0
  for trial in range(args.trials):
    workdir = root / f"trial{trial:02d}"
    kill_at = float(rng.uniform(0.0, full_s))
    proc = subprocess.Popen(_command(workdir, args.steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*")
                         if p.name.isdigit()) if (workdir / "checkpoints").exists() else []
    rerun = subprocess.run(_command(workdir, args.steps), capture_output=True, text=True)
    if rerun.returncode != 0:
      print(f"trial {trial:2d}: killed at {kill_at:5.1f} s, resume FAILED: "
            f"{rerun.stderr.strip().splitlines()[-1:]}", flush=True)
      continue
    same = _outcome(workdir) == reference
    identical += same
    resumed = json.loads((workdir / "summary.json").read_text()).get("resumed_from")
    print(f"trial {trial:2d}: killed at {kill_at:5.1f} s (checkpoints then: "
          f"{checkpoints or 'none'}), resumed from {resumed}: "
          f"{'identical' if same else 'DIFFERENT'}", flush=True)
  print(f"{identical}/{args.trials} bit-identical to the uninterrupted run")
  return 0 if identical == args.trials else 1


if __name__ == "__main__":
  sys.exit(main())
