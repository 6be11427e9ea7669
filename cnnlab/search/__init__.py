"""Search: the Optuna sweeper with pruning (hydra/sweeper=optuna): space, settings, study, trials."""
