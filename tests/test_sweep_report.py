"""The end of a sweep as a researcher sees it: the console summary, best.yaml, the command that
retrains the best trial as a normal run, and the parent run (its objective metric, its tags, its
plots) refreshed as trials finish."""

from __future__ import annotations

import random
import shlex
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from sketchsweep.sweep import parent as parent_module
from sketchsweep.sweep import report
from sketchsweep.sweep.parent import SweepRun, parallel_coordinates
from sketchsweep.sweep.space import search_space
from sketchsweep.sweep.storage import open_storage
from tests.conftest import sweep_overrides, train_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)

LR = FloatDistribution(1e-5, 1e-1, log=True)
WIDTH = CategoricalDistribution([8, 16, 32, 64])


def trial(value, lr: float, width: int, state=TrialState.COMPLETE, seconds: float = 14, **attrs):
    made = create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"optimizer.lr": lr, "model.width": width},
        distributions={"optimizer.lr": LR, "model.width": WIDTH},
        user_attrs=attrs,
        intermediate_values={1: 0.1} if state == TrialState.PRUNED else {},
    )
    if state.is_finished():
        made.datetime_start = datetime(2026, 1, 1, 12)
        made.datetime_complete = made.datetime_start + timedelta(seconds=seconds)
    return made


def single_study() -> optuna.Study:
    """8 complete (values 0.1 ... 0.8, trial 3 the best), 2 pruned, 1 failed, 1 running."""
    study = optuna.create_study(study_name="lr-width", direction="maximize")
    values = [0.5, 0.1, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6]
    for i, v in enumerate(values):
        attrs = {report.RUN_ID_ATTR: f"run{i:029d}", report.URL_ATTR: f"http://mlflow:5000/#/runs/run{i}"}
        study.add_trial(
            trial(v, 10 ** -(1 + i / 3), [8, 16, 32, 64][i % 4], **attrs, **{report.RUN_DIR_ATTR: f"/sweep/{i}"})
        )
    study.add_trial(trial(None, 1e-5, 8, TrialState.PRUNED))
    study.add_trial(trial(None, 2e-5, 8, TrialState.PRUNED))
    study.add_trial(trial(None, 1e-1, 64, TrialState.FAIL))
    study.add_trial(trial(None, 1e-3, 8, TrialState.RUNNING))
    return study


def pareto_study() -> optuna.Study:
    study = optuna.create_study(study_name="pareto", directions=["maximize", "minimize"])
    # (val_acc, num_parameters): trials 0, 2, 3 are the front; 1 and 4 are dominated
    for i, values in enumerate([(0.9, 120_000.0), (0.7, 130_000.0), (0.8, 30_000.0), (0.6, 9_000.0), (0.5, 9_500.0)]):
        study.add_trial(
            create_trial(
                values=list(values),
                params={"model.width": [64, 64, 16, 8, 8][i]},
                distributions={"model.width": WIDTH},
                user_attrs={report.URL_ATTR: f"http://mlflow:5000/#/runs/r{i}"},
            )
        )
    return study


# -- best_command ---------------------------------------------------------------------------------


FIXED = {
    "hparams_search": "lr_width",
    "data": "quickdraw",
    "sweep.deliverables": "all",
    "+sweep.extra": "1",
    "hydra.sweeper.n_trials": "6",
    "hydra.sweep.dir": "/tmp/sweep",
    "+trainer.note": "'two words'",
    "~scheduler": None,
    "mlflow.tracking_uri": r"http\://alice\:s3cret@mlflow\:5000",
}


def test_best_command_is_a_single_run_with_the_trials_params_exactly():
    params = {"optimizer.lr": 0.00012345678901234567, "trainer.weight": 1e-05, "model.width": 64, "optimizer": "sgd"}
    params |= {"model.bn": True, "model.extra": None}
    command = report.best_command(params, FIXED)
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "sketchsweep.train"]
    assert words[3:] == [
        "data=quickdraw",
        "+trainer.note='two words'",
        "~scheduler",
        r"mlflow.tracking_uri=http\://alice\:***@mlflow\:5000",  # recorded in a tag and a file: no password
        "optimizer.lr=0.00012345678901234567",
        "trainer.weight=1e-05",
        "model.width=64",
        "optimizer=sgd",
        "model.bn=true",
        "model.extra=null",
    ]
    parsed = {o.get_key_element(): o.value() for o in OverridesParser.create().parse_overrides(words[3:])}
    assert parsed["optimizer.lr"] == params["optimizer.lr"] and parsed["trainer.weight"] == 1e-05
    assert parsed["model.bn"] is True and parsed["model.extra"] is None and parsed["+trainer.note"] == "two words"


@pytest.mark.slow  # a sweep and a run: ~35 s on 2 cores
def test_the_best_command_trains_a_normal_run_not_a_child_of_the_sweep(tiny_data, tmp_path):
    """A real sweep (2 trials, 1 epoch), then its best trial's command, as a user would paste it."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = sweep_overrides(tiny_data, str(tmp_path / "study.journal"), uri, tmp_path / "sweep", "s", epochs=1)
    args += ["hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=none", "optimizer.lr=tag(log,interval(1e-3,1e-2))"]
    proc = train_cli([*args, "sweep.deliverables=none"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / "study.journal")))
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("sketchsweep").experiment_id
    [best_run] = client.search_runs([experiment_id], f"tags.`optuna.trial` = '{study.best_trial.number}'")
    # The fixed overrides as the sweeper reads them off the command line, sweep-only ones included,
    # and the internal ones the trial ran with (recorded in its folder): none may reach the command.
    _, fixed = search_space([a for a in args if a != "-m"])
    assert "hydra/sweeper" in fixed and "hydra.sweeper.n_trials" in fixed and "hydra.sweep.dir" in fixed
    recorded = OmegaConf.load(Path(best_run.data.tags["sketchsweep.run_dir"]) / ".hydra" / "overrides.yaml")
    _, internal = search_space([o for o in recorded if o.startswith("sweep.")])
    assert "sweep.parent_run_id" in internal and "sweep.trial_number" in internal
    fixed |= internal
    words = shlex.split(report.best_command(study.best_params, fixed))
    run_dir = tmp_path / "retrain"
    proc = train_cli([*words[3:], f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    [run] = [r for r in client.search_runs([experiment_id]) if r.data.tags.get("sketchsweep.run_dir") == str(run_dir)]
    assert run.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in run.data.tags
    assert not [k for k in run.data.tags if k.startswith("optuna.")]
    assert float(run.data.params["optimizer.lr"]) == study.best_params["optimizer.lr"]
    assert len(study.trials) == 2  # the study did not gain a trial


# -- summary and best.yaml --------------------------------------------------------------------------


def test_summary_shows_counts_the_top_five_and_where_the_champion_is():
    study = single_study()
    text = report.summary(study, ["val_acc"], ["maximize"], {"data": "quickdraw", "sweep.trial_number": "3"})
    lines = text.splitlines()
    assert lines[0] == "study lr-width: 12 trials: 8 complete, 2 pruned, 1 failed, 1 running"
    assert lines[1] == "top 5 of 8 complete trials by val_acc (maximize):"
    assert lines[2].split() == ["trial", "val_acc", "optimizer.lr", "model.width", "time"]
    assert [line.split()[:2] for line in lines[4:9]] == [
        ["3", "0.8000"],
        ["5", "0.7000"],
        ["7", "0.6000"],
        ["0", "0.5000"],
        ["6", "0.4000"],
    ]
    assert lines[4].split()[2:] == ["0.01", "64", "14", "s"]
    assert len({len(line) for line in lines[2:9]}) <= 2  # fixed width (the last column may be trimmed)
    assert lines[9] == "champion: trial 3, val_acc 0.8000"
    assert f"MLflow run: run{3:029d}  http://mlflow:5000/#/runs/run3" in text
    assert "run folder: /sweep/3" in text
    assert f"retrain:    python -m sketchsweep.train data=quickdraw optimizer.lr={0.01!r} model.width=64" in text


def test_summary_uses_the_studys_metric_names():
    study = single_study()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        study.set_metric_names(["final_val_acc"])
    assert "champion: trial 3, final_val_acc 0.8000" in report.summary(study, ["val_acc"], ["maximize"])


def test_summary_of_several_objectives_lists_the_pareto_front():
    text = report.summary(pareto_study(), ["val_acc", "num_parameters"], ["maximize", "minimize"])
    lines = text.splitlines()
    assert lines[1] == "Pareto front on val_acc (maximize), num_parameters (minimize): 3 trials:"
    assert [line.split()[:3] for line in lines[4:7]] == [
        ["0", "0.9000", "120,000"],
        ["2", "0.8000", "30,000"],
        ["3", "0.6000", "9,000"],
    ]
    assert "top" not in text and "\ntrial 1" not in text and "\n    1 " not in text
    assert "trial 2: http://mlflow:5000/#/runs/r2" in lines


def test_summary_before_any_trial_completed():
    study = optuna.create_study(study_name="empty")
    study.add_trial(trial(None, 1e-3, 8, TrialState.PRUNED))
    assert report.summary(study, ["val_acc"], ["maximize"]) == (
        "study empty: 1 trials: 0 complete, 1 pruned, 0 failed\nno trial completed"
    )


def test_best_yaml_holds_the_best_trial_and_its_command(tmp_path):
    study = single_study()
    path = tmp_path / "best.yaml"
    report.write_best_yaml(path, study, ["val_acc"], ["maximize"], {"data": "quickdraw", "sweep.storage": "x"})
    best = yaml.safe_load(path.read_text())
    assert best["trial"] == 3 and best["values"] == {"val_acc": 0.8}
    assert best["params"] == study.best_params  # floats exactly
    assert best["mlflow_run_id"] == f"run{3:029d}" and best["run_dir"] == "/sweep/3"
    assert best["command"] == report.best_command(study.best_params, {"data": "quickdraw"})
    assert best["trials"] == {"complete": 8, "pruned": 2, "failed": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best.yaml"]  # no temporary file left


def test_best_yaml_of_several_objectives_lists_the_pareto_front(tmp_path):
    path = tmp_path / "best.yaml"
    report.write_best_yaml(path, pareto_study(), ["val_acc", "num_parameters"], ["maximize", "minimize"], {})
    best = yaml.safe_load(path.read_text())
    assert best["objectives"] == {"val_acc": "maximize", "num_parameters": "minimize"}
    assert [t["trial"] for t in best["pareto_front"]] == [0, 2, 3]
    assert best["pareto_front"][1]["values"] == {"val_acc": 0.8, "num_parameters": 30_000.0}
    assert best["pareto_front"][2]["command"] == "python -m sketchsweep.train model.width=8"


def test_no_best_yaml_before_any_trial_completed(tmp_path):
    study = optuna.create_study()
    assert report.write_best_yaml(tmp_path / "best.yaml", study, ["val_acc"], ["maximize"], {}) is None
    assert not list(tmp_path.iterdir())


# -- the parent run -----------------------------------------------------------------------------------


@pytest.fixture
def parent(tmp_path, monkeypatch):
    """A parent run in a real SQLite store, for a real journal study that gets 6 trials one by one."""
    config = OmegaConf.create(
        {
            "mlflow": {
                "tracking_uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
                "artifact_root": None,
                "experiment_name": "e",
            }
        }
    )
    study = optuna.create_study(study_name="p", direction="maximize", storage=open_storage(str(tmp_path / "p.journal")))
    run = SweepRun(config, study, {"optimizer.lr": LR}, ["val_acc"], ["maximize"], True, fixed={"data": "quickdraw"})
    return run, study


def add_trials(run: SweepRun, study: optuna.Study, values: list[float]) -> None:
    for v in values:
        t = study.ask({"optimizer.lr": LR})
        t.set_user_attr(report.RUN_ID_ATTR, f"trial{t.number}")
        study.tell(t, v)
        run.refresh(study)


def test_the_parent_shows_progress_after_every_trial_and_is_not_ranked_among_trials(parent, monkeypatch):
    run, study = parent
    monkeypatch.setattr(parent_module, "PLOTS_EVERY_S", 1e9)  # not due: no plots mid-sweep
    add_trials(run, study, [0.4, 0.9, 0.5])
    got = run.client.get_run(run.run_id)
    assert got.data.metrics["study_best_val_acc"] == 0.9 and got.data.metrics["trials_complete"] == 3
    # Sorting runs by the trials' objective metrics never puts the parent among them.
    assert not {"val_acc", "best_val_acc"} & set(got.data.metrics)
    assert got.data.tags["best_trial"] == "1" and got.data.tags["best_run_id"] == "trial1"
    lr = study.best_params["optimizer.lr"]
    assert got.data.tags["best_command"] == f"python -m sketchsweep.train data=quickdraw optimizer.lr={lr!r}"
    assert got.data.tags["best.optimizer.lr"] == repr(lr)
    files = {a.path for a in run.client.list_artifacts(run.run_id)}
    assert {"trials.csv", "best_trials.json"} <= files and not any(f.endswith(".png") for f in files)
    assert len(Path(run.client.download_artifacts(run.run_id, "trials.csv")).read_text().splitlines()) == 4

    add_trials(run, study, [0.95])  # a new best: the tags follow
    got = run.client.get_run(run.run_id)
    assert got.data.tags["best_trial"] == "3" and got.data.metrics["study_best_val_acc"] == 0.95
    assert got.info.status == "RUNNING"


def test_plots_are_refreshed_when_due_and_at_the_end(parent, monkeypatch):
    run, study = parent
    monkeypatch.setattr(parent_module, "PLOTS_EVERY_S", 0.0)  # always due
    add_trials(run, study, [0.4, 0.9])
    files = {a.path for a in run.client.list_artifacts(run.run_id)}
    assert {"parallel_coordinates.png", "optimization_history.png", "param_importances.png"} <= files
    run.end(study, "FINISHED")
    assert run.client.get_run(run.run_id).info.status == "FINISHED"


def luminance(rgba) -> float:
    return 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]


@pytest.mark.parametrize("directions", [["maximize"], ["minimize"], ["maximize", "minimize"]])
def test_parallel_coordinates_draw_the_worst_trials_readably_and_the_best_darkest(directions):
    from matplotlib.collections import LineCollection

    study = optuna.create_study(directions=directions)
    rng = random.Random(0)
    for i in range(10):
        values = [i / 9, 1 - i / 9][: len(directions)]
        study.add_trial(
            create_trial(
                values=values, params={"optimizer.lr": rng.uniform(1e-4, 1e-2)}, distributions={"optimizer.lr": LR}
            )
        )
    ax = parallel_coordinates(study, ["val_acc", "num_parameters"][: len(directions)], directions)
    ax.figure.canvas.draw()  # the colours the PNG gets
    [lines] = [c for c in ax.collections if isinstance(c, LineCollection)]
    shade = {
        segment[0][1]: luminance(color) for segment, color in zip(lines.get_segments(), lines.get_colors(), strict=True)
    }
    assert len(shade) == 10
    assert max(shade.values()) < 0.8  # near-white (1.0) is invisible on the white background
    best = max(shade) if directions[0] == "maximize" else min(shade)
    assert shade[best] == min(shade.values())


def test_a_param_that_adds_a_key_is_a_valid_tag_name(parent):
    """``+newkey=choice(1,2)`` searches a key the config does not have: MLflow refuses '+' in tag names."""
    run, study = parent
    space = {"+newkey": CategoricalDistribution([1, 2])}
    t = study.ask(space)
    study.tell(t, 0.5)
    run.refresh(study)
    tags = run.client.get_run(run.run_id).data.tags
    assert tags["best.newkey"] == str(t.params["+newkey"]) and "+newkey=" in tags["best_command"]
