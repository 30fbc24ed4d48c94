"""The recipe knobs (model-quality issue): label smoothing, EMA, the one-cycle schedule, mixup/cutmix.
Each is checked for what it claims to change, on the CPU."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sketchsweep.checkpoint import load_trained
from sketchsweep.ema import EMA
from sketchsweep.engine import Step, mix_batch, to_input
from sketchsweep.model import SketchCNN
from sketchsweep.schedules import WarmupCosineLR
from sketchsweep.train import train
from tests.conftest import compose_config, train_cli, width4_overrides


def test_label_smoothing_changes_the_loss_by_the_expected_amount():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    nll = F.cross_entropy(logits, y)
    uniform = -F.log_softmax(logits, 1).mean()  # cross-entropy against the uniform distribution
    smoothed = Step(label_smoothing=0.1).loss(logits, y, None, 1.0)
    torch.testing.assert_close(smoothed, 0.9 * nll + 0.1 * uniform)
    assert not torch.isclose(smoothed, nll)
    torch.testing.assert_close(Step().loss(logits, y, None, 1.0), nll)


def test_mixup_blends_images_and_losses_by_one_share():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    mixed, perm, lam = mix_batch(x, mixup_alpha=0.4)
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(8))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(Step().loss(logits, y, perm, lam), expected)


def test_cutmix_pastes_one_box_whose_area_is_the_share_lost():
    torch.manual_seed(1)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 28, 28).clone()  # image i is all i
    for _ in range(5):
        mixed, perm, lam = mix_batch(x, cutmix_alpha=1.0)
        for i in range(8):
            pasted = (mixed[i] != x[i]).float().mean().item() if perm[i] != i else 1 - lam
            assert pasted == pytest.approx(1 - lam, abs=1e-6)
            assert set(mixed[i].unique().tolist()) <= {float(i), float(perm[i])}


def test_a_mixed_step_is_seeded_and_unmixed_batches_pass_through(tiny_data):
    images = torch.from_numpy(np.load(next(tiny_data.glob("*.npy")))[:16])
    step = Step(mix=lambda x: mix_batch(x, mixup_alpha=0.2, cutmix_alpha=1.0), mix_prob=0.5)
    torch.manual_seed(3)
    a = [step.inputs(images, False) for _ in range(6)]
    torch.manual_seed(3)
    b = [step.inputs(images, False) for _ in range(6)]
    for (xa, pa, la), (xb, pb, lb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb)
        assert la == lb and (pa is None) == (pb is None)
    assert any(p is None for _, p, _ in a) and any(p is not None for _, p, _ in a)  # prob 0.5: some of each
    unmixed = next(x for x, p, _ in a if p is None)
    torch.testing.assert_close(unmixed, to_input(images))


def test_ema_follows_the_formula_for_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = SketchCNN(3, width=2, hidden=4)
    ema = EMA(model, decay=0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.features[0][1].running_mean.add_(2.0)
        model.features[0][1].num_batches_tracked.add_(7)
    ema.update()  # update 1: decay min(0.5, 2/11)
    d = 2 / 11
    got = ema.model.state_dict()
    for name, now in model.state_dict().items():
        if now.is_floating_point():
            torch.testing.assert_close(got[name], d * start[name] + (1 - d) * now)
        else:
            assert torch.equal(got[name], now)
    assert not torch.equal(got["head.1.weight"], model.state_dict()["head.1.weight"])
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_is_what_a_run_evaluates_keeps_and_exports(tiny_data, tmp_path, store):
    from sketchsweep.checkpoint import build_model
    from sketchsweep.data import load_folder, stratified_split
    from sketchsweep.data.views import Split
    from sketchsweep.engine import evaluate

    cfg = compose_config(width4_overrides(tiny_data, store, "trainer.epochs=1", "trainer.ema_decay=0.9"))
    train(cfg, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    raw, averaged = ckpt["model"], ckpt["ema"]["model"]
    assert ckpt["ema"]["updates"] == math.ceil(432 / 64)  # one per step: 4 classes x 108 train drawings
    assert not torch.equal(raw["head.4.weight"], averaged["head.4.weight"])
    best = torch.load(tmp_path / "run" / "best_model_weights.pth", weights_only=True)
    final = torch.load(tmp_path / "run" / "model_weights.pth", weights_only=True)
    for kept in (best, final):  # one epoch: the best is the last, and both are the EMA's
        assert all(torch.equal(kept[k], averaged[k]) for k in averaged)
    # The epoch's val_loss is the EMA's, not the trained weights'.
    ds = load_folder(tiny_data)
    _, val, _ = stratified_split(ds.labels, ds.class_names, 0.1, 0)
    val_split = Split(torch.from_numpy(ds.images[val]), torch.from_numpy(ds.labels[val]))
    scores = {
        name: evaluate(build_model(w, ds.class_names, ckpt["config"], name), val_split)["val_loss"]
        for name, w in (("ema", averaged), ("raw", raw))
    }
    assert ckpt["history"][0]["val_loss"] == pytest.approx(scores["ema"], rel=1e-6)
    assert ckpt["history"][0]["val_loss"] != pytest.approx(scores["raw"], rel=1e-6)
    # What export, evaluate and predict load is the kept (EMA) best, never the raw weights.
    loaded = load_trained(tmp_path / "run").model.state_dict()
    assert torch.equal(loaded["head.4.weight"], best["head.4.weight"])
    assert not torch.equal(loaded["head.4.weight"], raw["head.4.weight"])


def test_resume_with_ema_is_bit_exact_on_cpu(tiny_data, tmp_path, store):
    knobs = ["trainer.ema_decay=0.8", "trainer.label_smoothing=0.1", "data.mix.mixup_alpha=0.2"]
    # scheduler.epochs=3 in both: the cut run is the straight one stopped after epoch 2.
    knobs += ["data.mix.cutmix_alpha=1.0", "scheduler=onecycle", "scheduler.warmup_epochs=1", "scheduler.epochs=3"]
    common = width4_overrides(tiny_data, store, *knobs)
    train(compose_config([*common, "trainer.epochs=3"]), tmp_path / "straight")
    train(compose_config([*common, "trainer.epochs=2"]), tmp_path / "cut")
    resume = f"trainer.resume={tmp_path / 'cut' / 'checkpoint.pt'}"
    train(compose_config([*common, "trainer.epochs=3", resume]), tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["ema"]["updates"] == b["ema"]["updates"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]), k
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]


def test_onecycle_warms_up_then_follows_a_cosine():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = WarmupCosineLR(opt, epochs=6, warmup_epochs=2, eta_min=0.01)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1 / 3, 0.2 / 3] + [0.01 + 0.09 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert lrs == pytest.approx(expected)
    # Without warm-up it is torch's cosine.
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=6)
    mine = WarmupCosineLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), epochs=6, warmup_epochs=0)
    for _ in range(6):
        assert mine.get_last_lr() == pytest.approx(ref.get_last_lr())
        mine.optimizer.step(), opt2.step()
        mine.step(), ref.step()


def test_a_run_logs_the_onecycle_lr_per_epoch(tiny_data, tmp_path, store):
    cfg = compose_config(
        width4_overrides(tiny_data, store, "trainer.epochs=3", "scheduler=onecycle", "scheduler.warmup_epochs=1")
    )
    train(cfg, tmp_path / "run")
    history = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["history"]
    assert [h["lr"] for h in history] == pytest.approx([5e-4, 1e-3, 5e-4])


def test_extending_a_onecycle_run_goes_on_down_its_cosine(tiny_data, tmp_path, store):
    """More trainer.epochs on resume after the warm-up: a cosine from the lr reached down to eta_min
    at the new end, never a jump back up (as scheduler=cosine does)."""
    common = width4_overrides(tiny_data, store, "scheduler=onecycle", "scheduler.warmup_epochs=1")
    train(compose_config([*common, "trainer.epochs=3"]), tmp_path / "three")
    resume = f"trainer.resume={tmp_path / 'three' / 'checkpoint.pt'}"
    train(compose_config([*common, "trainer.epochs=6", resume]), tmp_path / "six")
    lrs = [h["lr"] for h in torch.load(tmp_path / "six" / "checkpoint.pt", weights_only=True)["history"]]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 5e-4])
    assert lrs[3] == pytest.approx(5e-4) and all(a > b for a, b in itertools.pairwise(lrs[3:]))  # from there, down


def test_a_checkpoint_from_before_val_ece_resumes_and_its_sweep_objectives_map(tiny_data, tmp_path, store):
    from sketchsweep.config import SWEEP_OBJECTIVES
    from sketchsweep.sweep.link import objective_values

    common = width4_overrides(tiny_data, store)
    train(compose_config([*common, "trainer.epochs=1"]), tmp_path / "old")
    ckpt = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    for epoch in ckpt["history"]:
        del epoch["val_ece"]  # as written before val_ece was measured
    torch.save(ckpt, tmp_path / "old.pt")
    value = train(
        compose_config([*common, "trainer.epochs=2", f"trainer.resume={tmp_path / 'old.pt'}"]), tmp_path / "new"
    )
    resumed = torch.load(tmp_path / "new" / "checkpoint.pt", weights_only=True)
    assert 0 < value <= 1 and "val_ece" in resumed["history"][1]
    # Every objective a sweep may name maps to a value (NaN where the run lacks it: not told to Optuna).
    outcome = {"best_val_acc": 0.5, "best_val_loss": 1.0, "best_val_top3": 0.9, "best_epoch": 2, "num_parameters": 7}
    outcome |= {"final_val_acc": 0.4, "final_val_loss": 1.1, "final_val_top3": 0.8, "final_val_ece": 0.1}
    values = objective_values(list(SWEEP_OBJECTIVES), 0.5, outcome)
    assert len(values) == len(SWEEP_OBJECTIVES) and values[1] == 0.5 and math.isnan(values[3])  # val_ece: absent


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.label_smoothing=1.0", "label_smoothing"),
        ("trainer.ema_decay=1.5", "ema_decay"),
        ("data.mix.mixup_alpha=-1", "data.mix"),
        ("data.mix.prob=2", "data.mix"),
        ("scheduler=onecycle scheduler.warmup_epochs=1", "scheduler.warmup_epochs"),
    ],
)
def test_bad_knob_values_are_one_line_exit_2(tiny_data, tmp_path, override, key):
    proc = train_cli(["data=quickdraw", f"data.root={tiny_data}", *override.split(), "trainer.epochs=1"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_recipe_sweep_runs_on_the_best_preset(tiny_data, tmp_path):
    """hparams_search=recipe over experiment=quickdraw24_best (its data swapped for the tiny set):
    every searched knob reaches the trials' params."""
    import optuna

    from sketchsweep.sweep.storage import open_storage
    from tests.conftest import sweep_overrides

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = sweep_overrides(tiny_data, str(tmp_path / "study.journal"), uri, tmp_path / "sweep", "recipe", epochs=3)
    args += ["experiment=quickdraw24_best", "hparams_search=recipe", "hydra.sweeper.n_trials=2"]
    args += ["mlflow.experiment_name=sketchsweep"]
    proc = train_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = optuna.load_study(study_name="recipe", storage=open_storage(str(tmp_path / "study.journal"))).trials
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    assert {"trainer.label_smoothing", "trainer.ema_decay", "data.mix.cutmix_alpha"} <= set(trials[0].params)


def test_calibrate_fits_a_temperature_scores_the_test_split_with_it_and_exports_it(tiny_data, tmp_path, store):
    import onnxruntime as ort

    from sketchsweep.onnx_model import temperature as onnx_temperature

    # One short epoch: far from calibrated (and from every drawing right), so a temperature fits.
    extra = ["trainer.epochs=1", "trainer.label_smoothing=0.3", "trainer.calibrate=true", "data.test_fraction=0.2"]
    cfg = compose_config([*width4_overrides(tiny_data, store, *extra), "mlflow.log_onnx=true"])
    train(cfg, tmp_path / "run")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("sketchsweep").experiment_id])
    m = run.data.metrics
    t = m["temperature"]
    assert 0.02 < t < 50 and abs(t - 1) > 0.05
    assert m["test_ece"] < m["test_ece_uncalibrated"]
    session = ort.InferenceSession(str(tmp_path / "run" / "model.onnx"))
    assert onnx_temperature(session) == pytest.approx(t)
    trained = load_trained(tmp_path / "run")
    images = np.load(next(tiny_data.glob("*.npy")))[:8]
    logits = trained.model(to_input(torch.from_numpy(images))).detach()
    (name,) = [o.name for o in session.get_outputs() if o.name == "probabilities"]
    onnx_p = session.run([name], {session.get_inputs()[0].name: images.reshape(-1, 28, 28)})[0]
    np.testing.assert_allclose(onnx_p, (logits / t).softmax(1).numpy(), atol=1e-5)


def test_a_sweep_ships_its_champion_calibrated(tiny_data, tmp_path):
    """trainer.calibrate in a sweep: the champion's ONNX export, made when the study ends from the
    trial's folder, carries the temperature fitted on its validation split."""
    import onnxruntime as ort

    from sketchsweep.onnx_model import temperature as onnx_temperature
    from tests.conftest import sweep_overrides

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = sweep_overrides(tiny_data, str(tmp_path / "j.journal"), uri, tmp_path / "sweep", "cal", epochs=1)
    args += ["hydra.sweeper.n_trials=1", "optimizer.lr=choice(0.003)", "trainer.calibrate=true", "mlflow.log_onnx=true"]
    proc = train_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (onnx_file,) = (tmp_path / "sweep").rglob("model.onnx")
    t = onnx_temperature(ort.InferenceSession(str(onnx_file)))
    assert 0.02 < t < 50 and abs(t - 1) > 0.05
