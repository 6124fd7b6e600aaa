"""Training on top of the parallel layer: the run config of the recipes (`config`), where the model comes from
(`source`), building it on the mesh (`build`), the language-model loop (`loop`), metrics, PPO (`ppo`, its losses in
`rl`), data, optimizer, training-state checkpoints, runners and the launcher."""
