"""monitoring/: the alert rules pass promtool's checks and its unit tests (synthetic series, each
alert firing and quiet), and every PromQL expression in the rules and the Grafana dashboard names
only metrics a real daemon exposes on /metrics (a redis node: it has every series a single node
has, plus the broker's). promtool comes from Debian's prometheus package, installed by
build/ensure-promtool.sh when it is missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from daemon_process import DaemonProcess, config_text, http_get
from redis_server import ROOT, RedisServer

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts.test.yml"
SCRAPE_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"

# The alerts docs/MONITORING.md lists, by what they watch.
REQUIRED_ALERTS = {
    "AgentspoonsdDown",
    "AgentspoonsdNotReady",
    "AgentspoonsdBrokerDisconnected",
    "AgentspoonsdGeneratorLate",
    "AgentspoonsdClientsCutAsSlow",
    "AgentspoonsdAuthFailuresSpike",
    "AgentspoonsdWatchdogNearMiss",
}
# Series Prometheus itself writes for every target; not on /metrics.
PROMETHEUS_SERIES = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)
# The sample names a metric family of each type writes (prometheus_client's parser gives the
# family name: a counter `x` is scraped as `x_total`, a histogram as `x_bucket`, ...).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan", "start", "end"}
)


def ensure_promtool() -> str:
    """The promtool executable, installed first if absent."""
    if shutil.which("promtool") is None:
        subprocess.run(["sh", str(ROOT / "build" / "ensure-promtool.sh")], check=True)
    found = shutil.which("promtool")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_promtool()


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )


# --- names in PromQL (pure) ----------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's `$variables` allowed).

    Strings, label matchers, ranges and the label lists of `by`/`on`/... are removed first; what
    is left that looks like a name, is not a function call or aggregation, a keyword or part of a
    number or duration, is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        name = match.group()
        # A call, or an aggregation with its `by`/`without` clause first: `sum by (x) (...)`.
        called = re.match(r"\s*(\(|(by|without)\b)", text[match.end() :])
        if name.lower() in PROMQL_KEYWORDS or called:
            continue
        names.add(name)
    return names


def exposed_names(exposition: str) -> set[str]:
    """Every sample name a /metrics text can hold, whether or not a sample is there yet (a
    labelled counter before its first event is declared but has no sample)."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(exposition)
        for suffix in SUFFIXES[family.type]
    }


def test_metric_names_of_promql_expressions() -> None:
    assert metric_names(
        'sum by (reason) (rate(agentspoonsd_auth_failures_total{reason!="x(y)"}[5m])) > 1'
    ) == {"agentspoonsd_auth_failures_total"}
    assert metric_names(
        "increase(a_total[15m]) > 0 or (a_total unless a_total offset 15m)"
        " and on (job, instance) (b_info offset 1h30m)"
    ) == {"a_total", "b_info"}
    assert metric_names('time() - process_start_time_seconds{instance=~"$instance"}') == {
        "process_start_time_seconds"
    }
    assert metric_names(
        "histogram_quantile(0.99, sum without (le2) (rate(h_bucket[$__rate_interval])))"
    ) == {"h_bucket"}
    assert metric_names("a > bool 1e3 * b + c:recorded") == {"a", "b", "c:recorded"}
    assert metric_names("x / ignoring (reason) group_left (service) y") == {"x", "y"}


def test_exposed_names_follow_each_type_and_catch_a_misspelling() -> None:
    text = (
        "# HELP c_total A counter.\n# TYPE c_total counter\n"  # declared, no sample yet
        "# HELP g A gauge.\n# TYPE g gauge\ng 1.0\n"
        "# HELP h A histogram.\n# TYPE h histogram\n"
        'h_bucket{le="+Inf"} 0.0\nh_sum 0.0\nh_count 0.0\n'
    )
    names = exposed_names(text)
    assert {"c_total", "g", "h_bucket", "h_sum", "h_count"} <= names
    assert metric_names("rate(c_totl[5m]) + g") - names == {"c_totl"}
    assert "c" not in names and "g_total" not in names


# --- promtool --------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass_in_promtool(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_scrape_config_and_its_rule_files_pass_promtool_check(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", SCRAPE_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    """Each required alert exists, and each alert in the rules has a promtool case where it
    fires and one where it stays quiet (a rule without both is not tested)."""
    assert set(alerts()) >= REQUIRED_ALERTS
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for name in alerts():
        outcomes = {bool(case.get("exp_alerts")) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: firing and quiet cases, got {outcomes}"


# --- every expression names a metric the daemon exposes ----------------------------------------


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: the panels' targets, and the metric selectors of
    the templating queries (`label_values(selector, label)`, Grafana's, not PromQL)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    dashboard = json.loads(DASHBOARD.read_text())
    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        if match := re.fullmatch(r"label_values\((.*),\s*\w+\)", text):
            found.append(match.group(1))
    return found


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def scrape_redis_node(tmp_path: Path, redis: RedisServer) -> str:
    broker = f'\n[broker]\nkind = "redis"\nurl = "{redis.url}"\nprefix = "monitoring"\n'
    config = tmp_path / "node.toml"
    config.write_text(config_text(auth_enabled=False, extra=broker))
    node = DaemonProcess(config)
    node.start()
    try:
        _, http_port = await node.ports()
        status, _, body = await http_get(http_port, "/metrics")
        assert status == 200, body
        return body.decode()
    finally:
        node.kill()


async def test_every_expression_names_a_metric_the_daemon_exposes(
    tmp_path: Path, redis: RedisServer
) -> None:
    exposed = exposed_names(await scrape_redis_node(tmp_path, redis)) | PROMETHEUS_SERIES
    expressions = {f"rule {name}": rule["expr"] for name, rule in alerts().items()}
    panels = dashboard_expressions()
    assert len(panels) >= 20  # the walk found the dashboard's targets
    expressions |= {f"dashboard #{i}": expr for i, expr in enumerate(panels)}
    for where, expr in expressions.items():
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        assert names <= exposed, f"{where} names {sorted(names - exposed)}, not on /metrics"
    # The series this change added are used, so a monitoring system sees them.
    used = set().union(*(metric_names(expr) for expr in expressions.values()))
    for name in (
        "agentspoonsd_build_info",
        "agentspoonsd_ready",
        "agentspoonsd_watchdog_near_misses_total",
        "process_resident_memory_bytes",
    ):
        assert name in used
