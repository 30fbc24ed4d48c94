"""Shared fixtures: tiny datasets written in the real on-disk format, a throwaway MLflow
store per test, and a runner for the real `python -m sketchsweep.train` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sketchsweep.config import PROJECT_ROOT, register_configs
from sketchsweep.data.synthetic import write_synthetic

SHARED_QUICKDRAW = PROJECT_ROOT.parent / "shared" / "data" / "quickdraw"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 synthetic classes x 120 drawings: a numpy_bitmap folder, fast to train on."""
    return write_synthetic(tmp_path_factory.mktemp("data") / "tiny", num_classes=4, per_class=120, seed=0)


@pytest.fixture
def store(tmp_path) -> str:
    """A fresh SQLite MLflow store (artifacts beside it) for one test."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def tiny_overrides(data: Path, store: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=quickdraw",
        f"data.root={data}",
        "model.width=8",
        "model.hidden=32",
        "trainer.epochs=3",
        "trainer.batch_size=32",
        f"mlflow.tracking_uri={store}",
        "mlflow.log_model=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_cli(overrides: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the real entry point, as a user would, from ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "sketchsweep.train", *overrides],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_config(overrides: list[str]):
    register_configs()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)
