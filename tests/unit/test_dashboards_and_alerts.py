"""Dashboards and alert rules refer only to metrics the code exports (and are well-formed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from grokserve.model.config import get_preset
from grokserve.router.metrics import RouterMetrics
from grokserve.workers.metrics import WorkerMetrics

CHART = Path(__file__).resolve().parents[2] / "helm" / "grokserve"
METRIC = re.compile(r"\bgrokserve_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("_sum", "_count", "_created")}


def exported_sample_names() -> set[str]:
    names = set()
    for registry in (RouterMetrics(get_preset("test-small")).registry, WorkerMetrics("s").registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def expressions() -> list[tuple[str, str]]:
    out = []
    for path in sorted((CHART / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            out += [(f"{path.name}:{panel['title']}", t["expr"]) for t in panel["targets"]]
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                out.append((f"{path.name}:${var['name']}", var["query"]))
    for path in sorted((CHART / "rules").glob("*.yaml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += [(f"{path.name}:{rule['alert']}", rule["expr"]) for rule in group["rules"]]
    return out


def test_there_are_dashboards_and_alerts():
    assert {p.name for p in (CHART / "dashboards").glob("*.json")} >= {"overview.json", "experts.json"}
    alerts = {name.split(":")[1] for name, _ in expressions() if name.startswith("alerts.yaml")}
    assert len(alerts) >= 5


@pytest.mark.parametrize("where,expr", expressions())
def test_every_metric_in_dashboards_and_alerts_is_exported(where, expr):
    exported = exported_sample_names()
    missing = sorted(set(METRIC.findall(expr)) - exported)
    assert METRIC.search(expr), f"{where} uses no grokserve metric"
    assert not missing, f"{where} refers to metrics the code does not export: {missing}"
