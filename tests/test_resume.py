"""Resuming trains with what its params say; a killed run does not stay RUNNING; a signal during
the final exports has one outcome; bad model settings and a full disk are one line."""

from __future__ import annotations

import itertools
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sketchsweep import doctor
from sketchsweep import store as store_module
from sketchsweep.config import ConfigError
from sketchsweep.train import train
from tests.conftest import cli_env, compose_config, start_train, tiny_overrides, train_cli


def quiet(data: Path, store: str, *extra: str) -> list[str]:
    return [o for o in tiny_overrides(data, store, Path("unused"), *extra) if not o.startswith("hydra.")]


def runs_by_dir(store: str) -> dict[str, object]:
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("sketchsweep")
    return {r.data.tags["sketchsweep.run_dir"]: r for r in client.search_runs([exp.experiment_id])}


def test_resume_trains_with_the_changed_lr_and_extended_cosine(tiny_data, tmp_path, store):
    # Three epochs of a 4-epoch cosine (as if cut at epoch 3), resumed to 7 epochs at lr 0.1.
    first = quiet(tiny_data, store, "scheduler=cosine", "optimizer.lr=0.001")
    train(compose_config([*first, "trainer.epochs=3", "scheduler.T_max=4"]), tmp_path / "cut")
    resumed = [
        *quiet(tiny_data, store, "scheduler=cosine", "optimizer.lr=0.1", "optimizer.weight_decay=0.01"),
        "trainer.epochs=7",
        f"trainer.resume={tmp_path / 'cut'}",  # the run folder: its checkpoint.pt
    ]
    train(compose_config(resumed), tmp_path / "more")
    ckpt = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=True)
    lrs = [h["lr"] for h in ckpt["history"]]
    expected = [0.001 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(3)]
    assert lrs[:3] == pytest.approx(expected)
    # Epoch 4: the schedule's factor at that epoch times the new lr; then down towards 0 at epoch 7.
    assert lrs[3] == pytest.approx(0.1 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    assert all(a > b > 0 for a, b in itertools.pairwise(lrs[3:])), lrs
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    run = runs_by_dir(store)[str(tmp_path / "more")]
    assert run.data.params["optimizer.lr"] == "0.1" and run.data.params["scheduler.T_max"] == "7"


def test_extending_a_finished_cosine_run_goes_on_from_its_last_lr(tiny_data, tmp_path, store):
    base = quiet(tiny_data, store, "scheduler=cosine")
    train(compose_config([*base, "trainer.epochs=2"]), tmp_path / "two")
    train(compose_config([*base, "trainer.epochs=4", f"trainer.resume={tmp_path / 'two'}"]), tmp_path / "four")
    lrs = [h["lr"] for h in torch.load(tmp_path / "four" / "checkpoint.pt", weights_only=True)["history"]]
    assert lrs[:2] == pytest.approx([1e-3, 5e-4])
    assert lrs[2] == pytest.approx(5e-4) and 0 < lrs[3] < lrs[2], lrs  # not 0 (where the 2-epoch cosine ended)


def test_resume_refuses_changed_data_and_fewer_epochs_than_done(tiny_data, tmp_path, store):
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_data.glob("*.npy"):
        (data / f.name).write_bytes(f.read_bytes())
    base = quiet(data, store, "trainer.epochs=2")
    train(compose_config(base), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"trainer\.epochs=1: the checkpoint has 2 epochs done"):
        train(compose_config([*base, "trainer.epochs=1", f"trainer.resume={tmp_path / 'run'}"]), tmp_path / "x")
    first = sorted(data.glob("*.npy"))[0]
    rows = np.load(first)
    np.save(first, np.concatenate([rows, rows[:5]]))  # appended drawings: the split would move
    with pytest.raises(ConfigError, match=f"data has changed.*{first.name}: {len(rows)} rows at training"):
        train(compose_config([*base, "trainer.epochs=3", f"trainer.resume={tmp_path / 'run'}"]), tmp_path / "y")


def test_a_pid_reused_by_another_process_is_not_taken_for_the_runs(store):
    client = MlflowClient(store)
    exp = client.create_experiment("x")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        ours = store_module.process_tags()
        fake = {**ours, store_module.PID: str(alive.pid)}
        cases = {
            "this process": (ours, True),  # a resume in a process that got the dead run's pid
            "other, same start": ({**fake, store_module.STARTED: started_of(alive.pid)}, False),
            "other, reused": ({**fake, store_module.STARTED: "another-boot:1"}, True),
            "other host": ({**ours, store_module.HOST: "elsewhere"}, None),
        }
        for name, (tags, gone) in cases.items():
            run = client.create_run(exp, run_name=name, tags=tags)
            assert store_module.process_gone(client.get_run(run.info.run_id)) is gone, name
    finally:
        alive.kill()
        alive.wait()


def started_of(pid: int) -> str:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}:{fields[19]}"


def test_a_pruned_trial_stays_pruned_when_its_job_reports_completion(tmp_path):
    import optuna

    from sketchsweep.sweep.link import TrialLink
    from sketchsweep.sweep.storage import open_storage

    storage = str(tmp_path / "s.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(storage))
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    TrialLink("s", storage, trial.number, "none", None).complete(0.5)  # a signal after the last write
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    nan, done = study.ask(), study.ask()
    TrialLink("s", storage, nan.number, "none", None).complete(float("nan"))  # the sweeper's to fail
    TrialLink("s", storage, done.number, "none", None).complete((0.7,))
    assert [t.state.name for t in study.trials[1:]] == ["RUNNING", "COMPLETE"] and study.trials[2].value == 0.7


def test_resume_rebuilds_a_changed_step_schedule_at_the_current_epoch(tiny_data, tmp_path, store):
    base = quiet(tiny_data, store, "scheduler=steplr", "scheduler.step_size=1", "scheduler.gamma=0.5")
    train(compose_config([*base, "trainer.epochs=2"]), tmp_path / "two")
    more = [*base, "trainer.epochs=4", "scheduler.gamma=0.1", f"trainer.resume={tmp_path / 'two' / 'checkpoint.pt'}"]
    train(compose_config(more), tmp_path / "four")
    lrs = [h["lr"] for h in torch.load(tmp_path / "four" / "checkpoint.pt", weights_only=True)["history"]]
    assert lrs == pytest.approx([1e-3, 5e-4, 1e-3 * 0.1**2, 1e-3 * 0.1**3])


@pytest.mark.slow
def test_a_resume_that_cannot_be_honoured_is_one_line_before_a_run(tiny_data, tmp_path, store):
    first = tiny_overrides(tiny_data, store, tmp_path / "first", "trainer.epochs=1")
    assert train_cli(first, cwd=tmp_path).returncode == 0
    for change, named in (("optimizer=sgd", "optimizer._target_"), ("model.width=16", "model.width")):
        ov = tiny_overrides(tiny_data, store, tmp_path / "again", change, f"trainer.resume={tmp_path / 'first'}")
        proc = train_cli(ov, cwd=tmp_path)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert named in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert list(runs_by_dir(store)) == [str(tmp_path / "first")]  # no run was created for them


@pytest.mark.parametrize(
    "override", ["model.width=0", "model.width=-4", "model.hidden=0", "model.dropout=1.5", "model.dropout=1"]
)
def test_unusable_model_settings_are_config_errors(tiny_data, tmp_path, store, override):
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):
        train(compose_config(quiet(tiny_data, store, override)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_zero_width_model_is_one_line_at_the_command(tiny_data, tmp_path, store):
    proc = train_cli(tiny_overrides(tiny_data, store, tmp_path / "run", "model.width=0"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "width=0" in out and "Traceback" not in out, out


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_leaves_no_temporary(tmp_path):
    # RLIMIT_FSIZE makes writes past 1 MB fail as a full disk does (EFBIG instead of ENOSPC).
    script = (
        "import resource, signal, torch\n"
        "from pathlib import Path\n"
        "from sketchsweep.checkpoint import CheckpointError, save_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({2**20}, {resource.RLIM_INFINITY}))\n"
        f"path = Path({str(tmp_path / 'checkpoint.pt')!r})\n"
        "try:\n"
        "    save_atomic({'w': torch.zeros(2**20)}, path)\n"
        "except CheckpointError as e:\n"
        "    print('ERROR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("ERROR") and str(tmp_path / "checkpoint.pt") in line and "MB free" in line, line
    assert len(line.splitlines()) == 1 and "inline_container" not in line, line
    assert list(tmp_path.iterdir()) == []


def wait_for(path: Path, proc: subprocess.Popen, deadline_s: float = 180) -> None:
    deadline = time.monotonic() + deadline_s
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_sigkilled_run_is_closed_by_the_doctor_or_by_resuming(tiny_data, tmp_path, store, capsys):
    runs = []
    for name in ("a", "b"):
        ov = tiny_overrides(tiny_data, store, tmp_path / name, "trainer.epochs=30")
        proc = start_train(ov, tmp_path)
        wait_for(tmp_path / name / "checkpoint.pt", proc)
        proc.kill()
        proc.wait(timeout=60)
        runs.append(runs_by_dir(store)[str(tmp_path / name)])
    assert [r.info.status for r in runs] == ["RUNNING", "RUNNING"]
    assert runs[0].data.tags["sketchsweep.pid"].isdigit()

    # The doctor lists both and says how to close them; with --close-gone-runs it does.
    assert doctor.main(["--only", "mlflow", f"mlflow.tracking_uri={store}"]) == 0
    out = capsys.readouterr().out
    assert runs[0].info.run_id in out and runs[1].info.run_id in out and "--close-gone-runs" in out, out

    # Resuming closes the run that wrote the checkpoint, as KILLED with the reason.
    ov = tiny_overrides(tiny_data, store, tmp_path / "a2", "trainer.epochs=2", f"trainer.resume={tmp_path / 'a'}")
    resumed = train_cli(ov, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    old = MlflowClient(store).get_run(runs[0].info.run_id)
    assert old.info.status == "KILLED" and "resumed" in old.data.tags["sketchsweep.stopped"]

    assert doctor.main(["--only", "mlflow", "--close-gone-runs", f"mlflow.tracking_uri={store}"]) == 0
    other = MlflowClient(store).get_run(runs[1].info.run_id)
    assert other.info.status == "KILLED" and "gone" in other.data.tags["sketchsweep.stopped"]
    capsys.readouterr()
    assert doctor.main(["--only", "mlflow", f"mlflow.tracking_uri={store}"]) == 0
    assert "no run is left RUNNING" in capsys.readouterr().out


def test_sigterm_during_the_final_exports_ends_the_run_killed_and_resumable(tiny_data, tmp_path, store, monkeypatch):
    # The signal lands while the evaluation is computed (the first of the final exports).
    import sketchsweep.evaluation as evaluation_module  # sketchsweep.deliver imports it when the run ends

    original = evaluation_module.evaluation_artifacts

    def evaluation_artifacts(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "evaluation_artifacts", evaluation_artifacts)
    exports = quiet(tiny_data, store, "mlflow.log_onnx=true", "mlflow.log_evaluation=true", "trainer.epochs=2")
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(exports), tmp_path / "cut")
    assert runs_by_dir(store)[str(tmp_path / "cut")].info.status == "KILLED"  # one truth: cut, and resumable
    assert not (tmp_path / "cut" / "model.onnx").exists()

    # All epochs are done: resuming only produces the deliverables, in a new FINISHED run.
    monkeypatch.setattr(evaluation_module, "evaluation_artifacts", original)
    train(compose_config([*exports, f"trainer.resume={tmp_path / 'cut'}"]), tmp_path / "done")
    assert (tmp_path / "done" / "model.onnx").exists()
    assert runs_by_dir(store)[str(tmp_path / "done")].info.status == "FINISHED"


def test_a_signal_after_the_last_write_leaves_a_finished_run_and_exit_0(tiny_data, tmp_path, store):
    # SIGTERM to ourselves as the run's last write happens (the .hydra/train.log upload): held,
    # and since everything is written the run stays FINISHED and train returns normally.
    import sketchsweep.tracking as tracking

    original = tracking.Run.log_files

    def log_files(self, paths, artifact_path=None):
        original(self, paths, artifact_path)
        if any(p.name == ".hydra" for p in paths):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)

    tracking.Run.log_files = log_files
    try:
        value = train(compose_config(quiet(tiny_data, store, "trainer.epochs=1")), tmp_path / "run")
    except KeyboardInterrupt:
        pytest.fail("the signal after the last write cut a run that was complete")
    finally:
        tracking.Run.log_files = original
    assert isinstance(value, float)
    assert runs_by_dir(store)[str(tmp_path / "run")].info.status == "FINISHED"
