"""results.json -> the tables of docs/BENCHMARKS.md.

The document is prose written by hand around generated tables. Each table sits between
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; `update` rewrites what is between the markers and
leaves every other line alone. A missing document is created with every section's markers.

    .venv/bin/python -m bench.report runs/bench/results.json docs/BENCHMARKS.md
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Results = dict[str, Any]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; numbers formatted for reading."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "0"
    return str(value)


def encoder_ceiling(results: Results) -> float:
    """The encoder's best images a second at any rows a call measured: what a stream is held to."""
    return max((r["items_per_s"] for r in results["ceilings"] if r["graph"] == "encoder"), default=0.0)


def ceiling_of(results: Results, graph: str, rows: int) -> float:
    """The best layout's images a second for a graph at `rows` a call."""
    return max(
        (r["items_per_s"] for r in results["ceilings"] if r["graph"] == graph and r["rows"] == rows),
        default=0.0,
    )


def _window(
    server: Row | None, rpc: str, per_request: int, concurrency: int, dtype: str = "FLOAT32"
) -> Row | None:
    if not server or "windows" not in server:
        return None
    return next(
        (
            w
            for w in server["windows"]
            if w["rpc"] == rpc
            and w["per_request"] == per_request
            and w["concurrency"] == concurrency
            and w["dtype"] == dtype
        ),
        None,
    )


def _ratio(a: float | None, b: float | None) -> str | None:
    return None if not a or not b else _three_decimals(a / b)


def _three_decimals(ratio: float) -> str:
    """A ratio cut, not rounded, to three decimals: a 0.8997 or a 1.4998 must not print as the 0.9
    or the 1.50 of a goal it misses."""
    return f"{math.floor(ratio * 1000 + 1e-9) / 1000:.3f}"


# ---------------------------------------------------------------- sections


def machine(results: Results) -> str:
    m = results["machine"]
    rows = [[key.replace("_", " "), value] for key, value in m.items()]
    plan = results.get("plan", {})
    rows.append(["window / warm-up", f"{plan.get('window_s')} s / {plan.get('warmup_s')} s per cell"])
    service = results.get("service", {})
    rows.append(["service command", " ".join(service.get("argv", []))])
    return table(["", ""], rows)


def targets(results: Results) -> str:
    """The goals, judged on the paired rounds' median ratios (bench/targets.py), then start-up and memory."""
    rows: list[list[object]] = []
    for row in results.get("paired_targets", {}).get("summary", []):
        rows.append(
            [
                _target_name(row),
                row["ours_median"],
                row["theirs_median"],
                None if row["ratio_median"] is None else _three_decimals(row["ratio_median"]),
                None
                if row["ratio_low"] is None
                else f"{_three_decimals(row['ratio_low'])}-{_three_decimals(row['ratio_high'])}",
                f"{row['rounds_met']} of {row['rounds']}",
                f">= {row['goal']}",
                row["met"],
            ]
        )
    service = results.get("service", {})
    cold = results.get("service_cold_start", {}).get("median_s")
    for name, value, limit, unit in (
        ("cold start to SERVING (s, median of 3)", cold, 1.5, "s"),
        (_memory_name(service), service.get("rss_after_warmup_mb"), 250, "MB"),
    ):
        met = None if value is None else value < limit
        rows.append([name, value, None, None, None, None, f"< {limit} {unit}", met])
    header = ["target", "ours (median)", "theirs (median)", "ratio (median)", "ratio range", "rounds met"]
    return table([*header, "goal", "met"], rows)


def _target_name(row: Row) -> str:
    """The target, with why it has fewer rounds than the plan's, if it has."""
    notes = []
    if row.get("not_measured"):
        notes.append(f"not measured: {row['not_measured']}")
    if row.get("failed_in_round") is not None:
        notes.append(f"failed in round {row['failed_in_round']}")
    if dropped := row.get("dropped_rounds"):
        rounds = "rounds" if len(dropped) > 1 else "round"
        notes.append(f"{rounds} {', '.join(map(str, dropped))} dropped for failed requests")
    return f"{row['target']} ({'; '.join(notes)})" if notes else str(row["target"])


def _memory_name(service: Row) -> str:
    """The judged figure is the issue's, after warm-up; the label gives the sweep's loaded figures
    beside it (the startup table has them for every server)."""
    loaded = [
        f"{_cell(service[key])} {when}"
        for key, when in (("rss_after_run_mb", "after the sweep"), ("rss_peak_mb", "at the peak"))
        if service.get(key) is not None
    ]
    under_load = f"; under load: {', '.join(loaded)}" if loaded else ""
    return f"resident memory after warm-up (MB, 10^6 bytes{under_load})"


def ceilings(results: Results) -> str:
    rows = [
        [r["graph"], r["rows"], r["layout"], r["items_per_s"], r["cpu_ms_per_item"]]
        for r in results["ceilings"]
    ]
    return table(["graph", "rows/call", "layout", "images/s", "CPU ms/image"], rows)


def _server_table(results: Results, server: Row, rpcs: Sequence[str], graph_of: Callable[[str], str]) -> str:
    rows = []
    for w in server["windows"]:
        if w["rpc"] not in rpcs:
            continue
        # No ceiling measured at these rows a call: 0.0, which _ratio shows as "-".
        top = ceiling_of(results, graph_of(w["rpc"]), w["per_request"])
        keys = ["rpc", "per_request", "dtype", "concurrency", "items_per_s", "requests_per_s"]
        keys += [
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "errors",
            "server_cpu_ms_per_item",
            "client_cpu_ms_per_request",
        ]
        rows.append([*(w.get(key) for key in keys), _ratio(w["items_per_s"], top)])
    header = [
        "rpc",
        "per req",
        "dtype",
        "clients",
        "images/s",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "server CPU ms/image",
        "client CPU ms/req",
        "/ ceiling",
    ]
    return table(header, rows)


def _graph(rpc: str) -> str:
    return "encoder" if rpc == "Encode" else "decoder"


def service_sample(results: Results) -> str:
    return _server_table(results, results["service"], ["Sample"], _graph)


def service_unary(results: Results) -> str:
    return _server_table(results, results["service"], ["Encode", "Decode"], _graph)


def stream(results: Results) -> str:
    rows = []
    for name in ("service", "naive"):
        for s in results.get(name, {}).get("stream", []):
            top = encoder_ceiling(results)
            rows.append(
                [
                    name,
                    s["dtype"],
                    s["images"],
                    s["chunk"],
                    s["seconds"],
                    s["items_per_s"],
                    s["server_cpu_ms_per_item"],
                    _ratio(s["items_per_s"], top),
                ]
            )
    return table(
        [
            "server",
            "input dtype",
            "images",
            "per message",
            "seconds",
            "images/s",
            "server CPU ms/image",
            "/ encoder ceiling",
        ],
        rows,
    )


def _get(window: Row | None, key: str) -> Any:
    return None if window is None else window[key]


def peers(results: Results) -> str:
    servers = [results.get(name) for name in ("service", "naive", "triton")]
    rows = []
    cells = sorted(
        {
            (w["rpc"], w["per_request"], w["concurrency"])
            for peer in servers[1:]
            for w in (peer or {}).get("windows", [])
        }
    )
    for rpc, size, concurrency in cells:
        windows = [_window(server, rpc, size, concurrency) for server in servers]
        speeds = [_get(w, "items_per_s") for w in windows]
        rows.append(
            [
                rpc,
                size,
                concurrency,
                *speeds,
                _ratio(speeds[0], speeds[1]),
                _ratio(speeds[0], speeds[2]),
                *(_get(w, "p99_ms") for w in windows),
                *(_get(w, "server_cpu_ms_per_item") for w in windows),
                # Failed requests in any of the three windows: its images/s count only the answered ones.
                "; ".join(
                    f"{label} {_cell(w['errors'])}"
                    for label, w in zip(("service", "naive", "Triton"), windows, strict=True)
                    if w and w.get("errors")
                )
                or None,
            ]
        )
    header = [
        "rpc",
        "per req",
        "clients",
        "service img/s",
        "naive img/s",
        "Triton img/s",
        "x naive",
        "x Triton",
    ]
    header += ["service p99 ms", "naive p99 ms", "Triton p99 ms"]
    header += ["service CPU ms/img", "naive CPU ms/img", "Triton CPU ms/img", "errors"]
    notes = "".join(
        f"\n\n{label}: {peer['skipped']}"
        for label, peer in (("The naive server", servers[1]), ("Triton", servers[2]))
        if peer and "skipped" in peer
    )
    return table(header, rows) + notes


def startup(results: Results) -> str:
    """Seconds to ready and resident memory, in MB of 10^6 bytes. Triton runs in several processes
    (tritonserver, its Python stubs, PyTriton) that share memory: its figure is their PSS, which
    counts a shared page once."""
    rows = []
    cold = results.get("service_cold_start")
    if cold:
        service = results["service"]
        rows.append(
            [
                "service",
                ", ".join(f"{s:.2f}" for s in cold["seconds"]),
                service.get("rss_after_warmup_mb"),
                service.get("rss_after_run_mb"),
                service.get("rss_peak_mb"),
            ]
        )
    for name in ("naive", "triton"):
        peer = results.get(name)
        if peer and "cold_start_s" in peer:
            pss = peer.get("pss_after_run_mb")
            rows.append(
                [
                    name,
                    f"{peer['cold_start_s']:.2f}",
                    peer.get("rss_after_warmup_mb"),
                    peer.get("rss_after_run_mb") if pss is None else f"{_cell(pss)} (PSS, its processes)",
                    peer.get("rss_peak_mb"),
                ]
            )
    header = ["server", "seconds to ready", "RSS after warm-up MB", "RSS after the sweep MB", "peak RSS MB"]
    return table(header, rows)


def _rows_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    return table(columns, [[row.get(c) for c in columns] for row in rows])


def lever_section(key: str, columns: Sequence[str]) -> Callable[[Results], str]:
    def render(results: Results) -> str:
        rows = results.get("levers", {}).get(key)
        return _rows_table(rows, columns) if rows else "(not measured in this run)"

    return render


def server_levers(results: Results) -> str:
    rows = results.get("server_levers")
    if not rows:
        return "(not measured in this run)"
    return _rows_table(
        rows,
        [
            "lever",
            "shape",
            "concurrency",
            "items_per_s",
            "p50_ms",
            "p99_ms",
            "server_cpu_ms_per_item",
            "errors",
            "cold_start_s",
            "rss_after_run_mb",
        ],
    )


SECTIONS: dict[str, Callable[[Results], str]] = {
    "machine": machine,
    "targets": targets,
    "ceilings": ceilings,
    "service-sample": service_sample,
    "service-unary": service_unary,
    "stream": stream,
    "peers": peers,
    "startup": startup,
    "lever-threads": lever_section("thread_pool", ["variant", "rows", "items_per_s", "cpu_ms_per_item"]),
    "lever-batch-size": lever_section("batch_sizes", ["graph", "rows", "items_per_s", "cpu_ms_per_item"]),
    "lever-sharing": lever_section("session_sharing", ["variant", "rows", "items_per_s", "cpu_ms_per_item"]),
    "lever-optimization": lever_section(
        "optimization_levels", ["level", "rows", "items_per_s", "cpu_ms_per_item"]
    ),
    "lever-optimized-graph": lever_section(
        "optimized_graph", ["variant", "session_load_ms", "bytes", "items_per_s"]
    ),
    "lever-wire": lever_section(
        "wire", ["rows", "dtype", "bytes", "convert_us", "build_and_serialize_us", "parse_us", "inference_us"]
    ),
    "lever-decoding": lever_section("tensor_decoding", ["variant", "us"]),
    "lever-int8-speed": lever_section(
        "int8_speed", ["decoder", "bytes", "items_per_s", "max_abs_pixel_diff", "mean_abs_pixel_diff", "ops"]
    ),
    "lever-int8-quality": lever_section(
        "int8_quality",
        [
            "decoder",
            "mean_confidence",
            "fraction_confident_90",
            "predicted_digit_entropy_nats",
            "classifier_test_accuracy",
        ],
    ),
    "lever-server": server_levers,
}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def skeleton() -> str:
    parts = ["# Benchmarks\n"]
    for name in SECTIONS:
        begin, end = _markers(name)
        parts.append(f"## {name}\n\n{begin}\n{end}\n")
    return "\n".join(parts)


def _literal(text: str) -> Callable[[re.Match[str]], str]:
    return lambda _: text


def update(doc: Path, results: Results) -> None:
    """Rewrite every generated table of `doc` from `results`; prose outside the markers stays."""
    text = doc.read_text() if doc.exists() else skeleton()
    for name, render in SECTIONS.items():
        begin, end = _markers(name)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(text):
            continue
        # A function, not a string, as the replacement: the table's text is taken literally.
        text = pattern.sub(_literal(f"{begin}\n{render(results)}\n{end}"), text)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m bench.report RESULTS_JSON DOC_MD", file=sys.stderr)
        return 2
    update(Path(args[1]), json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
