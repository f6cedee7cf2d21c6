"""Orbax checkpoints of the whole train state in ``<workdir>/checkpoints``, verified.

Orbax writes a step asynchronously and has no integrity check of its own, so a file
damaged after the write (a bad disk, a stray write, a copy cut short) would load as
silently wrong numbers. Once a step has finished writing, its files' SHA-256 digests go
to ``<workdir>/checksums/<step>.json``. A restore takes the newest step whose files
match their digests and that orbax can read; a damaged step is moved to
``<workdir>/damaged/`` with a one-line warning naming it, and the next newer intact
one is used. Each step folder also holds the run's config (``run_config.json``), so a
lost ``config.json`` can be checked against, and restored from, the checkpoint itself.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import time
import warnings

import jax
import orbax.checkpoint as ocp

from ggr_jax import rundir
from ggr_jax.train import distributed
from ggr_jax.train.state import TrainState


class NoIntactCheckpoint(rundir.WorkdirError):
  """Every checkpoint of the workdir failed verification."""


class CheckpointWriteError(rundir.WorkdirError):
  """A checkpoint could not be written (permissions, a full disk); the previous ones are
  left as they were."""


_OS_ERROR = re.compile(r"([A-Za-z][A-Za-z ]+?) \[os_error_code='(\d+)'\]")


def _free_bytes(folder: pathlib.Path) -> int:
  return shutil.disk_usage(folder).free


def _folder_bytes(folder: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _digests(folder: pathlib.Path) -> dict[str, str]:
  out = {}
  for file in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest = hashlib.sha256()
    with file.open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    out[str(file.relative_to(folder))] = digest.hexdigest()
  return out


class Checkpointer:
  """Saves and restores :class:`TrainState`; keeps the newest ``max_to_keep`` steps."""

  def __init__(self, workdir: str | pathlib.Path, max_to_keep: int = 2,
               config: dict | None = None):
    """``config``: the run's config, stored in every step folder (``run_config.json``,
    under the digests) so that a checkpoint names the config it was trained with."""
    self._config = config
    self._writing: int | None = None  # the step of the newest save
    self._feed_states: dict[int, dict] = {}  # written into the step folders when sealed
    self._workdir = pathlib.Path(workdir).absolute()
    self._directory = rundir.checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
        self._directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                              create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState, feed_state: dict | None = None) -> None:
    """Saves at ``state.step`` (asynchronously; the digests are written once it is
    finished: at the first later save that finds no write in progress, at :meth:`wait`
    or at :meth:`close`; a save never waits for the previous one to finish).
    ``feed_state``: the input pipeline's state (JSON), stored beside it
    (:meth:`feed_state`)."""
    step = int(state.step)
    if feed_state is not None:
      self._feed_states[step] = feed_state
    if step != self._manager.latest_step():
      self._check_room(step)
      if not self._manager.is_saving_in_progress():
        self.check()
        self._seal()
      previous, in_progress = self._writing, self._manager.is_saving_in_progress()
      self._writing = step
      try:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
      except Exception as err:  # pylint: disable=broad-except  # orbax raises many kinds
        # a save first finishes the previous write, whose error it raises
        raise self._write_error(previous if in_progress else step, err) from None

  def check(self) -> None:
    """Raises :class:`CheckpointWriteError` if a finished background write failed; cheap
    enough for every step (nothing is checked while a write is in progress)."""
    if self._manager.is_saving_in_progress():
      return
    try:
      self._manager.check_for_errors()
      # the finalize thread can fail after the writer reports no error; joining a
      # finished thread re-raises its error and costs nothing otherwise
      self._manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      raise self._write_error(self._writing, err) from None

  def abandon(self) -> None:
    """Ends the background writer after a failed write (its error is already reported)."""
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def _check_room(self, step: int) -> None:
    """Refuses a save the checkpoint folder cannot take (not writable, or less free space
    than the newest checkpoint occupies) before anything is written."""
    if not distributed.is_primary():
      return
    if not os.access(self._directory, os.W_OK):
      raise self._write_error(step, PermissionError(f"{self._directory} is not writable"))
    newest = self._manager.latest_step()
    need = 0 if newest is None else _folder_bytes(self._directory / str(newest))
    free = _free_bytes(self._directory)
    if need > free:
      raise self._write_error(step, OSError(
          f"{free / 2**20:.0f} MiB free, the newest checkpoint took {need / 2**20:.0f} MiB"))

  def _write_error(self, step: int | None, err: Exception) -> CheckpointWriteError:
    os_error = _OS_ERROR.search(str(err))
    if os_error is not None:  # tensorstore reports the OS error inside its message
      cause = f"{os_error.group(1).strip()}, errno {os_error.group(2)}"
    else:
      cause = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    kept = self._manager.all_steps()
    return CheckpointWriteError(
        f"checkpoint step {step} could not be written to {self._directory} ({cause}); the "
        f"run stopped. Checkpoints kept: {sorted(kept) or 'none'}. Free space or fix the "
        "folder's permissions, then run the same command to resume.")

  def restore(self, like: TrainState) -> TrainState:
    """The newest intact checkpoint, laid out (shapes, dtypes, shardings) like ``like``."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = self._verify(step)
      if problem is None:
        try:
          return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # pylint: disable=broad-except  # orbax raises many kinds
          problem = f"orbax cannot read it ({type(err).__name__}: {str(err)[:200]})"
      self._set_aside(step, problem)
    raise NoIntactCheckpoint(
        f"no intact checkpoint in {self._directory} (the damaged ones are in "
        f"{rundir.path(self._workdir, rundir.DAMAGED)}); move the workdir aside and start "
        "the run again.")

  def feed_state(self, step: int) -> dict | None:
    """The input pipeline's state stored with checkpoint ``step`` (None if there is none)."""
    file = self._directory / str(step) / rundir.INPUT_STATE
    return rundir.read_json(file) if file.exists() else None

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      raise self._write_error(self._writing, err) from None
    self.check()
    self._seal()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  # -- digests ------------------------------------------------------------------------
  def _checksum_file(self, step: int) -> pathlib.Path:
    return rundir.path(self._workdir, rundir.CHECKSUMS) / f"{step}.json"

  def _seal(self) -> None:
    """Digests of the finished steps that have none; drops those of deleted steps.
    Called with no write in progress."""
    if not distributed.is_primary():
      return
    steps = set(self._manager.all_steps())
    folder = rundir.path(self._workdir, rundir.CHECKSUMS)
    folder.mkdir(exist_ok=True)
    for step in steps:
      # orbax lists a step from the start of its save: a failed one has no folder
      if not self._checksum_file(step).exists() and (self._directory / str(step)).is_dir():
        if self._config is not None:
          rundir.write_json(self._directory / str(step) / rundir.STEP_CONFIG, self._config,
                            sort_keys=True, default=list)
        if step in self._feed_states:
          rundir.write_json(self._directory / str(step) / rundir.INPUT_STATE,
                            self._feed_states[step])
        rundir.write_json(self._checksum_file(step), _digests(self._directory / str(step)))
    self._feed_states = {k: v for k, v in self._feed_states.items()  # the unsealed ones
                         if not self._checksum_file(k).exists() and k >= min(steps, default=0)}
    for file in folder.glob("*.json"):
      if file.stem.isdigit() and int(file.stem) not in steps:
        file.unlink(missing_ok=True)

  def _verify(self, step: int) -> str | None:
    """What is wrong with a step's files, or None (a step without digests, e.g. from
    before this check existed, is trusted to orbax)."""
    file = self._checksum_file(step)
    if not file.exists():
      return None
    try:
      expected = rundir.read_json(file)
    except rundir.WorkdirError:
      return f"its digest file {file} is damaged"
    found = _digests(self._directory / str(step))
    for name, digest in expected.items():
      if name not in found:
        return f"{name} is missing"
      if found[name] != digest:
        return f"{name} changed since it was written"
    extra = sorted(set(found) - set(expected))
    return f"{extra[0]} appeared after it was written" if extra else None

  def _set_aside(self, step: int, problem: str) -> None:
    target = rundir.path(self._workdir, rundir.DAMAGED) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if distributed.is_primary():
      target.parent.mkdir(exist_ok=True)
      shutil.move(str(self._directory / str(step)), str(target))
      self._checksum_file(step).unlink(missing_ok=True)
    warnings.warn(f"checkpoint step {step} is damaged ({problem}); moved to {target}, "
                  "falling back to the previous one.", stacklevel=2)
    self._manager.reload()
