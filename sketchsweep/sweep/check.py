"""What a sweep checks before its first trial, so that a sweep that cannot work fails in a second
with one line naming the key (``UserError``), not after its first trials have failed.

- the sampler and pruner are built with their ``*_kwargs`` (an argument their class refuses);
- the config of every trial is composed the way the launcher composes it, from the fixed overrides
  and each choice of a ``choice(...)`` / both ends of an interval (at most ``MAX_COMPOSES``
  composes), and checked with ``config.check_values``: a key not in the config, a config group
  option that does not exist, a value of the wrong type or out of range.

(Names of samplers, pruners and objectives are checked earlier, by ``study.read_settings``.)
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from sketchsweep.cli import UserError
from sketchsweep.config import check_values
from sketchsweep.sweep.space import PRUNERS, SAMPLERS, Fixed, as_overrides, make_pruner, make_sampler

log = logging.getLogger("sketchsweep.sweeper")

# A trial's config from its overrides, as the launcher composes it (Hydra's ConfigLoader.load_sweep_config).
Compose = Callable[[list[str]], DictConfig]
MAX_COMPOSES = 50  # ~50-80 ms each: a few seconds at most before a sweep starts


def check_sweep(
    settings: DictConfig, space: dict[str, BaseDistribution], fixed: Fixed, compose: Compose | None
) -> None:
    """Everything the first trials would find wrong; ``compose`` None: the algorithms only."""
    check_algorithms(settings, space)
    if compose is not None:
        check_space(space, fixed, compose)


def check_algorithms(settings: DictConfig, space: dict[str, BaseDistribution]) -> None:
    """Build the sampler and pruner as the study will: arguments their class refuses are named."""
    builders: dict[str, Callable[[dict[str, Any]], object]] = {
        "sampler": lambda kw: make_sampler(settings.sampler, space, kw, settings.seed),
        "pruner": lambda kw: make_pruner(settings.pruner, kw),
    }
    for what, build in builders.items():
        name = str(getattr(settings[what], "value", settings[what]))
        cls = (SAMPLERS if what == "sampler" else PRUNERS)[name]
        key, raw = f"hydra.sweeper.{what}_kwargs", settings[f"{what}_kwargs"]
        takes = ", ".join(p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs"))
        if raw is not None and not isinstance(raw, DictConfig):
            raise UserError(f"{key}: expected a dict of {cls.__name__}'s arguments ({takes}), got {raw!r}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental samplers warn; the study builds them again
                build(OmegaConf.to_container(raw) if raw else {})
        except UserError:
            raise
        except (TypeError, ValueError) as e:
            raise UserError(f"{key}: {cls.__name__} refuses them: {e} (it takes {takes})") from None


def check_space(space: dict[str, BaseDistribution], fixed: Fixed, compose: Compose) -> None:
    """Compose the fixed overrides alone, then each value to check (with its config group's or
    its keys' first values: ``optimizer=sgd`` with ``optimizer.betas``) and check each config."""
    base = as_overrides(fixed)
    reference = _composed(base, compose, "the sweep's fixed overrides", None)
    values = _values(space)
    for key, value in values[: MAX_COMPOSES - 1]:
        related = {k: _values_of(d)[0] for k, d in space.items() if k != key and _nested(k, key)}
        with_ = f" (with {' '.join(as_overrides(related))})" if related else ""
        where = f"hydra.sweeper.params: {key}={value}{with_}"
        _composed([*as_overrides({key: value}), *as_overrides(related), *base], compose, where, reference)
    if len(values) > MAX_COMPOSES - 1:
        log.info("search space: checked %d of its %d values before the first trial", MAX_COMPOSES - 1, len(values))


def _composed(overrides: list[str], compose: Compose, where: str, reference: DictConfig | None) -> DictConfig:
    try:
        cfg = compose(overrides)
        check_values(cfg)
    except (HydraException, OmegaConfBaseException, UserError) as e:
        raise UserError(f"{where}: {_reason(e, reference)}") from None
    return cfg


def _reason(e: Exception, reference: DictConfig | None) -> str:
    """Hydra's and OmegaConf's several-line errors as one line, with what was expected."""
    if isinstance(e, MissingConfigException) and e.options is not None:
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        return f"config group {group} has no option {name}; expected one of {', '.join(e.options)}"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, ConfigAttributeError) and cause.full_key:
        parent, _, name = str(cause.full_key).rpartition(".")
        if keys := _keys(cause.object_type, parent, reference):
            expected = ", ".join(k for k in keys if not k.startswith("_"))
            node = parent or "the config"
            return f"{node} has no key {name}; expected one of {expected} (+{cause.full_key}=... adds it)"
    text = str(getattr(cause, "msg", None) or cause)  # OmegaConf's msg: without its full_key/object_type lines
    return " ".join(line.strip() for line in text.splitlines() if line.strip() and not line.startswith((" ", "\t")))


def _keys(schema: Any, parent: str, reference: DictConfig | None) -> list[str]:
    """The keys of the node that lacks one: its schema's fields, else the fixed config's node."""
    if dataclasses.is_dataclass(schema):
        return [f.name for f in dataclasses.fields(schema)]
    node = OmegaConf.select(reference, parent) if parent and reference is not None else reference
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def _nested(a: str, b: str) -> bool:
    """Whether one key is inside the other (a config group and its keys)."""
    a, b = a.lstrip("+~"), b.lstrip("+~")
    return a.startswith(b + ".") or b.startswith(a + ".")


def _values_of(d: BaseDistribution) -> list[Any]:
    """What a trial may draw at the edges: every choice; an interval's two ends."""
    if isinstance(d, CategoricalDistribution):
        return list(dict.fromkeys(d.choices))
    if isinstance(d, (IntDistribution, FloatDistribution)):
        return list(dict.fromkeys([d.low, d.high]))
    return []


def _values(space: dict[str, BaseDistribution]) -> list[tuple[str, Any]]:
    """Each key's values to check, every key's first and last before any key's middle ones."""
    ranked = []
    for key, d in space.items():
        values = _values_of(d)
        order = [*values[:1], *values[-1:], *values[1:-1]] if len(values) > 1 else values
        ranked += [(rank, key, v) for rank, v in enumerate(order)]
    return [(key, v) for _, key, v in sorted(ranked, key=lambda t: t[0])]
