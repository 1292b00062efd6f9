"""The benchmark's arithmetic and its document: percentiles, and tables rewritten between markers only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import report
from bench.loadgen import percentile


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([3.0], 0.9) == 3.0
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError, match=r"quantile must be in \[0, 1\]"):
        percentile(values, 1.5)


def test_update_rewrites_the_tables_and_keeps_the_prose(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(
        "# Benchmarks\n\nHand-written analysis.\n\n"
        "<!-- bench:ceilings -->\nold table\n<!-- /bench:ceilings -->\n\nMore prose.\n"
    )
    results = {
        "ceilings": [
            {
                "graph": "decoder",
                "rows": 64,
                "layout": "1-thread",
                "items_per_s": 2600.0,
                "cpu_ms_per_item": 0.38,
            },
            {
                "graph": "decoder",
                "rows": 64,
                "layout": "per-core",
                "items_per_s": 5200.0,
                "cpu_ms_per_item": 0.38,
            },
        ]
    }

    report.update(doc, results)

    text = doc.read_text()
    assert "old table" not in text
    assert "| decoder | 64 | per-core | 5,200 | 0.38 |" in text
    assert text.startswith("# Benchmarks\n\nHand-written analysis.")
    assert text.endswith("\nMore prose.\n")
    assert report.ceiling_of(results, "decoder", 64) == 5200.0


def test_the_peers_table_says_why_a_peer_is_missing_and_keeps_the_other_peers_cells() -> None:
    window = {"rpc": "Sample", "per_request": 1, "concurrency": 32, "dtype": "FLOAT32"}
    results = {
        "service": {
            "windows": [{**window, "items_per_s": 2400.0, "p99_ms": 20.0, "server_cpu_ms_per_item": 0.4}]
        },
        "naive": {"skipped": "it failed, and the run went on without it: naive exited with -9 mid-run"},
        "triton": {
            "windows": [{**window, "items_per_s": 1200.0, "p99_ms": 40.0, "server_cpu_ms_per_item": 0.8}]
        },
    }

    table = report.peers(results)

    assert "| Sample | 1 | 32 | 2,400 | - | 1,200 |" in table
    assert (
        "The naive server: it failed, and the run went on without it: naive exited with -9 mid-run" in table
    )
