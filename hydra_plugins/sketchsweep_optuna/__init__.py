"""sketchsweep's Hydra sweeper on Optuna (>= 4.5): pruning, resumable studies, MLflow parent runs."""
