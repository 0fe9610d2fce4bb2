"""Alerts, dashboard and autoscaling queries name metrics and labels the gateway and vLLM really export."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from serve.gateway.metrics import GatewayMetrics
from tests.k8s.rendering import K8S, OVERLAYS, of_kind, rendered

MONITORED = ("gpu-llama-2-13b", "ray-multinode")
# Labels Prometheus adds to every scraped series (Prometheus Operator service and pod monitors).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "service", "endpoint"}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
BARE_NAME = re.compile(r"\b((?:gateway|vllm)[a-zA-Z0-9_:]*)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def gateway_series() -> dict[str, set[str]]:
    """Every series the gateway's registry can export, with its label names, observed or not."""
    series: dict[str, set[str]] = {}
    metrics = GatewayMetrics()
    # The endpoint gauges are read from the pools at scrape time; with no pools the collector still yields them.
    metrics.watch_pools(list, list)
    for collector in list(metrics.registry._collector_to_names):  # noqa: SLF001 (metrics not observed yet too)
        if isinstance(collector, MetricWrapperBase):
            labels = set(collector._labelnames)  # noqa: SLF001
            for family in collector.describe():
                for suffix in SUFFIXES.get(family.type, ("",)):
                    series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            for family in collector.collect():
                labels = set(getattr(family, "_labelnames", ()))
                for suffix in SUFFIXES.get(family.type, ("",)):
                    series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    assert {"gateway_requests_total", "gateway_inflight_requests", "gateway_endpoint_up"} <= series.keys()
    return series


def vllm_series() -> dict[str, set[str]]:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed: its metric names cannot be checked")
    source = (Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py").read_text()
    series: dict[str, set[str]] = {}
    for kind, name in re.findall(r"self\._(counter|gauge|histogram)_cls\(\s*name=\"(vllm:[a-z_:]+)\"", source):
        for suffix in SUFFIXES.get(kind, ("",)):
            series[name + suffix] = {"model_name", "engine"} | ({"le"} if suffix == "_bucket" else set())
    assert "vllm:num_requests_waiting" in series, "vLLM's metric definitions moved: update this test"
    return series


def known_series() -> dict[str, set[str]]:
    # `up` is Prometheus' own series for every target.
    return gateway_series() | vllm_series() | {"up": set()}


def check_expr(expr: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    expr = expr.replace("$__rate_interval", "5m")
    used: set[str] = set()
    for name, matchers in SELECTOR.findall(expr):
        if name in {"by", "without", "on", "ignoring"}:
            continue
        if name not in known:
            problems.append(f"unknown metric {name}")
            continue
        used |= known[name]
        for label, _ in MATCHER.findall(matchers):
            if label not in known[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
    for name in BARE_NAME.findall(SELECTOR.sub("", expr)):
        if name not in known:
            problems.append(f"unknown metric {name}")
        else:
            used |= known[name]
    for group in GROUPING.findall(expr):
        for label in (g.strip() for g in group.split(",") if g.strip()):
            if label not in used | TARGET_LABELS:
                problems.append(f"grouping by {label}, which no metric in the expression has")
    return problems


def exprs_of(overlay: str) -> list[str]:
    objs = rendered(overlay)
    exprs = [r["expr"] for pr in of_kind(objs, "PrometheusRule") for g in pr["spec"]["groups"] for r in g["rules"]]
    exprs += [t["metadata"]["query"] for so in of_kind(objs, "ScaledObject") for t in so["spec"]["triggers"]]
    return exprs


def dashboard() -> dict[str, object]:
    data: dict[str, object] = json.loads((K8S / "components" / "monitoring" / "dashboard.json").read_text())
    return data


def dashboard_exprs() -> list[str]:
    panels = dashboard()["panels"]
    assert isinstance(panels, list)
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_the_required_alerts_exist() -> None:
    for overlay in MONITORED:
        (rule,) = of_kind(rendered(overlay), "PrometheusRule")
        rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
        assert "gateway_requests_total" in rules["LLMServeHighErrorRate"]["expr"]
        assert "gateway_time_to_first_token_seconds_bucket" in rules["LLMServeTTFTP99High"]["expr"]
        assert "0.99" in rules["LLMServeTTFTP99High"]["expr"]
        assert "gateway_endpoint_up" in rules["LLMServeEngineDown"]["expr"]
        assert "vllm:kv_cache_usage_perc" in rules["LLMServeKVCacheFull"]["expr"]
        for r in rules.values():
            assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"], r["alert"]


def test_cpu_dev_needs_no_operator() -> None:
    kinds = {o["kind"] for o in rendered("cpu-dev")}
    assert not kinds & {"PrometheusRule", "ServiceMonitor", "PodMonitor", "ScaledObject", "RayCluster"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_queries_use_real_metrics_and_labels(overlay: str) -> None:
    known = known_series()
    problems = [f"{e!r}: {p}" for e in exprs_of(overlay) for p in check_expr(e, known)]
    assert not problems, "\n".join(problems)


def test_dashboard_uses_real_metrics_and_labels() -> None:
    known = known_series()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    problems = [f"{e!r}: {p}" for e in exprs for p in check_expr(e, known)]
    assert not problems, "\n".join(problems)


def test_checker_catches_mistakes() -> None:
    known = known_series()
    assert check_expr('rate(gateway_requests_total{model="m"}[5m])', known) == []
    assert check_expr("gateway_request_total", known) == ["unknown metric gateway_request_total"]
    assert check_expr('vllm:kv_cache_usage_perc{model="m"}', known) == ["vllm:kv_cache_usage_perc has no label model"]
    assert check_expr("sum by (route) (vllm:num_requests_waiting)", known) != []


def test_dashboard_is_picked_up_by_grafana() -> None:
    for overlay in MONITORED:
        (cm,) = [c for c in of_kind(rendered(overlay), "ConfigMap") if c["metadata"]["name"] == "llmserve-dashboard"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["llmserve.json"])["uid"] == dashboard()["uid"]


def test_monitors_scrape_the_serving_ports() -> None:
    for overlay in MONITORED:
        objs = rendered(overlay)
        (sm,) = of_kind(objs, "ServiceMonitor")
        (pm,) = of_kind(objs, "PodMonitor")
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["http"]
        assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["http"]
        assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
