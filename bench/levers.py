"""The levers measured in-process, one at a time, each against the same baseline.

Every function returns JSON-ready rows for docs/BENCHMARKS.md. The variants of one lever are measured
in interleaved rounds (`bench.ceiling.interleaved`): on a shared machine a single loop moves by 10-20%
from one minute to the next, more than most levers do. The server-side levers (batching knobs, thread
counts, uvloop) need a server restart and live in bench.suite.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from bench.ceiling import (
    decoder_feed,
    encoder_feed,
    graph_runner,
    interleaved,
    load,
    session_options,
)
from service.codec import from_tensor, images_as, to_tensor
from vae.v1 import vae_pb2

Row = dict[str, Any]
_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _micro_us(fn: Callable[[], object], repeat: int = 200) -> float:
    """The median wall time of `fn` in microseconds."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def batch_sizes(decoder: Path, encoder: Path, latent_dim: int, window_s: float) -> list[Row]:
    """Cost per image against rows per call, one 1-thread session per graph: what batching buys."""
    variants = {}
    for graph, path in (("decoder", decoder), ("encoder", encoder)):
        session = load(path, session_options(1))
        for rows in (1, 4, 16, 64, 256, 512):
            feed = decoder_feed(rows, latent_dim) if graph == "decoder" else encoder_feed(rows)
            variants[graph, rows] = [graph_runner(session, feed)]
    measured = interleaved(variants, window_s, 0.1)
    return [{"graph": graph, "rows": rows, **result.summary()} for (graph, rows), result in measured.items()]


def optimization_levels(decoder: Path, latent_dim: int, rows: int, window_s: float) -> list[Row]:
    """Graph optimization level, one 1-thread session, decoder at `rows` a call."""
    feed = decoder_feed(rows, latent_dim)
    variants = {
        name: [graph_runner(load(decoder, session_options(1, optimization=level)), feed)]
        for name, level in _LEVELS.items()
    }
    measured = interleaved(variants, window_s, 0.2)
    return [{"level": name, "rows": rows, **result.summary()} for name, result in measured.items()]


def thread_pool_options(decoder: Path, latent_dim: int, window_s: float) -> list[Row]:
    """Spinning and execution mode of a default-threads session, at 1 and 64 rows a call.

    Spinning keeps idle pool threads busy-waiting for the next call: lower latency in a tight loop,
    but CPU that the event loop's thread needs on a 2-core machine.
    """
    options: list[tuple[str, ort.SessionOptions]] = [
        ("default threads, spinning on (ORT default)", session_options(0, spinning=True)),
        ("default threads, spinning off", session_options(0, spinning=False)),
        (
            "default threads, parallel execution, 2 inter-op",
            session_options(0, parallel=True, inter_op_threads=2),
        ),
        ("1 intra-op thread", session_options(1)),
    ]
    variants = {}
    for name, option in options:
        session = load(decoder, option)
        for rows in (1, 64):
            variants[name, rows] = [graph_runner(session, decoder_feed(rows, latent_dim))]
    measured = interleaved(variants, window_s, 0.2)
    return [{"variant": name, "rows": rows, **result.summary()} for (name, rows), result in measured.items()]


def session_sharing(decoder: Path, latent_dim: int, window_s: float, threads: int) -> list[Row]:
    """`threads` callers side by side: on one shared 1-thread session, or on a session each.

    onnxruntime's `run` may be called concurrently on one session; sharing saves the memory and the
    load time of the extra sessions, if it costs no speed.
    """
    shared = load(decoder, session_options(1))
    own = [shared] + [load(decoder, session_options(1)) for _ in range(threads - 1)]
    variants = {}
    for rows in (1, 64, 256):
        feed = decoder_feed(rows, latent_dim)
        for name, sessions in (("one shared session", [shared] * threads), ("a session per caller", own)):
            variants[f"{threads} callers, {name}", rows] = [graph_runner(s, feed) for s in sessions]
    measured = interleaved(variants, window_s, 0.2)
    return [{"variant": name, "rows": rows, **result.summary()} for (name, rows), result in measured.items()]


def optimized_graph(decoder: Path, latent_dim: int, window_s: float) -> list[Row]:
    """ORT's optimized graph saved to disk and loaded with optimizations off: load time and speed."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "decoder.optimized.onnx"
        options = session_options(1)
        options.optimized_model_filepath = str(optimized)
        load(decoder, options)
        variants = [
            ("bundle graph, ORT_ENABLE_ALL at load", decoder, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
            ("pre-optimized graph, optimizations off", optimized, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        ]
        feed = decoder_feed(64, latent_dim)
        runners, load_ms = {}, {}
        for name, path, level in variants:
            loads = []
            for _ in range(5):
                start = time.perf_counter()
                session = load(path, session_options(1, optimization=level))
                loads.append(time.perf_counter() - start)
            runners[name] = [graph_runner(session, feed)]
            load_ms[name] = round(1000 * statistics.median(loads), 2)
        measured = interleaved(runners, window_s, 0.2)
        return [
            {
                "variant": name,
                "session_load_ms": load_ms[name],
                "bytes": path.stat().st_size,
                **measured[name].summary(),
            }
            for name, path, _ in variants
        ]


def wire_costs(latent_dim: int, decode_ms_per_image: float) -> list[Row]:
    """What building and parsing a response costs per request, against the inference it carries.

    `decode_ms_per_image` is the 1-thread decoder's cost, to put the figures in proportion.
    """
    rng = np.random.default_rng(0)
    out = []
    for rows in (1, 64, 256):
        images = rng.random((rows, 1, 28, 28), dtype=np.float32)
        latents = rng.standard_normal((rows, latent_dim), dtype=np.float32)
        for dtype_name, dtype in (("FLOAT32", vae_pb2.DATA_TYPE_FLOAT32), ("UINT8", vae_pb2.DATA_TYPE_UINT8)):
            out.append(
                {
                    "rows": rows,
                    "dtype": dtype_name,
                    **_response_costs(images, latents, dtype),
                    "inference_us": round(1000 * decode_ms_per_image * rows, 1),
                }
            )
    return out


def _response_costs(images: npt.NDArray[np.float32], latents: npt.NDArray[np.float32], dtype: int) -> Row:
    """The servicer's steps for one SampleResponse: dtype conversion, message build + serialize, parse."""

    def convert() -> object:
        return images_as(images, dtype)

    converted = images_as(images, dtype)

    def build() -> bytes:
        response = vae_pb2.SampleResponse(images=to_tensor(converted), latents=to_tensor(latents), seed=1)
        return response.SerializeToString()

    payload = build()

    def parse() -> object:
        return vae_pb2.SampleResponse.FromString(payload)

    return {
        "bytes": len(payload),
        "convert_us": round(_micro_us(convert), 1),
        "build_and_serialize_us": round(_micro_us(build), 1),
        "parse_us": round(_micro_us(parse), 1),
    }


def tensor_decoding() -> list[Row]:
    """Reading a 64-image Encode request's tensor: zero-copy np.frombuffer against a copying read."""
    images = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    request = vae_pb2.EncodeRequest(images=to_tensor(images))
    payload = request.SerializeToString()
    parsed = vae_pb2.EncodeRequest.FromString(payload)
    uint8_tensor = to_tensor((images * 255).astype(np.uint8))
    return [
        {
            "variant": "parse the request message (protobuf)",
            "us": round(_micro_us(lambda: vae_pb2.EncodeRequest.FromString(payload)), 1),
        },
        {
            "variant": "np.frombuffer (zero-copy, service.codec)",
            "us": round(_micro_us(lambda: from_tensor(parsed.images, "images")), 1),
        },
        {
            "variant": "np.frombuffer(...).copy()",
            "us": round(_micro_us(lambda: from_tensor(parsed.images, "images").copy()), 1),
        },
        {
            "variant": "np.array(list of floats)",
            "us": round(
                _micro_us(
                    lambda: np.array(from_tensor(parsed.images, "images").tolist(), dtype=np.float32),
                    repeat=20,
                ),
                1,
            ),
        },
        {
            "variant": "UINT8 input: frombuffer + scale to float32",
            "us": round(
                _micro_us(lambda: from_tensor(uint8_tensor, "images").astype(np.float32) / np.float32(255)), 1
            ),
        },
    ]
