"""The search space, written in Hydra's override grammar as hydra-optuna-sweeper reads it, and the
samplers and pruners that explore it.

    interval(lo, hi)             FloatDistribution (IntDistribution when both ends are ints)
    tag(log, interval(lo, hi))   the same on a log scale
    int(interval(lo, hi))        IntDistribution
    range(start, stop, step)     IntDistribution / FloatDistribution with ``step``, over the values
                                 Hydra's own range gives (stop excluded): ordered, so TPE sees it
    choice(a, b, ...)            CategoricalDistribution (so is shuffle(range(...)))
    key=value, +key=value, ~key  fixed overrides, passed to every trial as written

A later override of a key replaces an earlier one, sweep or fixed: the command line's overrides
replace a preset's ``params`` (a key fixed on the command line is no longer searched).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from sketchsweep.cli import UserError


class Sampler(str, Enum):
    tpe = "tpe"
    random = "random"
    cmaes = "cmaes"
    gp = "gp"
    grid = "grid"
    nsgaii = "nsgaii"


class Pruner(str, Enum):
    median = "median"
    percentile = "percentile"
    successive_halving = "successive_halving"
    hyperband = "hyperband"
    none = "none"


SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "grid": optuna.samplers.GridSampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
assert set(SAMPLERS) == {s.value for s in Sampler} and set(PRUNERS) == {p.value for p in Pruner}

Fixed = dict[str, "str | None"]  # key element (with its +/~ prefix) -> value as written; None: a bare ~key


def make_pruner(name: str, kwargs: dict[str, Any] | None = None) -> optuna.pruners.BasePruner:
    name = str(getattr(name, "value", name))
    if name not in PRUNERS:
        raise UserError(f"hydra.sweeper.pruner={name}: expected one of {sorted(PRUNERS)}")
    return PRUNERS[name](**(kwargs or {}))


def make_sampler(
    name: str,
    space: dict[str, BaseDistribution],
    kwargs: dict[str, Any] | None = None,
    seed: int | None = None,
    shared: bool = False,
) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` with its arguments; ``shared``: other workers sample the same study."""
    name = str(getattr(name, "value", name))
    if name not in SAMPLERS:
        raise UserError(f"hydra.sweeper.sampler={name}: expected one of {sorted(SAMPLERS)}")
    kwargs = dict(kwargs or {})
    if seed is not None:
        kwargs.setdefault("seed", seed)
    if shared and name == "tpe":
        kwargs.setdefault("constant_liar", True)  # do not propose what other workers are running
    if name == "grid":
        return optuna.samplers.GridSampler({k: grid_values(k, d) for k, d in space.items()}, **kwargs)
    return SAMPLERS[name](**kwargs)


def grid_values(name: str, d: BaseDistribution) -> list[Any]:
    """Every value of a discrete distribution, for the grid sampler."""
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, (IntDistribution, FloatDistribution)) and d.step is not None and not d.log:
        n = round((d.high - d.low) / d.step) + 1
        return [
            d.low + i * d.step if isinstance(d, IntDistribution) else round(d.low + i * d.step, 12) for i in range(n)
        ]
    raise UserError(f"hydra.sweeper.sampler=grid: {name} must be choice(...) or range(...)")


def distribution(override: Override) -> BaseDistribution | str | None:
    """One override -> an Optuna distribution, or the fixed value it sets (None for a bare ``~key``)."""
    if not override.is_sweep_override():
        if override.is_delete() and override.value() is None:
            return None  # `~key` deletes whatever the key holds: it takes no value
        return override.get_value_element_as_str()
    value = override.value()
    if isinstance(value, RangeSweep) and not value.shuffle:
        return _stepped(override, value)
    if override.is_choice_sweep() or override.is_range_sweep():
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise UserError(f"hydra.sweeper.params: {override.input_line} is not a search space Optuna can sample")


def _stepped(override: Override, r: RangeSweep) -> IntDistribution | FloatDistribution:
    values = list(override.sweep_iterator())
    if not values:
        raise UserError(f"hydra.sweeper.params: {override.input_line} is an empty range")
    step = abs(r.step)
    if all(isinstance(v, int) for v in (r.start, r.stop, r.step)):
        return IntDistribution(min(values), max(values), step=step)
    # Float ranges accumulate rounding (0.1 * 3 = 0.30000000000000004): keep the intended grid.
    return FloatDistribution(round(min(values), 12), round(max(values), 12), step=float(step))


def search_space(arguments: list[str]) -> tuple[dict[str, BaseDistribution], Fixed]:
    """Sweep overrides -> (the distributions to sample, the fixed overrides every trial gets)."""
    space: dict[str, BaseDistribution] = {}
    fixed: Fixed = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key, value = override.get_key_element(), distribution(override)
        space.pop(key, None), fixed.pop(key, None)  # the later override wins (the command line over a preset)
        if isinstance(value, BaseDistribution):
            space[key] = value
        else:
            fixed[key] = value
    return space, fixed


def grid_size(space: dict[str, BaseDistribution]) -> int:
    """How many points the grid sampler has in ``space``."""
    return math.prod(len(grid_values(k, d)) for k, d in space.items())


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``key=value`` overrides; a bare ``~key`` stays bare."""
    return [k if v is None else f"{k}={v}" for k, v in values.items()]
