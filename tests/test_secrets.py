"""Passwords in storage and tracking URLs stay out of everything a run or a sweep writes or logs:
the masking itself on tricky URLs, a training run on a real MLflow server whose URI carries a
password, and a real sweep on a password-protected PostgreSQL role."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from omegaconf import OmegaConf
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from sketchsweep import tracking
from sketchsweep.cli import one_line, redact
from sketchsweep.credentials import (
    SECRET_URLS_ENV,
    hide_password,
    hide_passwords,
    reveal,
    scrub,
    scrub_files,
    server_uri,
    share,
)
from sketchsweep.sweep.storage import open_storage
from tests.conftest import cli_env, sweep_overrides, tiny_overrides, train_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)

PASSWORD = "Kx7q/w@Rm4z"  # a "/" and an "@": both broke the old masking
IN_URL = "Kx7q/w%40Rm4z"  # as a URL carries it ("@" percent-encoded, as SQLAlchemy expects)
FRAGMENTS = ("Kx7q", "Rm4z")  # either side of the "/" and the "@": no part of the password may show

TRICKY = [
    "postgresql://user:Kx7q/wRm4z@host/db",  # "/" in the password
    f"postgresql+psycopg://user:{IN_URL}@host:5432/db?sslmode=require",
    "postgresql+psycopg://user:Kx7q%2Fw%40Rm4z@host/db",  # all of it encoded
    "postgresql://:Kx7qRm4z@host/db",  # no user name
    "postgresql://user:Kx7q@Rm4z@host/db",  # an "@" not encoded
    "postgresql://user:Kx7q/w@Rm4z@host:5432/db",  # both, not encoded
    "postgresql://a@corp:Kx7qRm4z@host/db",  # an "@" in the user name
    f"http://alice:{IN_URL}@127.0.0.1:5000",
    "https://alice:Kx7q:Rm4z@mlflow.example.org/prefix?x=1",  # ":" in the password
    "mysql+pymysql://user:Kx7q?Rm4z@[::1]:3306/db",  # "?" in the password, an IPv6 host
]
# A password given as a query parameter (libpq, PyMySQL and others read it there).
IN_QUERY = [
    "postgresql+psycopg://user@host/db?password=Kx7q%2Fw%40Rm4z",
    "postgresql://user@host:5432/db?sslmode=require&password=Kx7qRm4z&application_name=x",
    "postgresql+psycopg://user@host/db?sslpassword=Kx7qRm4z",
    "mysql+pymysql://user@host/db?passwd=Kx7qRm4z",
    "postgresql://user:Kx7q@host/db?password=Rm4z",  # both places
]
# An "@" after the authority (in a path or a query) is no user info: http(s) URLs read as urllib does.
AT_IN_PATH = [
    "http://localhost:5000/a@b",
    "https://mlflow.example.org/team@corp/",
    "http://[::1]:5000/runs@x",
    "http://localhost:5000/x?user=a:b@c",
    "http://localhost:5000/a@b?x=1#c@d",
]
PLAIN = [
    "postgresql+psycopg://user@host:5432/db",
    "postgresql://user@host/db?sslmode=require&passfile=/home/u/.pgpass",
    "sqlite:////tmp/mlruns/mlflow.db",
    "http://127.0.0.1:5000",
    "file:///tmp/mlruns",
    "/tmp/optuna/sweep-abc.journal",
    "databricks://profile:prefix",
]


# Set by the code under test (share, server_uri): restored after each test, checked at the end.
SECRET_VARS = (SECRET_URLS_ENV, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
ENV_AT_START = {k: os.environ.get(k) for k in SECRET_VARS}


@pytest.fixture(autouse=True)
def _restore_environment():
    """``share`` and ``server_uri`` write to ``os.environ`` (their purpose); ``monkeypatch.delenv``
    of an unset variable records nothing to undo, so restore the whole environment instead."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def parts(url: str) -> tuple:
    u = make_url(url)
    return u.drivername, u.username, u.password, u.host, u.port, u.database, dict(u.query)


@pytest.mark.parametrize("url", TRICKY)
def test_a_password_is_hidden_whatever_it_holds(url):
    shown, text = hide_password(url), redact(url)
    assert not [f for f in FRAGMENTS if f in shown or f in text], (shown, text)
    # The regex of cli.redact (standard library only) hides what SQLAlchemy's parser calls the
    # password, and leaves the rest of the URL as SQLAlchemy reads it.
    assert parts(text) == parts(shown)
    assert make_url(shown).password == "***"
    original = make_url(url)
    if "@" not in (original.host or ""):  # an unencoded "@": SQLAlchemy itself splits at the first one
        assert parts(shown)[:2] + parts(shown)[3:] == parts(url)[:2] + parts(url)[3:]
    assert hide_password(shown) == shown


@pytest.mark.parametrize("url", PLAIN)
def test_a_url_without_a_password_is_left_as_given(url):
    assert hide_password(url) == url and redact(url) == url


@pytest.mark.parametrize("url", IN_QUERY)
def test_a_password_in_the_query_is_hidden(url):
    shown, text, [scrubbed] = hide_password(url), redact(url), scrub([url])
    assert not [f for f in FRAGMENTS if f in shown or f in text or f in scrubbed], (shown, text, scrubbed)
    assert text == shown == scrubbed
    original, hidden = make_url(url), make_url(shown)
    assert {k: v for k, v in hidden.query.items() if "pass" in k} == {k: "***" for k in original.query if "pass" in k}
    assert parts(shown)[:2] + parts(shown)[3:6] == parts(url)[:2] + parts(url)[3:6]
    assert [k for k in hidden.query] == [k for k in original.query]  # the other parameters as given


@pytest.mark.parametrize("url", AT_IN_PATH)
def test_an_at_sign_after_the_host_is_no_password(url, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert hide_password(url) == url and redact(url) == url and scrub(url) == url
    assert server_uri(url) == url
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ and "MLFLOW_TRACKING_PASSWORD" not in os.environ
    # With credentials before the host, only they go: the path keeps its "@".
    with_creds = url.replace("://", f"://alice:{IN_URL}@", 1)
    assert hide_password(with_creds) == redact(with_creds) == url.replace("://", "://alice:***@", 1)
    assert server_uri(with_creds) == url
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", PASSWORD)


def test_what_is_written_is_masked_by_the_parser(tmp_path):
    """A password with a space: SQLAlchemy reads it whole; a regex over free text cannot."""
    url = "postgresql://user:Kx7q Rm4z@host/db"
    assert make_url(url).password == "Kx7q Rm4z" and hide_password(url) == "postgresql://user:***@host/db"
    config = {"sweep": {"storage": url}, "tags": [f"storage={url}", f"'{url}' and http://localhost:5000/a@b"]}
    assert scrub(config) == {
        "sweep": {"storage": "postgresql://user:***@host/db"},
        "tags": [
            "storage=postgresql://user:***@host/db",
            "'postgresql://user:***@host/db' and http://localhost:5000/a@b",
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(f"sweep:\n  storage: {url}\n  other: sqlite:///x.db\nhydra:\n  task:\n  - sweep.storage='{url}'\n")
    scrub_files([path])
    assert path.read_text() == (
        "sweep:\n  storage: postgresql://user:***@host/db\n  other: sqlite:///x.db\n"
        "hydra:\n  task:\n  - sweep.storage='postgresql://user:***@host/db'\n"
    )
    # YAML folds a long value over lines (Hydra's override_dirname): each value is read whole.
    dirname = f"mlflow.tracking_uri=sqlite:///{'x' * 60}.db,sweep.storage='{url}',trainer.epochs=2"
    path.write_text(OmegaConf.to_yaml({"job": {"override_dirname": dirname, "id": "???"}}))
    assert "Kx7q\n" in path.read_text()
    scrub_files([path])
    clean = OmegaConf.load(path)
    assert clean.job.override_dirname == dirname.replace(url, "postgresql://user:***@host/db")
    assert OmegaConf.is_missing(clean.job, "id")
    # Free text: every URL in it through the parser, the rest as given.
    text = f"connect to {url}, then http://u:{IN_URL}@h:5000/a@b (see postgresql://h/db?password=Kx7q)."
    assert hide_passwords(text) == (
        "connect to postgresql://user:***@host/db, then http://u:***@h:5000/a@b (see postgresql://h/db?password=***)."
    )


def test_a_url_escaped_in_a_hydra_override_is_read_as_unescaped():
    """The sweeper hands a job its fixed overrides as Hydra writes them: ``:`` escaped as ``\\:``."""
    line = r"- mlflow.tracking_uri=http\://alice\:Kx7q/w%40Rm4z@h\:5000,sweep.storage=postgresql\://u\:Kx7q\ Rm4z@h/db"
    expected = r"- mlflow.tracking_uri=http\://alice\:***@h\:5000,sweep.storage=postgresql\://u\:***@h/db"
    assert hide_passwords(line) == scrub([line])[0] == expected
    assert redact(line.split(",")[0]) == expected.split(",")[0]  # the regex: no space in the password
    at = r"mlflow.tracking_uri=http\://localhost\:5000/a@b"
    assert redact(at) == hide_passwords(at) == at


def test_passwords_in_free_text_and_shortened_errors_are_hidden():
    text = f"cannot connect to postgresql://:{PASSWORD}@db/optuna (timeout); tracking 'http://u:Kx7q/w@h:5000/'"
    assert redact(text) == "cannot connect to postgresql://:***@db/optuna (timeout); tracking 'http://u:***@h:5000/'"
    # An error cut short inside its URL: the cut must not leave the password without its "@".
    error = RuntimeError("x" * 280 + f" postgresql://user:{IN_URL}@host/db")
    assert not [f for f in FRAGMENTS if f in one_line(error)], one_line(error)


def test_a_shared_url_is_revealed_only_to_its_hidden_form(monkeypatch, caplog):
    monkeypatch.delenv(SECRET_URLS_ENV, raising=False)
    real = f"postgresql+psycopg://user:{IN_URL}@host:5432/db"
    shown = share(real)
    assert shown == "postgresql+psycopg://user:***@host:5432/db"
    assert json.loads(os.environ[SECRET_URLS_ENV]) == [real]
    assert share("/tmp/x.journal") == "/tmp/x.journal" and json.loads(os.environ[SECRET_URLS_ENV]) == [real]
    assert reveal(shown, "sweep.storage") == real
    assert reveal(real, "sweep.storage") == real
    # Another URL's hidden form is not given this password: it connects without one (PGPASSWORD, ~/.pgpass).
    assert reveal("postgresql+psycopg://user:***@other/db", "sweep.storage") == "postgresql+psycopg://user@other/db"
    assert "sweep.storage=postgresql+psycopg://user:***@other/db: the password is hidden" in caplog.text
    # A password in the query: shared and revealed the same way, dropped when not found.
    real = "postgresql+psycopg://user@host/db?sslmode=require&password=Kx7q%2Fw%40Rm4z"
    shown = share(real)
    assert shown == "postgresql+psycopg://user@host/db?sslmode=require&password=***"
    assert reveal(shown, "sweep.storage") == real
    other = "postgresql+psycopg://user@other/db?sslmode=require&password=***"
    assert reveal(other, "sweep.storage") == "postgresql+psycopg://user@other/db?sslmode=require"


def test_a_tracking_servers_credentials_go_to_mlflow_through_its_environment(monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    uri = tracking.tracking_uri(f"http://alice:{IN_URL}@127.0.0.1:5000")
    assert uri == "http://127.0.0.1:5000"
    creds = get_default_host_creds(uri)  # what MLflow sends with each request to the server
    assert (creds.username, creds.password) == ("alice", PASSWORD)
    # A recorded config's hidden password keeps the credentials given before.
    assert tracking.tracking_uri("http://alice:***@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD


def test_files_are_rewritten_with_the_password_hidden(tmp_path):
    path = tmp_path / "hydra.yaml"
    path.write_text(f"storage: postgresql://user:{IN_URL}@host/db\nother: 1\n")
    path.chmod(0o640)
    scrub_files([path, tmp_path / "missing.yaml"])
    assert path.read_text() == "storage: postgresql://user:***@host/db\nother: 1\n"
    assert path.stat().st_mode & 0o777 == 0o640 and [p.name for p in tmp_path.iterdir()] == ["hydra.yaml"]


def test_no_secret_is_left_in_the_environment_for_later_tests(monkeypatch):
    """Runs after the tests above: what they set is gone, and no subprocess inherits it."""
    assert {k: os.environ.get(k) for k in SECRET_VARS} == ENV_AT_START
    monkeypatch.setenv(SECRET_URLS_ENV, json.dumps(["postgresql://u:x@h/db"]))
    assert SECRET_URLS_ENV not in cli_env()


# -- real runs ---------------------------------------------------------------------------------


def leaks(texts: dict[str, str | bytes]) -> list[str]:
    """The names of the texts that hold any part of the password."""
    found = []
    for name, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        if any(f.encode() in data for f in FRAGMENTS):
            found.append(name)
    return found


def files_under(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}


def mlflow_records(uri: str, experiment: str) -> dict[str, str]:
    """Every run's name, params and tags in ``experiment``, as text."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert runs
    return {
        f"run {r.info.run_name}": json.dumps([r.info.run_name, r.data.params, r.data.tags, r.info.artifact_uri])
        for r in runs
    }


def with_password(uri: str, user: str = "alice") -> str:
    return uri.replace("://", f"://{user}:{IN_URL}@", 1)


def test_a_trials_storage_password_on_the_command_line_is_refused_and_recorded_nowhere(tiny_data, tmp_path, store):
    """A storage URL with a password on the command line (as a sweep's job gets it, re-run by
    hand): refused (the sweep's internal keys are), and neither the console nor the run folder
    Hydra made (.hydra/) holds it. It holds a space, which only the parser, not a regex over free
    text, finds the end of."""
    run_dir, storage = tmp_path / "run", f"postgresql+psycopg://alice:{IN_URL} x@db.invalid/optuna"
    overrides = tiny_overrides(tiny_data, store, run_dir, f"sweep.storage='{storage}'", "trainer.epochs=2")
    proc = train_cli(overrides, cwd=tmp_path)
    assert proc.returncode == 2 and "sweep.storage: set by the Optuna sweeper" in proc.stdout + proc.stderr
    assert "alice:***@db.invalid" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    texts = {"console": proc.stdout + proc.stderr, **files_under(run_dir)}
    assert not leaks(texts)


# -- a real sweep on a password-protected PostgreSQL role -----------------------------------------


@pytest.fixture
def protected_db(postgres) -> str:
    """A database owned by a new role that must give its password (scram-sha-256, not the cluster's
    trust): the storage URL of a sweep, password included."""
    import psycopg
    from psycopg import sql

    role, db = f"secret_{uuid.uuid4().hex[:8]}", f"secret_{uuid.uuid4().hex[:8]}"
    admin = f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(PASSWORD)))
        c.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(role)))
        hba = postgres.dir / "data" / "pg_hba.conf"  # the first matching line wins
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        c.execute("SELECT pg_reload_conf()")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"host=127.0.0.1 port={postgres.port} user={role} dbname={db} password=wrong").close()
    return f"postgresql+psycopg://{role}:{IN_URL}@127.0.0.1:{postgres.port}/{db}"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=submitit_local"]], ids=["basic", "submitit_local"])
def test_a_sweep_on_a_password_protected_database_records_no_password(
    tiny_data, tmp_path, protected_db, mlflow_server, launcher
):
    """Jobs reach the study with the password the sweeper hands them through the environment;
    nothing under the sweep folder (submitit's pickled jobs too), in MLflow or on the console holds it."""
    args = sweep_overrides(
        tiny_data,
        protected_db,
        with_password(mlflow_server.uri),
        tmp_path / "sweep",
        "secret",
        "mlflow.experiment_name=secret-sweep",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.pruner=none",
        "optimizer.lr=tag(log,interval(1e-4,1e-2))",
        *launcher,
        epochs=2,
    )
    proc = train_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]

    trials = optuna.load_study(study_name="secret", storage=open_storage(protected_db)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] and trials[0].intermediate_values  # the job reported
    records = mlflow_records(mlflow_server.uri, "secret-sweep")
    assert len(records) == 2  # the study's parent run and its trial's
    overrides = (tmp_path / "sweep" / "trial-0" / ".hydra" / "overrides.yaml").read_text()
    assert hide_password(protected_db) in overrides  # the job's override names the storage, password hidden
    assert hide_password(protected_db) in (tmp_path / "sweep" / "trial-0" / ".hydra" / "hydra.yaml").read_text()
    texts = {"console": proc.stdout + proc.stderr, **files_under(tmp_path / "sweep", mlflow_server.artifacts)}
    assert not leaks({**texts, **records})


@pytest.mark.slow
def test_a_run_on_a_password_protected_store_prints_and_records_no_password(tiny_data, tmp_path, protected_db):
    """A single run whose MLflow store is the database itself: the line saying how to open the UI
    names the store with its password hidden, on the console and in train.log (which is uploaded)."""
    run_dir, artifacts = tmp_path / "run", tmp_path / "artifacts"
    args = tiny_overrides(tiny_data, protected_db, run_dir, "trainer.epochs=1", f"mlflow.artifact_root={artifacts}")
    proc = train_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"--backend-store-uri {hide_password(protected_db)}" in out
    assert not leaks({"console": out, **files_under(run_dir, artifacts)})
