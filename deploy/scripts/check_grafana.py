"""Grafana's provisioning, checked without a Grafana: the files parse and point at each other.

    check_grafana.py deploy/grafana

Every panel query names a datasource uid that a provisioned datasource has, panel ids and the
dashboard's uid are unique, and the dashboard provider's folder is where docker-compose.yml mounts the
dashboards. (The integration test runs each query against a real Prometheus.) Run by deploy/check.sh.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def check(root: Path) -> list[str]:
    problems: list[str] = []
    datasource_uids = set()
    for path in sorted((root / "provisioning" / "datasources").glob("*.yml")):
        for datasource in yaml.safe_load(path.read_text())["datasources"]:
            datasource_uids.add(datasource["uid"])
    providers = []
    for path in sorted((root / "provisioning" / "dashboards").glob("*.yml")):
        providers.extend(yaml.safe_load(path.read_text())["providers"])
    if not any(p["options"]["path"] == DASHBOARDS_MOUNT for p in providers):
        problems.append(f"no dashboard provider reads {DASHBOARDS_MOUNT}, where the dashboards are mounted")
    dashboard_uids: set[str] = set()
    for path in sorted((root / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        if dashboard.get("uid") in dashboard_uids:
            problems.append(f"{path.name}: uid {dashboard.get('uid')!r} is used twice")
        dashboard_uids.add(dashboard["uid"])
        ids = [panel["id"] for panel in panels_of(dashboard)]
        if len(ids) != len(set(ids)):
            problems.append(f"{path.name}: panel ids repeat: {sorted(ids)}")
        for panel in panels_of(dashboard):
            if panel["type"] == "row":
                continue
            targets = panel.get("targets") or []
            if not targets:
                problems.append(f"{path.name}: panel {panel['title']!r} has no query")
            for target in targets:
                uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
                if uid not in datasource_uids:
                    problems.append(
                        f"{path.name}: panel {panel['title']!r} uses datasource {uid!r}; "
                        f"provisioned: {sorted(datasource_uids)}"
                    )
                if not target.get("expr", "").strip():
                    problems.append(f"{path.name}: panel {panel['title']!r} has an empty query")
    if not dashboard_uids:
        problems.append(f"no dashboard in {root / 'dashboards'}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_grafana.py GRAFANA_DIR", file=sys.stderr)
        return 2
    problems = check(Path(argv[0]))
    for problem in problems:
        print(f"check_grafana: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("check_grafana: datasources, dashboard provider and dashboards consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
