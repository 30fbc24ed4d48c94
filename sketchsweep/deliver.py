"""What a finished run ships beside its weights: the evaluation artifacts on its validation split,
the PyTorch model and the ONNX export of its best epoch, each as ``mlflow.log_*`` configures.

A single run makes them as it ends (``sketchsweep.train``). In an Optuna sweep the trials stay lean
(params, metrics, config, best weights) and the sweep makes them once it ends, for its best trials
only (``sweep.deliverables``), from each trial's run folder into its finished MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from sketchsweep import engine, registry, tracking
from sketchsweep.calibration import at_bound, fit_temperature
from sketchsweep.checkpoint import TrainedModel, load_trained
from sketchsweep.cli import one_line
from sketchsweep.config import ConfigError, saved_data_config
from sketchsweep.data.fingerprint import changes, saved_record
from sketchsweep.data.load import load_data
from sketchsweep.data.views import Rows
from sketchsweep.modelref import BEST_WEIGHTS, CLASSES, CONFIG, ONNX, SPLIT, ModelRef
from sketchsweep.store import fetch_run_files

log = logging.getLogger("sketchsweep")

MADE = "sketchsweep.deliverables"  # a sweep trial's tag once its deliverables are logged ("made")
CHAMPION = "champion"  # the alias a study's best model (or a registered single run) takes


@dataclass
class Shipment:
    """A trained model and what its deliverables are made from."""

    model: nn.Module  # the best epoch's weights
    class_names: list[str]
    resolved: dict[str, Any]  # the run's config, as recorded
    run_dir: Path
    val_rows: Rows | None  # the validation split, for the evaluation artifacts (None: none)
    example: np.ndarray  # real drawings, uint8 (N, 784): signatures and the ONNX parity check
    device: torch.device
    precision: engine.MixedPrecision
    temperature: float = 1.0  # trainer.calibrate's, folded into the ONNX export (1: not calibrated)


def fit_run_temperature(model: nn.Module, rows: Rows | None, batch_size: int, precision) -> float:
    """``trainer.calibrate``: the temperature of ``model``'s logits on the validation ``rows``; 1
    (with a warning) where none fits: no rows, or every drawing right by wide margins."""
    if rows is None or not len(rows):
        log.warning("trainer.calibrate: no validation split to fit a temperature on: not calibrated")
        return 1.0
    temperature = fit_temperature(*engine.all_logits(model, rows, batch_size, precision))
    if at_bound(temperature):
        log.warning("trainer.calibrate: no temperature fits the validation split (T=%.3g): not calibrated", temperature)
        return 1.0
    return temperature


def log_deliverables(
    s: Shipment,
    run: tracking.Run,
    mlflow_cfg,
    interruptible: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> None:
    """The evaluation artifacts, the PyTorch model and the ONNX export of ``s.model``, each as
    ``mlflow_cfg`` (``mlflow.*``) says. A failed ONNX parity check raises (fails a run: its weights
    and checkpoint are saved and logged by then, so nothing is lost). ``interruptible``: where a
    signal may cut the work at once (the slow parts)."""
    m, step = mlflow_cfg, int(s.resolved["trainer"]["epochs"])
    if m.log_evaluation and s.val_rows is not None and len(s.val_rows):
        from sketchsweep.evaluation import evaluation_artifacts  # matplotlib: only where plots are made

        out = s.run_dir / "evaluation"
        with interruptible():
            metrics = evaluation_artifacts(
                s.model, s.val_rows, None, s.class_names, out, s.resolved["trainer"]["eval_batch_size"], s.device,
                s.precision,
            )  # fmt: skip
        run.log_metrics(metrics, step=step)
        run.log_files([out])
    model = s.model.cpu().eval()
    if m.log_model:
        run.log_model(model, engine.to_input(torch.from_numpy(s.example[:2])).numpy())
    if m.log_onnx:
        from sketchsweep.onnx_export import export_onnx  # onnx and onnxscript: only where a model is exported

        trained = TrainedModel(model, s.class_names, s.resolved, run.id, str(s.run_dir))  # type: ignore[arg-type]
        with interruptible():
            report = export_onnx(trained, s.run_dir / ONNX, real_images=s.example, temperature=s.temperature)
        log.info(
            "model.onnx: ONNX Runtime matches PyTorch on %d inputs (max |logit diff| %.1e)",
            *(report.num_checked, report.max_abs_diff),
        )
        run.log_metrics({"onnx_max_abs_diff": report.max_abs_diff}, step=step)
        run.log_onnx(report.path, s.example[:2].reshape(-1, 28, 28))


@contextlib.contextmanager
def from_folder(run_dir: Path, run_id: str | None = None, uri: str | None = None) -> Iterator[Shipment]:
    """A finished run's shipment, from its folder: the best epoch's weights, and its validation
    split read again from its data (none when the data changed since: no evaluation then). A
    folder this machine does not have (a trial another worker trained) is read from the run's
    MLflow artifacts (``run_id`` in the store at ``uri``)."""
    with contextlib.ExitStack() as stack:
        if not run_dir.is_dir() and run_id is not None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sketchsweep-ship-")))
            fetch_run_files(ModelRef.parse(f"runs:/{run_id}"), (CONFIG, CLASSES, SPLIT, BEST_WEIGHTS), run_dir, uri)
        trained = load_trained(run_dir)
        device = engine.pick_device(str(trained.config["trainer"]["device"]))
        data = load_data(saved_data_config(trained.config), device)
        if hasattr(data.images, "close"):  # streamed from disk
            stack.callback(data.images.close)
        rows, example = _validation(run_dir, trained, data, device)
        precision = engine.resolve_precision(str(trained.config["trainer"]["precision"]), device)
        model = trained.model.to(device)
        t = trained.config["trainer"]
        temperature = fit_run_temperature(model, rows, t["eval_batch_size"], precision) if t.get("calibrate") else 1.0
        yield Shipment(
            model, trained.class_names, trained.config, run_dir, rows, example, device, precision, temperature
        )


def _validation(run_dir: Path, trained: TrainedModel, data, device: torch.device) -> tuple[Rows | None, np.ndarray]:
    """The run's validation rows as its data holds them now (None when its files changed since:
    the split would index other drawings), and up to 64 real drawings for signatures and parity."""
    with np.load(run_dir / SPLIT, allow_pickle=False) as z:
        val = z["val"].astype(np.int64)
    record = saved_record(run_dir / SPLIT)
    changed = changes(record, data) if record is not None else []
    if data.class_names != trained.class_names:  # a class added to the folder shifts every row and label
        changed.append(f"classes {trained.class_names} at training, {data.class_names} now")
    if len(val) and val.max() >= len(data.labels):
        changed.append(f"the split indexes row {val.max()}, the data has {len(data.labels)}")
    if changed:
        log.warning("%s: its data changed since training (%s): no evaluation artifacts", run_dir, "; ".join(changed))
        val = val[:0]
    rows = Rows(data.images, data.labels[val], val, device) if len(val) else None
    first = val[:64] if len(val) else np.arange(min(64, len(data.labels)))
    return rows, np.ascontiguousarray(data.images[first])


def data_label(config: dict[str, Any] | DictConfig) -> str:
    """What a model was trained on, for its registered version's ``data`` tag."""
    data = config["data"]
    source = data["source"]
    return str(data["root"]) if getattr(source, "value", source) == "folder" else "synthetic"


def registered_name(mlflow_cfg) -> str:
    return mlflow_cfg.registered_model or mlflow_cfg.experiment_name


def check_register(mlflow_cfg) -> None:
    """``mlflow.register=true`` that cannot register (no ONNX model, a name MLflow refuses) fails
    before training, not after it."""
    if not mlflow_cfg.register:
        return
    if not mlflow_cfg.log_onnx:
        raise ConfigError(
            "mlflow.register=true: the registered model is the run's ONNX export; expected mlflow.log_onnx=true"
        )
    registry.check_names(registered_name(mlflow_cfg), CHAMPION)


def register_run(cfg: DictConfig, uri: str, run_id: str, value: float) -> None:
    """A single run with ``mlflow.register=true``: its model as a new version, alias ``champion``.
    A failure is one error line: the run and its files are kept."""
    name = registered_name(cfg.mlflow)
    tags = {"objective": cfg.trainer.objective.value, "value": f"{value:.6g}", "data": data_label(cfg)}
    try:
        version = registry.register(uri, run_id, name, CHAMPION, tags)
    except registry.RegistryError as e:
        log.error("not registered: %s", one_line(e))
        return
    log.info("registered as models:/%s/%s (alias %s: models:/%s@%s)", name, version, CHAMPION, name, CHAMPION)
