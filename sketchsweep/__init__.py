"""sketchsweep: train compact CNNs on 28x28 Quick, Draw! sketches, sweep them with Optuna and
compare them in MLflow.

Layers, imports pointing down only (``tests/test_structure.py`` checks it):

- entry points: ``train`` on top (it calls evaluation and export), then ``evaluate``, ``export``,
  ``predict``, ``doctor``, ``workers``;
- services: ``config``, ``checkpoint``, ``modelref``, ``tracking``, ``evaluation``, ``onnx_model``,
  ``sweep/``;
- core, torch and numpy only: ``model``, ``engine``, ``data/``;
- ``cli`` (exit codes, one-line errors, signals) is standard library only, for every layer.
"""

from pathlib import Path

# The repo root holds conf/, mlruns/, outputs/ and data/: stores and caches resolve from here, not
# from the current folder, so jobs started anywhere (multirun, SLURM) share them.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
