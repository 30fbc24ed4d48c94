"""``hydra/sweeper=optuna``: the shim Hydra discovers for sketchsweep's Optuna sweeper; the sweep
itself is ``sketchsweep.sweep`` (pruning, resumable studies, MLflow parent runs, many workers)."""
