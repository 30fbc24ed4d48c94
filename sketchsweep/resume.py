"""Continue a run from its checkpoint (``trainer.resume``), training with what the config says now.

The checkpoint puts the model, optimizer, scheduler, RNG states and history back exactly, so an
unchanged config continues bit for bit. A changed setting is honoured, never only logged:

- optimizer hyperparameters (lr, weight_decay, betas, momentum, ...) are set on the restored
  optimizer; a new lr rescales the schedule (this epoch's lr is the new lr times the schedule's factor);
- ``trainer.epochs``, and with it a cosine schedule's ``T_max``: cosine decays from the current lr
  to ``eta_min`` over the remaining epochs (smoothly, never rising); step and constant schedules
  simply continue;
- other settings of the same scheduler: it is rebuilt at the current epoch (its closed form);
- settings used only from here on (batch size, dropout, precision, augmentation, ...) as they are.

What cannot be honoured is a ``ConfigError`` before any run or file is created: another model
shape, optimizer or scheduler class, split, seed or data.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sketchsweep import credentials, store
from sketchsweep.checkpoint import Checkpoint, CheckpointError
from sketchsweep.config import ConfigError, flatten
from sketchsweep.data import Dataset
from sketchsweep.data.fingerprint import changes, saved_record
from sketchsweep.ema import EMA
from sketchsweep.modelref import CHECKPOINT, SPLIT, ModelRef, ModelRefError
from sketchsweep.schedules import WarmupCosineLR

log = logging.getLogger("sketchsweep")

# Settings a checkpoint cannot continue with: the weights' shape, the optimizer's and scheduler's
# state layout, the rows of the train/val/test split, the random state (restored, not re-seeded).
FIXED = (
    "model.width",
    "model.hidden",
    "model.negative_slope",
    "optimizer._target_",
    "scheduler._target_",
    "seed",
    "data.source",
    "data.max_per_class",
    "data.val_fraction",
    "data.test_fraction",
    "data.split_seed",
    "data.synthetic.",
)


def checkpoint_path(resume: str) -> Path:
    """``trainer.resume``: a run folder (its checkpoint.pt) or a checkpoint file."""
    expected = f"expected a run folder or the {CHECKPOINT} in one"
    if not Path(resume).expanduser().exists():
        raise ConfigError(f"trainer.resume={resume}: does not exist; {expected}")
    try:
        ref = ModelRef.parse(resume)
    except ModelRefError as e:
        raise ConfigError(f"trainer.resume: {e}") from None
    if ref.kind == "folder" and ref.path is not None and (ref.path / CHECKPOINT).is_file():
        return ref.path / CHECKPOINT
    if ref.kind != "checkpoint" or ref.path is None:
        raise ConfigError(f"trainer.resume={resume}: {expected}")
    return ref.path


def load(resume: str | None, data: Dataset, now: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint ``trainer.resume`` names, checked against the data and the config ``now``."""
    if not resume:
        return None
    path = checkpoint_path(resume)
    try:
        ckpt = Checkpoint.load(path)
    except CheckpointError as e:
        raise ConfigError(f"trainer.resume: {e}") from None
    if ckpt.class_names != data.class_names:
        raise ConfigError(
            f"trainer.resume: the checkpoint's classes {ckpt.class_names} differ from the data's {data.class_names}; "
            "resume with the data config it was trained on"
        )
    record = saved_record(path.parent / SPLIT)
    changed = changes(record, data) if record is not None and data.files is not None else []
    if changed:
        raise ConfigError(
            f"trainer.resume: the data has changed since the checkpoint was written, so the split would mix "
            f"training and validation rows: {'; '.join(changed)}"
        )
    if ckpt.epoch > now["trainer"]["epochs"]:
        raise ConfigError(
            f"trainer.epochs={now['trainer']['epochs']}: the checkpoint has {ckpt.epoch} epochs done already; "
            f"resume with trainer.epochs >= {ckpt.epoch}"
        )
    fixed = [(k, a, b) for k, a, b in changed_settings(ckpt.config, now) if k.startswith(FIXED)] if ckpt.config else []
    if fixed:
        said = ", ".join(f"{k}={a} (checkpoint: {b})" for k, a, b in fixed)
        raise ConfigError(
            f"trainer.resume: cannot continue the checkpoint with {said}; resume with its settings, or start a new run"
        )
    return ckpt


def close_previous(uri: str, ckpt: Checkpoint) -> None:
    """End the MLflow run that wrote the checkpoint as KILLED when it still says RUNNING (a SIGKILL
    or a crash left it so). One still alive on this host is an error: two processes, one run."""
    if not ckpt.mlflow_run_id:
        return
    client = MlflowClient(uri)
    try:
        run = client.get_run(ckpt.mlflow_run_id)
    except MlflowException:
        return  # logged to another store: not ours to close
    if run.info.status != "RUNNING":
        return
    gone = store.process_gone(run)
    if gone is False:
        raise ConfigError(
            f"trainer.resume: run {run.info.run_id} that writes this checkpoint is still running "
            f"(pid {run.data.tags[store.PID]} on this host); stop it first"
        )
    why = f"resumed from its {CHECKPOINT} (epoch {ckpt.epoch})"
    if gone:
        store.end_gone_run(client, run.info.run_id, f"its process is gone; {why}")
        log.info("run %s was left RUNNING by a process that is gone: ended as KILLED", run.info.run_id)
        return
    host = run.data.tags.get(store.HOST, "an unknown host")
    store.end_gone_run(client, run.info.run_id, f"{why} on {socket.gethostname()}; its process on {host} unchecked")
    log.warning(
        "run %s says RUNNING and ran on %s, where its process cannot be checked from here: ended as KILLED, "
        "since its checkpoint is resumed here (stop that process if it still runs)",
        *(run.info.run_id, host),
    )


def changed_settings(then: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, now, then)`` for each setting that differs (resume and MLflow settings aside)."""
    ignore = ("trainer.resume", "mlflow.")
    a, b = flatten(then), flatten(now)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith(ignore))
    return [(k, b.get(k), a.get(k)) for k in keys]


def restore(ckpt: Checkpoint | None, now: dict[str, Any], model, optimizer, scheduler, scaler, shuffle, device):
    """Put the checkpoint back into the training pieces, then apply what ``now`` changes. Returns
    the history, the best epoch and the scheduler to train with (rebuilt when its settings changed)."""
    if ckpt is None:
        return [], {"epoch": 0, "value": None, "model": None}, scheduler
    try:
        ckpt.restore(model, optimizer, scheduler, scaler, shuffle, device)
    except CheckpointError as e:
        raise ConfigError(f"trainer.resume: {e}") from None
    for key, value, was in changed_settings(ckpt.config, now):
        log.info(
            "resuming with %s=%s (the checkpoint was trained with %s)", key, value, credentials.hide_passwords(str(was))
        )
    if ckpt.config:
        _apply_optimizer(optimizer, scheduler, ckpt.config.get("optimizer") or {}, now["optimizer"])
        scheduler = _apply_schedule(optimizer, scheduler, ckpt, now)
    return ckpt.history, ckpt.best, scheduler


def restore_ema(ckpt: Checkpoint | None, model, decay: float) -> EMA | None:
    """The weights' moving average for ``trainer.ema_decay`` (None when 0), as the checkpoint left
    it; a checkpoint written without one starts it from the weights it resumes with."""
    if decay <= 0:
        if ckpt is not None and ckpt.ema is not None:
            log.warning(
                "trainer.ema_decay=0: the checkpoint's moving average is dropped; epochs from here on are judged on "
                "the trained weights, the best so far (epoch %s) on the average",
                ckpt.best.get("epoch"),
            )
        return None
    ema = EMA(model, decay)
    if ckpt is not None and ckpt.ema is not None:
        try:
            ema.load_state_dict(ckpt.ema)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"trainer.resume: the checkpoint's EMA does not fit this model: {e}") from None
    elif ckpt is not None:
        log.warning(
            "trainer.ema_decay=%g: the moving average starts from the weights at epoch %d; the best so far (epoch %s) "
            "was judged on the trained weights",
            *(decay, ckpt.epoch, ckpt.best.get("epoch")),
        )
    return ema


def _apply_optimizer(optimizer, scheduler, then: dict[str, Any], now: dict[str, Any]) -> None:
    for key, value in now.items():
        if key in ("_target_", "lr") or then.get(key) == value:
            continue
        for group in optimizer.param_groups:
            group[key] = tuple(value) if isinstance(value, list) else value
    old, new = then.get("lr"), now.get("lr")
    if old and new is not None and new != old:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * new / old
            group["initial_lr"] = new
        scheduler.base_lrs = [new for _ in optimizer.param_groups]
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _apply_schedule(optimizer, scheduler, ckpt: Checkpoint, now: dict[str, Any]):
    """The scheduler for the epochs still to train, when its settings (or a cosine's T_max) changed."""
    then_cfg, now_cfg = ckpt.config.get("scheduler") or {}, now["scheduler"]
    if then_cfg == now_cfg:
        return scheduler
    cls = type(scheduler)
    args = {k: v for k, v in now_cfg.items() if k != "_target_"}
    epoch, total = ckpt.epoch, now["trainer"]["epochs"]
    past_warmup = isinstance(scheduler, WarmupCosineLR) and epoch >= args.get("warmup_epochs", 0)
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or past_warmup:
        # A cosine from the lr reached so far down to eta_min at the new end: the same shape,
        # never a jump back up (T_max counted from the start would raise the lr here).
        eta_min = args.get("eta_min", 0.0)
        last, base = (ckpt.history[-1]["lr"] if ckpt.history else None), (ckpt.config.get("optimizer") or {}).get("lr")
        for group in optimizer.param_groups:
            # A schedule that had reached its end (a finished run extended) goes on from the last
            # epoch's lr (times a new lr's factor): from eta_min the extra epochs would not train.
            if group["lr"] <= eta_min and last is not None and base:
                group["lr"] = last * group["initial_lr"] / base
            group["initial_lr"] = group["lr"]
        remaining = max(total - epoch, 1)
        rebuilt = (
            cls(optimizer, epochs=remaining, warmup_epochs=0, eta_min=eta_min)  # onecycle: its cosine part
            if past_warmup
            else cls(optimizer, T_max=remaining, eta_min=eta_min)
        )
        log.info(
            "cosine schedule: lr %.3g after epoch %d, down to %g at epoch %d", _lr(optimizer), epoch, eta_min, total
        )
        return rebuilt
    if not hasattr(cls, "_get_closed_form_lr"):
        raise ConfigError(f"trainer.resume: {cls.__name__} cannot be rebuilt at epoch {epoch} with {args}")
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    rebuilt = cls(optimizer, **args)
    rebuilt.last_epoch = epoch
    for group, lr in zip(optimizer.param_groups, rebuilt._get_closed_form_lr(), strict=True):
        group["lr"] = lr
    rebuilt._last_lr = [g["lr"] for g in optimizer.param_groups]
    log.info("%s rebuilt at epoch %d with %s: lr %.3g", cls.__name__, epoch, args, _lr(optimizer))
    return rebuilt


def _lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
