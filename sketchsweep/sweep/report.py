"""What a sweep hands a researcher when it ends: the console summary, ``best.yaml`` in the sweep
folder, and the single-run command that retrains a trial (a normal run, not a child of the sweep).

The champion is the study's best trial, or for several objectives every trial on the Pareto front.
Each trial's MLflow run id, URL and run folder are the user attributes its job records
(``RUN_ID_ATTR``, ``URL_ATTR``, ``RUN_DIR_ATTR``); a trial without them is shown without them.
"""

from __future__ import annotations

import os
import shlex
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sketchsweep.credentials import hide_passwords
from sketchsweep.sweep.console import short
from sketchsweep.sweep.link import RUN_DIR_ATTR, RUN_ID_ATTR, URL_ATTR
from sketchsweep.sweep.space import Fixed

TOP = 5  # trials in the summary's table (single objective)
FRONT = 10  # Pareto trials in the summary's table (best.yaml lists them all)
TRAIN = "python -m sketchsweep.train"

# Overrides that only mean something to a sweep: a single run drops them (`sweep.*` would make it
# the sweep's trial again, and a run refuses them; a preset and the sweeper's settings are noise).
SWEEP_ONLY = ("hparams_search", "hydra/sweeper", "hydra/launcher", "hydra.sweeper", "hydra.sweep", "hydra.launcher")
SWEEP_ONLY += ("hydra.mode", "sweep")


def metric_names(study: optuna.Study, objectives: Sequence[str]) -> list[str]:
    """The objectives' names: the study's own (``set_metric_names``) when it has them."""
    return list(study.metric_names or objectives)


def champions(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial, or the Pareto front ordered best first on the first objective; [] before
    any trial completes."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return _ranked(study, study.best_trials)


def _ranked(study: optuna.Study, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """``trials`` best first on the study's first objective (ties: the earlier trial)."""
    sign = -1.0 if study.directions[0] == StudyDirection.MAXIMIZE else 1.0
    return sorted(trials, key=lambda t: (sign * t.values[0], t.number))


def _is_sweep_only(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith(k + ".") for k in SWEEP_ONLY)


def _as_value(value: Any) -> str:
    """A sampled value as Hydra's grammar reads it back: floats exactly (repr), null, true/false."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def best_command(params: dict[str, Any], fixed: Fixed) -> str:
    """The single-run command that retrains a trial: the sweep's fixed overrides as written (but
    those that only matter to a sweep), then the trial's params; shell-quoted, passwords hidden."""
    overrides = [k if v is None else f"{k}={v}" for k, v in fixed.items() if not _is_sweep_only(k)]
    overrides += [f"{k}={_as_value(v)}" for k, v in params.items()]
    return " ".join([TRAIN, *(shlex.quote(hide_passwords(o)) for o in overrides)])


def _counts(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def _counts_line(study: optuna.Study) -> str:
    counts = _counts(study)
    parts = [f"{counts[s]} {w}" for s, w in ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"))]
    parts.append(f"{counts[TrialState.FAIL]} failed")
    parts += [f"{counts[s]} {s.name.lower()}" for s in (TrialState.RUNNING, TrialState.WAITING) if counts[s]]
    return f"study {study.study_name}: {sum(counts.values())} trials: {', '.join(parts)}"


def _short(value: Any, width: int = 18) -> str:
    text = short(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _objective(value: float) -> str:
    """0.8217 for a rate or loss; 12,345 for a count (num_parameters)."""
    return f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1000 else f"{value:.4f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """A fixed-width text table: a header, a rule, the rows; ``right``: which columns align right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _trials_table(trials: list[FrozenTrial], names: list[str]) -> list[str]:
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    headers = ["trial", *names, *params, "time"]
    rows = [
        [
            str(t.number),
            *(_objective(v) for v in t.values),
            *(_short(t.params[k]) if k in t.params else "-" for k in params),
            f"{t.duration.total_seconds():.0f} s" if t.duration else "-",
        ]
        for t in trials
    ]
    return table(headers, rows, [True] * (1 + len(names)) + [False] * len(params) + [True])


def _where(trial: FrozenTrial, fixed: Fixed | None) -> list[str]:
    """Where a trial's run is: MLflow run (id and link), run folder, the command that retrains it."""
    attrs, lines = trial.user_attrs, []
    if RUN_ID_ATTR in attrs:
        lines.append(f"  MLflow run: {attrs[RUN_ID_ATTR]}" + (f"  {attrs[URL_ATTR]}" if URL_ATTR in attrs else ""))
    if RUN_DIR_ATTR in attrs:
        lines.append(f"  run folder: {attrs[RUN_DIR_ATTR]}")
    if fixed is not None:
        lines.append(f"  retrain:    {best_command(trial.params, fixed)}")
    return lines


def summary(
    study: optuna.Study, objectives: Sequence[str], directions: Sequence[str], fixed: Fixed | None = None
) -> str:
    """The end-of-sweep console summary: trial counts, the top trials (the Pareto front for several
    objectives) with their objective and params, and where the champion is (with ``fixed``, the
    sweep's fixed overrides, also the command that retrains it)."""
    names = metric_names(study, objectives)
    lines = [_counts_line(study)]
    best = champions(study)
    if not best:
        return "\n".join([*lines, "no trial completed"])
    goal = ", ".join(f"{n} ({d})" for n, d in zip(names, directions, strict=True))
    if len(names) == 1:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        top = _ranked(study, complete)[:TOP]
        lines += [f"top {len(top)} of {len(complete)} complete trials by {goal}:", *_trials_table(top, names)]
        champion = best[0]
        lines += [f"champion: trial {champion.number}, {names[0]} {_objective(champion.values[0])}"]
        return "\n".join([*lines, *_where(champion, fixed)])
    shown = best[:FRONT]
    more = f" ({len(best) - len(shown)} more in best.yaml)" if len(best) > len(shown) else ""
    lines += [f"Pareto front on {goal}: {len(best)} trials{more}:", *_trials_table(shown, names)]
    for t in shown:  # one line each: the commands that retrain them are in best.yaml
        attrs = t.user_attrs
        where = [w for w in (attrs.get(URL_ATTR) or attrs.get(RUN_ID_ATTR), attrs.get(RUN_DIR_ATTR)) if w]
        if where:
            lines.append(f"trial {t.number}: {'  '.join(where)}")
    return "\n".join(lines)


def _entry(trial: FrozenTrial, names: list[str], fixed: Fixed) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "trial": trial.number,
        "values": dict(zip(names, trial.values, strict=True)),
        "params": dict(trial.params),
        "mlflow_run_id": attrs.get(RUN_ID_ATTR),
        "mlflow_url": attrs.get(URL_ATTR),
        "run_dir": attrs.get(RUN_DIR_ATTR),
        "command": best_command(trial.params, fixed),
    }


def write_best_yaml(
    path: Path, study: optuna.Study, objectives: Sequence[str], directions: Sequence[str], fixed: Fixed
) -> dict[str, Any] | None:
    """``best.yaml``: the best trial (several objectives: ``pareto_front``, a list of trials) with
    its objective values, params, MLflow run, run folder and the command that retrains it. Written
    then renamed, so a reader never sees half a file. None (nothing written) before any trial completes."""
    best = champions(study)
    if not best:
        return None
    names = metric_names(study, objectives)
    counts = _counts(study)
    doc: dict[str, Any] = {
        "study": study.study_name,
        "objectives": dict(zip(names, directions, strict=True)),
        "trials": {
            w: counts[s]
            for s, w in ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"), (TrialState.FAIL, "failed"))
        },
    }
    if len(names) == 1:
        doc |= _entry(best[0], names, fixed)
    else:
        doc["pareto_front"] = [_entry(t, names, fixed) for t in best]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # a resumed study with nothing left to run made no folder
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return doc
