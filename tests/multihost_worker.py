"""One process of the multi-host test: ``ggr-jax train`` then dump the final parameters.

``python tests/multihost_worker.py OUT.npz -- TRAIN_ARGS...`` runs ``ggr-jax train
TRAIN_ARGS`` (which joins a multi-process run when given ``--coordinator`` etc.), then
restores the newest checkpoint of its workdir and writes this process's copy of the
replicated final parameters (``final[...]``), the initial ones (``init[...]``) and the
process count and index to ``OUT.npz``.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv: list[str]) -> int:
  out, train_args = argv[0], argv[argv.index("--") + 1:]
  from ggr_jax import cli  # pylint: disable=import-outside-toplevel
  code = cli.main(["train", *train_args])
  if code:
    return code
  import jax  # pylint: disable=import-outside-toplevel
  from ggr_jax.train import loop  # pylint: disable=import-outside-toplevel
  from ggr_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  workdir = next(a.split("=", 1)[1] for a in train_args if a.startswith("--workdir="))
  trainer = loop.Trainer(loop.load_run_config(workdir), workdir, progress=False)
  ckpt = Checkpointer(workdir)
  state = trainer.restore(ckpt)
  initial = trainer.program.init_state()
  ckpt.close()
  arrays = {}
  for prefix, params in (("final", state.params), ("init", initial.params)):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    arrays.update({prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves})
  np.savez(out, __process_count=jax.process_count(), __process_index=jax.process_index(),
           __step=int(state.step), **arrays)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
