"""Optuna sweeps through `python -m sketchsweep.train -m`: pruning, failures, resume, MLflow structure."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sketchsweep.sweep.storage import open_storage
from tests.conftest import cli_env, sweep_overrides, train_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep_args(tiny_data, tmp_path, *extra: str) -> list[str]:
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    return sweep_overrides(tiny_data, str(tmp_path / "study.journal"), uri, tmp_path / "sweep", "test", *extra)


def load(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="test", storage=open_storage(str(tmp_path / "study.journal")))


def runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sketchsweep")
    all_runs = client.search_runs([exp.experiment_id])
    parents = [r for r in all_runs if r.data.tags.get("sketchsweep.role") == "sweep"]
    return client, parents, [r for r in all_runs if r not in parents]


def test_bad_learning_rates_are_pruned_and_runs_nest_under_the_study(tiny_data, tmp_path):
    proc = train_cli(
        sweep_args(
            tiny_data,
            tmp_path,
            "hydra.sweeper.n_trials=6",
            "hydra.sweeper.sampler=grid",
            "hydra.sweeper.pruner_kwargs={n_startup_trials:2,n_warmup_steps:0}",
            "optimizer.lr=choice(0.01,0.005,0.003,1e-7,1e-8,1e-9)",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load(tmp_path)
    states = [t.state for t in study.trials]
    assert len(study.trials) == 6 and TrialState.FAIL not in states
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.params, t.state) for t in study.trials]
    assert all(max(t.intermediate_values) < 4 for t in pruned)  # stopped before the last epoch
    assert any(t.params["optimizer.lr"] < 1e-6 for t in pruned)  # the hopeless region is cut short
    assert study.best_params["optimizer.lr"] > 1e-3
    assert len({t.params["optimizer.lr"] for t in study.trials}) == 6

    client, [parent], children = runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "test"
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    # Named by number and sampled params: trial-3 lr=1e-07
    assert sorted(c.info.run_name.split(" ")[0] for c in children) == [f"trial-{i}" for i in range(6)]
    assert all(c.info.run_name.split(" ")[1].startswith("lr=") for c in children)
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    for t in pruned:
        tags = by_trial[t.number].data.tags
        assert tags["pruned"] == "true" and int(tags["pruned_at_epoch"]) == max(t.intermediate_values)
        assert tags["optuna.state"] == "PRUNED"
    assert {c.data.tags["optuna.state"] for c in children} == {"PRUNED", "COMPLETE"}
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_trials.json", "optimization_history.png", "parallel_coordinates.png"} <= files
    assert "param_importances.png" in files
    assert parent.data.metrics["study_best_val_acc"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.optimizer.lr"] == str(study.best_params["optimizer.lr"])


def test_a_failing_trial_does_not_end_the_sweep(tiny_data, tmp_path):
    proc = train_cli(
        sweep_args(
            tiny_data,
            tmp_path,
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler=random",
            "hydra.sweeper.max_failures=10",
            "optimizer=sgd",
            "optimizer.lr=choice(0.01,1e30)",  # 1e30 blows the loss up: the trial raises
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load(tmp_path)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(done) == 3 and failed and all(t.params["optimizer.lr"] == 1e30 for t in failed)
    client, _, children = runs(tmp_path)
    bad = [c for c in children if c.info.status == "FAILED"]
    assert len(bad) == len(failed)
    assert all("error.txt" in {a.path for a in client.list_artifacts(c.info.run_id)} for c in bad)


def test_too_many_failures_stop_the_sweep(tiny_data, tmp_path):
    proc = train_cli(
        sweep_args(
            tiny_data,
            tmp_path,
            "hydra.sweeper.n_trials=5",
            "hydra.sweeper.max_failures=1",
            "optimizer=sgd",
            "optimizer.lr=choice(1e30,2e30)",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "hydra.sweeper.max_failures=1" in proc.stdout + proc.stderr
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL, TrialState.FAIL]
    _, [parent], _ = runs(tmp_path)
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_trials(tiny_data, tmp_path):
    args = sweep_args(
        tiny_data,
        tmp_path,
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.pruner=none",
        "optimizer.lr=tag(log,interval(1e-4,1e-2))",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sketchsweep.train", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "sweep ended before it could be killed"
        if (tmp_path / "study.journal").exists():
            trials = load(tmp_path).trials
            if sum(t.state == TrialState.COMPLETE for t in trials) >= 2:
                break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    before = {t.number: t.params for t in load(tmp_path).trials if t.state == TrialState.COMPLETE}
    assert 2 <= len(before) < 6

    again = train_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = load(tmp_path).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6, " ".join(f"{t.number}:{t.state.name}" for t in trials)  # n_trials is the total
    assert {t.number: t.params for t in complete if t.number in before} == before  # kept, not re-run
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)  # nothing left RUNNING
    _, parents, children = runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the study keeps one parent
    assert sum(c.info.status == "FINISHED" for c in children) == 6


@pytest.mark.slow
def test_pareto_preset_returns_both_objectives(tiny_data, tmp_path):
    proc = train_cli(
        sweep_args(
            tiny_data,
            tmp_path,
            "hparams_search=pareto",
            "hydra.sweeper.n_trials=3",
            "model.width=choice(4,8)",
            "model.hidden=choice(16,32)",
            "optimizer.lr=0.003",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load(tmp_path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(len(t.values) == 2 and t.values[1] > 1000 for t in study.trials)  # (val_acc, parameters)
    client, [parent], _ = runs(tmp_path)
    assert "pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_search_space_grammar_maps_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from sketchsweep.sweep.space import search_space

    space, fixed = search_space(
        [
            "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            "optimizer.weight_decay=interval(0, 0.1)",
            "model.width=int(interval(8, 64))",
            "model.hidden=choice(64, 128)",
            "trainer.batch_size=range(64, 257, 64)",
            "trainer.epochs=5",
        ]
    )
    assert space["optimizer.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["optimizer.weight_decay"] == FloatDistribution(0.0, 0.1)
    assert space["model.width"] == IntDistribution(8, 64)
    assert space["model.hidden"] == CategoricalDistribution([64, 128])
    # range(...) is ordered, as Hydra's own range (stop excluded): TPE sees 128 between 64 and 192.
    assert space["trainer.batch_size"] == IntDistribution(64, 256, step=64)
    assert fixed == {"trainer.epochs": "5"}


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "grid", "nsgaii"])
def test_every_sampler_builds(sampler):
    from optuna.distributions import CategoricalDistribution

    from sketchsweep.sweep.space import make_sampler

    built = make_sampler(sampler, {"model.width": CategoricalDistribution([8, 16])}, seed=1)
    assert isinstance(built, optuna.samplers.BaseSampler)


def test_unknown_sampler_and_mismatched_directions_are_named(caplog):
    from hydra_plugins.sketchsweep_optuna.config import OptunaSweeperConf
    from hydra_plugins.sketchsweep_optuna.sweeper import OptunaSweeper

    base = {k: v for k, v in vars(OptunaSweeperConf()).items() if k != "_target_"}
    for conf, expected in [
        ({"sampler": "bayes"}, "hydra.sweeper.sampler=bayes"),
        ({"objective": ["val_acc", "num_parameters"]}, "one direction per objective"),
    ]:
        with pytest.raises(SystemExit) as e:  # one line, exit 2: the sweep check (tests/test_sweep_check.py)
            OptunaSweeper(**{**base, **conf})
        assert e.value.code == 2 and expected in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["lr_width", "optimizer"])
def test_presets_run(tiny_data, tmp_path, preset):
    args = sweep_args(tiny_data, tmp_path, f"hparams_search={preset}", "hydra.sweeper.n_trials=2", "trainer.epochs=2")
    if preset == "lr_width":  # keep its lr and weight decay ranges, shrink the model and batch choices
        args = [a for a in args if not a.startswith("model.width")]
        args += ["model.width=choice(4,8)", "trainer.batch_size=choice(32,64)"]
    proc = train_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = load(tmp_path).trials
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    if preset == "optimizer":
        assert {"optimizer", "scheduler", "optimizer.lr", "optimizer.weight_decay"} == set(trials[0].params)


def test_range_is_an_ordered_stepped_distribution_over_hydras_own_values():
    """hydra-optuna-sweeper's grammar: range(start, stop, step) is an Int/FloatDistribution with a
    step (TPE then models its order), over the values Hydra's basic sweeper would run."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from sketchsweep.sweep.space import grid_values, search_space

    space, _ = search_space(
        [
            "a=range(64, 257, 64)",
            "b=range(10, 0, -3)",
            "c=range(0.1, 0.5, 0.1)",
            "d=shuffle(range(1, 4))",
            "e=range(5, 6)",
        ]
    )
    assert space["a"] == IntDistribution(64, 256, step=64)
    assert space["b"] == IntDistribution(1, 10, step=3)  # 10, 7, 4, 1
    assert space["c"] == FloatDistribution(0.1, 0.4, step=0.1)
    assert isinstance(space["d"], CategoricalDistribution) and sorted(space["d"].choices) == [1, 2, 3]
    assert space["e"] == IntDistribution(5, 5, step=1)
    assert grid_values("a", space["a"]) == [64, 128, 192, 256]
    assert grid_values("c", space["c"]) == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="empty range"):
        search_space(["f=range(3, 3)"])
    # TPE samples only the range's values.
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    study.optimize(lambda t: t.suggest_int("a", 64, 256, step=64) / 256, n_trials=12)
    assert {t.params["a"] for t in study.trials} <= {64, 128, 192, 256}


def test_a_grid_sweep_runs_each_point_once_and_stops(tiny_data, tmp_path):
    """n_trials (20 by default) larger than the grid: the study's total is the grid's size; the grid
    sampler's stop() at the last point is not a failed trial, and no point runs twice."""
    proc = train_cli(
        sweep_args(tiny_data, tmp_path, "hydra.sweeper.sampler=grid", "trainer.epochs=1", "model.width=range(4, 9, 4)"),
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert not re.search(r"trial \d+ failed", out) and "0 failed" in out and "the grid has 2 points" in out
    study = load(tmp_path)
    assert sorted(t.params["model.width"] for t in study.trials) == [4, 8]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.trials[0].distributions["model.width"].step == 4


def test_a_bad_sweep_setting_is_one_line_with_exit_code_2(tiny_data, tmp_path):
    proc = train_cli(
        sweep_args(tiny_data, tmp_path, "hydra.sweeper.sampler=grid", "optimizer.lr=interval(0.001, 0.01)"),
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "hydra.sweeper.sampler=grid: optimizer.lr must be choice(...) or range(...)" in out
    assert "Traceback" not in out


def test_a_later_override_replaces_an_earlier_one():
    """The command line's overrides replace a preset's params: a key fixed there is no longer
    searched (else the study would record values the trials never trained with), and vice versa."""
    from optuna.distributions import CategoricalDistribution

    from sketchsweep.sweep.space import search_space

    space, fixed = search_space(["trainer.batch_size=choice(128, 256)", "optimizer=choice(adam, sgd)", "optimizer=sgd"])
    assert space == {"trainer.batch_size": CategoricalDistribution([128, 256])} and fixed == {"optimizer": "sgd"}
    space, fixed = search_space(["trainer.batch_size=64", "trainer.batch_size=choice(32, 64)"])
    assert space == {"trainer.batch_size": CategoricalDistribution([32, 64])} and fixed == {}


@pytest.mark.slow
def test_delete_overrides_reach_every_trial_as_written(tiny_data, tmp_path):
    """`~experiment` undoes `experiment=quickstart` (its synthetic data, its MLflow experiment) in
    every trial, passed on exactly as written."""
    proc = train_cli(
        sweep_args(
            tiny_data,
            tmp_path,
            "hydra.sweeper.n_trials=2",
            "trainer.epochs=1",
            "model.width=choice(4,8)",
            "experiment=quickstart",
            "~experiment",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, [_parent], children = runs(tmp_path)  # one parent in "sketchsweep", not in quickstart's experiment
    assert len(children) == 2 and all(c.data.params["data.source"] == "folder" for c in children)
    for c in children:
        recorded = (Path(c.data.tags["sketchsweep.run_dir"]) / ".hydra" / "overrides.yaml").read_text()
        assert "- ~experiment\n" in recorded, recorded


def test_unknown_sampler_fails_before_any_study(tiny_data, tmp_path):
    proc = train_cli(
        sweep_args(tiny_data, tmp_path, "hydra.sweeper.sampler=bayes", "model.width=choice(4,8)"), cwd=tmp_path
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "bayes" in out and "tpe" in out  # the bad name and the known ones
    assert not (tmp_path / "study.journal").exists()


def test_trial_ids_come_from_optunas_storage(tmp_path):
    """sweep.storage.trial_id is the one call into Optuna's private storage API (no public one
    exists): it must keep finding each trial, or pruning and heartbeats break."""
    from sketchsweep.sweep.storage import trial_id

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="ids", storage=storage)
    numbers = [study.ask().number for _ in range(3)]
    for n in numbers:
        tid = trial_id(study, n)
        assert storage.get_trial(tid).number == n
        optuna.trial.Trial(study, tid).report(0.5, step=1)
    assert study.trials[1].intermediate_values == {1: 0.5}
