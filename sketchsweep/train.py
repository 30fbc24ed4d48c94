"""Train SketchCNN and log the run to MLflow.

    python -m sketchsweep.train                                  # the seed recipe on synthetic data
    python -m sketchsweep.train experiment=quickstart            # what `make demo` runs
    python -m sketchsweep.train data=quickdraw data.root=PATH model.width=128
    python -m sketchsweep.train -m optimizer=adam,sgd            # a Hydra multirun

Returns the objective (``trainer.objective`` at the run's best epoch) so sweepers can use it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sketchsweep import tracking
from sketchsweep.checkpoint import BEST_WEIGHTS, CHECKPOINT, FINAL_WEIGHTS
from sketchsweep.config import PROJECT_ROOT, DataSource, register_configs
from sketchsweep.data import DataError, Dataset, load_folder, stratified_split, write_synthetic
from sketchsweep.data.folder import class_labels, open_class_file, select_files
from sketchsweep.data.stream import RowReader, StreamingSplit
from sketchsweep.data.synthetic import cache_folder
from sketchsweep.engine import (
    Split,
    evaluate,
    optimizer_options,
    prepare_model,
    random_affine,
    resolve_precision,
    to_input,
    train_one_epoch,
)
from sketchsweep.model import SketchCNN, count_parameters

log = logging.getLogger("sketchsweep")

# checkpoint.pt: resumable (model, optimizer, scheduler, scaler, epoch, RNG, history, best);
# model_weights.pth: the last epoch's state_dict, as the seed saved it; best_model_weights.pth:
# the best epoch's (by trainer.objective). sketchsweep.checkpoint loads a model from any of them.
VAL_METRICS = ("val_loss", "val_acc", "val_top3")
# What a sweep may optimize: best-epoch values, last-epoch values, and the model's size.
SWEEP_OBJECTIVES = (*VAL_METRICS, *(f"final_{k}" for k in VAL_METRICS), "best_epoch", "num_parameters")
TEST_METRICS = ("test_loss", "test_acc", "test_top3")


class ConfigError(ValueError):
    """A config value that composes but cannot be used (e.g. a bad trainer.resume path)."""


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda: no CUDA device is available (use trainer.device=auto or cpu)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def load_data(cfg: DictConfig, device: torch.device) -> Dataset:
    """Read (and for synthetic data, first generate) the dataset; every problem is a DataError.

    Data within ``data.max_memory_gb`` is loaded whole (and later moved to the device); larger
    data stays on disk and is streamed (``Dataset.images`` is then a ``RowReader``)."""
    if cfg.source == DataSource.synthetic:
        s = cfg.synthetic
        folder = write_synthetic(synthetic_folder(cfg), **s)
    else:
        if not cfg.root:
            raise DataError("data.root: not set; expected data.root=PATH, a folder with one <class>.npy per class")
        folder = Path(cfg.root).expanduser()
    classes = list(cfg.classes) if cfg.classes else None
    files = select_files(folder, classes, cfg.max_per_class)
    counts = [min(len(open_class_file(p)), cfg.max_per_class or sys.maxsize) for p in files.values()]
    size, budget = sum(counts) * 784, memory_budget(cfg.max_memory_gb, device)
    if size <= budget:
        return load_folder(folder, classes, cfg.max_per_class)
    log.info(
        "data is %.2f GB, over the %.2f GB budget (data.max_memory_gb): streaming from disk", size / 1e9, budget / 1e9
    )
    reader = RowReader(list(files.values()), cfg.max_per_class)
    return Dataset(reader, class_labels(reader.counts), list(files))  # type: ignore[arg-type]


def synthetic_folder(data_cfg) -> Path:
    """The cache folder of ``data=synthetic`` (a config node or its dict): under ``data.root``,
    else ``<project>/data/synthetic``."""
    s = data_cfg.get("synthetic") or {}
    root = data_cfg.get("root") or PROJECT_ROOT / "data" / "synthetic"
    return cache_folder(root, s.get("num_classes"), s.get("per_class"), s.get("seed"))


def memory_budget(max_memory_gb: float | None, device: torch.device) -> float:
    """Bytes of images to hold in memory: data.max_memory_gb, or half the RAM (and, on a GPU,
    at most half its memory, since resident data is moved there)."""
    if max_memory_gb is not None:
        return max_memory_gb * 1e9
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory / 2)
    return budget


def load_checkpoint(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"trainer.resume: {p} does not exist; expected a {CHECKPOINT} from an earlier run")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"trainer.resume: {p} cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "epoch" not in ckpt or "model" not in ckpt:
        raise ConfigError(f"trainer.resume: {p} is not a sketchsweep {CHECKPOINT} (no model/epoch entries)")
    return ckpt


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary name, then rename: a kill mid-write never corrupts the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Signals:
    """SIGTERM (kill, SLURM preemption) and Ctrl-C end a run as a ``KeyboardInterrupt``, but only
    where that is safe: at once during an epoch's compute (``interruptible()``), otherwise once the
    write in progress is done (``check()``). An interrupt inside MLflow's SQLite writes would leave
    the store locked, so the run could not even be marked KILLED. A second signal stops at once."""

    def __init__(self) -> None:
        self.open, self.pending = False, None

    def handle(self, signum, frame) -> None:
        if self.open or self.pending is not None:
            self.pending = None
            raise KeyboardInterrupt(f"signal {signum}")
        self.pending = signum
        log.warning("signal %d: stopping after the checkpoint and log writes in progress (again: stop now)", signum)

    def check(self) -> None:
        """Raise the ``KeyboardInterrupt`` a signal held back during writes."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self.open = True
        try:
            yield
        finally:
            self.open = False


@contextlib.contextmanager
def held_signals() -> Iterator[Signals]:
    """Route SIGTERM and SIGINT through a ``Signals`` for the duration (main thread only)."""
    signals = Signals()
    try:
        old = {s: signal.signal(s, signals.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        signals.open = True
        yield signals
        return
    try:
        yield signals
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    signals.check()  # held through the last writes: it still stops whatever comes next


def warn_config_changes(before: dict[str, Any], now: dict[str, Any]) -> None:
    """Resuming uses the config given now; say which settings differ from the checkpoint's,
    since a changed recipe means the result is no longer one uninterrupted run."""
    ignore = ("trainer.resume", "trainer.epochs", "mlflow.")
    a, b = tracking.flatten(before), tracking.flatten(now)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith(ignore))
    for k in changed:
        log.warning("resuming with %s=%s; the checkpoint was trained with %s", k, b.get(k), a.get(k))


def is_better(value: float, best: float | None, objective: str) -> bool:
    if best is None:
        return True
    return value < best if objective == "val_loss" else value > best


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> float:
    """Train per ``cfg``, writing checkpoints to ``run_dir`` and logging to MLflow.
    Returns ``trainer.objective`` at the best epoch."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.trainer
    objective = t.objective.value

    # Everything that can be wrong with the input is checked before a run or file is created.
    if t.epochs < 1 or t.batch_size < 2 or t.eval_batch_size < 1:
        raise ConfigError(
            f"trainer: expected epochs >= 1, batch_size >= 2, eval_batch_size >= 1; got epochs={t.epochs}, "
            f"batch_size={t.batch_size}, eval_batch_size={t.eval_batch_size}"
        )
    device = pick_device(t.device.value)
    data = load_data(cfg.data, device)
    ckpt = load_checkpoint(t.resume) if t.resume else None
    if ckpt is not None and ckpt.get("class_names") != data.class_names:
        raise ConfigError(
            f"trainer.resume: the checkpoint's classes {ckpt.get('class_names')} differ from the data's "
            f"{data.class_names}; resume with the data config it was trained on"
        )
    objectives = list(cfg.sweep.objectives or [])
    unknown = [o for o in objectives if o not in SWEEP_OBJECTIVES]
    if unknown:
        raise ConfigError(f"sweep objective(s) {unknown} unknown; expected some of {list(SWEEP_OBJECTIVES)}")
    train_idx, val_idx, test_idx = stratified_split(
        data.labels, data.class_names, cfg.data.val_fraction, cfg.data.split_seed, cfg.data.test_fraction
    )

    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)  # data order; checkpointed with the run
    precision = resolve_precision(t.precision.value, device)
    model = prepare_model(SketchCNN(len(data.class_names), **cfg.model), device, precision)
    optimizer = instantiate(
        cfg.optimizer, params=model.parameters(), **optimizer_options(cfg.optimizer._target_, device)
    )
    # Compiled or not, weights are saved from `model` (a compiled wrapper prefixes their names).
    net = torch.compile(model) if t.compile else model
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": 0, "value": None, "model": None}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ConfigError(f"trainer.resume: the checkpoint does not fit this model config: {e}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        shuffle.set_state(ckpt["rng"]["shuffle"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        if precision.scaler is not None and ckpt.get("scaler"):
            precision.scaler.load_state_dict(ckpt["scaler"])  # fp16: keep the loss scale it had found
        history, best = ckpt["history"], ckpt["best"]
    start_epoch = len(history)

    if not isinstance(data.images, RowReader):  # resident: one copy on the device, splits index it
        images, labels = torch.from_numpy(data.images).to(device), torch.from_numpy(data.labels).to(device)

    def to_device(idx: np.ndarray) -> Split | StreamingSplit:
        if isinstance(data.images, RowReader):
            return StreamingSplit(data.images, data.labels, idx, device, order=cfg.data.stream_order.value)
        return Split(images, labels, torch.from_numpy(idx).to(device))

    train_split, val_split = to_device(train_idx), to_device(val_idx)

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    (run_dir / "classes.json").write_text(json.dumps(data.class_names, indent=1) + "\n")
    # Indices into the loaded data (classes in sorted order, rows in file order).
    np.savez_compressed(run_dir / "split.npz", train=train_idx, val=val_idx, test=test_idx)
    aug = cfg.data.augment
    augment = None
    if aug.enabled:
        augment = functools.partial(
            random_affine, degrees=aug.degrees, scale=tuple(aug.scale), translate=aug.translate, hflip=aug.hflip
        )

    if ckpt is not None:
        warn_config_changes(ckpt.get("config", {}), resolved)

    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = tracking.setup_experiment(uri, cfg.mlflow.experiment_name, cfg.mlflow.artifact_root)
    link, name, sw = None, tracking.run_name(list(overrides)), cfg.sweep
    if sw.trial_number is not None:
        from sketchsweep.trial import TrialLink  # optuna is only needed inside a sweep

        link = TrialLink(sw.study_name, sw.storage, sw.trial_number, sw.pruner, sw.pruner_kwargs)
        name = f"trial-{sw.trial_number}"
    parent = sw.parent_run_id or os.environ.get(tracking.PARENT_RUN_ENV)
    tags = {
        **({"mlflow.parentRunId": parent} if parent else {}),
        **({"optuna.study": sw.study_name, "optuna.trial": str(sw.trial_number)} if link else {}),
        **tracking.git_state(),
        **tracking.device_tags(device),
        "hydra.overrides": " ".join(overrides),
        "sketchsweep.run_dir": str(run_dir),
        "num_parameters": str(count_parameters(model)),
    }
    if ckpt is not None:
        tags |= {
            "sketchsweep.resumed_from": str(Path(t.resume).resolve()),
            "sketchsweep.resumed_at_epoch": str(start_epoch),
        }
        tags["sketchsweep.resumed_from_run"] = str(ckpt.get("mlflow_run_id"))
    log.info(
        "%d classes, %d train / %d val images, %s, SketchCNN width %d (%s parameters)",
        len(data.class_names),
        len(train_idx),
        len(val_idx),
        device,
        cfg.model.width,
        f"{count_parameters(model):,}",
    )

    with (
        held_signals() as signals,
        tracking.Run(uri, experiment_id, name, tracking.flatten(resolved), tags) as run,
    ):
        for epoch, metrics in enumerate(history, start=1):  # a resumed run carries the whole curve
            run.log_metrics(metrics, step=epoch)
        pruned_at = None
        for epoch in range(start_epoch + 1, t.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            # A signal stops the compute at once; from here to the next epoch it waits for the writes.
            with (
                signals.interruptible(),
                progress_bar(len(train_split), t.batch_size, f"epoch {epoch}/{t.epochs}") as on_step,
            ):
                metrics = train_one_epoch(
                    net, train_split, optimizer, t.batch_size, shuffle, on_step, augment, precision
                )
                if not math.isfinite(metrics["train_loss"]):
                    raise FloatingPointError(f"training loss is {metrics['train_loss']} at epoch {epoch} (lr {lr:g})")
                metrics |= evaluate(net, val_split, t.eval_batch_size, precision=precision)
            metrics["lr"] = lr
            scheduler.step()
            history.append(metrics)
            if is_better(metrics[objective], best["value"], objective):
                weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best = {"epoch": epoch, "value": metrics[objective], "model": weights}
            rng = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": precision.scaler.state_dict() if precision.scaler is not None else None,
                    "epoch": epoch,
                    "rng": rng,
                    "history": history,
                    "best": best,
                    "class_names": data.class_names,
                    "config": resolved,
                    "mlflow_run_id": run.id,
                },
                run_dir / CHECKPOINT,
            )
            run.log_metrics(metrics, step=epoch)
            shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("train_loss", "train_acc", *VAL_METRICS))
            log.info(
                "epoch %d/%d  %s  lr %.2e  %.1fs  %.0f img/s",
                *(epoch, t.epochs, shown, lr, metrics["epoch_seconds"], metrics["train_images_per_sec"]),
            )
            watched = objectives[0] if objectives and objectives[0] in metrics else objective
            if link is not None and epoch < t.epochs and link.report(metrics[watched], epoch):
                pruned_at = epoch
                log.info("trial %d pruned after epoch %d (%s %.4f)", link.number, epoch, watched, metrics[watched])
                run.set_tags({"pruned": "true", "pruned_at_epoch": str(epoch)})
                break

        final, at_best = history[-1], history[best["epoch"] - 1]
        summary = {"best_epoch": best["epoch"]}
        summary |= {f"best_{k}": at_best[k] for k in VAL_METRICS} | {f"final_{k}": final[k] for k in VAL_METRICS}
        torch.save(model.state_dict(), run_dir / FINAL_WEIGHTS)
        torch.save(best["model"], run_dir / BEST_WEIGHTS)
        model.load_state_dict(best["model"])
        if len(test_idx):  # scored once, with the weights the run keeps
            summary |= evaluate(net, to_device(test_idx), t.eval_batch_size, prefix="test", precision=precision)
            log.info("test (best epoch's weights): %s", "  ".join(f"{k} {summary[k]:.4f}" for k in TEST_METRICS))
        run.log_metrics(summary, step=t.epochs)
        run.log_files(
            [run_dir / n for n in ("config.yaml", "classes.json", "split.npz", FINAL_WEIGHTS, BEST_WEIGHTS, CHECKPOINT)]
        )
        if link is not None:
            run.set_tags({"optuna.state": "PRUNED" if pruned_at is not None else "COMPLETE"})
        if pruned_at is not None:
            link.mark_pruned()
        else:  # what a researcher looks at and ships: only for runs that finished
            source = data.images if isinstance(data.images, RowReader) else images
            log_deliverables(cfg, resolved, run, model, source, data, val_idx, run_dir, precision)
        log.info(
            "val_acc %.4f (last epoch); best %.4f at epoch %d, which the objective %s=%.4f comes from",
            final["val_acc"],
            at_best["val_acc"],
            best["epoch"],
            objective,
            best["value"],
        )
        log.info("run folder: %s", run_dir)
        log.info("MLflow run %s in experiment '%s' at %s", run.id, cfg.mlflow.experiment_name, uri)
        log.info("open the MLflow UI: make ui   (or: mlflow ui --backend-store-uri %s)", uri)
        run.log_files([run_dir / ".hydra", run_dir / "train.log"])  # last, so the log is complete
    if isinstance(data.images, RowReader):
        data.images.close()
    if device.type == "cuda":  # trials in one process must not pile up GPU memory
        del model, net, optimizer, train_split, val_split
        torch.cuda.empty_cache()
    if objectives:
        outcome = {k: at_best[k] for k in VAL_METRICS} | summary | {"num_parameters": float(tags["num_parameters"])}
        values = tuple(float(outcome[o]) for o in objectives)
        return values[0] if len(values) == 1 else values
    return float(best["value"])


def log_deliverables(
    cfg, resolved: dict, run, model, source, data: Dataset, val_idx: np.ndarray, run_dir: Path, precision
) -> None:
    """The evaluation artifacts, the PyTorch model and the ONNX export of the kept (best-epoch)
    weights, each as configured under ``mlflow.*``. A failed ONNX parity check fails the run: the
    weights and checkpoint are already saved and logged by then, so nothing is lost."""
    device = next(model.parameters()).device
    if cfg.mlflow.log_evaluation and len(val_idx):
        from sketchsweep.evaluate import Rows, evaluation_artifacts

        out = run_dir / "evaluation"
        metrics = evaluation_artifacts(
            model, Rows(source, val_idx), data.labels[val_idx], data.class_names, out,
            cfg.trainer.eval_batch_size, device, precision,
        )  # fmt: skip
        run.log_metrics(metrics, step=cfg.trainer.epochs)
        run.log_files([out])
    example = np.ascontiguousarray(data.images[val_idx[:64]])  # real drawings, for signatures and parity
    model = model.cpu().eval()
    if cfg.mlflow.log_model:
        run.log_model(model, to_input_numpy(example[:2]))
    if cfg.mlflow.log_onnx:
        from sketchsweep.checkpoint import TrainedModel
        from sketchsweep.export import export_onnx

        trained = TrainedModel(model, data.class_names, resolved, run.id, str(run_dir))  # type: ignore[arg-type]
        report = export_onnx(trained, run_dir / "model.onnx", real_images=example)
        log.info(
            "model.onnx: ONNX Runtime matches PyTorch on %d inputs (max |logit diff| %.1e)",
            report.num_checked,
            report.max_abs_diff,
        )
        run.log_metrics({"onnx_max_abs_diff": report.max_abs_diff}, step=cfg.trainer.epochs)
        run.log_onnx(report.path, example[:2].reshape(-1, 28, 28))


def to_input_numpy(images: np.ndarray) -> np.ndarray:
    """The model's input for uint8 rows, as a NumPy example for MLflow's signature."""
    return to_input(torch.from_numpy(np.ascontiguousarray(images))).numpy()


@contextlib.contextmanager
def progress_bar(n_images: int, batch_size: int, desc: str) -> Iterator[Any]:
    """A tqdm bar when stderr is a terminal; nothing otherwise (CI and SLURM logs get one
    line per epoch instead of thousands of carriage returns)."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=math.ceil(n_images / batch_size), desc=desc, unit="batch", leave=False) as bar:
        yield bar.update


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        return train(cfg, run_dir, list(hc.overrides.task))
    except (DataError, ConfigError, tracking.TrackingError) as e:
        if hc.mode == RunMode.MULTIRUN:
            raise  # let the sweeper record this job as failed
        log.error("%s", e)
        sys.exit(2)
    except Exception as e:
        # The sweeper keeps the exception of a failed trial; drop the frames' locals (model,
        # optimizer, data on the GPU) so the next trial starts with the memory free.
        traceback.clear_frames(e.__traceback__)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
    except KeyboardInterrupt:
        ckpt = run_dir / CHECKPOINT
        if ckpt.exists():
            log.warning("interrupted; the last completed epoch is in %s; continue with trainer.resume=%s", ckpt, ckpt)
        else:
            log.warning("interrupted before the first epoch completed; no checkpoint was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
