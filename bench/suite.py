"""`make bench`: the whole benchmark in one run, results as JSON and as the tables of docs/BENCHMARKS.md.

    .venv/bin/python -m bench.suite --bundle runs/bench/bundle --doc docs/BENCHMARKS.md

In order: the machine record; the in-process ceilings; the service (cold start, memory, the sweep of
shapes and concurrencies, EncodeStream); the naive grpc.aio peer; Triton through PyTriton (from
bench/.venv, when it is there); the in-process levers; the server-side levers (one restart each);
the targets, in paired rounds (bench/targets.py); a second pass of the ceilings.
Every server runs as its own process, and the load generator is this process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from bench import ceiling, levers, quantize, report, servers, targets
from bench.loadgen import RESULT_PREFIX, UNANSWERED_LIMIT_S, closed_loop, process_tree_cpu_s
from bench.workloads import Shape, channel, encode_stream, random_images, request_factory
from service.settings import Settings
from vae.v1 import vae_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BENCH_PYTHON = ROOT / "bench" / ".venv" / "bin" / "python"
# Images per Sample request in the targets held to the all-core ceiling.
TARGET_SAMPLE_SIZES = (64, 256)
# The target's stream: messages of vae-encode-job's default size (client/cli.py, DEFAULT_BATCH_SIZE).
TARGET_STREAM_CHUNK = 256
# The rows of the service's own calls (its default --max-batch-size): the ceiling measures them too,
# so that no call size the service uses is missing from "the best at any rows a call".
SERVICE_CALL_ROWS: int = Settings.max_batch_size
# Call sizes between those, so that "the best at any rows a call" misses no size a graph peaks at
# (4 rows a call measured faster than 16 in the batch-size lever, 32 fastest for the decoder).
EXTRA_CALL_ROWS = (4, 32)
TRITON_ENV = {"PYTHONPATH": str(ROOT)}
TRITON_MISSING = f"{BENCH_PYTHON} not found: `make bench-setup` installs PyTriton there"
# PyTriton sometimes loses a race with its own handshake socket while Triton loads a model (the proxy's
# initialize gets ConnectionRefusedError; seen in the 12-07 08:01 run): a second try, then give up.
TRITON_START_ATTEMPTS = 2
NAIVE_TARGET = "Sample 1/req, 32 clients / naive"
NAIVE_ONE_THREAD_TARGET = "Sample 1/req, 32 clients / naive, 1 intra-op thread"
# The naive peer as a plain server runs (onnxruntime's default threads, which spin against its event
# loop and the clients at one image a call), and in its best layout at batch 1: both on record, as
# the Sample targets' two ceilings are. Triton is measured in its best layout only.
NAIVE_LAYOUTS: dict[str, tuple[str, ...]] = {NAIVE_TARGET: (), NAIVE_ONE_THREAD_TARGET: ("--threads", "1")}
TRITON_TARGET = "Sample 1/req, 32 clients / triton"
Row = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """What to measure and for how long."""

    window_s: float = 2.0
    warmup_s: float = 0.5
    ceiling_window_s: float = 1.5
    sample_sizes: tuple[int, ...] = (1, 8, 64, 256)
    concurrencies: tuple[int, ...] = (1, 4, 8, 32)
    peer_concurrencies: tuple[int, ...] = (1, 4, 8, 32)
    peer_unary_concurrencies: tuple[int, ...] = (4, 32)
    stream_images: int = 10_000
    # Images per EncodeStream message: the first is vae-encode-job's default, the one the target uses.
    stream_chunks: tuple[int, ...] = (256, 64)
    stream_repeats: int = 3
    # Rounds of the targets' paired measurement (bench/targets.py): the median ratio decides. Even,
    # so that each side is measured first in half of them.
    target_rounds: int = 6
    triton: bool = True
    levers: bool = True
    quality: bool = True

    @classmethod
    def quick(cls) -> Plan:
        """Seconds, not minutes: for the smoke test and for trying things."""
        return cls(
            window_s=0.5,
            warmup_s=0.2,
            ceiling_window_s=0.3,
            sample_sizes=(1, 64),
            concurrencies=(1, 8),
            peer_concurrencies=(8,),
            peer_unary_concurrencies=(8,),
            stream_images=1_000,
            stream_repeats=1,
            target_rounds=1,
            triton=False,
            levers=False,
            quality=False,
        )


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run the load generator's event loop, on uvloop where it is installed (less client overhead)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _mb(size_bytes: int) -> float:
    """Megabytes of 10^6 bytes, as the issue's "250 MB" counts them."""
    return round(size_bytes / 1e6, 1)


def _client_loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {getattr(uvloop, '__version__', '')}".strip()


def _service_defaults() -> str:
    """vae-serve's settings for the knobs that decide its speed, as the sweep runs it: its defaults,
    and the container images' environment over them."""
    from service.settings import ENV_PREFIX, Settings

    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    knobs = (
        "intra_op_threads",
        "inference_nice",
        "pin_inference_threads",
        "max_batch_size",
        "max_queue_delay_ms",
        "max_queue_size",
    )
    environment = {**servers.IMAGE_ENVIRONMENT, **os.environ}
    values = {name: environment.get(ENV_PREFIX + name.upper(), fields[name]) for name in knobs}
    return ", ".join(f"{name} {value}" for name, value in values.items())


def machine_record(bundle: Path, manifest: dict[str, Any]) -> Row:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "cores_usable": ceiling.cores(),
        "cpu": cpu_model,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "client_event_loop": _client_loop(),
        "service_settings": _service_defaults(),
        "bundle": str(bundle),
        "bundle_name": manifest.get("name"),
        "bundle_version": manifest.get("version"),
        "latent_dim": manifest["latent_dim"],
    }


# ---------------------------------------------------------------- ceilings


def ceilings(bundle: Path, manifest: dict[str, Any], plan: Plan) -> list[Row]:
    """Every layout for the decoder at each Sample size and the encoder at each stream chunk, and both
    at the service's own call size and the sizes between."""
    latent_dim = int(manifest["latent_dim"])
    decoder = bundle / manifest["graphs"]["decoder"]["file"]
    encoder = bundle / manifest["graphs"]["encoder"]["file"]
    rows: list[Row] = []
    for size in sorted({*plan.sample_sizes, *TARGET_SAMPLE_SIZES, SERVICE_CALL_ROWS, *EXTRA_CALL_ROWS}):
        for measured in ceiling.layouts(
            decoder, ceiling.decoder_feed(size, latent_dim), plan.ceiling_window_s, 0.2
        ):
            rows.append({"graph": "decoder", "rows": size, **measured.summary()})
    for size in sorted({*plan.stream_chunks, SERVICE_CALL_ROWS, *EXTRA_CALL_ROWS}):
        for measured in ceiling.layouts(encoder, ceiling.encoder_feed(size), plan.ceiling_window_s, 0.2):
            rows.append({"graph": "encoder", "rows": size, **measured.summary()})
    return rows


def best_of(passes: list[list[Row]]) -> list[Row]:
    """Per (graph, rows, layout), the pass with the most images a second."""
    best: dict[tuple[str, int, str], Row] = {}
    for rows in passes:
        for row in rows:
            key = (row["graph"], row["rows"], row["layout"])
            if key not in best or row["items_per_s"] > best[key]["items_per_s"]:
                best[key] = row
    return list(best.values())


# ---------------------------------------------------------------- servers speaking vae.v1


@dataclass(frozen=True)
class Sweep:
    """The windows to measure on one server, as (shape, concurrency) cells, then EncodeStream's dtypes."""

    cells: Sequence[tuple[Shape, int]]
    stream_dtypes: Sequence[str] = ("FLOAT32",)

    @classmethod
    def grid(
        cls, shapes: Sequence[Shape], concurrencies: Sequence[int], stream_dtypes: Sequence[str]
    ) -> Sweep:
        return cls([(shape, c) for shape in shapes for c in concurrencies], stream_dtypes)


async def _sweep(server: servers.Server, sweep: Sweep, latent_dim: int, plan: Plan) -> Row:
    result: Row = {"windows": [], "stream": []}
    async with channel(server.target) as chan:
        stub = vae_pb2_grpc.VaeServiceStub(chan)
        # Warm-up: every shape once, so that lazy set-up and first allocations are behind us.
        for shape in dict.fromkeys(shape for shape, _ in sweep.cells):
            await asyncio.wait_for(request_factory(stub, shape, latent_dim)(0)(), UNANSWERED_LIMIT_S)
        result["rss_after_warmup_mb"] = _mb(server.rss_bytes())
        for shape, concurrency in sweep.cells:
            window = await closed_loop(
                request_factory(stub, shape, latent_dim),
                concurrency=concurrency,
                duration_s=plan.window_s,
                warmup_s=plan.warmup_s,
                server_pid=server.pid,
            )
            row = {
                "shape": shape.name,
                "rpc": shape.rpc,
                "per_request": shape.per_request,
                "dtype": shape.dtype,
            }
            result["windows"].append({**row, **window.summary()})
            print(
                f"  {server.name}: {shape.name} c={concurrency}: {window.items_per_s:,.0f} items/s",
                flush=True,
            )
        for dtype, chunk in itertools.product(sweep.stream_dtypes, plan.stream_chunks):
            images = random_images(plan.stream_images, dtype)
            await encode_stream(stub, images[: chunk * 4], chunk)
            runs = []
            for _ in range(plan.stream_repeats):
                cpu_before = process_tree_cpu_s(server.pid)
                seconds = await encode_stream(stub, images, chunk)
                runs.append((seconds, process_tree_cpu_s(server.pid) - cpu_before))
            seconds, cpu = sorted(runs)[len(runs) // 2]
            answered = len(images)
            result["stream"].append(
                {
                    "dtype": dtype,
                    "images": answered,
                    "chunk": chunk,
                    "seconds": round(seconds, 3),
                    "items_per_s": round(answered / seconds, 1),
                    "server_cpu_ms_per_item": round(1000 * cpu / answered, 4),
                }
            )
            print(
                f"  {server.name}: EncodeStream {dtype}, {chunk}/message: {answered / seconds:,.0f} images/s",
                flush=True,
            )
    result["rss_after_run_mb"] = _mb(server.rss_bytes())
    # After warm-up is the figure; this, the most resident at any moment since the start,
    # shows what the sweep's load made of it.
    result["rss_peak_mb"] = _mb(server.peak_rss_bytes())
    return result


def measure_vae_server(
    name: str,
    argv: list[str],
    port: int,
    sweep: Sweep,
    latent_dim: int,
    plan: Plan,
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> Row:
    server = servers.start(name, argv, port, log_dir, env=env)
    print(f"{name}: ready in {server.cold_start_s:.2f} s (pid {server.pid})", flush=True)
    try:
        result: Row = _run(_sweep(server, sweep, latent_dim, plan))
    except (grpc.RpcError, TimeoutError, ProcessLookupError) as error:  # the last: no /proc to read
        exited = server.process.poll()
        state = f"exited with {exited}" if exited is not None else "failed"
        raise servers.ServerFailed(
            f"{name} {state} mid-run ({error!r:.300}): see {server.log_path}"
        ) from error
    finally:
        server.stop()
    return {"cold_start_s": round(server.cold_start_s, 3), "argv": argv[1:], **result}


def service_argv(bundle: Path, port: int, *extra: str, module: str = "service") -> list[str]:
    """vae-serve's command line (as `python -m service`, or a wrapper module taking the same flags)."""
    return [
        sys.executable,
        "-m",
        module,
        "--model-dir",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--log-level",
        "warning",
        *extra,
    ]


def _layout_name(ceiling_row: Row) -> str:
    rows = ceiling_row["rows"]
    return f"{ceiling_row['layout']}, {rows} row{'s' if rows != 1 else ''} a call"


def naive_argv(bundle: Path, port: int, *extra: str) -> list[str]:
    """The naive peer's command line (bench/peers/naive_server.py), with `extra` flags."""
    peer = [sys.executable, "-m", "bench.peers.naive_server"]
    return [*peer, "--model-dir", str(bundle), "--port", str(port), *extra]


def cold_starts(bundle: Path, log_dir: Path, repeats: int = 3) -> Row:
    """The service's seconds to SERVING, several times, each after the page cache has dropped the files
    a start reads (the bundle, the interpreter and its packages, this repository), which the sweep
    before has read: partly cold, as what this process has mapped stays (the interpreter, and the
    compiled libraries of onnxruntime, gRPC and numpy)."""
    times = []
    for _ in range(repeats):
        servers.evict_from_page_cache(bundle, ROOT, Path(sys.prefix), Path(sys.base_prefix))
        port = servers.free_port()
        server = servers.start("service-cold", service_argv(bundle, port), port, log_dir)
        times.append(server.cold_start_s)
        server.stop()
    return {"seconds": [round(t, 3) for t in times], "median_s": round(sorted(times)[len(times) // 2], 3)}


# ---------------------------------------------------------------- Triton


def start_triton(
    bundle: Path, log_dir: Path, instances: int, threads: int, name: str = "triton"
) -> servers.Server:
    """PyTriton with dynamic batching, from bench/.venv; its log is LOG_DIR/NAME-IxT.log (-try2.log
    for a second try)."""
    for attempt in range(1, TRITON_START_ATTEMPTS + 1):
        grpc_port, http_port, metrics_port = (servers.free_port() for _ in range(3))
        argv = [
            str(BENCH_PYTHON), "-m", "bench.peers.triton_server", "--model-dir", str(bundle),
            "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
            "--instances", str(instances), "--threads", str(threads),
        ]  # fmt: skip
        try:
            server = servers.start(
                f"{name}-{instances}x{threads}" + (f"-try{attempt}" if attempt > 1 else ""),
                argv,
                grpc_port,
                log_dir,
                env=TRITON_ENV,
                ready_marker="triton: serving on",
                timeout_s=120,
            )
        except servers.ServerFailed as error:
            if attempt == TRITON_START_ATTEMPTS:
                raise
            print(f"triton: start failed, trying once more: {error}", flush=True)
            continue
        print(f"triton: ready in {server.cold_start_s:.2f} s (pid {server.pid})", flush=True)
        return server
    raise AssertionError("unreachable: the last attempt returns or raises")


def _paired_triton(bundle: Path, log_dir: Path, plan: Plan) -> servers.Server | str:
    """Triton for the paired targets, or why there is none (its target is then listed as not
    measured): the rest still runs."""
    if not plan.triton:
        return "left out of this run by --no-triton or --quick"
    if not BENCH_PYTHON.exists():
        return TRITON_MISSING
    try:
        return start_triton(bundle, log_dir, instances=ceiling.cores(), threads=1, name="triton-paired")
    except RuntimeError as error:
        print(f"triton failed, its target left out: {error}", flush=True)
        return f"triton failed to start: {error}"


def triton_windows(
    server: servers.Server,
    shape: Shape,
    concurrencies: Sequence[int],
    latent_dim: int,
    plan: Plan,
    server_cpu: bool = True,
) -> list[Row]:
    """Closed-loop windows on Triton, driven by tritonclient from bench/.venv; with `server_cpu`, its
    server's CPU time from /proc too (a walk of its processes at each window's edges, which the
    paired targets' windows on the other servers do not make either)."""
    command = [
        str(BENCH_PYTHON), "-m", "bench.peers.triton_load", "--target", server.target,
        "--rpc", shape.rpc, "--per-request", str(shape.per_request), "--latent-dim", str(latent_dim),
        "--concurrency", *map(str, concurrencies), "--duration", str(plan.window_s),
        "--warmup", str(plan.warmup_s), "--uvloop",
        *(["--server-pid", str(server.pid)] if server_cpu else []),
    ]  # fmt: skip
    done = subprocess.run(
        command, env={**os.environ, **TRITON_ENV}, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise servers.ServerFailed(f"triton_load failed: {done.stderr[-2000:]}")
    return triton_results(done.stdout, len(concurrencies))


def triton_results(stdout: str, expected: int) -> list[Row]:
    """The `expected` windows triton_load printed, each on a line after RESULT_PREFIX; its other lines
    (a library's print) are not results. Too few, or one unreadable: ServerFailed, which costs the
    stage or the target that asked, not the run."""
    lines = [
        line.removeprefix(RESULT_PREFIX) for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)
    ]
    try:
        windows = [json.loads(line) for line in lines]
    except json.JSONDecodeError as error:
        raise servers.ServerFailed(f"triton_load printed an unreadable window: {error}") from error
    if len(windows) != expected or not all(isinstance(window, dict) for window in windows):
        raise servers.ServerFailed(
            f"triton_load printed {len(windows)} windows, not {expected}: {stdout[-500:]!r}"
        )
    return windows


def triton_window(
    server: servers.Server, shape: Shape, concurrency: int, latent_dim: int, plan: Plan
) -> targets.Measure:
    """One Triton window as a side of a target: its images a second, or WindowErrors."""

    def measure() -> float:
        (window,) = triton_windows(server, shape, [concurrency], latent_dim, plan, server_cpu=False)
        return targets.clean_rate(float(window["items_per_s"]), window["errors"])

    return measure


def measure_triton(
    bundle: Path, latent_dim: int, plan: Plan, log_dir: Path, instances: int, threads: int
) -> Row:
    """Every peer shape on Triton."""
    if not BENCH_PYTHON.exists():
        return {"skipped": TRITON_MISSING}
    server = start_triton(bundle, log_dir, instances, threads)
    windows: list[Row] = []
    try:
        shapes = [(Shape("Sample", size), plan.peer_concurrencies) for size in plan.sample_sizes]
        shapes += [(Shape(rpc, 64), plan.peer_unary_concurrencies) for rpc in ("Decode", "Encode")]
        for shape, concurrencies in shapes:
            for window in triton_windows(server, shape, concurrencies, latent_dim, plan):
                row = {"shape": shape.name, "rpc": shape.rpc, "per_request": shape.per_request}
                windows.append({**row, "dtype": "FLOAT32", **window})
                print(
                    f"  triton: {shape.name} c={window['concurrency']}: {window['items_per_s']:,.0f} items/s",
                    flush=True,
                )
        # PSS: tritonserver, its Python stubs and PyTriton share memory, which VmRSS counts in each.
        pss = server.pss_bytes()
    finally:
        server.stop()
    return {
        "cold_start_s": round(server.cold_start_s, 3),
        "instances": instances,
        "threads": threads,
        "pss_after_run_mb": _mb(pss),
        "windows": windows,
    }


# ---------------------------------------------------------------- the targets, in paired rounds


def paired_targets(
    bundle: Path, manifest: dict[str, Any], plan: Plan, ceiling_rows: list[Row], log_dir: Path
) -> Row:
    """Each target's sides measured back to back, `plan.target_rounds` times (bench/targets.py)."""
    latent_dim = int(manifest["latent_dim"])

    def window(server: servers.Server, shape: Shape, concurrency: int) -> targets.Measure:
        return targets.service_window(
            server, shape, concurrency, latent_dim, plan.window_s, plan.warmup_s, run=_run
        )

    def best_layout(graph: str, rows: int | None = None) -> Row:
        """The ceiling's best row for `graph`: at any rows a call, or at `rows` a call."""
        candidates = [r for r in ceiling_rows if r["graph"] == graph and rows in (None, r["rows"])]
        return max(candidates, key=lambda r: r["items_per_s"])

    def ceiling_side(graph: str, best: Row) -> targets.Measure:
        path = bundle / manifest["graphs"][graph]["file"]
        feed = (
            ceiling.decoder_feed(best["rows"], latent_dim)
            if graph == "decoder"
            else ceiling.encoder_feed(best["rows"])
        )
        return targets.ceiling_window(
            ceiling.layout_runs(path, feed, best["layout"]), plan.ceiling_window_s, 0.2
        )

    started: list[servers.Server] = []
    chosen: list[targets.Target] = []
    # Every target in the table's order, measured or not; those that are not, with why.
    goals: dict[str, float] = {}
    not_measured: dict[str, str] = {}

    def add(target: targets.Target) -> None:
        goals[target.name] = target.goal
        chosen.append(target)

    try:
        port = servers.free_port()
        service = servers.start("service-paired", service_argv(bundle, port), port, log_dir)
        started.append(service)
        batch_one = Shape("Sample", 1)
        # Each peer's side of its target, or why it has none.
        peer_sides: dict[str, targets.Measure | str] = {}
        for index, (name, flags) in enumerate(NAIVE_LAYOUTS.items(), 1):
            port = servers.free_port()
            try:
                naive = servers.start(
                    f"naive-paired-{index}", naive_argv(bundle, port, *flags), port, log_dir
                )
            except RuntimeError as error:  # a peer that fails costs its target, not the run
                print(f"naive failed, its target left out: {error}", flush=True)
                peer_sides[name] = f"the naive server failed to start: {error}"
            else:
                started.append(naive)
                peer_sides[name] = window(naive, batch_one, 32)
        # Held to the decoder's best at ANY rows a call, as the stream is to the encoder's: the
        # service may split a request into calls of any size, so no smaller call is the excuse.
        # The issue defines the ceiling of a shape at its own rows a call, in the best thread layout:
        # measured too, so that both readings of the target are on record.
        decoder_best = best_layout("decoder")
        for size in TARGET_SAMPLE_SIZES:
            sample = window(service, Shape("Sample", size), 4)
            add(
                targets.Target(
                    f"Sample {size}/req, 4 clients / all-core ceiling ({_layout_name(decoder_best)})",
                    0.9,
                    sample,
                    ceiling_side("decoder", decoder_best),
                )
            )
            own_rows = best_layout("decoder", size)
            add(
                targets.Target(
                    f"Sample {size}/req, 4 clients / the shape's own ceiling ({_layout_name(own_rows)})",
                    0.9,
                    sample,
                    ceiling_side("decoder", own_rows),
                )
            )
        ours_batch_one = window(service, batch_one, 32)
        triton = _paired_triton(bundle, log_dir, plan)
        if isinstance(triton, str):
            peer_sides[TRITON_TARGET] = triton
        else:
            started.append(triton)
            peer_sides[TRITON_TARGET] = triton_window(triton, batch_one, 32, latent_dim, plan)
        for name, theirs in peer_sides.items():
            goal = 2.0 if name == TRITON_TARGET else 1.5
            if isinstance(theirs, str):
                goals[name] = goal
                not_measured[name] = theirs
            else:
                add(targets.Target(name, goal, ours_batch_one, theirs))
        encoder_best = best_layout("encoder")
        add(
            targets.Target(
                f"EncodeStream {plan.stream_images:,} images, {TARGET_STREAM_CHUNK} a message"
                f" / encoder ceiling ({_layout_name(encoder_best)})",
                0.8,
                targets.stream_window(service, plan.stream_images, TARGET_STREAM_CHUNK, run=_run),
                ceiling_side("encoder", encoder_best),
            )
        )
        measured = targets.paired_rounds(chosen, plan.target_rounds)
    finally:
        for server in started:
            server.stop()
    return {"rounds": measured, "summary": targets.summarize(measured, goals, not_measured)}


# ---------------------------------------------------------------- levers


def in_process_levers(
    bundle: Path, manifest: dict[str, Any], plan: Plan, ceilings_rows: list[Row], work_dir: Path
) -> Row:
    latent_dim = int(manifest["latent_dim"])
    decoder = bundle / manifest["graphs"]["decoder"]["file"]
    window = plan.ceiling_window_s
    one_thread_64 = next(
        r for r in ceilings_rows if r["graph"] == "decoder" and r["rows"] == 64 and r["layout"] == "1-thread"
    )
    decode_ms_per_image = 1000.0 / one_thread_64["items_per_s"]
    result: Row = {
        "batch_sizes": levers.batch_sizes(
            decoder, bundle / manifest["graphs"]["encoder"]["file"], latent_dim, 1.0
        ),
        "optimization_levels": levers.optimization_levels(decoder, latent_dim, 64, window),
        "thread_pool": levers.thread_pool_options(decoder, latent_dim, window),
        "session_sharing": levers.session_sharing(decoder, latent_dim, window, ceiling.cores()),
        "optimized_graph": levers.optimized_graph(decoder, latent_dim, window),
        "wire": levers.wire_costs(latent_dim, decode_ms_per_image),
        "tensor_decoding": levers.tensor_decoding(),
    }
    decoders = quantize.quantized_decoders(decoder, latent_dim, work_dir / "quantized")
    result["int8_speed"] = quantize.speed_and_error(decoders, latent_dim, window)
    if plan.quality:
        result["int8_quality"] = quantize.sample_quality(decoders, bundle, latent_dim)
    return result


# (name, the module that serves, its extra flags): one server restart each.
VARIANT = "bench.serve_variant"
SERVER_LEVERS: list[tuple[str, str, list[str]]] = [
    ("defaults", "service", []),
    ("--max-concurrent-batches 1 (one call at a time)", "service", ["--max-concurrent-batches", "1"]),
    (
        "the first service's layout: 1 call at a time, ORT's default threads, batches of 256",
        "service",
        ["--max-concurrent-batches", "1", "--intra-op-threads", "0", "--max-batch-size", "256"],
    ),
    ("--max-queue-delay-ms 0", "service", ["--max-queue-delay-ms", "0"]),
    ("--inference-nice 0 (inference at the event loop's priority)", "service", ["--inference-nice", "0"]),
    ("--pin-inference-threads off (the kernel places them)", "service", ["--pin-inference-threads", "off"]),
    ("--max-batch-size 64 (the earlier default)", "service", ["--max-batch-size", "64"]),
    ("--max-batch-size 256", "service", ["--max-batch-size", "256"]),
    ("uvloop event loop", VARIANT, ["--uvloop"]),
    ("GIL switch interval 1 ms", VARIANT, ["--switch-interval-ms", "1"]),
]


def server_levers(bundle: Path, latent_dim: int, plan: Plan, log_dir: Path) -> list[Row]:
    """Each server-side knob alone, on the shapes the targets name."""
    cells = [(Shape("Sample", 1), 32), (Shape("Sample", 64), 4), (Shape("Sample", 256), 4)]
    sweep = Sweep(cells, ("FLOAT32",))
    plan = replace(plan, stream_repeats=1)
    rows: list[Row] = []
    for name, module, extra in SERVER_LEVERS:
        port = servers.free_port()
        argv = service_argv(bundle, port, *extra, module=module)
        try:
            measured = measure_vae_server(f"service[{name}]", argv, port, sweep, latent_dim, plan, log_dir)
        except Exception as error:  # one broken variant must not sink the whole run
            rows.append({"lever": name, "errors": {"failed": str(error)[:200]}})
            continue
        rss = {key: measured[key] for key in ("cold_start_s", "rss_after_warmup_mb", "rss_after_run_mb")}
        rows += [{"lever": name, **rss, **w} for w in measured["windows"]]
        stream = measured["stream"][0]
        rows.append({"lever": name, **rss, "shape": "EncodeStream 10,000", "concurrency": 1, **stream})
    return rows


# ---------------------------------------------------------------- main


def run(bundle: Path, plan: Plan, work_dir: Path, results: Row) -> None:
    """Every stage in turn, each adding its figures to `results` (kept by the caller if one fails)."""
    manifest = json.loads((bundle / "model.json").read_text())
    latent_dim = int(manifest["latent_dim"])
    log_dir = work_dir / "logs"
    started = time.perf_counter()
    results.update(machine=machine_record(bundle, manifest), plan=plan.__dict__)
    print("ceilings", flush=True)
    results["ceilings"] = ceilings(bundle, manifest, plan)

    sample_shapes = [
        Shape("Sample", size, dtype) for dtype in ("FLOAT32", "UINT8") for size in plan.sample_sizes
    ]
    unary_shapes = [Shape(rpc, 64, dtype) for rpc in ("Decode", "Encode") for dtype in ("FLOAT32", "UINT8")]
    port = servers.free_port()
    results["service"] = measure_vae_server(
        "service",
        service_argv(bundle, port),
        port,
        Sweep.grid([*sample_shapes, *unary_shapes], plan.concurrencies, ("FLOAT32", "UINT8")),
        latent_dim,
        plan,
        log_dir,
    )
    results["service_cold_start"] = cold_starts(bundle, log_dir)

    port = servers.free_port()
    naive_sample = Sweep.grid(
        [Shape("Sample", size) for size in plan.sample_sizes], plan.peer_concurrencies, ()
    )
    naive_unary = Sweep.grid([Shape("Decode", 64), Shape("Encode", 64)], plan.peer_unary_concurrencies, ())
    try:
        results["naive"] = measure_vae_server(
            "naive",
            naive_argv(bundle, port),
            port,
            Sweep([*naive_sample.cells, *naive_unary.cells], ("FLOAT32",)),
            latent_dim,
            plan,
            log_dir,
        )
    except RuntimeError as error:  # a peer that fails must not cost the rest of the run
        print(f"naive failed, left out: {error}", flush=True)
        results["naive"] = {"skipped": f"it failed, and the run went on without it: {error}"}
    if plan.triton:
        print("triton", flush=True)
        # Triton's best layout here: one single-threaded model instance per core (one instance with
        # onnxruntime's default threads made half as many images a second in a trial).
        try:
            results["triton"] = measure_triton(
                bundle, latent_dim, plan, log_dir, instances=ceiling.cores(), threads=1
            )
        except RuntimeError as error:  # a peer that fails must not cost the rest of the run
            print(f"triton failed, left out: {error}", flush=True)
            results["triton"] = {"skipped": f"it failed, and the run went on without it: {error}"}
    if plan.levers:
        print("levers", flush=True)
        results["levers"] = in_process_levers(bundle, manifest, plan, results["ceilings"], work_dir)
        results["server_levers"] = server_levers(bundle, latent_dim, plan, log_dir)
    # A second pass: the ceiling is the most onnxruntime does here, and passing load on a shared
    # machine only ever lowers a measurement, so each layout keeps its better pass. It comes before
    # the targets, which hold the service to the best layout: one slow pass alone once chose a layout
    # 8% below the best for them (docs/BENCHMARKS.md, the 12-06 05:14 run).
    print("ceilings, second pass", flush=True)
    results["ceilings_passes"] = [results["ceilings"], ceilings(bundle, manifest, plan)]
    results["ceilings"] = best_of(results["ceilings_passes"])
    print("targets, in paired rounds", flush=True)
    results["paired_targets"] = paired_targets(bundle, manifest, plan, results["ceilings"], log_dir)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"]["suite_seconds"] = round(time.perf_counter() - started, 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the benchmark suite behind docs/BENCHMARKS.md")
    parser.add_argument("--bundle", type=Path, required=True, help="the model bundle to serve")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench"), help="results.json and logs")
    parser.add_argument("--doc", type=Path, default=None, help="the Markdown file whose tables to rewrite")
    parser.add_argument("--quick", action="store_true", help="short windows, few shapes: a smoke run")
    parser.add_argument("--window", type=float, default=None, help="seconds per measured window")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--no-levers", action="store_true")
    parser.add_argument("--no-quality", action="store_true", help="skip the int8 decoder's quality score")
    args = parser.parse_args(argv)
    if not (args.bundle / "model.json").is_file():
        parser.error(f"--bundle {args.bundle}: no model.json there; run vae-export first")
    plan = Plan.quick() if args.quick else Plan()
    if args.window:
        plan = replace(plan, window_s=args.window)
    plan = replace(
        plan,
        triton=plan.triton and not args.no_triton,
        levers=plan.levers and not args.no_levers,
        quality=plan.quality and not args.no_quality,
    )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results: Row = {}
    try:
        run(args.bundle, plan, args.work_dir, results)
    except BaseException:
        # What was measured before the failure is kept beside, not over, the last finished run's
        # results.json, which the doc's tables (untouched here) were made from.
        partial = args.work_dir / "results.partial.json"
        partial.write_text(json.dumps(results, indent=2) + "\n")
        print(f"failed; what was measured before is in {partial}", flush=True)
        raise
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.work_dir / 'results.json'}", flush=True)
    if args.doc:
        report.update(args.doc, results)
        print(f"wrote {args.doc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
