"""What a command loads before it does its work: the heavy libraries (onnx and onnxscript, matplotlib,
MLflow's PyTorch flavor, MLflow itself for a run folder) only where they are used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sketchsweep import cli, store
from tests.conftest import cli_env

HEAVY = ("onnx", "onnxscript", "onnx_ir", "onnxruntime", "matplotlib", "mlflow.pytorch", "mlflow.onnx")


def loaded_after(module: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after importing ``module``."""
    code = f"import sys, json, {module}; print(json.dumps([m for m in {list(watched)!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_starts_without_the_export_and_plotting_libraries():
    # Each costs ~0.3-1 s of every run's and trial's start; they load when the deliverables are made.
    assert loaded_after("sketchsweep.train", HEAVY) == []


def test_evaluating_a_run_folder_does_not_load_mlflow():
    # MLflow (~1.5 s) is for runs:/ and models:/ references and --log only.
    assert loaded_after("sketchsweep.evaluate", ("mlflow", *HEAVY)) == []


def test_a_run_that_cannot_be_logged_to_is_one_user_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "files").mkdir()
    with pytest.raises(cli.UserError, match="no-such-run") as e:
        store.log_to_run("no-such-run", uri, tmp_path / "files", "evaluation", {"eval_top1": 1.0})
    assert "\n" not in cli.message(e.value)


ENDING = """
import atexit, sys, threading, time
from pathlib import Path
from sketchsweep import cli

out = Path(sys.argv[1])

def main():
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    def late():
        time.sleep(0.5)
        (out / "thread").write_text("joined")
    threading.Thread(target=late).start()
    import concurrent.futures  # a pool left open, as joblib's and MLflow's are: its workers wait for its shutdown
    pool = concurrent.futures.ThreadPoolExecutor(2)
    pool.submit(lambda: (out / "pool").write_text("done"))
    print("result line", end="")  # piped: block-buffered, unflushed
    sys.exit(sys.argv[2] if sys.argv[2].startswith("x") else int(sys.argv[2]))

cli.run_and_exit(main)
"""


@pytest.mark.parametrize("code", ["0", "2", "130", "xmessage"])
def test_a_command_ends_fast_but_finishes_everything_first(code, tmp_path):
    """run_and_exit skips the interpreter's teardown, not the exit code, the buffered output, the
    atexit handlers or a running thread's work."""
    proc = subprocess.run(
        [sys.executable, "-c", ENDING, str(tmp_path), code], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == (1 if code.startswith("x") else int(code)), proc.stderr
    assert proc.stdout == "result line"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    assert (tmp_path / "pool").read_text() == "done"
    if code.startswith("x"):
        assert proc.stderr.strip() == code  # sys.exit("message") prints it, as Python does
