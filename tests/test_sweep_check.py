"""A sweep that cannot work fails before its first trial: one line naming the key and what was
expected, exit code 2, and nothing created (no study, no MLflow run, no trial folder)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sketchsweep.sweep.space import Sampler
from tests.conftest import compose_config, sweep_overrides, train_cli

SPACE = "model.width=choice(4,8)"


def bad_sweep(tiny_data, tmp_path, *extra: str) -> str:
    """Run the real sweep command; check that it failed before anything was created; its output."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = sweep_overrides(tiny_data, str(tmp_path / "study.journal"), uri, tmp_path / "sweep", "test", *extra)
    proc = train_cli([*args, "hydra.sweeper.n_trials=2"], cwd=tmp_path, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out[-3000:]
    assert len(out.strip().splitlines()) == 1, out[-3000:]
    assert not (tmp_path / "mlruns").exists()  # no MLflow store, so no parent run and no trial run
    assert not (tmp_path / "study.journal").exists() and not (tmp_path / "sweep").exists()
    return out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["hydra.sweeper.objective=val_accuracy", SPACE], ["hydra.sweeper.objective", "val_accuracy", "val_acc"]),
        (["hydra.sweeper.pruner=medain", SPACE], ["hydra.sweeper.pruner=medain", "median"]),
        (["hydra.sweeper.pruner_kwargs={n_startup:5}", SPACE], ["hydra.sweeper.pruner_kwargs", "n_startup_trials"]),
        ([], ["no search space", "hydra.sweeper.params"]),
        (["model.widht=choice(8,16)"], ["model.widht=8", "width"]),  # a typo: expected the keys model has
        (["optimizer=choice(adam,nadam)"], ["optimizer=nadam", "adam, adamw, sgd"]),
        (["model.width=choice(a,b)"], ["model.width=a", "Integer"]),
        (["hydra.sweeper.n_jobs=0", SPACE], ["hydra.sweeper.n_jobs=0", "expected 1 or more"]),
    ],
    ids=["objective", "pruner", "pruner_kwargs", "empty_space", "missing_key", "group_option", "wrong_type", "n_jobs"],
)
def test_a_sweep_that_cannot_work_fails_before_its_first_trial(tiny_data, tmp_path, extra, expected):
    out = bad_sweep(tiny_data, tmp_path, *extra)
    assert all(e in out for e in expected), out


# -- the checks themselves, on configs composed the way a trial's is ------------------------------


def settings(**conf):
    from hydra_plugins.sketchsweep_optuna.config import OptunaSweeperConf
    from sketchsweep.sweep.settings import read_settings

    return read_settings({**vars(OptunaSweeperConf()), **conf})[0]


def check(arguments: list[str], composed: list | None = None, **conf) -> None:
    from sketchsweep.sweep.check import check_sweep
    from sketchsweep.sweep.space import search_space

    def compose(overrides):
        if composed is not None:
            composed.append(list(overrides))
        return compose_config(list(overrides))

    space, fixed = search_space(arguments)
    check_sweep(settings(**conf), space, fixed, compose)


def test_a_search_space_the_config_accepts_passes():
    composed: list = []
    check(
        [
            "+newkey=choice(1,2)",  # + adds a key: allowed
            "optimizer=choice(adam,sgd)",
            "optimizer.lr=tag(log,interval(1e-4,1e-2))",
            "model.width=range(8,33,8)",
            "trainer.epochs=2",
        ],
        composed,
        sampler="random",
        pruner_kwargs={"n_startup_trials": 2},
    )
    # Each choice and each interval's ends, with the fixed overrides, once (and the fixed ones alone).
    assert ["trainer.epochs=2"] in composed
    assert ["optimizer=sgd", "optimizer.lr=0.0001", "trainer.epochs=2"] in composed  # with its key's first value
    assert ["optimizer.lr=0.01", "optimizer=adam", "trainer.epochs=2"] in composed  # its group's first choice
    assert ["model.width=32", "trainer.epochs=2"] in composed
    assert len(composed) == 1 + 2 + 2 + 2 + 2


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["model.width=choice(0,8)"], "hydra.sweeper.params: model.width=0: model: expected width >= 1"),
        (["model.width=choice(4,8)", "trainer.epochs=0"], "fixed overrides: trainer: expected epochs >= 1"),
        (["+model.width=choice(4,8)"], "+model.width=4: Could not append to config"),
        (
            ["optimizer=choice(adam,sgd)", "optimizer.betas=choice([0.9,0.99])"],
            "optimizer=sgd (with optimizer.betas=[0.9,0.99]): optimizer has no key betas",
        ),
    ],
    ids=["range", "fixed_range", "append_existing", "group_and_its_key"],
)
def test_a_value_no_trial_could_train_with_is_named(arguments, expected):
    with pytest.raises(ValueError) as e:
        check(arguments)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_the_sampler_and_pruner_are_built_with_their_arguments():
    with pytest.raises(ValueError, match=r"^hydra\.sweeper\.sampler_kwargs: .*n_startup_trials"):
        check(["model.width=choice(4,8)"], sampler="tpe", sampler_kwargs={"startup": 3})
    with pytest.raises(ValueError, match=r"^hydra\.sweeper\.pruner_kwargs: .*cannot be negative"):
        check(["model.width=choice(4,8)"], pruner_kwargs={"n_startup_trials": -1})
    with pytest.raises(ValueError, match=r"^hydra\.sweeper\.pruner_kwargs: expected a dict"):
        check(["model.width=choice(4,8)"], pruner_kwargs=5)


def test_a_large_search_space_is_checked_with_a_bounded_number_of_composes():
    from sketchsweep.sweep.check import MAX_COMPOSES

    composed: list = []
    many = ",".join(map(str, range(1, 60)))
    check([f"model.width=choice({many})", f"model.hidden=choice({many})"], composed)
    assert len(composed) == MAX_COMPOSES
    firsts_and_lasts = {"model.width=1", "model.width=59", "model.hidden=1", "model.hidden=59"}
    assert firsts_and_lasts <= {o for c in composed for o in c}  # each key's ends come first


def test_the_sweepers_config_accepts_any_name_for_read_settings_to_refuse():
    """hydra.sweeper.sampler/pruner are plain strings in the sweeper's schema: a wrong name is then
    read_settings' one line (exit 2), not Hydra's composition error."""
    from hydra_plugins.sketchsweep_optuna.config import OptunaSweeperConf

    conf = OmegaConf.merge(OmegaConf.structured(OptunaSweeperConf), {"sampler": "bayes"})
    assert conf.sampler == "bayes"
    with pytest.raises(ValueError, match=r"hydra\.sweeper\.sampler=bayes: expected one of"):
        settings(sampler="bayes")
    assert settings(sampler="grid").sampler == Sampler.grid  # a known name is typed as before
