"""Check that this machine can train and track: versions, GPUs, a tiny training step on every
device, the MLflow store and the Optuna storage.

    python -m sketchsweep.doctor
    python -m sketchsweep.doctor mlflow.tracking_uri=http://host:5000 hydra.sweeper.storage=postgresql+psycopg://...
    python -m sketchsweep.doctor --only mlflow,optuna            # skip versions, GPUs and the training step

Takes the same overrides as training for what it checks (``mlflow.tracking_uri``,
``mlflow.artifact_root``, ``mlflow.experiment_name``, ``hydra.sweeper.storage``,
``trainer.device``); other ``key=value`` arguments are ignored, so a training command's
overrides can be pasted as they are. Exit code 1 when a check fails, 0 otherwise.

Torch, MLflow and Optuna are imported by the check that needs them, so a broken or missing
package is reported as a failed check, not a crash.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sketchsweep import cli
from sketchsweep.paths import JOURNAL_DIR, PROJECT_ROOT

KEYS = (
    "mlflow.tracking_uri",
    "mlflow.artifact_root",
    "mlflow.experiment_name",
    "hydra.sweeper.storage",
    "trainer.device",
)


class Report:
    """Prints each check as it completes (slow checks show progress) and counts failures."""

    def __init__(self) -> None:
        utf8 = (sys.stdout.encoding or "").lower().replace("-", "") in ("utf8", "utf16", "utf32")
        self.marks = {"ok": "✓", "fail": "✗", "info": "·"} if utf8 else {"ok": "OK  ", "fail": "FAIL", "info": "    "}
        self.failures: list[str] = []
        self.passed = 0

    def section(self, title: str) -> None:
        print(f"\n{cli.redact(title)}", flush=True)

    def line(self, kind: str, text: str) -> None:
        text = cli.redact(text)
        print(f"  {self.marks[kind]} {text}", flush=True)
        if kind == "fail":
            self.failures.append(text)
        elif kind == "ok":
            self.passed += 1

    def ok(self, text: str) -> None:
        self.line("ok", text)

    def fail(self, text: str) -> None:
        self.line("fail", text)

    def info(self, text: str) -> None:
        self.line("info", text)


# -- environment and devices -----------------------------------------------------------------


def check_environment(report: Report) -> None:
    import torch

    report.section("Environment")
    report.info(f"Python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    report.info(
        f"torch {torch.__version__}: "
        + (f"CUDA {cuda} build, cuDNN {cudnn}" if cuda else "CPU-only build")
        + f", {torch.get_num_threads()} CPU threads"
    )
    versions = []
    for name in ("numpy", "hydra", "mlflow", "optuna", "matplotlib"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except Exception as e:  # a missing package is reported, not fatal: the checks below say what breaks
            versions.append(f"{name} missing ({type(e).__name__})")
    report.info(", ".join(versions))


def check_cuda(report: Report, device_choice: str) -> list[str]:
    """GPUs with their properties; returns the devices to run the training step on."""
    import torch

    from sketchsweep.engine import native_bf16

    report.section("CUDA")
    if not torch.cuda.is_available():
        driver = Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None
        if device_choice == "cuda":
            report.fail("trainer.device=cuda, but there is no CUDA device: training would stop at once")
        else:
            report.info("no CUDA device: training runs on the CPU")
        if torch.version.cuda is None and driver:
            report.info(
                "an NVIDIA driver is installed but this torch is a CPU-only build: install a CUDA build to use it"
            )
        elif torch.version.cuda is not None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            report.info(
                f"this torch is built for CUDA {torch.version.cuda} but sees no GPU"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else " (no driver, or no GPU?)")
            )
        return ["cpu"]
    devices = ["cpu"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bf16 = native_bf16(torch.device(f"cuda:{i}"))
        report.info(
            f"cuda:{i} {p.name}: compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
            f"{p.multi_processor_count} SMs, bf16 {'yes' if bf16 else 'no (trainer.precision=auto uses fp32)'}"
        )
        arch = f"sm_{p.major}{p.minor}"
        if torch.cuda.get_arch_list() and arch not in torch.cuda.get_arch_list():
            report.info(f"this torch has no kernels compiled for {arch} ({' '.join(torch.cuda.get_arch_list())})")
        devices.append(f"cuda:{i}")
    if device_choice == "cpu":
        report.info("trainer.device=cpu: the GPU is not used")
    return devices


def check_compute(report: Report, devices: list[str]) -> None:
    """Forward, backward and an Adam step of the default SketchCNN (width 64) on each device,
    in the precision training would use there (trainer.precision=auto)."""
    import torch
    import torch.nn.functional as F

    from sketchsweep.engine import native_bf16, optimizer_options, prepare_model, resolve_precision, to_input
    from sketchsweep.model import SketchCNN

    report.section("Training step (SketchCNN width 64, forward + backward + Adam)")
    for name in devices:
        device = torch.device(name)
        # A few seconds at most on a laptop CPU; a GPU gets a batch like training's.
        batch, steps = (256, 10) if device.type == "cuda" else (16, 2)
        try:
            precision = resolve_precision("auto", device)
            torch.manual_seed(0)
            model = prepare_model(SketchCNN(10), device, precision)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, **optimizer_options("torch.optim.Adam", device))
            x = torch.randint(0, 256, (batch, 784), dtype=torch.uint8, device=device)
            y = torch.randint(0, 10, (batch,), device=device)

            def step(model=model, opt=opt, x=x, y=y, precision=precision, device=device) -> torch.Tensor:
                with precision.autocast(device):
                    loss = F.cross_entropy(model(to_input(x, precision.channels_last)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss.detach()

            def sync(device=device) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            step()  # warm-up: kernel selection, allocator
            sync()
            start = time.perf_counter()
            losses = [step() for _ in range(steps)]
            sync()
            ms = (time.perf_counter() - start) / steps * 1000
            if not all(torch.isfinite(v).item() for v in losses):
                report.fail(f"{name}: the loss is not finite ({[v.item() for v in losses]})")
                continue
            dtype = "bf16 autocast" if precision.dtype is torch.bfloat16 else "fp32"
            report.ok(f"{name}: {ms:.1f} ms/step at batch {batch} ({dtype}, {batch * 1000 / ms:,.0f} images/s)")
            if device.type == "cpu":
                native = (
                    "natively: trainer.precision=bf16 trains ~2x faster" if native_bf16(device) else "only by emulation"
                )
                report.info(f"cpu: computes bf16 {native} (trainer.precision=auto is fp32 on a CPU)")
        except Exception as e:
            report.fail(f"{name}: {cli.one_line(e)}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


# -- MLflow ----------------------------------------------------------------------------------


def check_mlflow(
    report: Report, configured: str | None, artifact_root: str | None, experiment: str, close: bool = False, args=()
) -> None:
    """Create, read back and remove a throwaway run (with an artifact) in the store training uses;
    list the runs left RUNNING by processes that are gone (``close``: end them; ``args``: for the hint)."""
    from sketchsweep.tracking import tracking_uri

    uri = tracking_uri(configured)
    origin = (
        "mlflow.tracking_uri"
        if configured
        else ("$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the project default")
    )
    report.section(f"MLflow tracking store: {uri}  (from {origin})")
    try:
        from sketchsweep.store import check_store

        where = check_store(uri, artifact_root)
        report.ok(f"reachable and writable: a throwaway run with a metric and an artifact ({where}), then removed")
    except Exception as e:
        report.fail(f"{uri}: {cli.one_line(e)}")
        return
    try:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name(experiment)
        if exp is None:
            report.info(f"experiment {experiment!r} does not exist yet; the first run creates it")
        elif exp.lifecycle_stage == "deleted":
            report.fail(
                f"experiment {experiment!r} is deleted: runs cannot start in it (restore it: mlflow experiments "
                f"restore --experiment-id {exp.experiment_id}, or set mlflow.experiment_name=...)"
            )
        else:
            report.ok(f"experiment {experiment!r} (id {exp.experiment_id}): artifacts at {exp.artifact_location}")
    except Exception as e:
        report.fail(f"{uri}: cannot read experiment {experiment!r}: {cli.one_line(e)}")
    try:
        check_gone_runs(report, uri, close, " ".join(args))
    except Exception as e:
        report.fail(f"{uri}: cannot list the runs left RUNNING: {cli.one_line(e)}")


def check_gone_runs(report: Report, uri: str, close: bool, args: str) -> None:
    """Runs that say RUNNING although their process (on this host) is gone: a SIGKILL, a crash,
    an out-of-memory kill. Listed, with the command that ends them as KILLED (``close``: end them)."""
    from mlflow.tracking import MlflowClient

    from sketchsweep import store

    client = MlflowClient(uri)
    gone = store.gone_runs(client)
    if not gone:
        report.ok("no run is left RUNNING by a process that is gone")
        return
    names = ", ".join(f"{r.info.run_name} ({r.info.run_id})" for r in gone)
    if close:
        for run in gone:
            store.end_gone_run(client, run.info.run_id, "its process is gone; ended by python -m sketchsweep.doctor")
        report.ok(f"ended as KILLED: {names}")
        return
    report.info(
        f"{len(gone)} run(s) left RUNNING by a process that is gone: {names}; end them as KILLED with: "
        f"python -m sketchsweep.doctor --only mlflow --close-gone-runs {args}".rstrip()
    )


# -- Optuna ----------------------------------------------------------------------------------


def check_optuna(report: Report, configured: str | None) -> None:
    """Open the sweeps' storage and create, use and delete a throwaway study in it."""
    default_dir = JOURNAL_DIR
    if configured is None:
        report.section(f"Optuna storage: journal files in {default_dir}  (default: one <study>.journal per study)")
    else:
        report.section(f"Optuna storage: {configured}  (from hydra.sweeper.storage)")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError as e:
        report.fail(f"optuna cannot be imported ({cli.one_line(e)}): sweeps (-m hydra/sweeper=optuna) cannot run")
        return
    try:
        from sketchsweep.sweep.storage import check_storage

        report.ok(check_storage(configured))
    except Exception as e:
        report.fail(f"{configured or default_dir}: {cli.one_line(e)}")


# -- command line ----------------------------------------------------------------------------


def parse_overrides(args: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """``key=value`` arguments: the settings the checks use, and the ones ignored.

    ``tracking=<option>`` reads that option of ``conf/tracking/`` (e.g. ``server``), as training
    does; an explicit ``mlflow.*`` argument wins over it."""
    settings: dict[str, str | None] = dict.fromkeys(KEYS)
    ignored, explicit = [], set()
    for arg in args:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep:
            raise ValueError(f"{arg!r}: expected key=value, e.g. mlflow.tracking_uri=sqlite:///path/mlflow.db")
        value = value.strip("'\"")
        if key == "tracking":
            path = PROJECT_ROOT / "conf" / "tracking" / f"{value}.yaml"
            if not path.is_file():
                options = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise ValueError(f"tracking={value}: no such option; expected one of {options}")
            preset = OmegaConf.to_container(OmegaConf.load(path)).get("mlflow") or {}
            for k, v in preset.items():
                if f"mlflow.{k}" in settings and f"mlflow.{k}" not in explicit:
                    settings[f"mlflow.{k}"] = None if v is None else str(v)
        elif key in settings:
            settings[key] = None if value in ("", "null") else value
            explicit.add(key)
        else:
            ignored.append(arg)
    return settings, ignored


SECTIONS = ("system", "mlflow", "optuna")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sketchsweep.doctor",
        description="Check versions, GPUs, a training step on every device, the MLflow store and the Optuna storage.",
        epilog=f"Settings checked: {', '.join(KEYS)}; other key=value arguments are ignored.",
    )
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. mlflow.tracking_uri=URI")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated checks to run, of {','.join(SECTIONS)} (system: versions, GPUs, training step)",
    )
    parser.add_argument(
        "--close-gone-runs",
        action="store_true",
        help="end the runs left RUNNING by processes on this host that are gone (a SIGKILL, a crash) as KILLED",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    try:
        unknown = [s for s in only if s not in SECTIONS]
        if unknown or not only:
            raise ValueError(f"--only {args.only}: expected some of {','.join(SECTIONS)}")
        settings, ignored = parse_overrides(args.overrides)
        device = settings["trainer.device"] or "auto"
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"trainer.device={device}: expected auto, cpu or cuda")
    except ValueError as e:
        return cli.fail(e)
    report = Report()
    print("sketchsweep doctor", flush=True)
    if ignored:
        report.info(f"ignored (not checked here): {' '.join(ignored)}")
    checks: dict[str, Callable[[], Any]] = {
        "system": lambda: (check_environment(report), check_compute(report, check_cuda(report, device))),
        "mlflow": lambda: check_mlflow(
            report,
            settings["mlflow.tracking_uri"],
            settings["mlflow.artifact_root"],
            settings["mlflow.experiment_name"] or "sketchsweep",
            args.close_gone_runs,
            args.overrides,
        ),
        "optuna": lambda: check_optuna(report, settings["hydra.sweeper.storage"]),
    }
    for name in SECTIONS:
        if name not in only:
            continue
        try:
            checks[name]()
        except Exception as e:  # a bug in one check must not hide the others' results
            report.fail(f"the {name} check itself failed: {cli.one_line(e)}")
    print()
    if report.failures:
        print(f"{len(report.failures)} problem(s), {report.passed} check(s) passed:", flush=True)
        for text in report.failures:
            print(f"  - {text}")
        return cli.FAILURE
    print(f"all {report.passed} check(s) passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
