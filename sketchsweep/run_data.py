"""What to evaluate (or calibrate) a trained model on: its run's own split, read again with
training's loader and checked against the data as it is now, or every row of other data given as
Hydra data overrides, its classes matched by name onto the model's. ``python -m
sketchsweep.evaluate`` and ``python -m sketchsweep.export --calibrate`` read data through here.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from sketchsweep.checkpoint import TrainedModel
from sketchsweep.config import register_configs, saved_data_config
from sketchsweep.data import stratified_split
from sketchsweep.data.categories import class_key, suggest
from sketchsweep.data.fingerprint import changes, saved_record
from sketchsweep.data.folder import select_files
from sketchsweep.data.load import is_synthetic, load_data
from sketchsweep.data.views import Rows
from sketchsweep.evaluation import EvalError
from sketchsweep.modelref import SPLIT, ModelRef, ModelRefError
from sketchsweep.paths import PROJECT_ROOT


@dataclass
class Target:
    """What the CLI evaluates: rows of a dataset, labelled with the model's class indices."""

    rows: Rows
    label: str  # "" for the run's validation split; else what the data is ("test", "qd-small", ...)
    description: str


def map_classes(data_classes: list[str], model_classes: list[str]) -> np.ndarray:
    """Index into the model's classes for each of the data's classes, matched by name."""
    known = {class_key(n): i for i, n in enumerate(model_classes)}
    unknown = [n for n in data_classes if class_key(n) not in known]
    if unknown:
        names = {k: model_classes[i] for k, i in known.items()}
        hints = []
        for name in unknown[:5]:
            hint = suggest(class_key(name), names)
            hints.append(f"{name!r}" + (f" ({hint})" if hint else ""))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        theirs = f": {', '.join(model_classes)}" if len(model_classes) <= 10 else " are in its classes.json"
        raise EvalError(
            f"the data has class(es) the model does not know: {', '.join(hints)}{more}; the model's "
            f"{len(model_classes)} classes{theirs} (pick known ones with data.classes=[...])"
        )
    return np.array([known[class_key(n)] for n in data_classes], dtype=np.int64)


def compose_data(run_config: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The data config to evaluate on: Hydra data overrides applied to the run's own data config.

    ``data=<group>`` starts from that group's defaults, as in training; ``data.<key>=...`` alone
    changes the run's data config. Hydra's compose API parses and type-checks the overrides."""
    bad = [o for o in overrides if not re.match(r"^[+~]?data(\.|=|$)", o)]
    if bad:
        raise EvalError(f"only data overrides are accepted (data=GROUP, data.KEY=VALUE); got {' '.join(bad)}")
    own = run_config.get("data") and not any(re.match(r"^data=", o) for o in overrides)
    base = saved_data_config(run_config)
    register_configs()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3", job_name="evaluate"):
        group = [f"data={'synthetic' if is_synthetic(base) else 'quickdraw'}"] if own else []
        cfg = compose("config", overrides=[*group, *overrides])
    if not own:
        return cfg.data
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        OmegaConf.update(base, key[len("data.") :], OmegaConf.select(cfg, key), merge=False)
    return base


def _data_label(data_cfg: DictConfig) -> str:
    if is_synthetic(data_cfg):
        return "synthetic"
    return re.sub(r"[^\w.-]+", "_", Path(str(data_cfg.root)).expanduser().resolve().name) or "data"


@dataclass
class SavedSplit:
    """A run's split.npz: the row indices, and (runs since it was added) the record of the class
    files they index, ``data.fingerprint``'s."""

    indices: dict[str, np.ndarray]
    record: dict[str, np.ndarray] | None
    source: str  # where it was read, for messages


def _read_split(path: Path, source: str) -> SavedSplit:
    with np.load(path, allow_pickle=False) as z:
        indices = {k: z[k].astype(np.int64) for k in ("train", "val", "test") if k in z}
    return SavedSplit(indices, saved_record(path), source)


def _run_split(ref: ModelRef) -> SavedSplit | None:
    """The run's split.npz, from its folder or its MLflow run; None when it has none (older runs)."""
    if ref.folder is not None:
        path = ref.folder / SPLIT
        return _read_split(path, str(path)) if path.is_file() else None
    from sketchsweep import store  # MLflow (~1.5 s to import): only for runs:/ and models:/

    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_id = store.fetch_run_files(ref, [SPLIT], Path(tmp))
        except ModelRefError:
            return None
        return _read_split(Path(tmp) / SPLIT, f"{SPLIT} of run {run_id}")


def _split_indices(ref: ModelRef, data, data_cfg: DictConfig) -> dict[str, np.ndarray]:
    """The run's split; recomputed from the run's data config if it is missing, which gives the
    same indices (the split depends only on it). Refused when the class files it indexes changed."""
    saved = _run_split(ref)
    if saved is None:
        train, val, test = stratified_split(
            data.labels, data.class_names, data_cfg.val_fraction, data_cfg.split_seed, data_cfg.test_fraction
        )
        return {"train": train, "val": val, "test": test}
    split, source = saved.indices, saved.source
    changed = changes(saved.record, data) if saved.record is not None else []
    if changed:
        raise EvalError(
            f"{source}: the run's data has changed since training, so its split would index other images: "
            f"{'; '.join(changed)} (restore the files, or evaluate on the data as it is now with --split all or "
            "data overrides)"
        )
    if any(len(v) and v.max() >= len(data.labels) for v in split.values()):
        raise EvalError(
            f"{source}: indices go past the {len(data.labels)} rows of the run's data, which has changed since "
            "training (evaluate on it with data overrides instead)"
        )
    return split


def load_target(trained: TrainedModel, ref: ModelRef, overrides: list[str], split: str, device) -> Target:
    """The images and labels to evaluate: the run's ``split`` without overrides, all rows with them."""
    if overrides:
        data_cfg = compose_data(trained.config, overrides)
    elif trained.config.get("data"):
        data_cfg = saved_data_config(trained.config)
    else:
        raise EvalError(f"{ref.text}: no data config is known for this model; give data overrides (data.root=PATH ...)")
    if overrides and not is_synthetic(data_cfg) and data_cfg.root:
        # Check class names before reading every file: an unknown class fails in a second.
        map_classes(list(select_files(data_cfg.root, list(data_cfg.classes or []) or None)), trained.class_names)
    data = load_data(data_cfg, device)
    to_model = map_classes(data.class_names, trained.class_names)
    if overrides:
        label = _data_label(data_cfg)
        return Target(Rows(data.images, to_model[data.labels]), label, f"all {len(data.labels):,} images of {label}")
    if data.class_names != trained.class_names:
        raise EvalError(
            f"the run's data now has classes {data.class_names}, the model {trained.class_names}: its split no "
            "longer applies (evaluate on the data with overrides, e.g. data.classes=[...])"
        )
    if split == "all":
        return Target(Rows(data.images, data.labels), "all", f"all {len(data.labels):,} images of the run's data")
    idx = _split_indices(ref, data, data_cfg)[split]
    if len(idx) == 0:
        raise EvalError(f"{ref.text}: the run has no {split} split (data.{split}_fraction was 0)")
    name = {"val": "validation", "test": "test", "train": "training"}[split]
    rows = Rows(data.images, data.labels[idx], idx)
    return Target(rows, "" if split == "val" else split, f"the {name} split ({len(idx):,})")
