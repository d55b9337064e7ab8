"""Training: config checks, optimizer, sharded train state, the step and the loop."""
