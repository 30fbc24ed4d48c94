"""A run's metrics and tags on their way to a tracking server that may be down for a while."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import requests
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger("sketchsweep")


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_problem(uri: str, timeout: float = 3.0) -> str | None:
    """None when the tracking server answers its /health endpoint, else what went wrong.

    Quick on purpose: MLflow's own client retries a refused connection for minutes."""
    try:
        r = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None if r.status_code == 200 else f"/health answered HTTP {r.status_code}"


class Outbox:
    """A run's metrics and tags on their way to the store. On a tracking server they wait, in order
    and with their original timestamps, while the server cannot be reached, and go once it answers:
    training goes on through an outage. A down server is detected by a quick /health probe, not by
    MLflow's retries, which would stall training for minutes."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri, self.remote = client, run_id, uri, is_server(uri)
        self.pending: list[tuple[list[Metric], list[RunTag]]] = []
        self.outage: float | None = None  # when the server stopped answering

    def put(self, metrics: list[Metric], tags: list[RunTag]) -> None:
        self.pending.append((metrics, tags))
        self.flush()

    def flush(self, final: bool = False) -> bool:
        """Send what is waiting; False (and one warning per outage) while the server cannot be reached.
        ``final``: the run is ending, so MLflow's own retries get their chance."""
        if not self.pending:
            return True
        if self.remote and not final and server_problem(self.uri, timeout=2) is not None:
            self._down()
            return False
        try:
            while self.pending:
                metrics, tags = self.pending[0]
                self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
                self.pending.pop(0)
        except Exception:
            if not self.unreachable():
                raise
            self._down()
            return False
        if self.outage is not None:
            log.warning(
                "MLflow server at %s is back after %.0f s: buffered metrics and tags sent",
                *(self.uri, time.monotonic() - self.outage),
            )
            self.outage = None
        return True

    def _down(self) -> None:
        if self.outage is None:
            self.outage = time.monotonic()
            log.warning(
                "MLflow server at %s (mlflow.tracking_uri) cannot be reached: training goes on, metrics are "
                "buffered and sent when it is back",
                self.uri,
            )

    def unreachable(self) -> bool:
        """Whether the store is a server that cannot be reached now (then an error from it is not a bug)."""
        return self.remote and server_problem(self.uri, timeout=2) is not None

    def save_unsent(self, run_dir: Path | None) -> None:
        """What is still waiting at the end of the run goes to ``mlflow_unsent.json`` in the run folder."""
        n = sum(len(m) + len(t) for m, t in self.pending)
        rows = [
            {"metrics": [m.to_dictionary() for m in metrics], "tags": {t.key: t.value for t in tags}}
            for metrics, tags in self.pending
        ]
        where = "nowhere (no run folder)"
        if run_dir is not None:
            path = run_dir / "mlflow_unsent.json"
            path.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri, "batches": rows}, indent=1))
            where = str(path)
        log.error(
            "MLflow server at %s (mlflow.tracking_uri) still unreachable at the end of run %s: %d metric values "
            "and tags not sent, saved to %s",
            *(self.uri, self.run_id, n, where),
        )
