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


def _window(
    rpc: str, per_request: int, items_per_s: float, dtype: str = "FLOAT32", **more: float
) -> report.Row:
    return {
        "rpc": rpc,
        "per_request": per_request,
        "concurrency": 32,
        "dtype": dtype,
        "items_per_s": items_per_s,
        **more,
    }


def test_the_peers_ratios_divide_the_services_speed_by_each_peers_on_float32_windows_only() -> None:
    def peer(speed: float, p99: float, cpu: float) -> report.Row:
        # A faster UINT8 window first: compared with it, every ratio would be off.
        return {
            "windows": [
                _window("Sample", 1, 99_999.0, "UINT8", p99_ms=1.0, server_cpu_ms_per_item=0.01),
                _window("Sample", 1, speed, p99_ms=p99, server_cpu_ms_per_item=cpu),
            ]
        }

    results = {
        "service": peer(2400.0, 20.0, 0.4),
        "naive": peer(800.0, 30.0, 0.6),
        "triton": peer(1200.0, 40.0, 0.8),
    }

    table = report.peers(results)

    assert (
        "| Sample | 1 | 32 | 2,400 | 800 | 1,200 | 3.000 | 2.000 | 20.0 | 30.0 | 40.0 | 0.4 | 0.6 | 0.8 |"
        in table
    )


def test_encode_is_judged_against_the_encoders_ceiling_and_decode_against_the_decoders_at_their_rows() -> (
    None
):
    results = {
        "ceilings": [
            {"graph": "encoder", "rows": 64, "layout": "1-thread", "items_per_s": 3000.0},
            {"graph": "encoder", "rows": 64, "layout": "per-core", "items_per_s": 4000.0},
            {"graph": "encoder", "rows": 256, "layout": "per-core", "items_per_s": 5000.0},
            {"graph": "decoder", "rows": 64, "layout": "per-core", "items_per_s": 8000.0},
            {"graph": "decoder", "rows": 256, "layout": "per-core", "items_per_s": 16000.0},
        ],
        "service": {
            "windows": [
                _window("Encode", 64, 2000.0),
                _window("Decode", 64, 2000.0),
                _window("Sample", 7, 100.0),
                _window("Sample", 64, 4000.0),
            ],
            "stream": [
                {
                    "dtype": "UINT8",
                    "images": 10_000,
                    "chunk": 64,
                    "seconds": 10.0,
                    "items_per_s": 1000.0,
                    "server_cpu_ms_per_item": 0.5,
                }
            ],
        },
    }

    unary, sample, stream = (
        report.service_unary(results),
        report.service_sample(results),
        report.stream(results),
    )

    assert unary.splitlines()[2].startswith("| Encode | 64 |") and unary.splitlines()[2].endswith("| 0.500 |")
    assert unary.splitlines()[3].startswith("| Decode | 64 |") and unary.splitlines()[3].endswith("| 0.250 |")
    assert sample.splitlines()[2].endswith("| - |")  # no decoder ceiling measured at 7 rows a call
    assert sample.splitlines()[3].startswith("| Sample | 64 |")
    assert sample.splitlines()[3].endswith("| 0.500 |")
    # A stream is held to the encoder's best at any rows a call: 1,000 / 5,000.
    assert stream.splitlines()[2] == "| service | UINT8 | 10,000 | 64 | 10.0 | 1,000 | 0.5 | 0.200 |"


@pytest.mark.parametrize(
    ("cold_s", "rss_mb", "met"),
    [(1.49, 249.9, ("yes", "yes")), (1.5, 250.0, ("no", "no")), (None, None, ("-", "-"))],
)
def test_start_up_is_met_under_one_and_a_half_seconds_and_memory_under_250_mb(
    cold_s: float | None, rss_mb: float | None, met: tuple[str, str]
) -> None:
    results = {"service_cold_start": {"median_s": cold_s}, "service": {"rss_after_warmup_mb": rss_mb}}
    cold_row, rss_row = report.targets(results).splitlines()[2:]
    assert cold_row.endswith(f"| < 1.5 s | {met[0]} |") and rss_row.endswith(f"| < 250 MB | {met[1]} |")


def test_a_goals_ratio_is_shown_to_three_decimals_so_a_near_miss_does_not_round_up_to_the_goal() -> None:
    row = {
        "target": "Sample c=32 vs Triton",
        "ours_median": 2990.0,
        "theirs_median": 2000.0,
        "ratio_median": 1.4948,
        "ratio_low": 1.2,
        "ratio_high": 1.7,
        "rounds_met": 1,
        "rounds": 3,
        "goal": 1.5,
        "met": False,
        "failed_in_round": 2,
    }
    first = report.targets({"paired_targets": {"summary": [row]}}).splitlines()[2]
    expected = "| Sample c=32 vs Triton (failed in round 2) | 2,990 | 2,000 | 1.494 | 1.200-1.700 | 1 of 3 |"
    assert first == expected + " >= 1.5 | no |"


def test_the_peers_table_names_the_failed_requests_of_any_window_beside_its_speed() -> None:
    def peer(speed: float, errors: dict[str, int]) -> report.Row:
        window = _window("Sample", 256, speed, p99_ms=500.0, server_cpu_ms_per_item=0.2)
        return {"windows": [{**window, "errors": errors}]}

    results = {
        "service": peer(8448.0, {"RESOURCE_EXHAUSTED": 320}),
        "naive": peer(4480.0, {}),
        "triton": peer(8192.0, {"UNAVAILABLE": 2}),
    }

    (row,) = report.peers(results).splitlines()[2:]

    assert row.endswith("| service RESOURCE_EXHAUSTED 320; Triton UNAVAILABLE 2 |")
    assert (
        report.peers({**results, "service": peer(8448.0, {})})
        .splitlines()[2]
        .endswith("| Triton UNAVAILABLE 2 |")
    )


def test_memory_is_judged_after_warm_up_in_mb_of_a_million_bytes_with_the_loaded_figures_beside_it() -> None:
    results = {"service": {"rss_after_warmup_mb": 116.4, "rss_after_run_mb": 152.0, "rss_peak_mb": 160.3}}

    memory = report.targets(results).splitlines()[-1]

    assert memory == (
        "| resident memory after warm-up (MB, 10^6 bytes; under load: 152 after the sweep, 160 at the peak)"
        " | 116 | - | - | - | - | < 250 MB | yes |"
    )


def test_the_startup_table_gives_each_servers_peak_and_tritons_memory_as_the_pss_of_its_processes() -> None:
    results = {
        "service_cold_start": {"seconds": [0.24, 0.25, 0.24]},
        "service": {"rss_after_warmup_mb": 116.4, "rss_after_run_mb": 152.0, "rss_peak_mb": 160.3},
        "naive": {
            "cold_start_s": 0.2,
            "rss_after_warmup_mb": 150.1,
            "rss_after_run_mb": 290.0,
            "rss_peak_mb": 301.0,
        },
        "triton": {"cold_start_s": 6.56, "pss_after_run_mb": 1100.2},
    }

    table = report.startup(results).splitlines()

    assert (
        table[0]
        == "| server | seconds to ready | RSS after warm-up MB | RSS after the sweep MB | peak RSS MB |"
    )
    assert table[2:] == [
        "| service | 0.24, 0.25, 0.24 | 116 | 152 | 160 |",
        "| naive | 0.20 | 150 | 290 | 301 |",
        "| triton | 6.56 | - | 1,100 (PSS, its processes) | - |",
    ]


def test_a_ratio_just_short_of_a_goal_does_not_read_as_the_goal() -> None:
    """Cut to three decimals, not rounded: 8,448 / 9,390 is 0.89968, which is not the goal's 0.9."""
    window: report.Row = {"rpc": "Sample", "per_request": 1, "concurrency": 32, "dtype": "FLOAT32"}
    window |= {"p99_ms": 1.0, "server_cpu_ms_per_item": 0.1}

    def results(service_speed: float) -> report.Results:
        return {
            "service": {"windows": [{**window, "items_per_s": service_speed}]},
            "naive": {"windows": [{**window, "items_per_s": 1000.0}]},
            "ceilings": [{"graph": "decoder", "rows": 1, "items_per_s": 9390.0}],
        }

    assert "| 1.499 |" in report.peers(results(1499.9))
    assert report.service_sample(results(8448.0)).splitlines()[2].endswith("| 0.899 |")
