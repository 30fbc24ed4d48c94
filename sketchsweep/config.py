"""Typed config schemas, registered in Hydra's ConfigStore, and the one way to read a saved config.

Every default is stated here, once; the YAML files under ``conf/`` pick a schema and keep only
the values where an option differs from it. Because every group option is merged onto a
dataclass, a misspelled key (``model.widht=128``) or a wrong type (``model.width=abc``) fails
when Hydra composes the config, before any data is read or any run is created.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from sketchsweep.cli import UserError
from sketchsweep.paths import PROJECT_ROOT


class ConfigError(UserError):
    """A config value that composes but cannot be used (e.g. a bad trainer.resume path)."""


class DataSource(str, Enum):
    synthetic = "synthetic"  # generated on first use into data.root, then read as a folder
    folder = "folder"  # a numpy_bitmap folder you bring


class StreamOrder(str, Enum):
    exact = "exact"  # the resident path's shuffle: same seed, same batches, whatever the data size
    chunks = "chunks"  # shuffled runs of consecutive rows: sequential reads for slow disks


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA devices that support it, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # with a gradient scaler


class Deliverables(str, Enum):
    best = "best"  # the study's best trial (every Pareto trial for several objectives), when it ends
    all = "all"  # every trial that finished, as it finishes (as a single run does)
    none = "none"  # trials keep their weights only


class Objective(str, Enum):
    val_acc = "val_acc"
    val_top3 = "val_top3"
    val_loss = "val_loss"


VAL_METRICS = ("val_loss", "val_acc", "val_top3", "val_ece")
# What a sweep may optimize (hydra.sweeper.objective): best-epoch values, last-epoch values, the model's size.
SWEEP_OBJECTIVES = (*VAL_METRICS, *(f"final_{k}" for k in VAL_METRICS), "best_epoch", "num_parameters")


@dataclass
class SyntheticConfig:
    num_classes: int = 10
    per_class: int = 1000
    seed: int = 0


@dataclass
class AugmentConfig:
    # Off by default, as in the seed recipe. Applied per batch on the training device.
    enabled: bool = False
    degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.1  # fraction of the image side
    hflip: bool = False


@dataclass
class MixConfig:
    # Off by default (alpha 0). Per batch on the training device: mixup blends each drawing with
    # another of the batch, cutmix pastes a box of another into it; the loss is blended by the
    # same share. A share lam ~ Beta(alpha, alpha) per batch.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # share of batches that are mixed
    switch_prob: float = 0.5  # with both on: share of mixed batches that use cutmix instead of mixup


@dataclass
class DataConfig:
    source: DataSource = DataSource.synthetic
    # Folder of <class>.npy (or full_numpy_bitmap_<class>.npy) files, uint8 (N, 784). For
    # synthetic data: where generated sets are cached (null: <project>/data/synthetic).
    root: str | None = None
    classes: list[str] | None = None  # a subset of class names, e.g. [cat,dog,apple]; null: every file
    max_per_class: int | None = None  # e.g. 10000: keep the first N drawings of each class
    # Data up to this size is loaded whole (onto the GPU when training there); larger data is
    # streamed from disk. null: half the RAM (and at most half the GPU's memory).
    max_memory_gb: float | None = None
    # How streamed data is shuffled (data/stream.py). chunks: sequential reads, fast from any disk;
    # exact: the resident path's order (same seed, same batches), scattered reads (slow from a cold disk).
    stream_order: StreamOrder = StreamOrder.chunks
    val_fraction: float = 0.1
    test_fraction: float = 0.0  # > 0: a held-out test split, scored once at the end with the best weights
    split_seed: int = 0  # the validation split; independent of the training seed
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mix: MixConfig = field(default_factory=MixConfig)


@dataclass
class ModelConfig:
    width: int = 64  # channels width, 2*width, 4*width
    hidden: int = 256
    dropout: float = 0.3
    negative_slope: float = 0.1


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 1e-2


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4


@dataclass
class StepLRConfig:
    _target_: str = "torch.optim.lr_scheduler.StepLR"
    step_size: int = 10
    gamma: float = 0.5


@dataclass
class CosineConfig:
    _target_: str = "torch.optim.lr_scheduler.CosineAnnealingLR"
    T_max: int = II("trainer.epochs")  # decay over the whole run
    eta_min: float = 0.0


@dataclass
class OneCycleConfig:
    # Linear warm-up to optimizer.lr over warmup_epochs, then a cosine down to eta_min at the last
    # epoch; stepped once per epoch, like every schedule here.
    _target_: str = "sketchsweep.schedules.WarmupCosineLR"
    epochs: int = II("trainer.epochs")
    warmup_epochs: int = 2
    eta_min: float = 0.0


@dataclass
class ConstantConfig:
    # "none": a scheduler that never changes the lr, so checkpoints always have one to save.
    _target_: str = "torch.optim.lr_scheduler.ConstantLR"
    factor: float = 1.0
    total_iters: int = 0


@dataclass
class TrainerConfig:
    epochs: int = 20
    batch_size: int = 256
    eval_batch_size: int = 1024
    device: Device = Device.auto
    precision: Precision = Precision.auto
    compile: bool = False  # torch.compile the model
    # What the run returns (and sweeps optimize): this metric at the run's best epoch.
    objective: Objective = Objective.val_acc
    # Cross-entropy against (1 - s) * one-hot + s / classes. 0: off (validation loss stays plain).
    label_smoothing: float = 0.0
    # > 0: an exponential moving average of the weights (e.g. 0.998 per step) is evaluated every
    # epoch and is what the run keeps: best-epoch selection, checkpoints' best weights, export.
    ema_decay: float = 0.0
    # Fit a temperature to the kept weights' logits on the validation split when training ends:
    # the test metrics (test_ece_uncalibrated: before) and the ONNX export use it (README: Export).
    calibrate: bool = False
    resume: str | None = None  # path of a checkpoint.pt to continue from


@dataclass
class MLflowConfig:
    # null: $MLFLOW_TRACKING_URI if set, else sqlite:///<project>/mlruns/mlflow.db
    tracking_uri: str | None = None
    # null: the folder of a SQLite/file store (so <project>/mlruns); ignored for servers
    artifact_root: str | None = None
    experiment_name: str = "sketchsweep"
    # mlflow.pytorch.log_model (pt2) of the best-epoch model: ~0.9 s and 1.5 MB per run, and read by
    # nothing here (runs:/ and models:/ load best_model_weights.pth; serving runs the ONNX model)
    log_model: bool = False
    # model.onnx of the best-epoch model in the run folder, parity-checked against PyTorch with
    # ONNX Runtime, logged with mlflow.onnx.log_model
    log_onnx: bool = True
    # evaluation/ on the validation split: top-1/3/5, per-class accuracy, confused pairs, plots
    log_evaluation: bool = True
    # Register the run's model in the MLflow Model Registry (a sweep registers its champion itself)
    register: bool = False
    registered_model: str | None = None  # the registered model's name; null: mlflow.experiment_name


@dataclass
class SweepConfig:
    """Set by sketchsweep's Optuna sweeper for each trial (leave unset when training by hand), but
    for ``deliverables``."""

    # Which trials of an Optuna sweep get the evaluation artifacts, the PyTorch model and the ONNX
    # export (mlflow.log_evaluation/log_model/log_onnx say which of these are made).
    deliverables: Deliverables = Deliverables.best
    study_name: str | None = None
    storage: str | None = None
    trial_number: int | None = None
    # What the job returns, in order: val_acc/val_top3/val_loss/val_ece (at the best epoch),
    # final_val_acc/..., num_parameters. The first is reported every epoch for pruning.
    objectives: list[str] | None = None
    parent_run_id: str | None = None  # the sweep's MLflow parent run
    pruner: str = "none"  # the study's pruner: Optuna does not store it with the study
    pruner_kwargs: str | None = None  # its arguments, as JSON


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    # Any: each optimizer/scheduler option brings its own schema (their arguments differ).
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, name, node in [
        ("data", "data_schema", DataConfig),
        ("model", "model_schema", ModelConfig),
        ("optimizer", "adam_schema", AdamConfig),
        ("optimizer", "adamw_schema", AdamWConfig),
        ("optimizer", "sgd_schema", SGDConfig),
        ("scheduler", "steplr_schema", StepLRConfig),
        ("scheduler", "cosine_schema", CosineConfig),
        ("scheduler", "none_schema", ConstantConfig),
        ("scheduler", "onecycle_schema", OneCycleConfig),
    ]:
        cs.store(group=f"schema/{group}", name=name, node=node)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def check_values(cfg: DictConfig) -> None:
    """Values that compose (right keys and types) but cannot be trained with: one ``ConfigError``
    naming them, before any data is read or any run is created."""
    t, m = cfg.trainer, cfg.model
    if t.epochs < 1 or t.batch_size < 2 or t.eval_batch_size < 1:
        raise ConfigError(
            f"trainer: expected epochs >= 1, batch_size >= 2, eval_batch_size >= 1; got epochs={t.epochs}, "
            f"batch_size={t.batch_size}, eval_batch_size={t.eval_batch_size}"
        )
    if m.width < 1 or m.hidden < 1 or not 0 <= m.dropout < 1:
        raise ConfigError(
            f"model: expected width >= 1, hidden >= 1 and 0 <= dropout < 1; got width={m.width}, "
            f"hidden={m.hidden}, dropout={m.dropout}"
        )
    _check_recipe_knobs(cfg)
    unknown = [o for o in cfg.sweep.objectives or [] if o not in SWEEP_OBJECTIVES]
    if unknown:
        raise ConfigError(f"sweep objective(s) {unknown} unknown; expected some of {list(SWEEP_OBJECTIVES)}")


def _check_recipe_knobs(cfg: DictConfig) -> None:
    t, mix = cfg.trainer, cfg.data.mix
    if not 0 <= t.label_smoothing < 1 or not 0 <= t.ema_decay < 1:
        raise ConfigError(
            f"trainer: expected 0 <= label_smoothing < 1 and 0 <= ema_decay < 1; "
            f"got label_smoothing={t.label_smoothing}, ema_decay={t.ema_decay}"
        )
    if min(mix.mixup_alpha, mix.cutmix_alpha) < 0 or not (0 <= mix.prob <= 1 and 0 <= mix.switch_prob <= 1):
        raise ConfigError(
            f"data.mix: expected alphas >= 0 and 0 <= prob, switch_prob <= 1; got mixup_alpha={mix.mixup_alpha}, "
            f"cutmix_alpha={mix.cutmix_alpha}, prob={mix.prob}, switch_prob={mix.switch_prob}"
        )
    warmup, total = cfg.scheduler.get("warmup_epochs"), cfg.scheduler.get("epochs")
    if warmup is not None and not 0 <= warmup < total:
        raise ConfigError(f"scheduler.warmup_epochs={warmup}: expected 0 <= warmup_epochs < scheduler.epochs={total}")


def check_sweep_keys(cfg: DictConfig, in_sweep: bool) -> None:
    """The ``sweep.*`` keys the Optuna sweeper sets for its trials are refused outside its sweeps: a
    command copied from a trial would otherwise attach a new run to the study as one of its trials."""
    defaults = OmegaConf.structured(SweepConfig)
    internal = [k for k in defaults if k != "deliverables" and cfg.sweep[k] != defaults[k]]
    if internal and not in_sweep:
        raise ConfigError(
            f"{', '.join(f'sweep.{k}' for k in internal)}: set by the Optuna sweeper for its trials only; "
            "to train a trial's parameters again, use the sweep's best_command (best.yaml) or its params alone"
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"width": 64}} -> {"model.width": 64}; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def saved_data_config(saved: dict[str, Any] | None) -> DictConfig:
    """The data config of a run's saved config (``config.yaml``, a checkpoint's ``config``), typed
    as it was at training time: read with the same attributes and enums as a composed one."""
    return OmegaConf.merge(OmegaConf.structured(DataConfig), (saved or {}).get("data") or {})
