"""Train SketchCNN and log the run to MLflow.

    python -m sketchsweep.train                                  # the seed recipe on synthetic data
    python -m sketchsweep.train experiment=quickstart            # what `make demo` runs
    python -m sketchsweep.train data=quickdraw data.root=PATH model.width=128
    python -m sketchsweep.train -m optimizer=adam,sgd            # a Hydra multirun

``train`` is the recipe's table of contents: ``setup`` builds every piece from the config (one
object each, checked before anything is written), ``open_run`` prepares the MLflow run, ``fit`` is
the epoch loop and ``finish`` saves and reports what the run keeps. It returns the objective (``trainer.objective``
at the run's best epoch; in a sweep, the values of ``sweep.objectives``) for sweepers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sketchsweep import cli, credentials, deliver, engine, resume, store, tracking
from sketchsweep.checkpoint import Checkpoint, save_atomic
from sketchsweep.config import VAL_METRICS, Deliverables, check_sweep_keys, check_values, flatten, register_configs
from sketchsweep.data import Dataset, stratified_split
from sketchsweep.data.fingerprint import fingerprint
from sketchsweep.data.load import Placement, load_data
from sketchsweep.ema import EMA
from sketchsweep.model import SketchCNN, count_parameters
from sketchsweep.modelref import BEST_WEIGHTS, CHECKPOINT, CLASSES, CONFIG, FINAL_WEIGHTS, SPLIT
from sketchsweep.sweep.console import console_for, trial_name
from sketchsweep.sweep.link import TrialLink, objective_values
from sketchsweep.sweep.parent import PARENT_RUN_ENV

log = logging.getLogger("sketchsweep")


@dataclass
class Recipe:
    """Every piece of a run, built once by ``setup``."""

    cfg: DictConfig
    run_dir: Path
    resolved: dict[str, Any]  # the config as recorded: params, config.yaml, the checkpoint
    device: torch.device
    data: Dataset
    placement: Placement  # resident on the device, or streamed from disk
    splits: dict[str, np.ndarray]  # train/val/test rows of the data (split.npz)
    train_split: engine.View
    val_split: engine.View
    model: nn.Module  # weights are saved from here (a compiled wrapper prefixes their names)
    net: nn.Module  # what runs: the model, or torch.compile(model)
    num_parameters: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: engine.MixedPrecision
    shuffle: torch.Generator  # the data order; checkpointed with the run
    step: engine.Step  # augmentation, mixing, label smoothing and the EMA's update of a training step
    ema: EMA | None  # the weights' moving average (trainer.ema_decay): what is evaluated and kept
    history: list[dict[str, float]]  # every epoch's metrics so far (a resumed run's from its checkpoint)
    best: dict[str, Any]  # the best epoch by trainer.objective: epoch, value, model (its weights)
    resumed: Checkpoint | None
    link: TrialLink | None  # this job's Optuna trial, in a sweep


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> float | tuple[float, ...]:
    """Train per ``cfg``, writing the run's files to ``run_dir`` and logging to MLflow."""
    recipe = setup(cfg, Path(run_dir).resolve())
    try:
        run = open_run(recipe, overrides)
        # From here a signal waits for the write in progress (the run starts inside): see cli.Signals.
        with cli.held_signals() as signals, run, console_for(recipe.link):
            if recipe.link is not None:
                recipe.link.record_run(
                    run.id, tracking.run_url(run.uri, run.experiment_id, run.id), str(recipe.run_dir)
                )
            pruned_at = fit(recipe, run, signals)
            summary = finish(recipe, run, pruned_at, signals)
            outcome = summary | {"num_parameters": recipe.num_parameters}
            values = objective_values(cfg.sweep.objectives, recipe.best["value"], outcome)
            if recipe.link is not None and pruned_at is None:
                recipe.link.complete(values)  # recorded with the run: a signal from here on loses neither
            signals.settle()  # everything is written: a signal now no longer cuts the run
        if cfg.mlflow.register and recipe.link is None:  # a sweep registers its champion when it ends
            deliver.register_run(cfg, run.uri, run.id, float(recipe.best["value"]))
        if signals.pending is not None:
            log.warning("signal %d arrived after the run's last write: it is complete (FINISHED)", signals.pending)
            cli.hand_back(signals.pending)  # in a sweep: it stops before the next trial
        return values
    finally:
        recipe.placement.close()
        del recipe  # trials in one process must not pile up GPU memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- setup: every piece, built and checked before a run or a file is created ------------------


def setup(cfg: DictConfig, run_dir: Path) -> Recipe:
    t = cfg.trainer
    credentials.scrub_hydra_files(run_dir)  # Hydra copied the command line there, passwords included
    check_values(cfg)
    deliver.check_register(cfg.mlflow)
    link = TrialLink.of(cfg.sweep)
    if link is not None and t.resume is None and (earlier := link.earlier_checkpoint(run_dir)):
        log.warning("trial %d runs again (its job was requeued): resuming from %s", link.number, earlier)
        t.resume = str(earlier)  # so the run's params say so
    # As recorded (params, config.yaml, the checkpoint): passwords hidden; cfg keeps them for connecting.
    resolved = credentials.scrub(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    device = engine.pick_device(t.device.value)
    data = load_data(cfg.data, device)
    resumed = resume.load(t.resume, data, resolved)
    train_idx, val_idx, test_idx = stratified_split(
        data.labels, data.class_names, cfg.data.val_fraction, cfg.data.split_seed, cfg.data.test_fraction
    )
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    precision = engine.resolve_precision(t.precision.value, device)
    model = engine.prepare_model(SketchCNN(len(data.class_names), **cfg.model), device, precision)
    fused = engine.optimizer_options(cfg.optimizer._target_, device)
    optimizer = instantiate(cfg.optimizer, params=model.parameters(), **fused)
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer)
    history, best, scheduler = resume.restore(
        resumed, resolved, model, optimizer, scheduler, precision.scaler, shuffle, device
    )
    ema = resume.restore_ema(resumed, model, t.ema_decay)
    placement = Placement(data, device, cfg.data.stream_order.value)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(
        cfg=cfg,
        run_dir=run_dir,
        resolved=resolved,
        device=device,
        data=data,
        placement=placement,
        splits={"train": train_idx, "val": val_idx, "test": test_idx},
        train_split=placement.split(train_idx),
        val_split=placement.split(val_idx),
        model=model,
        net=torch.compile(model) if t.compile else model,
        num_parameters=count_parameters(model),
        optimizer=optimizer,
        scheduler=scheduler,
        precision=precision,
        shuffle=shuffle,
        step=_setup_step(cfg, ema),
        ema=ema,
        history=history,
        best=best,
        resumed=resumed,
        link=link,
    )
    (run_dir / CONFIG).write_text(OmegaConf.to_yaml(recipe.resolved))
    (run_dir / CLASSES).write_text(json.dumps(data.class_names, indent=1) + "\n")
    np.savez_compressed(run_dir / SPLIT, **recipe.splits, **fingerprint(data))  # row indices; what the files held
    return recipe


def _setup_step(cfg: DictConfig, ema: EMA | None) -> engine.Step:
    aug, mix = cfg.data.augment, cfg.data.mix
    augment = functools.partial(
        engine.random_affine, degrees=aug.degrees, scale=tuple(aug.scale), translate=aug.translate, hflip=aug.hflip
    )
    mixing = functools.partial(engine.mix_batch, **{k: mix[k] for k in ("mixup_alpha", "cutmix_alpha", "switch_prob")})
    return engine.Step(
        augment=augment if aug.enabled else None,
        mix=mixing if mix.mixup_alpha > 0 or mix.cutmix_alpha > 0 else None,
        mix_prob=mix.prob,
        label_smoothing=cfg.trainer.label_smoothing,
        after_update=ema.update if ema is not None else None,
    )


# -- the MLflow run ----------------------------------------------------------------------------


def open_run(r: Recipe, overrides: list[str] | tuple[str, ...]) -> tracking.Run:
    """The run's MLflow run, to start with ``with``: its experiment, name, params (the whole
    resolved config), tags and parent."""
    cfg, sw = r.cfg, r.cfg.sweep
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = tracking.setup_experiment(uri, cfg.mlflow.experiment_name, cfg.mlflow.artifact_root)
    if r.resumed is not None:
        resume.close_previous(uri, r.resumed)
    parent = sw.parent_run_id or os.environ.get(PARENT_RUN_ENV)
    tags = {
        **({"mlflow.parentRunId": parent} if parent else {}),
        **({"optuna.study": sw.study_name, "optuna.trial": str(sw.trial_number)} if r.link else {}),
        **tracking.git_state(),
        **tracking.device_tags(r.device),
        **store.process_tags(),
        "hydra.overrides": credentials.hide_passwords(" ".join(overrides)),
        "sketchsweep.run_dir": str(r.run_dir),
        "num_parameters": str(r.num_parameters),
    }
    if r.resumed is not None:
        tags["sketchsweep.resumed_from"] = str(Path(cfg.trainer.resume).resolve())
        tags["sketchsweep.resumed_at_epoch"] = str(len(r.history))
        tags["sketchsweep.resumed_from_run"] = str(r.resumed.mlflow_run_id)
    (log.info if r.link is None else log.debug)(  # a sweep prints one line per trial itself
        "%d classes, %d train / %d val images, %s, SketchCNN width %d (%s parameters)",
        *(len(r.data.class_names), len(r.splits["train"]), len(r.splits["val"]), r.device, cfg.model.width),
        f"{r.num_parameters:,}",
    )
    name = trial_name(sw.trial_number, r.link.params) if r.link else tracking.run_name(overrides)
    # sweep.* only says how a job reaches its trial: not a param (the trial's tags name the study and trial)
    params = {k: v for k, v in flatten(r.resolved).items() if not k.startswith("sweep.")}
    return tracking.Run(uri, experiment_id, name, params, tags)


# -- fit: the epoch loop -----------------------------------------------------------------------


def fit(r: Recipe, run: tracking.Run, signals: cli.Signals) -> int | None:
    """Train, evaluate, checkpoint and log every epoch; in a sweep, report to the pruner. Returns
    the epoch a pruned trial stopped after (None: every epoch ran)."""
    t = r.cfg.trainer
    objective = t.objective.value
    objectives = list(r.cfg.sweep.objectives or [])
    for epoch, metrics in enumerate(r.history, start=1):  # a resumed run carries the whole curve
        run.log_metrics(metrics, step=epoch)
    for epoch in range(len(r.history) + 1, t.epochs + 1):
        lr = r.optimizer.param_groups[0]["lr"]
        # A signal stops the compute at once; from here to the next epoch it waits for the writes.
        with (
            signals.interruptible(),
            cli.progress_bar(len(r.train_split), t.batch_size, f"epoch {epoch}/{t.epochs}") as on_step,
        ):
            metrics = engine.train_one_epoch(
                r.net, r.train_split, r.optimizer, t.batch_size, r.shuffle, on_step, r.step, r.precision
            )
            if not math.isfinite(metrics["train_loss"]):
                raise FloatingPointError(f"training loss is {metrics['train_loss']} at epoch {epoch} (lr {lr:g})")
            evaluated = time.perf_counter()
            judged = r.ema.model if r.ema is not None else r.net
            metrics |= engine.evaluate(judged, r.val_split, t.eval_batch_size, precision=r.precision)
            metrics["val_seconds"] = time.perf_counter() - evaluated  # with epoch_seconds: the epoch's compute
        metrics["lr"] = lr
        r.scheduler.step()
        r.history.append(metrics)
        if is_better(metrics[objective], r.best["value"], objective):
            weights = {k: v.detach().to("cpu", copy=True) for k, v in kept_model(r).state_dict().items()}
            r.best = {"epoch": epoch, "value": metrics[objective], "model": weights}
        ckpt = Checkpoint.capture(
            *(r.model, r.optimizer, r.scheduler, r.precision.scaler, r.shuffle, r.device),
            epoch=epoch,
            class_names=r.data.class_names,
            history=r.history,
            best=r.best,
            config=r.resolved,
            mlflow_run_id=run.id,
            ema=r.ema.state_dict() if r.ema is not None else None,
        )
        ckpt.save(r.run_dir / CHECKPOINT)
        run.log_metrics(metrics, step=epoch)
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("train_loss", "train_acc", *VAL_METRICS))
        log.info(
            "epoch %d/%d  %s  lr %.2e  %.1fs  %.0f img/s",
            *(epoch, t.epochs, shown, lr, metrics["epoch_seconds"], metrics["train_images_per_sec"]),
        )
        watched = objectives[0] if objectives and objectives[0] in metrics else objective
        if r.link is not None and r.link.report(metrics[watched], epoch, last=epoch == t.epochs):
            log.info("trial %d pruned after epoch %d (%s %.4f)", r.link.number, epoch, watched, metrics[watched])
            run.set_tags({"pruned": "true", "pruned_at_epoch": str(epoch)})
            return epoch
    return None


def kept_model(r: Recipe) -> nn.Module:
    """Whose weights the run keeps: the EMA of the weights when there is one, else the model."""
    return r.ema.model if r.ema is not None else r.model


def is_better(value: float, best: float | None, objective: str) -> bool:
    if best is None:
        return True
    return value < best if objective == "val_loss" else value > best


# -- finish: what the run keeps ----------------------------------------------------------------


def finish(r: Recipe, run: tracking.Run, pruned_at: int | None, signals: cli.Signals) -> dict[str, float]:
    """Save the last and best epochs' weights, score the test split once with the kept (best)
    weights, log the summary and files, and for a run that was not pruned its evaluation and
    models. A signal cuts the scoring and exports (the run is KILLED, resumable from its
    checkpoint); it waits for the writes. Returns the summary metrics."""
    t, history, best = r.cfg.trainer, r.history, r.best
    final, at_best = history[-1], history[best["epoch"] - 1]
    summary = {"best_epoch": best["epoch"]}
    # (an epoch from before val_ece was measured, resumed, has no val_ece)
    summary |= {f"best_{k}": at_best[k] for k in VAL_METRICS if k in at_best}
    summary |= {f"final_{k}": final[k] for k in VAL_METRICS if k in final}
    save_atomic(kept_model(r).state_dict(), r.run_dir / FINAL_WEIGHTS)
    save_atomic(best["model"], r.run_dir / BEST_WEIGHTS)
    r.model.load_state_dict(best["model"])
    calibrate, temperature, test = t.calibrate and pruned_at is None, 1.0, {}
    with signals.interruptible():
        if calibrate:
            temperature = test["temperature"] = deliver.fit_run_temperature(
                r.net, r.val_split, t.eval_batch_size, r.precision
            )
        if len(r.splits["test"]):
            held_out = r.placement.split(r.splits["test"])
            test |= engine.evaluate(r.net, held_out, t.eval_batch_size, "test", r.precision, temperature)
            log.info("test (best epoch's weights): %s", "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
    summary |= test
    lean = r.link is not None and r.cfg.sweep.deliverables != Deliverables.all
    if r.link is not None:
        summary["pruned"] = float(pruned_at is not None)  # a column to sort the trials by
    run.log_metrics(summary, step=t.epochs)
    # A lean trial keeps what it trained with and its best weights; the sweep ships its best trials
    # when it ends (sketchsweep.deliver). The resumable checkpoint stays in the run folder.
    kept = (
        (CONFIG, CLASSES, SPLIT, BEST_WEIGHTS)
        if lean
        else (CONFIG, CLASSES, SPLIT, FINAL_WEIGHTS, BEST_WEIGHTS, CHECKPOINT)
    )
    run.log_files([r.run_dir / n for n in kept])
    if r.link is not None:
        run.set_tags({"optuna.state": "PRUNED" if pruned_at is not None else "COMPLETE"})
        if pruned_at is not None:
            r.link.mark_pruned()
    if pruned_at is None and not lean:  # what a researcher looks at and ships: only for runs that finished
        deliver.log_deliverables(shipment(r, temperature), run, r.cfg.mlflow, signals.interruptible)
        if r.link is not None:  # sweep.deliverables=all: the study does not make them again
            run.set_tags({deliver.MADE: "made"})
    log.info(
        "val_acc %.4f (last epoch); best %.4f at epoch %d, which the objective %s=%.4f comes from",
        *(final["val_acc"], at_best["val_acc"], best["epoch"], t.objective.value, best["value"]),
    )
    # A sweep prints one line per trial itself.
    run.say_where(r.run_dir, r.cfg.mlflow.experiment_name, log.info if r.link is None else log.debug)
    run.log_files([r.run_dir / ".hydra", r.run_dir / "train.log"])  # last, so the log is complete
    return summary


def shipment(r: Recipe, temperature: float) -> deliver.Shipment:
    """What the run's deliverables are made from: its model (holding the best epoch's weights now)."""
    val_idx = r.splits["val"]
    rows = r.placement.rows(val_idx) if len(val_idx) else None
    example = np.ascontiguousarray(r.data.images[val_idx[:64]])  # real drawings, for signatures and parity
    made_from = (r.model, r.data.class_names, r.resolved, r.run_dir, rows, example, r.device, r.precision)
    return deliver.Shipment(*made_from, temperature)


# -- the command -------------------------------------------------------------------------------

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    cli.stop_on_sigterm_in_a_job()
    try:
        credentials.scrub_hydra_files(run_dir)  # before anything can stop the run: Hydra wrote the command line there
        check_sweep_keys(cfg, hc.mode == RunMode.MULTIRUN and "sketchsweep_optuna" in str(hc.sweeper.get("_target_")))
        return train(cfg, run_dir, list(hc.overrides.task))
    except Exception as e:
        if isinstance(e, cli.UserError) and hc.mode != RunMode.MULTIRUN:
            log.error("%s", cli.message(e))
            sys.exit(cli.BAD_INPUT)
        # The sweeper keeps a failed trial's exception: drop its frames' locals (model, optimizer,
        # data on the GPU) so the next trial starts with the memory free.
        traceback.clear_frames(e.__traceback__)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
    except KeyboardInterrupt:
        ckpt = run_dir / CHECKPOINT
        if cfg.sweep.trial_number is not None:
            pass  # an Optuna trial: the sweep says how to go on (its command again), not trainer.resume
        elif ckpt.exists():
            log.warning("interrupted; the last completed epoch is in %s; continue with trainer.resume=%s", ckpt, ckpt)
        else:
            log.warning("interrupted before the first epoch completed; no checkpoint was written")
        sys.exit(cli.INTERRUPTED)


if __name__ == "__main__":
    cli.run_and_exit(main)
