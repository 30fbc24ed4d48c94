"""What a sweep prints: one line as each trial starts (its sampled params), one with its result,
instead of the launchers' lines with every job's full overrides and Optuna's routine INFO lines."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from sketchsweep.sweep.link import TrialLink

# Hydra's launchers print every job's full overrides (the sweep's internal ones too): the sweep
# prints one line per trial instead. Optuna's INFO lines ("Skipped telling trial ...") are routine.
LAUNCHER_LOGGERS = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
)


@contextlib.contextmanager
def quiet_launchers() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in LAUNCHER_LOGGERS]
    levels, verbosity = [lg.level for lg in loggers], optuna.logging.get_verbosity()
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        optuna.logging.set_verbosity(verbosity)


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def result_line(study: optuna.Study, number: int, objectives: list[str]) -> str:
    """``trial 6: val_acc 0.8217, pruned after epoch 2, 14 s``: a finished trial, as the sweep prints it."""
    t = study.get_trials(deepcopy=False)[number]
    seconds = f"{t.duration.total_seconds():.0f} s" if t.duration else "?"
    if t.state == TrialState.PRUNED and t.intermediate_values:
        epoch = max(t.intermediate_values)
        return (
            f"trial {number}: {objectives[0]} {t.intermediate_values[epoch]:.4f}, pruned after epoch {epoch}, {seconds}"
        )
    values = ", ".join(f"{o} {v:.4f}" for o, v in zip(objectives, t.values or [], strict=False))
    return f"trial {number}: {values or t.state.name.lower()}, {seconds}"


@contextlib.contextmanager
def console_for(link: TrialLink | None) -> Iterator[None]:
    """In a sweep, a trial's own lines (epochs, test scores) go to its train.log only: the sweep
    prints one line as it starts and one with its result. Warnings and errors still show."""
    consoles = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    levels = [h.level for h in consoles]
    if link is not None:
        for h in consoles:
            h.setLevel(max(h.level, logging.WARNING))
    try:
        yield
    finally:
        for h, level in zip(consoles, levels, strict=True):
            h.setLevel(level)


def trial_name(number: int, params: dict[str, Any]) -> str:
    """``trial-6 lr=0.0024,width=32``: the trial's number and sampled params (their keys' last parts
    where those are unique), as its MLflow run's name."""
    last = [k.rsplit(".", 1)[-1] for k in params]
    shown = [
        f"{short if last.count(short) == 1 else k}={f'{v:.3g}' if isinstance(v, float) else v}"
        for (k, v), short in zip(params.items(), last, strict=True)
    ]
    name = f"trial-{number} {','.join(shown)}".strip()
    return name if len(name) <= 250 else name[:247] + "..."
