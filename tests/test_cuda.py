"""The engine's CUDA paths: bf16 autocast, channels-last, fused Adam, fp16 with a gradient scaler,
pinned non-blocking streaming copies, torch.compile, and a whole run of the harness on the GPU.

Skipped without a CUDA device (CI has none). On a GPU box, `bash benchmarks/gpu.sh tests` runs
them; everything but the last test needs only torch, numpy and pytest.
"""

import json

import numpy as np
import pytest
import torch

from sketchsweep.data import load_folder, stratified_split
from sketchsweep.data.folder import class_labels, select_files
from sketchsweep.data.stream import RowReader
from sketchsweep.data.views import Split, StreamingSplit
from sketchsweep.engine import (
    evaluate,
    optimizer_options,
    prepare_model,
    resolve_precision,
    train_one_epoch,
)
from sketchsweep.model import SketchCNN
from tests.conftest import rows_with_labels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def train_tiny(data, device: torch.device, precision_name: str, epochs: int = 4, compile: bool = False) -> dict:
    """Train a small SketchCNN with the engine's setup for ``device``; return validation metrics."""
    ds = load_folder(data)
    train_idx, val_idx, _ = stratified_split(ds.labels, ds.class_names, 0.2, seed=0)
    images, labels = torch.from_numpy(ds.images).to(device), torch.from_numpy(ds.labels).to(device)
    train = Split(images, labels, torch.from_numpy(train_idx).to(device))
    val = Split(images, labels, torch.from_numpy(val_idx).to(device))
    precision = resolve_precision(precision_name, device)
    torch.manual_seed(0)
    model = prepare_model(SketchCNN(len(ds.class_names), width=8, hidden=32), device, precision)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, **optimizer_options("torch.optim.Adam", device))
    net = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(0)
    history = [train_one_epoch(net, train, opt, 32, gen, precision=precision) for _ in range(epochs)]
    return evaluate(net, val, precision=precision) | {"history": history, "precision": precision, "model": model}


def test_auto_is_bf16_channels_last_and_fused_adam_on_ampere_or_newer():
    precision = resolve_precision("auto", CUDA)
    assert precision.channels_last and precision.scaler is None
    if torch.cuda.get_device_capability(CUDA) >= (8, 0):
        assert precision.dtype == torch.bfloat16
    else:
        assert precision.dtype is None
    assert optimizer_options("torch.optim.Adam", CUDA) == {"fused": True}
    assert optimizer_options("torch.optim.SGD", CUDA) == {}
    model = prepare_model(SketchCNN(5, width=8), CUDA, precision)
    assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark


def test_cuda_engine_reaches_the_cpu_fp32_accuracy(tiny_data):
    """The results contract on the GPU: bf16 + channels-last + fused Adam learn like fp32 on a CPU."""
    gpu = train_tiny(tiny_data, CUDA, "auto")
    cpu = train_tiny(tiny_data, torch.device("cpu"), "fp32")
    assert all(np.isfinite(h["train_loss"]) for h in gpu["history"])
    assert gpu["history"][-1]["train_loss"] < gpu["history"][0]["train_loss"]
    assert cpu["val_acc"] > 0.6 and abs(gpu["val_acc"] - cpu["val_acc"]) < 0.1, (gpu["val_acc"], cpu["val_acc"])


def test_cuda_fp16_with_gradient_scaler_learns(tiny_data):
    result = train_tiny(tiny_data, CUDA, "fp16")
    scaler = result["precision"].scaler
    assert scaler is not None and scaler.get_scale() > 0
    assert all(np.isfinite(h["train_loss"]) for h in result["history"])
    assert result["val_acc"] > 0.6


def test_cuda_streaming_gives_the_resident_batches(tiny_data):
    """Pinned buffers and non-blocking copies deliver exactly the resident path's batches."""
    files = select_files(tiny_data)
    reader = RowReader(list(files.values()))
    try:
        labels = class_labels(reader.counts)
        train_idx, _, _ = stratified_split(labels, list(files), 0.1, seed=0)
        ds = load_folder(tiny_data)
        resident = Split(*(torch.from_numpy(a).to(CUDA) for a in (ds.images, ds.labels, train_idx)))
        streaming = StreamingSplit(reader, labels, train_idx, CUDA, buffer_rows=100, order="exact")
        gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for _ in range(2):
            a, b = list(resident.batches(32, gen_a)), list(streaming.batches(32, gen_b))
            assert len(a) == len(b)
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert xb.device.type == "cuda" and torch.equal(xa, xb) and torch.equal(ya, yb)
        # The default chunked order: every training image once per epoch, with its label.
        chunks = StreamingSplit(reader, labels, train_idx, CUDA, buffer_rows=100)
        xs, ys = zip(*chunks.batches(32, torch.Generator().manual_seed(0)), strict=True)
        seen = rows_with_labels(torch.cat(xs).cpu().numpy(), torch.cat(ys).cpu().numpy())
        assert seen == rows_with_labels(ds.images[train_idx], ds.labels[train_idx])
    finally:
        reader.close()


@pytest.mark.slow  # compiling takes a minute
def test_cuda_compiled_model_trains(tiny_data):
    result = train_tiny(tiny_data, CUDA, "auto", epochs=3, compile=True)
    assert result["val_acc"] > 0.5


@pytest.mark.slow
def test_cuda_harness_run_resume_and_export(tiny_data, tmp_path, store):
    """`python -m sketchsweep.train` on the GPU: train, resume on the GPU, evaluate and export
    the channels-last bf16-trained weights to ONNX with the parity check (needs hydra and mlflow)."""
    pytest.importorskip("hydra")
    pytest.importorskip("mlflow")
    from sketchsweep.train import train
    from tests.conftest import compose_config, tiny_overrides

    def config(run_dir, *extra):
        base = tiny_overrides(tiny_data, store, run_dir, "trainer.device=cuda", *extra)
        return compose_config([o for o in base if not o.startswith("hydra.")])

    first = tmp_path / "first"
    train(config(first, "trainer.epochs=2"), first)
    ckpt = torch.load(first / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["rng"]["cuda"] is not None
    resumed = tmp_path / "resumed"
    value = train(
        config(
            resumed,
            "trainer.epochs=3",
            f"trainer.resume={first / 'checkpoint.pt'}",
            "mlflow.log_onnx=true",
            "mlflow.log_evaluation=true",
        ),
        resumed,
    )
    assert value > 0.5
    assert (resumed / "model.onnx").is_file()
    assert (resumed / "evaluation" / "confusion_matrix.csv").is_file()
    # The evaluate command on the GPU, on the run's own split: the run's best validation accuracy.
    from sketchsweep.evaluate import main as evaluate

    assert evaluate([str(resumed), "--device", "cuda", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["eval_top1"] == pytest.approx(value, abs=0.02)  # bf16 autocast in both
