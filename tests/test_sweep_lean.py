"""Lean trials: a sweep's trials log what they trained with and their best weights; the study ships
its best trial's deliverables (evaluation, models) once, when it ends, and registers the champion."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from sketchsweep import deliver
from sketchsweep.sweep.storage import open_storage
from tests.conftest import sweep_overrides, tiny_overrides, train_cli

LEAN = {".hydra", "best_model_weights.pth", "classes.json", "config.yaml", "split.npz", "train.log"}


def sweep(tiny_data, tmp_path: Path, *extra: str, study: str = "lean") -> tuple[str, str]:
    """Run a sweep of tiny 2-epoch trials; returns (stdout+stderr, the store's URI)."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = sweep_overrides(tiny_data, str(tmp_path / "study.journal"), uri, tmp_path / "sweep", study, *extra, epochs=2)
    proc = train_cli(args, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out, uri


def trial_runs(uri: str) -> dict[int, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sketchsweep")
    return {
        int(r.data.tags["optuna.trial"]): r
        for r in client.search_runs([exp.experiment_id])
        if "optuna.trial" in r.data.tags
    }


def artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def test_trials_are_lean_and_only_the_best_ships(tiny_data, tmp_path):
    out, uri = sweep(
        tiny_data,
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "optimizer.lr=choice(0.01,0.003,1e-8)",
        "hydra.sweeper.sampler=grid",
        "mlflow.log_evaluation=true",
    )
    study = optuna.load_study(study_name="lean", storage=open_storage(str(tmp_path / "study.journal")))
    runs, client = trial_runs(uri), MlflowClient(uri)
    best = study.best_trial.number
    assert set(runs) == {0, 1, 2}
    for number, run in runs.items():
        trial = study.trials[number]
        files = artifacts(client, run.info.run_id)
        if number == best:  # its evaluation, made when the study ended, into its finished run
            assert files == LEAN | {"evaluation"} and run.data.tags["sketchsweep.deliverables"] == "made"
            assert "confusion_matrix.png" in {
                Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")
            }
            assert run.info.status == "FINISHED" and "sketchsweep.deliverables_error" not in run.data.tags
        else:
            assert files == LEAN and "sketchsweep.deliverables" not in run.data.tags
        # The MLflow view: no sweep.* params, named by number and sampled params, a sortable pruned column.
        assert not [k for k in run.data.params if k.startswith("sweep.")]
        assert re.fullmatch(rf"trial-{number} lr=[0-9.e-]+", run.info.run_name), run.info.run_name
        assert run.data.metrics["pruned"] == 0.0
        # Optuna's view: the run, its page in MLflow's classic view, the last epoch reported too.
        assert trial.user_attrs["sketchsweep.mlflow_run_id"] == run.info.run_id
        assert trial.user_attrs["sketchsweep.mlflow_url"].endswith(
            f"/runs/{run.info.run_id}?workflowType=machine_learning"
        )
        assert max(trial.intermediate_values) == 2
    assert study.metric_names == ["val_acc"]
    # The console: one line as each trial starts (its sampled params only) and one with its result.
    for number in runs:
        lr = study.trials[number].params["optimizer.lr"]
        assert re.search(rf"trial {number}: optimizer.lr={lr:.4g}\n", out), out[-3000:]
        assert re.search(rf"trial {number}: val_acc [01]\.\d{{4}}, \d+ s\n", out), out[-3000:]
    for noise in ("sweep.study_name", "Launching", "Skipped telling", "epoch 1/2", "#0 :"):
        assert noise not in out, noise


def test_weights_are_linked_not_copied_into_a_local_store(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    proc = train_cli(tiny_overrides(tiny_data, uri, run_dir, "trainer.epochs=1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("sketchsweep").experiment_id])
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    for name in ("best_model_weights.pth", "model_weights.pth", "checkpoint.pt"):
        assert os.stat(root / name).st_ino == os.stat(run_dir / name).st_ino, name  # one copy on disk
    assert os.stat(root / "config.yaml").st_ino != os.stat(run_dir / "config.yaml").st_ino  # text: copied


def test_deliverables_none_ships_nothing(tiny_data, tmp_path):
    out, uri = sweep(
        tiny_data, tmp_path, "hydra.sweeper.n_trials=2", "optimizer.lr=choice(0.01,0.003)", "sweep.deliverables=none",
        "mlflow.log_evaluation=true",
    )  # fmt: skip
    client = MlflowClient(uri)
    for run in trial_runs(uri).values():
        assert artifacts(client, run.info.run_id) == LEAN and "sketchsweep.deliverables" not in run.data.tags
    assert "not registered" in out


@pytest.mark.slow
def test_deliverables_all_makes_them_in_every_trial(tiny_data, tmp_path):
    _, uri = sweep(
        tiny_data, tmp_path, "hydra.sweeper.n_trials=2", "optimizer.lr=choice(0.01,0.003)", "sweep.deliverables=all",
        "mlflow.log_evaluation=true",
    )  # fmt: skip
    client = MlflowClient(uri)
    for run in trial_runs(uri).values():  # as a single run keeps: its checkpoint and last weights too
        files = artifacts(client, run.info.run_id)
        assert LEAN | {"evaluation", "checkpoint.pt", "model_weights.pth"} == files


def test_the_sweeps_internal_keys_are_refused_outside_a_sweep(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    proc = train_cli(
        tiny_overrides(tiny_data, uri, tmp_path / "run", "sweep.trial_number=1", "sweep.study_name=x"), tmp_path
    )
    assert proc.returncode == 2
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "sweep.study_name, sweep.trial_number" in lines[0], lines
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_resumed_study_ships_its_new_champion_and_moves_the_alias(tiny_data, tmp_path):
    """A study continued with a better trial ships that one; the first champion keeps what it has."""
    full = ("mlflow.log_onnx=true", "mlflow.log_model=false", "mlflow.log_evaluation=false")
    space = "optimizer.lr=choice(1e-9,0.01)"
    study = optuna.create_study(
        study_name="lean", storage=open_storage(str(tmp_path / "study.journal")), direction="maximize"
    )
    study.enqueue_trial({"optimizer.lr": 1e-9})  # a hopeless first champion
    _, uri = sweep(tiny_data, tmp_path, "hydra.sweeper.n_trials=1", space, *full)
    client = MlflowClient(uri)
    first = client.get_model_version_by_alias("sketchsweep", "champion")
    assert first.run_id == trial_runs(uri)[0].info.run_id
    study.enqueue_trial({"optimizer.lr": 0.01})
    sweep(tiny_data, tmp_path, "hydra.sweeper.n_trials=2", space, *full)
    runs = trial_runs(uri)
    champion = client.get_model_version_by_alias("sketchsweep", "champion")
    assert champion.run_id == runs[1].info.run_id and int(champion.version) == int(first.version) + 1
    assert champion.tags["trial"] == "1" and champion.tags["study"] == "lean"
    assert runs[0].data.tags["sketchsweep.deliverables"] == "made" == runs[1].data.tags["sketchsweep.deliverables"]
    # Run again: nothing new to ship, no version registered twice.
    sweep(tiny_data, tmp_path, "hydra.sweeper.n_trials=2", space, *full)
    assert len(client.search_model_versions("name = 'sketchsweep'")) == 2


def test_a_study_created_for_another_direction_is_refused(tiny_data, tmp_path):
    optuna.create_study(study_name="lean", storage=open_storage(str(tmp_path / "study.journal")))  # minimize
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = sweep_overrides(
        tiny_data, str(tmp_path / "study.journal"), uri, tmp_path / "sweep", "lean", "optimizer.lr=choice(0.01)"
    )
    proc = train_cli(args, cwd=tmp_path)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2 and "was created to ['minimize']" in lines[-1] and "Traceback" not in proc.stderr, lines
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_champion_is_shipped_from_its_mlflow_run_and_a_failure_does_not_fail_the_study(tiny_data, tmp_path):
    """The champion's run folder is gone (trained on another machine): its MLflow artifacts serve.
    While its data is missing too, shipping fails with one line; the study still ends FINISHED with
    its best.yaml, and the same command ships it once the data is back."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    args = ("hydra.sweeper.n_trials=1", "optimizer.lr=choice(0.01)", "mlflow.log_evaluation=true")
    _, uri = sweep(data, tmp_path, *args, "sweep.deliverables=none")
    shutil.rmtree(tmp_path / "sweep" / "trial-0")
    (tmp_path / "sweep" / "best.yaml").unlink()
    data.rename(tmp_path / "moved")
    out, _ = sweep(data, tmp_path, *args)
    assert re.search(r"trial 0 not shipped: .*moved|trial 0 not shipped: .*data", out), out[-3000:]
    client, run = MlflowClient(uri), trial_runs(uri)[0]
    assert "sketchsweep.deliverables" not in run.data.tags and (tmp_path / "sweep" / "best.yaml").is_file()
    [parent] = [r for r in client.search_runs([run.info.experiment_id]) if "optuna.trial" not in r.data.tags]
    assert parent.info.status == "FINISHED"

    (tmp_path / "moved").rename(data)
    sweep(data, tmp_path, *args)
    run = trial_runs(uri)[0]
    assert run.data.tags["sketchsweep.deliverables"] == "made" and "evaluation" in artifacts(client, run.info.run_id)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_class_added_to_the_data_since_training_means_no_evaluation(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    proc = train_cli(tiny_overrides(data, uri, tmp_path / "run", "trainer.epochs=1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with deliver.from_folder(tmp_path / "run") as shipment:
        assert shipment.val_rows is not None and len(shipment.val_rows)
    first = sorted(data.glob("*.npy"))[0]
    shutil.copy(first, data / "aaa_new_class.npy")  # sorts first: every label and row would shift
    with deliver.from_folder(tmp_path / "run") as shipment:
        assert shipment.val_rows is None and len(shipment.example) == 64
