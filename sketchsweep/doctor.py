"""Check that this machine can train and track: versions, GPUs, a tiny training step on every
device, the MLflow store and the Optuna storage.

    python -m sketchsweep.doctor
    python -m sketchsweep.doctor mlflow.tracking_uri=http://host:5000 hydra.sweeper.storage=postgresql+psycopg://...
    python -m sketchsweep.doctor --only mlflow,optuna            # skip versions, GPUs and the training step

Takes the same overrides as training for what it checks (``mlflow.tracking_uri``,
``mlflow.artifact_root``, ``mlflow.experiment_name``, ``hydra.sweeper.storage``,
``trainer.device``); other ``key=value`` arguments are ignored, so a training command's
overrides can be pasted as they are. Exit code 1 when a check fails, 0 otherwise.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DOCTOR_EXPERIMENT = "sketchsweep-doctor"
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
        print(f"\n{redact(title)}", flush=True)

    def line(self, kind: str, text: str) -> None:
        text = redact(text)
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


def redact(text: str) -> str:
    """Hide passwords in URLs (``postgresql://user:secret@host`` -> ``user:***@host``)."""
    return re.sub(r"(://[^:/@\s]+):[^@/\s]+@", r"\1:***@", text)


def _error(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: database drivers put pages of SQL and links in theirs."""
    text = " ".join((str(e).strip().splitlines() or [""])[0].split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
        bf16 = (p.major, p.minor) >= (8, 0)
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

    from sketchsweep.engine import optimizer_options, prepare_model, resolve_precision, to_input
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
        except Exception as e:
            report.fail(f"{name}: {_error(e)}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _not_a_file(folder: Path) -> None:
    """mkdir's "File exists" / "Not a directory" do not say which path is the file."""
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"{p} is a file, not a folder: cannot hold {folder}")


# -- MLflow ----------------------------------------------------------------------------------


def check_mlflow(report: Report, configured: str | None, artifact_root: str | None, experiment: str) -> None:
    """Create, read back and remove a throwaway run (with an artifact) in the store training uses."""
    from sketchsweep.tracking import tracking_uri

    uri = tracking_uri(configured)
    origin = (
        "mlflow.tracking_uri"
        if configured
        else ("$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the project default")
    )
    report.section(f"MLflow tracking store: {uri}  (from {origin})")
    try:
        with _quick_http():
            where = _mlflow_roundtrip(uri, artifact_root)
        report.ok(f"reachable and writable: a throwaway run with a metric and an artifact ({where}), then removed")
    except Exception as e:
        report.fail(f"{uri}: {_error(e)}")
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
        report.fail(f"{uri}: cannot read experiment {experiment!r}: {_error(e)}")


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """A tracking server that is down fails the check in seconds, not after MLflow's minutes of
    retries; the user's own settings win, and the environment is restored afterwards."""
    saved = dict(os.environ)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        yield
    finally:
        for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            if key not in saved:
                os.environ.pop(key, None)


def _mlflow_roundtrip(uri: str, artifact_root: str | None) -> str:
    """Returns where the artifact went. Uses MlflowClient only: no global MLflow state is changed."""
    from mlflow.tracking import MlflowClient

    from sketchsweep.tracking import _local_store_dir

    store_dir = _local_store_dir(uri)
    if uri.startswith(("http://", "https://")):
        from sketchsweep import tracking

        # /health answers in milliseconds; MLflow's API calls to a dead server time out slowly.
        problem = tracking.server_problem(uri) if hasattr(tracking, "server_problem") else None
        if problem:
            raise ConnectionError(f"the tracking server does not answer ({problem})")
    if store_dir is not None:
        _not_a_file(store_dir)
        try:
            store_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the store's folder {store_dir}: {e.strerror or e}") from None
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(DOCTOR_EXPERIMENT)
    if exp is None:
        root = Path(artifact_root) if artifact_root else store_dir
        location = (root.resolve() / DOCTOR_EXPERIMENT).as_uri() if root is not None else None
        exp_id = client.create_experiment(DOCTOR_EXPERIMENT, artifact_location=location)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":  # left by an earlier check on a store without hard deletes
            client.restore_experiment(exp_id)
    run = client.create_run(exp_id, run_name="doctor", tags={"sketchsweep.role": "doctor"})
    run_id = run.info.run_id
    try:
        client.log_metric(run_id, "doctor", 1.0)
        client.log_text(run_id, "written by python -m sketchsweep.doctor\n", "doctor.txt")
        if client.get_run(run_id).data.metrics.get("doctor") != 1.0:
            raise RuntimeError("the metric written could not be read back")
        if [a.path for a in client.list_artifacts(run_id)] != ["doctor.txt"]:
            raise RuntimeError(f"the artifact written could not be listed back from {run.info.artifact_uri}")
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a "View run" link for servers
            client.set_terminated(run_id, "FINISHED")
    finally:
        _remove_run(client, uri, run_id, run.info.artifact_uri, exp_id)
    return run.info.artifact_uri.rsplit("/", 2)[0]


def _remove_run(client, uri: str, run_id: str, artifact_uri: str, exp_id: str) -> None:
    """Delete the throwaway run for good where the store allows it (what `mlflow gc` does), and the
    doctor's experiment once empty; on a server the run stays soft-deleted, out of sight."""
    from mlflow.entities import ViewType
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with contextlib.suppress(Exception):  # nothing was written, or the artifact store is the problem (reported)
        get_artifact_repository(artifact_uri, tracking_uri=uri).delete_artifacts()
    client.delete_run(run_id)
    store = getattr(getattr(client, "_tracking_client", None), "store", None)  # private, as `mlflow gc` uses it
    hard = hasattr(store, "_hard_delete_run") and hasattr(store, "_hard_delete_experiment")
    if hard:
        store._hard_delete_run(run_id)
    local = Path(artifact_uri[len("file://") :]) if artifact_uri.startswith("file://") else None
    if local is not None:  # <experiment folder>/<run id>/artifacts: remove the empty folders left
        for folder in (local, local.parent, local.parent.parent):
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:  # not empty: someone else's files
                break
    if not hard:
        # A server keeps deleted runs, and restoring an experiment would bring its runs back: the
        # doctor's experiment stays (empty to the eye); leftovers of an interrupted check go too.
        for old in client.search_runs([exp_id], filter_string="tags.`sketchsweep.role` = 'doctor'"):
            client.delete_run(old.info.run_id)
        return
    if client.search_runs([exp_id], run_view_type=ViewType.ALL, max_results=1):
        return  # someone keeps runs in it: leave it
    client.delete_experiment(exp_id)
    store._hard_delete_experiment(exp_id)


# -- Optuna ----------------------------------------------------------------------------------


def check_optuna(report: Report, configured: str | None) -> None:
    """Open the sweeps' storage and create, use and delete a throwaway study in it."""
    from sketchsweep.config import PROJECT_ROOT

    default_dir = PROJECT_ROOT / "mlruns" / "optuna"
    if configured is None:
        report.section(f"Optuna storage: journal files in {default_dir}  (default: one <study>.journal per study)")
    else:
        report.section(f"Optuna storage: {configured}  (from hydra.sweeper.storage)")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError as e:
        report.fail(f"optuna cannot be imported ({_error(e)}): sweeps (-m hydra/sweeper=optuna) cannot run")
        return
    try:
        if configured is not None and "://" in configured:
            _check_rdb(report, configured)
        else:
            _check_journal(report, Path(configured).expanduser() if configured else None, default_dir)
    except Exception as e:
        report.fail(f"{configured or default_dir}: {_error(e)}")


def _study_roundtrip(storage: Any) -> None:
    import optuna

    name = f"sketchsweep-doctor-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=storage)
    try:
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, 1.0)
        if study.best_value != 1.0:
            raise RuntimeError("a trial written could not be read back")
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def _check_journal(report: Report, path: Path | None, default_dir: Path) -> None:
    """A journal file is append-only: the check writes a throwaway journal beside it (then deletes
    it) and only reads the configured file, so the user's studies are left exactly as they were."""
    import optuna

    from sketchsweep.trial import open_storage

    folder = path.parent if path is not None else default_dir
    _not_a_file(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    scratch = folder / f".sketchsweep-doctor-{os.getpid()}.journal"
    try:
        _study_roundtrip(open_storage(str(scratch)))
    except OSError as e:
        raise OSError(f"cannot write a journal in {folder}: {e.strerror or e}") from None
    finally:
        for p in folder.glob(scratch.name + "*"):  # the journal and its lock file
            p.unlink(missing_ok=True)
        for p in created:  # folders this check made, innermost first
            try:
                p.rmdir()
            except OSError:
                break
    if path is not None and path.is_file():
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        studies = optuna.get_all_study_names(storage)
        report.ok(f"{path}: opens, {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}; its folder is writable")
    elif path is not None:
        report.ok(f"{path} does not exist yet; its folder is writable, the first sweep creates it")
    else:
        report.ok(f"{folder}: writable; a throwaway study was created, used and deleted")


def _check_rdb(report: Report, url: str) -> None:
    import optuna

    from sketchsweep.trial import storage_url

    url = storage_url(url)  # as the sweeper reads it: postgres(ql):// means psycopg 3
    scheme = url.split("://", 1)[0]
    kwargs: dict[str, Any] = {}
    if scheme.startswith(("postgresql", "mysql")):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}  # a dead server fails in seconds
    # A SQLite file this check creates is removed again: the first sweep makes its own.
    sqlite_file = Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None
    new_file = sqlite_file is not None and not sqlite_file.exists()
    try:
        try:
            storage = optuna.storages.RDBStorage(url, **kwargs)
        except ImportError as e:
            hint = ""
            if scheme.startswith("postgresql"):
                hint = (
                    "; pip install 'psycopg[binary]' for postgresql+psycopg:// (and postgresql:// with "
                    "SQLAlchemy 2.1), or psycopg2-binary for postgresql+psycopg2://"
                )
            raise ImportError(f"the database driver for {scheme}:// is not installed ({e}){hint}") from None
        _study_roundtrip(storage)
        engine = getattr(storage, "engine", None)
        if engine is not None:  # close SQLite's connections before the file is removed
            engine.dispose()
    finally:
        if new_file and sqlite_file is not None:
            sqlite_file.unlink(missing_ok=True)
    report.ok(f"{scheme}:// storage opens; a throwaway study was created, used and deleted")


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
            from omegaconf import OmegaConf

            from sketchsweep.config import PROJECT_ROOT

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


def main(argv: list[str] | None = None) -> int:
    import argparse

    prog = "python -m sketchsweep.doctor"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Check versions, GPUs, a training step on every device, the MLflow store and the Optuna storage.",
        epilog=f"Settings checked: {', '.join(KEYS)}; other key=value arguments are ignored.",
    )
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. mlflow.tracking_uri=URI")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated checks to run, of {','.join(SECTIONS)} (system: versions, GPUs, training step)",
    )
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
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
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
        ),
        "optuna": lambda: check_optuna(report, settings["hydra.sweeper.storage"]),
    }
    for name in SECTIONS:
        if name not in only:
            continue
        try:
            checks[name]()
        except Exception as e:  # a bug in one check must not hide the others' results
            report.fail(f"the {name} check itself failed: {_error(e)}")
    print()
    if report.failures:
        print(f"{len(report.failures)} problem(s), {report.passed} check(s) passed:", flush=True)
        for text in report.failures:
            print(f"  - {text}")
        return 1
    print(f"all {report.passed} check(s) passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
