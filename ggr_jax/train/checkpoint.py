"""Orbax checkpoints of the whole train state in ``<workdir>/checkpoints``."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from ggr_jax import rundir
from ggr_jax.train.state import TrainState


class Checkpointer:
  """Saves and restores :class:`TrainState`; keeps the newest ``max_to_keep`` steps."""

  def __init__(self, workdir: str | pathlib.Path, max_to_keep: int = 2):
    directory = rundir.checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState) -> None:
    """Saves at ``state.step`` (asynchronously; :meth:`wait` blocks until written)."""
    step = int(state.step)
    if step != self._manager.latest_step():
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, like: TrainState) -> TrainState:
    """The newest checkpoint, laid out (shapes, dtypes, shardings) like ``like``."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self._manager.restore(self._manager.latest_step(),
                                 args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
