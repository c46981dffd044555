"""The committed Grafana dashboards are what deploy/grafana/dashboards.py writes (edit the
script, then run it); their queries are well-formed enough to be checked against /metrics
(tests/e2e/test_dashboards.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_dashboards() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "infermesh_dashboards", ROOT / "deploy" / "grafana" / "dashboards.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def test_committed_dashboards_are_the_generated_ones() -> None:
    mod = load_dashboards()
    for name, d in mod.DASHBOARDS.items():
        path = ROOT / "deploy" / "grafana" / f"infermesh-{name}.json"
        assert path.read_text() == mod.render(d), \
            f"{path.name} is stale: run python deploy/grafana/dashboards.py"
        data = json.loads(path.read_text())
        assert data["uid"] == f"infermesh-{name}" and data["panels"]
        for panel in data["panels"]:
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
            assert panel["datasource"]["uid"] == "${datasource}"
    assert set(mod.DASHBOARDS) == {"fleet", "cache", "scheduler", "autoscaler"}
