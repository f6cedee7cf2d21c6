"""The README's optax example runs as printed and rectifies a conflicting step."""

import pathlib
import re

import jax
import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_compiles_once():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  code = next(b for b in blocks if "ggr_jax.rectify(" in b)
  namespace: dict = {}
  exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
  step, tx = namespace["step"], namespace["tx"]
  keys = jax.random.split(jax.random.key(0), 3)
  batch = {"x": jax.random.normal(keys[0], (16, 3)), "y": jax.random.normal(keys[1], (16, 2)),
           "pseudo": -jax.random.normal(keys[1], (16, 2))}  # pseudo-labels opposing y
  params = {"w": jnp.zeros((3, 2))}
  opt_state = tx.init(params)
  for _ in range(3):
    params, opt_state, cos = step(params, opt_state, batch)
  assert float(cos) < 0 and step._cache_size() == 1
