"""Optuna sweeps, in one home:

- ``space``: the search space in Hydra's override grammar, samplers and pruners;
- ``storage``: where a study lives (journal file or database), heartbeats, stale trials;
- ``link``: a job's side, reporting every epoch to its trial and stopping when pruned;
- ``parent``: the MLflow parent run of a study (and of a plain grid multirun);
- ``study``: the sweep loop: ask trials, launch them as jobs, tell their results;
- ``workers``: several sweep processes on one study (``python -m sketchsweep.workers``).

``hydra_plugins/sketchsweep_optuna`` is only the shim Hydra discovers (``hydra/sweeper=optuna``).
"""

WORKER_ENV = "SKETCHSWEEP_WORKER"  # this worker's index among several on one study (sketchsweep.workers sets it)
