"""``ggr-jax sweep``: many ``ggr-jax train`` runs from one spec, placed on devices, resumable.

A sweep spec is a Python file (or the name of a file in ``configs/``) whose
``get_sweep()`` (``get_sweep(arg)`` for ``SPEC:ARG``) returns a list of cells::

  {"name": "fixmatch-vlr-s0",            # optional: unique, filesystem-safe
   "config": "grid:algorithm=fixmatch,ggr=vlr,seed=0",   # as for ggr-jax train --config
   "overrides": {"train.steps": 500}}     # optional: --config.FIELD=VALUE flags

:func:`product` builds the cells of a grid of axes. Each cell trains in ``ROOT/<name>``
as its own process (``python -m ggr_jax.cli train``), its output in ``ROOT/<name>/log.txt``.
A cell whose ``summary.json`` belongs to the same config is done and skipped; a cell
with a checkpoint is resumed by rerunning its command (the loop resumes); a failed cell
is rerun. Placement: one cell per GPU (``CUDA_VISIBLE_DEVICES``) or TPU chip
(``TPU_VISIBLE_CHIPS``) at a time, or one cell over all devices at a time
(``--devices all``); on CPU, ``--parallel N`` cells at a time, each pinned to its own
share of the cores (XLA sizes its thread pool from the affinity mask). Ctrl-C (or
SIGTERM) sends SIGTERM to the running cells, which save a checkpoint and exit 130; the
next ``ggr-jax sweep`` resumes them. At the end the report of :mod:`ggr_jax.report` is
written into ``ROOT``.

``--launcher slurm`` submits the cells instead, as one SLURM job array through submitit
(:mod:`ggr_jax.sweep.submitit_launcher`); ``--status`` reads each cell's state from its
workdir and the scheduler (:mod:`ggr_jax.sweep.status`).
"""

from ggr_jax.sweep.placement import Slot, detect_accelerators, make_slots
from ggr_jax.sweep.runner import Outcome, build_parser, main, plan, run_sweep, status_table
from ggr_jax.sweep.status import CellStatus, format_status, status_rows
from ggr_jax.sweep.submitit_launcher import LAUNCHERS, CellJob, LauncherOptions, submit
from ggr_jax.sweep.spec import (CELL_KEYS, Cell, SweepError, cell_state, checkpoint_step,
                                config_diff, default_name, load_spec, parse_cells, product,
                                resolve_config)

__all__ = ["CELL_KEYS", "Cell", "CellJob", "CellStatus", "LAUNCHERS", "LauncherOptions",
           "Outcome", "Slot", "SweepError", "build_parser", "cell_state",
           "checkpoint_step", "config_diff", "default_name", "detect_accelerators", "load_spec",
           "main", "make_slots", "parse_cells", "plan", "product", "resolve_config",
           "run_sweep", "status_rows", "format_status", "status_table", "submit"]
