"""The Grafana dashboard queries only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from slimserve.serving import metrics

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json"


def test_every_dashboard_query_uses_an_exported_metric():
    source = Path(metrics.__file__).read_text()
    exported = set(re.findall(r'"(slimserve_[a-z_]+)"', source))
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"slimserve_[a-z_]+", target["expr"]))
    suffixes = ("_total", "_bucket", "_sum", "_count")
    for name in used:
        base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
        assert base in exported or name in exported, f"dashboard uses unknown metric {name}"
    assert len(dash["panels"]) >= 8
