"""The alert rules, the Prometheus config and the dashboards (issue #18, items 3 and 4).

promtool checks and unit-tests the rules; the dashboards' JSON must equal a fresh build of their
code; every metric and label they name must be Switchyard's. Then a real Prometheus scrapes an
in-process exporter of every Switchyard metric (the names and labels of ``broker.core.names``):
the circuit alert fires, every dashboard query returns data (``ops/grafana/check.py``), and the
checker reports a query without data.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker.core import names
from ops.grafana import build
from ops.grafana.check import check_dashboards, dashboard_queries
from ops.grafana.cost import BUDGET_BURN
from tests.conftest import REPO
from tests.prometheus_server import (
    PROMTOOL_BIN,
    PrometheusServer,
    need_prometheus,
    prometheus_server,
    serve_registry,
)

PROM_DIR = REPO / "ops" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERT_TESTS = PROM_DIR / "alerts.test.yml"
HISTOGRAMS = {
    names.METRIC_JOB_WAIT,
    names.METRIC_JOB_DURATION,
    names.METRIC_PROVIDER_LATENCY,
    names.METRIC_PROVIDER_TTFT,
    names.METRIC_HTTP_DURATION,
}
# Every metric's name -> its label names, from broker.core.names.
METRICS: dict[str, tuple[str, ...]] = {
    getattr(names, attr): getattr(names, f"{attr}_LABELS")
    for attr in dir(names)
    if attr.startswith("METRIC_") and not attr.endswith("_LABELS")
}
_SERIES_NAME = re.compile(r"\b(switchyard_\w+)")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")


def _promtool(*args: str) -> str:
    need_prometheus()
    done = subprocess.run(
        [PROMTOOL_BIN, *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(build.DASHBOARDS_DIR.glob("*.json"))}


# --- promtool -------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    output = _promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(_alert_rules())} rules found" in output


def test_promtool_unit_tests_pass() -> None:
    assert "SUCCESS" in _promtool("test", "rules", str(ALERT_TESTS))


def test_promtool_checks_the_compose_config() -> None:
    output = _promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert "is valid prometheus config file syntax" in output
    assert f"SUCCESS: {len(_alert_rules())} rules found" in output


def test_every_alert_is_labelled_annotated_and_unit_tested_both_ways() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    rules = _alert_rules()
    assert len(rules) >= 9
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= rule["annotations"].keys(), name
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: needs a firing and a not-firing case"


# --- the dashboards' code and JSON ----------------------------------------------------------


def test_the_committed_dashboards_equal_a_fresh_build() -> None:
    assert build.stale() == [], "run: python -m ops.grafana.build"
    assert sorted(_dashboards()) == sorted(build.BOARDS)


def test_build_check_flags_an_edited_dashboard(tmp_path: Path) -> None:
    build.write(tmp_path)
    assert build.main(["--check", "--out", str(tmp_path)]) == 0
    edited = tmp_path / "cost.json"
    edited.write_text(edited.read_text().replace("switchyard_cost_usd_total", "usd_total"))
    assert build.main(["--check", "--out", str(tmp_path)]) == 1


def _exprs() -> list[tuple[str, str]]:
    """(where, expr) of every dashboard query (variables substituted) and every alert rule."""
    found = []
    for name, board in _dashboards().items():
        queries, unresolved = dashboard_queries(board)
        assert unresolved == [], [str(p) for p in unresolved]
        found += [(f"{name} / {q.panel} [{q.ref}]", q.expr) for q in queries]
    return found + [(rule["alert"], rule["expr"]) for rule in _alert_rules()]


def test_every_metric_and_grouping_label_is_switchyards() -> None:
    """Each series named is a Switchyard metric (a histogram's by its _bucket, _count or
    _sum), and each ``by (...)`` label is one of the expression's metrics' labels."""
    exprs = _exprs()
    assert len(exprs) > 50
    for where, expr in exprs:
        used: set[str] = set()
        for series in _SERIES_NAME.findall(expr):
            base = re.sub(r"_(bucket|count|sum)$", "", series)
            metric = series if series in METRICS else base if base in HISTOGRAMS else None
            assert metric is not None, f"{where}: {series} is not a Switchyard metric"
            used.update(METRICS[metric])
        for group in _BY.findall(expr):
            labels = {label.strip() for label in group.split(",")} - {"le"}
            assert labels <= used, f"{where}: by ({group}) is not among {sorted(used)}"


def test_the_budget_alerts_and_the_budget_panels_read_one_ratio() -> None:
    budgets = [r["expr"] for r in _alert_rules() if r["alert"].startswith("SwitchyardBudget")]
    assert len(budgets) == 2
    for expr in budgets:
        assert BUDGET_BURN in " ".join(expr.split())


def test_every_panel_reads_the_datasource_variable() -> None:
    for name, board in _dashboards().items():
        variables = board["templating"]["list"]
        assert variables[0]["type"] == "datasource" and variables[0]["query"] == "prometheus"
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
                assert panel["targets"], (name, panel["title"])


def test_compose_scrapes_each_switchyard_process() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    port = compose["x-switchyard"]["environment"]["SWITCHYARD_METRICS_PORT"]
    processes = {
        name
        for name, service in services.items()
        if service.get("command", [None])[0] in ("scheduler", "worker", "accountant", "gateway")
    }
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "switchyard"]
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    assert targets == {f"{name}:{port}" for name in processes}
    for name in processes:
        assert services[name]["environment"]["SWITCHYARD_METRICS_PORT"] == port
    mounts = " ".join(services["grafana"]["volumes"] + services["prometheus"]["volumes"])
    for directory in ("ops/prometheus", "ops/grafana/provisioning", "ops/grafana/dashboards"):
        assert f"./{directory}:" in mounts


# --- a real Prometheus ----------------------------------------------------------------------


def _metric(registry: CollectorRegistry, name: str) -> Counter | Gauge | Histogram:
    labels = METRICS[name]
    if name in HISTOGRAMS:
        return Histogram(name, name, labels, registry=registry, buckets=(0.1, 1, 10, 60))
    if name.endswith("_total"):
        return Counter(name, name, labels, registry=registry)
    return Gauge(name, name, labels, registry=registry)


def _fill(m: dict[str, Any]) -> None:
    """One provider "p" whose circuit is open (and "q" closed), a key with a USD budget 90 %
    spent, and every other series a dashboard reads, with the label values the processes use."""
    n = names
    m[n.METRIC_JOBS_SUBMITTED].labels("5", "gpt-4o-mini", "chat").inc(3)
    for status in ("succeeded", "server_error"):
        m[n.METRIC_JOBS_FINISHED].labels(status, "5", "p", "gpt-4o-mini", "chat").inc()
    for histogram in (n.METRIC_JOB_WAIT, n.METRIC_JOB_DURATION):
        m[histogram].labels("5").observe(0.5)
    for kind in ("prompt", "completion"):
        m[n.METRIC_TOKENS].labels("p", "gpt-4o-mini", "key-a", "chat", kind).inc(100)
    m[n.METRIC_COST].labels("p", "gpt-4o-mini", "key-a", "chat").inc(0.01)
    for histogram in (n.METRIC_PROVIDER_LATENCY, n.METRIC_PROVIDER_TTFT):
        m[histogram].labels("p", "gpt-4o-mini").observe(0.3)
    m[n.METRIC_PROVIDER_ERRORS].labels("p", "gpt-4o-mini", "timeout").inc()
    m[n.METRIC_RETRIES].labels("p", "gpt-4o-mini").inc()
    m[n.METRIC_FAILOVERS].labels("p").inc()
    m[n.METRIC_CIRCUIT_OPENED].labels("p").inc()
    for provider, state, status in (("p", 2, "down"), ("q", 0, "up")):
        m[n.METRIC_CIRCUIT_STATE].labels(provider).set(state)
        for each in ("up", "degraded", "down"):
            m[n.METRIC_PROVIDER_UP].labels(provider, each).set(int(each == status))
        m[n.METRIC_PROVIDER_ERROR_RATE].labels(provider, "gpt-4o-mini").set(0.1)
        m[n.METRIC_PROVIDER_P50].labels(provider, "gpt-4o-mini").set(0.3)
    m[n.METRIC_QUOTA_USED].labels("key", "key-a", "usd_per_day").set(9)
    m[n.METRIC_QUOTA_LIMIT].labels("key", "key-a", "usd_per_day").set(10)
    m[n.METRIC_PARKED].labels("quota").inc()
    for queue in ("jobs", "reroute", "usage", "dead", "provider.p", "provider.p.1", "park.30s"):
        m[n.METRIC_QUEUE_MESSAGES].labels(queue).set(1)
        m[n.METRIC_QUEUE_AGE].labels(queue).set(2)
        m[n.METRIC_QUEUE_CONSUMERS].labels(queue).set(1)
    m[n.METRIC_ACCOUNTANT_LAG].set(0.2)
    m[n.METRIC_HTTP_REQUESTS].labels("/v1/chat/completions", "POST", "200").inc()
    m[n.METRIC_HTTP_DURATION].labels("/v1/chat/completions").observe(0.05)
    m[n.METRIC_WEBHOOK_ATTEMPTS].labels("2xx").inc()
    m[n.METRIC_WEBHOOK_DELIVERIES].labels("delivered").inc()


@pytest.fixture(scope="module")
def exporter() -> Iterator[str]:
    registry = CollectorRegistry()
    metrics = {name: _metric(registry, name) for name in METRICS}
    _fill(metrics)
    with serve_registry(registry) as target:
        yield target


@pytest.fixture(scope="module")
def prom(exporter: str) -> Iterator[PrometheusServer]:
    with prometheus_server([exporter], [ALERTS]) as server:
        server.wait_for_targets(timeout_s=30)
        yield server


def test_the_circuit_alert_fires_for_the_open_circuit_only(prom: PrometheusServer) -> None:
    firing = prom.wait_for_alert("SwitchyardCircuitOpen", timeout_s=30)
    assert [a["labels"]["provider"] for a in firing] == ["p"]
    assert firing[0]["labels"]["severity"] == "warning"
    assert firing[0]["annotations"]["summary"] == "Circuit breaker of p is open"
    # Its `for` of 2 minutes holds the unhealthy-provider alert pending.
    assert prom.wait_for_alert("SwitchyardProviderUnhealthy", state="pending", timeout_s=30)


def test_with_for_overridden_a_minutes_long_alert_fires_in_seconds(exporter: str) -> None:
    with prometheus_server([exporter], [ALERTS], for_override="1s") as server:
        firing = server.wait_for_alert("SwitchyardProviderUnhealthy", timeout_s=30)
        budget = server.wait_for_alert("SwitchyardBudget80", timeout_s=30)
    assert [a["labels"]["provider"] for a in firing] == ["p"]
    assert [a["labels"]["scope_id"] for a in budget] == ["key-a"]


def _rated(prom: PrometheusServer) -> None:
    """Until rate() over the dashboards' 1m has two samples of each series to work from."""
    prom.wait_for("rate(switchyard_jobs_submitted_total[1m])", timeout_s=30)


def test_every_dashboard_query_returns_data(prom: PrometheusServer) -> None:
    _rated(prom)
    problems = check_dashboards(prom.url)
    assert problems == [], "\n".join(map(str, problems))


def _board(title: str, *exprs: str) -> dict[str, Any]:
    return {
        "title": title,
        "templating": {"list": [{"name": "datasource", "type": "datasource"}]},
        "panels": [
            {"title": f"panel {i}", "targets": [{"refId": "A", "expr": expr}]}
            for i, expr in enumerate(exprs)
        ],
    }


def test_the_checker_reports_each_query_without_data(
    prom: PrometheusServer, tmp_path: Path
) -> None:
    _rated(prom)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_board("good", "max(switchyard_circuit_state)")))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            _board(
                "bad",
                "sum(rate(switchyard_jobs_submitted_total[$__rate_interval]))",  # has data
                'switchyard_circuit_state{provider="nobody"}',  # no series
                "sum(rate(switchyard_jobs_submitted_total[5m]",  # not PromQL
                'switchyard_circuit_state{provider=~"$nowhere"}',  # unknown variable
            )
        )
    )
    assert check_dashboards(prom.url, [good]) == []
    problems = check_dashboards(prom.url, [good, bad])
    reported = sorted((p.query.panel, p.reason.split(":")[0]) for p in problems)
    assert reported == [
        ("panel 1", "no series"),
        ("panel 2", "bad_data"),
        ("panel 3", "unknown variables"),
    ]
    cli = [sys.executable, "-m", "ops.grafana.check", "--prometheus", prom.url]
    passed = subprocess.run([*cli, str(good)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert passed.returncode == 0, passed.stderr
    failed = subprocess.run([*cli, str(bad)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert failed.returncode == 1 and "bad / panel 1 [A]: no series" in failed.stderr
