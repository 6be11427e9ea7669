"""cnnlab's Hydra plugins: `hydra/sweeper=optuna` (search with pruning, cnnlab/search/)."""
