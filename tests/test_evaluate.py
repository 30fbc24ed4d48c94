"""Evaluation artifacts and `python -m sketchsweep.evaluate`, on one tiny model trained once per
session through the real training CLI, with a real MLflow store."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sketchsweep.evaluate import main
from sketchsweep.evaluation import (
    CONFUSION_CSV,
    FILES,
    MISCLASSIFIED_PNG,
    PER_CLASS,
    RELIABILITY_PNG,
    evaluation_artifacts,
    pick_misclassified,
)
from sketchsweep.plots import confusion_view
from tests.conftest import cli_env, compose_config, tiny_overrides, train_cli


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """One tiny model (4 classes, 3 epochs, with a test split) for every test here."""
    tmp = tmp_path_factory.mktemp("evaluate")
    store = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    run_dir = tmp / "run"
    proc = train_cli(tiny_overrides(tiny_data, store, run_dir, "data.test_fraction=0.1"), cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("sketchsweep").experiment_id])
    return run_dir, store, run.info.run_id


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def confusion_total(folder: Path) -> int:
    with open(folder / CONFUSION_CSV, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return sum(int(v) for row in rows for v in row[1:])


def test_cli_on_run_folder_scores_the_validation_split_and_logs(trained_run, tmp_path):
    run_dir, store, run_id = trained_run
    proc = subprocess.run(
        [sys.executable, "-m", "sketchsweep.evaluate", str(run_dir), "--log"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = run_dir / "evaluation"
    assert {p.name for p in out.iterdir()} >= set(FILES)
    val = np.load(run_dir / "split.npz")["val"]
    assert confusion_total(out) == len(val)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_images"] == len(val)
    assert 0 <= metrics["eval_top1"] <= metrics["eval_top3"] <= metrics["eval_top5"] <= 1
    assert 0 <= metrics["eval_ece"] <= 1 and "eval_tta_top1" not in metrics  # TTA only with --tta
    rows = read_csv(out / PER_CLASS)
    assert [r["class"] for r in rows] == json.loads((run_dir / "classes.json").read_text())
    assert sum(int(r["n"]) for r in rows) == len(val)
    assert all(float(r["accuracy"]) <= float(r["top3_accuracy"]) for r in rows)
    for png in ("confusion_matrix.png", MISCLASSIFIED_PNG, RELIABILITY_PNG):
        assert matplotlib.image.imread(out / png).ndim == 3
    # The same weights on the same images: what training reported for its best epoch.
    run = MlflowClient(store).get_run(run_id)
    assert metrics["eval_top1"] == pytest.approx(run.data.metrics["best_val_acc"])
    assert run.data.metrics["eval_top1"] == pytest.approx(metrics["eval_top1"])
    assert run.data.metrics["eval_ece"] == pytest.approx(metrics["eval_ece"])
    logged = {a.path for a in MlflowClient(store).list_artifacts(run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in logged and "evaluation/per_class_accuracy.csv" in logged


def test_cli_test_split_and_data_overrides(trained_run, tiny_data, tmp_path, capsys):
    run_dir, _, _ = trained_run
    assert main([str(run_dir / "checkpoint.pt"), "--split", "test", "--out", str(tmp_path / "test")]) == 0
    assert confusion_total(tmp_path / "test") == len(np.load(run_dir / "split.npz")["test"])

    # Other data: every row, classes matched by name ("_" and space alike), here a subset of two.
    out = tmp_path / "subset"
    assert (
        main(
            [str(run_dir), "data=quickdraw", f"data.root={tiny_data}", "data.classes=[star,circle]", "--out", str(out)]
        )
        == 0
    )
    rows = read_csv(out / PER_CLASS)
    assert [r["class"] for r in rows] == ["circle", "star"]
    assert confusion_total(out) == 240  # 2 classes x 120 drawings, no split
    assert "all 240 images" in capsys.readouterr().out

    # data.* alone changes the run's own data config; the default folder is named after the data.
    assert main([str(run_dir), "data.max_per_class=20"]) == 0
    assert confusion_total(run_dir / f"evaluation-{tiny_data.name}") == 80


def test_cli_tta_reports_plain_and_tta_scores_and_logs_both(trained_run, tmp_path, capsys):
    run_dir, store, run_id = trained_run
    assert main([str(run_dir / "checkpoint.pt"), "--split", "test", "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    capsys.readouterr()
    out = tmp_path / "tta"
    assert main([str(run_dir / "checkpoint.pt"), "--split", "test", "--tta", "--log", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    tta_keys = {"eval_tta_top1", "eval_tta_top3", "eval_tta_top5", "eval_tta_ece"}
    assert tta_keys <= set(metrics)
    assert {k: metrics[k] for k in plain} == plain  # the plain scores stay the main ones, unchanged
    assert 0 <= metrics["eval_tta_top1"] <= metrics["eval_tta_top3"] <= metrics["eval_tta_top5"] <= 1
    assert metrics["eval_tta_ece"] != metrics["eval_ece"]  # averaged logits: other confidences
    plain_line, tta_line = [line for line in printed.splitlines() if "ECE" in line]
    assert f"top-1 {metrics['eval_top1']:.4f}" in plain_line and f"ECE {metrics['eval_ece']:.4f}" in plain_line
    assert "test-time augmentation" in tta_line and f"top-1 {metrics['eval_tta_top1']:.4f}" in tta_line
    assert f"ECE {metrics['eval_tta_ece']:.4f}" in tta_line
    logged = MlflowClient(store).get_run(run_id).data.metrics
    for key in ("top1", "ece", "tta_top1", "tta_top3", "tta_ece"):  # another split: eval_test_<name>
        assert logged[f"eval_test_{key}"] == pytest.approx(metrics[f"eval_{key}"]), key


class Fixed(torch.nn.Module):
    """Every drawing gets the same probabilities."""

    def __init__(self, probabilities: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(probabilities).log()

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_evaluation_reports_the_ece_and_draws_the_reliability_diagram(tmp_path):
    images = np.zeros((10, 784), np.uint8)
    model = Fixed([0.7, 0.1, 0.1, 0.1])  # 70 % sure of class 0, every time
    names = ["a", "b", "c", "d"]
    right_7_of_10 = np.array([0] * 7 + [1] * 3)
    metrics = evaluation_artifacts(model, images, right_7_of_10, names, tmp_path / "calibrated", device="cpu")
    assert metrics["eval_top1"] == pytest.approx(0.7) and metrics["eval_ece"] == pytest.approx(0.0, abs=1e-6)
    never_right = np.ones(10, np.int64)
    metrics = evaluation_artifacts(model, images, never_right, names, tmp_path / "wrong", device="cpu", tta=[(0, 0)])
    assert metrics["eval_ece"] == pytest.approx(0.7, abs=1e-6)
    assert metrics["eval_tta_ece"] == metrics["eval_ece"] and metrics["eval_tta_top1"] == metrics["eval_top1"] == 0
    assert json.loads((tmp_path / "wrong" / "metrics.json").read_text())["eval_ece"] == metrics["eval_ece"]
    height, width, _ = matplotlib.image.imread(tmp_path / "wrong" / RELIABILITY_PNG).shape
    assert height > 300 and width > 300


def test_cli_errors_are_one_line_with_exit_2(trained_run, tiny_data, tmp_path, capsys):
    run_dir, _, _ = trained_run
    extra = tmp_path / "extra"
    shutil.copytree(tiny_data, extra)
    shutil.copy(extra / "star.npy", extra / "zebra.npy")
    cases = {
        "zebra": [str(run_dir), "data=quickdraw", f"data.root={extra}"],
        "no such file or folder": [str(tmp_path / "missing-run")],
        "only data overrides": [str(run_dir), "model.width=16"],
        "data.max_per_class": [str(run_dir), "data.max_per_class=abc"],
    }
    for needle, argv in cases.items():
        assert main(argv) == 2, needle
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (extra / "evaluation").exists()


def test_the_split_is_refused_when_the_data_has_changed_since_training(tiny_data, tmp_path, capsys):
    """split.npz records each class file's rows (count and digest): appended or replaced rows make the
    split index other images, so scoring it is refused, naming the file; older split.npz still work."""
    from sketchsweep.train import train

    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    overrides = tiny_overrides(data, f"sqlite:///{tmp_path / 'mlflow.db'}", run_dir, "trainer.epochs=1")
    train(compose_config([o for o in overrides if not o.startswith("hydra.")]), run_dir)
    saved = dict(np.load(run_dir / "split.npz"))
    assert saved["class_rows"].tolist() == [120] * 4 and len(set(saved["class_digest"].tolist())) == 4
    assert main([str(run_dir)]) == 0
    capsys.readouterr()

    circle, star = np.load(data / "circle.npy"), np.load(data / "star.npy")
    np.save(data / "circle.npy", np.concatenate([circle, circle[:5]]))  # rows appended
    np.save(data / "star.npy", star[::-1])  # the same number of rows, not the same ones
    for split in ("val", "test", "train"):
        assert main([str(run_dir), "--split", split] if split != "val" else [str(run_dir)]) == 2, split
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{data / 'circle.npy'}: 120 rows at training, 125 now" in err
        assert f"{data / 'star.npy'}: " in err and "rows differ" in err
    assert main([str(run_dir), "--split", "all"]) == 0  # every row of the data as it is now: no split involved
    assert main([str(run_dir), "data.max_per_class=120"]) == 0  # other data, by the user's choice

    np.save(data / "circle.npy", circle)
    np.save(data / "star.npy", star.reshape(-1, 28, 28))  # rewritten in another layout: the same rows
    assert main([str(run_dir)]) == 0
    # A split.npz from before these records: the split is scored as it was.
    np.save(data / "circle.npy", np.concatenate([circle, circle[:5]]))
    np.savez_compressed(run_dir / "split.npz", **{k: saved[k] for k in ("train", "val", "test")})
    assert main([str(run_dir)]) == 0


def test_many_classes_plot_stays_small(tmp_path):
    """345 classes, random predictions: the plot shows ~30 of them, and everything is written."""

    class Random(torch.nn.Module):
        def forward(self, x):
            return torch.randn(len(x), 345, generator=torch.Generator().manual_seed(len(x)))

    names = [f"category number {i}" for i in range(345)]
    labels = np.repeat(np.arange(345), 4)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 784), dtype=np.uint8)
    metrics = evaluation_artifacts(Random(), images, labels, names, tmp_path, batch_size=512, device="cpu")
    assert metrics["eval_images"] == len(labels)
    assert len(read_csv(tmp_path / PER_CLASS)) == 345
    assert len(read_csv(tmp_path / "confused_pairs.csv")) == 20
    height, width, _ = matplotlib.image.imread(tmp_path / "confusion_matrix.png").shape
    assert max(height, width) < 2000
    assert 0 <= metrics["eval_ece"] <= 1 and matplotlib.image.imread(tmp_path / RELIABILITY_PNG).ndim == 3
    conf = np.random.default_rng(0).integers(0, 5, (345, 345))
    assert len(confusion_view(conf)[0]) <= 30


def test_pick_misclassified_spreads_over_classes():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    predicted = np.array([1, 1, 1, 0, 0, 0, 2])
    confidence = np.array([0.9, 0.8, 0.7, 0.9, 0.6, 0.5, 0.9])
    assert pick_misclassified(labels, predicted, confidence, 2).tolist() == [0, 4]
    assert pick_misclassified(labels, predicted, confidence, 10).tolist() == [0, 1, 2, 4, 5]


def test_rows_go_to_the_device_evaluation_runs_on():
    """Rows made where the data is (the CPU) are delivered to the device asked for (a GPU),
    not left where they were made (no GPU needed to check the routing)."""
    from sketchsweep.data.views import Rows
    from sketchsweep.evaluation import as_rows

    rows = Rows(np.zeros((4, 784), np.uint8), np.arange(4))
    assert as_rows(rows, device="cuda").device == torch.device("cuda")
    assert as_rows(rows).device == torch.device("cpu")
    assert as_rows(np.zeros((2, 784), np.uint8), [0, 1], "cuda").device == torch.device("cuda")
