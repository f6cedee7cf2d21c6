"""The ``ggr-jax`` command. Subcommands: ``demo`` (more arrive with the training system)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ggr-jax", description="Geometric Gradient Rectification for semi-supervised JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser(
      "demo", help="train a small MLP on open-set digits with every rectification mode")
  demo.add_argument("--steps", type=_positive_int, default=600, help="SGD steps per run")
  demo.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (0..N-1)")
  demo.add_argument("--labels-per-class", type=_positive_int, default=5,
                    help="labeled images per known digit (0-5)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "demo":
    from ggr_jax import demo  # pylint: disable=import-outside-toplevel
    demo.main(demo.DemoConfig(steps=args.steps, seeds=tuple(range(args.seeds)),
                              labels_per_class=args.labels_per_class))
  return 0


if __name__ == "__main__":
  sys.exit(main())
