"""Where the project's own files go by default. Stores and caches resolve from the repo root, not
from the current folder, so jobs started anywhere (multirun, SLURM) share them.

(``sketchsweep`` is a namespace package, as ``hydra_plugins`` is, so this is a module of its own:
with an editable install, a regular package would be shadowed by any ``sketchsweep/`` folder in
the current directory, e.g. an MLflow artifact folder of the experiment ``sketchsweep``.)
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # holds conf/, mlruns/, outputs/, data/
MLRUNS = PROJECT_ROOT / "mlruns"  # the default MLflow store (mlflow.db, artifacts) and sweep journals
JOURNAL_DIR = MLRUNS / "optuna"  # sweeps' default storage: <study>.journal here
SYNTHETIC_CACHE = PROJECT_ROOT / "data" / "synthetic"  # data=synthetic's generated sets, by default
