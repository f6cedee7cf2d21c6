"""The training system: optimizer, train state, the jitted step, checkpoints and the loop."""
