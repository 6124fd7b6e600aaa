"""Training on top of the parallel layer: data, optimizer, checkpoints, RL losses, runners and the loop."""
