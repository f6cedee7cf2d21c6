"""The step profile: every traced operation is named from the program's own HLO."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from ggr_jax import cli, step_profile
from ggr_jax.models import build_model
from ggr_jax.train.state import make_apply_fn


def _cnn_gradient_program():
  model = build_model("cnn", 10, "none")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)))
  apply_fn = make_apply_fn(model)

  def loss(params, x):
    return jnp.sum(apply_fn(params, variables["batch_stats"], x, True)[0]["logits"] ** 2)

  x = jnp.ones((16, 8, 8, 1))
  compiled = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile()
  return compiled, step_profile.kernel_layers(variables["params"])


def test_the_gradient_of_a_cnn_has_every_kind_of_convolution_in_its_layers():
  compiled, kernels = _cnn_gradient_program()
  ops, opcodes = step_profile.parse_hlo(compiled.as_text())
  named = {op.name: step_profile.classify(op, opcodes, kernels) for op in ops.values()
           if op.opcode in ("convolution", "fusion", "custom-call")}
  kinds = {kind for _, _, kind in named.values()}
  assert {"conv forward", "conv input grad", "conv kernel grad"} <= kinds
  # the CNN's four convolutions, each found under its Flax module path, forward and back
  # (the kernels' shapes differ, so the kernel gradients are named by them)
  convs = {f"backbone/block{b}_conv" for b in ("1a", "1b", "2a", "2b")}
  for kind in ("conv forward", "conv kernel grad"):
    assert convs <= {layer for _, layer, k in named.values() if k == kind}, kind
  for phase, _, kind in named.values():
    if kind in ("conv input grad", "conv kernel grad"):
      assert phase == "backward"


def test_tuple_shapes_and_nested_computations_parse():
  text = """HloModule m

%fused_computation (p: f32[4]) -> f32[] {
  %p = f32[4]{0} parameter(0)
  ROOT %reduce.1 = f32[] reduce(%p, %c), dimensions={0}, to_apply=%add
}

ENTRY %main (a: f32[4]) -> (f32[], f32[4]) {
  %a = f32[4]{0} parameter(0)
  %fusion.3 = f32[] fusion(%a), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/reduce_sum"}
  ROOT %tuple.2 = (f32[], f32[4]{0}) tuple(%fusion.3, %a)
}
"""
  ops, opcodes = step_profile.parse_hlo(text)
  assert ops["tuple.2"].opcode == "tuple" and ops["tuple.2"].shape.startswith("(f32[]")
  assert ops["fusion.3"].calls == "fused_computation" and ops["fusion.3"].op_name == "jit(f)/reduce_sum"
  assert step_profile.classify(ops["fusion.3"], opcodes, {}) == (
      "other", "-", "reduction fusion")


def test_bench_profile_times_the_operations_of_the_step(tmp_path, capsys):
  path = tmp_path / "profile.json"
  assert cli.main(["bench", "--workloads", "tiny", "--algorithms", "fixmatch", "--variants",
                   "vlr", "--steps", "2", "--warmup", "1", "--profile", "5",
                   "--json", str(path)]) == 0
  row, = json.loads(path.read_text())["results"]
  operations = row["operations"]
  assert row["wall_ms"] > 0 and row["busy_ms"] == pytest.approx(sum(r["ms"] for r in operations))
  kinds = {r["kind"] for r in operations}
  assert {"conv forward", "conv input grad", "conv kernel grad"} <= kinds
  assert all(r["ms"] >= 0 and r["phase"] in ("forward", "backward", "other")
             for r in operations)
  assert operations == sorted(operations, key=lambda r: -r["ms"])
  out = capsys.readouterr().out
  assert "tiny fixmatch vlr: wall" in out and "by phase and kind" in out
  assert cli.main(["bench", "--workloads", "tiny", "--variants", "nope", "--profile", "3"]) == 2
