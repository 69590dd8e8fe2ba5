"""A real Prometheus for tests: Debian's ``prometheus`` binary on a free port, scraping the given
``host:port`` targets every second and evaluating the given rule files every second, its storage
in a temporary directory removed when it stops.

    with PrometheusServer(["127.0.0.1:9464"], rule_files=[ALERTS]) as prom:
        prom.wait_for_targets()
        prom.wait_for("switchyard_circuit_state", bool, timeout_s=20)
        firing = prom.wait_for_alert("SwitchyardCircuitOpen", timeout_s=30)

It never touches a system Prometheus (the Debian package may run one on :9090): it has its own
port, config and storage, and is stopped by its PID (terminate, then kill after a bound).
``for_override`` copies the rule files with every rule's ``for`` replaced, so an alert whose
production ``for`` is minutes can be seen firing in seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from tests.conftest import free_port

__all__ = [
    "PROMETHEUS_BIN",
    "PROMTOOL_BIN",
    "PrometheusServer",
    "need_prometheus",
    "prometheus_server",
    "serve_registry",
]

PROMETHEUS_BIN = os.environ.get("SWITCHYARD_PROMETHEUS_BIN", "/usr/bin/prometheus")
PROMTOOL_BIN = os.environ.get("SWITCHYARD_PROMTOOL_BIN", "/usr/bin/promtool")
JOB = "switchyard"  # the scrape job's name, as in ops/prometheus/prometheus.yml
STOP_S = 10.0


def need_prometheus() -> None:
    """Skip the test when Prometheus is not installed here; fail it in CI (``CI`` set)."""
    missing = [b for b in (PROMETHEUS_BIN, PROMTOOL_BIN) if not shutil.which(b)]
    if missing:
        message = f"not installed: {', '.join(missing)} (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class PrometheusServer:
    """One Prometheus process; ``start``/``stop``, or use it as a context manager."""

    def __init__(
        self,
        targets: Sequence[str],
        rule_files: Sequence[Path] = (),
        *,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        for_override: str | None = None,
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.scrape_targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.for_override = for_override
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        """What Prometheus logged so far (for a failing test's message)."""
        path = self.directory / "prometheus.log" if self.directory else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    # --- lifecycle ----------------------------------------------------------------------------

    def _rules(self, directory: Path) -> list[str]:
        if self.for_override is None:
            return [str(p) for p in self.rule_files]
        copies = []
        for index, path in enumerate(self.rule_files):
            document = yaml.safe_load(path.read_text())
            for group in document.get("groups", []):
                for rule in group.get("rules", []):
                    if "alert" in rule:
                        rule["for"] = self.for_override
            copy = directory / f"rules-{index}-{path.name}"
            copy.write_text(yaml.safe_dump(document, sort_keys=False))
            copies.append(str(copy))
        return copies

    def _write_config(self, directory: Path) -> Path:
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": self._rules(directory),
            "scrape_configs": [
                {"job_name": JOB, "static_configs": [{"targets": self.scrape_targets}]}
            ],
        }
        path = directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self) -> PrometheusServer:
        need_prometheus()
        self.directory = Path(tempfile.mkdtemp(prefix="sy-prometheus-"))
        try:
            config = self._write_config(self.directory)
            self.port = free_port()
            with (self.directory / "prometheus.log").open("wb") as log:
                self.process = subprocess.Popen(
                    [
                        PROMETHEUS_BIN,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.directory / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--storage.tsdb.retention.time=1h",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            self._client = httpx.Client(base_url=self.url, timeout=10.0)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None and self._client is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.process.returncode}):\n{self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if self._client.get("/-/ready").status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready in {self.ready_timeout_s}s:\n{self.log}")

    def stop(self) -> None:
        """Terminate the process (kill it after ``STOP_S``) and remove its directory."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_S)
        self.process = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the HTTP API -------------------------------------------------------------------------

    def _get(self, path: str, **params: str) -> Any:
        if self._client is None:
            raise RuntimeError("prometheus is not running")
        body = self._client.get(path, params=params).json()
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series, each ``{"metric": {...}, "value": [ts, "v"]}``; a scalar
        result as one series without labels."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """``/api/v1/alerts``: each active alert's labels, annotations, state (pending|firing)
        and value."""
        return list(self._get("/api/v1/alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, each with ``scrapeUrl``, ``health`` (up|down|unknown) and
        ``lastError``."""
        return list(self._get("/api/v1/targets", state="active")["activeTargets"])

    # --- bounded waits ------------------------------------------------------------------------

    def _until(self, probe: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            found = probe()
            if found:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
            time.sleep(0.2)

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout_s: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Query ``expr`` until ``predicate`` holds of its series (default: there are some)."""
        last: list[list[dict[str, Any]]] = [[]]

        def probe() -> list[dict[str, Any]] | None:
            last[0] = self.query(expr)
            return last[0] if predicate(last[0]) else None

        try:
            result: list[dict[str, Any]] = self._until(probe, timeout_s, expr)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last result: {last[0]}") from None
        return result

    def wait_for_targets(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every target was scraped and is up."""

        def probe() -> list[dict[str, Any]] | None:
            targets = self.targets()
            up = len(targets) == len(self.scrape_targets) and all(
                t["health"] == "up" for t in targets
            )
            return targets if up else None

        try:
            result: list[dict[str, Any]] = self._until(probe, timeout_s, "every target up")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self.targets()}") from None
        return result

    def wait_for_alert(
        self, name: str, state: str = "firing", timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until alert ``name`` is in ``state``; its active instances in that state."""

        def probe() -> list[dict[str, Any]]:
            return [
                a
                for a in self.alerts()
                if a["labels"].get("alertname") == name and a["state"] == state
            ]

        try:
            result: list[dict[str, Any]] = self._until(probe, timeout_s, f"{name} {state}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; active alerts: {self.alerts()}") from None
        return result


@contextlib.contextmanager
def prometheus_server(
    targets: Sequence[str], rule_files: Sequence[Path] = (), **options: Any
) -> Iterator[PrometheusServer]:
    """A started ``PrometheusServer``, stopped on the way out; in a fixture,
    ``with prometheus_server([...]) as prom: yield prom``."""
    server = PrometheusServer(targets, rule_files, **options)
    with server:
        yield server


@contextlib.contextmanager
def serve_registry(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` on ``/metrics`` at a free port of 127.0.0.1 (a thread); yields the
    ``host:port`` to scrape."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=STOP_S)
