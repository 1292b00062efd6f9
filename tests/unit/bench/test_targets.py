"""The targets' paired rounds: both sides of a ratio measured back to back, judged on the median."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import numpy as np
import pytest

from bench import ceiling, loadgen, report, servers, suite, targets
from bench.workloads import Shape, encode_stream
from service import settings
from vae.v1 import vae_pb2, vae_pb2_grpc


def _recorder(calls: list[str], name: str, value: float) -> targets.Measure:
    def measure() -> float:
        calls.append(name)
        return value

    return measure


def test_each_round_measures_both_sides_back_to_back_and_odd_rounds_swap_the_order() -> None:
    calls: list[str] = []
    pair = targets.Target("t", 0.9, _recorder(calls, "ours", 90.0), _recorder(calls, "theirs", 100.0))

    measured = targets.paired_rounds([pair], rounds=3)

    assert calls == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
    assert [(m["round"], m["ours"], m["theirs"]) for m in measured] == [
        (1, 90.0, 100.0),
        (2, 90.0, 100.0),
        (3, 90.0, 100.0),
    ]


def test_a_target_whose_peer_fails_is_measured_no_more_and_the_others_go_on() -> None:
    calls: list[str] = []
    answers = iter([1200.0])

    def triton_dies_in_round_two() -> float:
        calls.append("triton")
        try:
            return next(answers)
        except StopIteration:
            raise servers.ServerFailed("triton_load failed: connection refused") from None

    peer = targets.Target("triton", 2.0, _recorder(calls, "service", 2400.0), triton_dies_in_round_two)
    ceiling_pair = targets.Target(
        "ceiling", 0.9, _recorder(calls, "sample", 90.0), _recorder(calls, "ceiling", 100.0)
    )

    measured = targets.paired_rounds([peer, ceiling_pair], rounds=3)

    assert [(m["target"], m["round"]) for m in measured] == [
        ("triton", 1),
        ("ceiling", 1),
        ("triton", 2),
        ("ceiling", 2),
        ("ceiling", 3),
    ]
    assert measured[2]["error"] == "triton_load failed: connection refused"
    summary = {row["target"]: row for row in targets.summarize(measured, {"triton": 2.0, "ceiling": 0.9})}
    assert (summary["triton"]["rounds"], summary["triton"]["failed_in_round"]) == (1, 2)
    assert (summary["ceiling"]["rounds"], summary["ceiling"]["failed_in_round"]) == (3, None)
    assert (summary["triton"]["ratio_median"], summary["triton"]["met"]) == (2.0, False)
    assert (
        "| triton (failed in round 2) | 2,400 | 1,200 | 2.000 | 2.000-2.000 | 1 of 1 | >= 2.0 | no |"
        in report.targets({"paired_targets": {"summary": list(summary.values())}})
    )


def test_a_target_whose_peer_fails_in_the_first_round_is_still_listed_as_not_met() -> None:
    def dies() -> float:
        raise servers.ServerFailed("triton-paired exited with 1")

    measured = targets.paired_rounds([targets.Target("triton", 2.0, lambda: 2400.0, dies)], rounds=6)

    assert measured == [{"target": "triton", "round": 1, "error": "triton-paired exited with 1"}]
    (row,) = targets.summarize(measured, {"triton": 2.0})
    assert (row["rounds"], row["failed_in_round"], row["ratio_median"], row["met"]) == (0, 1, None, False)
    assert "| triton (failed in round 1) | - | - | - | - | 0 of 0 | >= 2.0 | no |" in report.targets(
        {"paired_targets": {"summary": [row]}}
    )


def test_a_target_is_judged_on_the_median_of_its_rounds_ratios_and_reports_their_range() -> None:
    measured = [
        {"target": "a", "round": 1, "ours": 88.0, "theirs": 100.0},
        {"target": "a", "round": 2, "ours": 95.0, "theirs": 100.0},
        {"target": "a", "round": 3, "ours": 92.0, "theirs": 100.0},
        {"target": "b", "round": 1, "ours": 140.0, "theirs": 100.0},
    ]

    summary = {row["target"]: row for row in targets.summarize(measured, {"a": 0.9, "b": 1.5})}

    assert summary["a"]["ratio_median"] == pytest.approx(0.92)
    assert (summary["a"]["ratio_low"], summary["a"]["ratio_high"]) == (0.88, 0.95)
    assert (summary["a"]["rounds_met"], summary["a"]["rounds"], summary["a"]["met"]) == (2, 3, True)
    assert (summary["b"]["ratio_median"], summary["b"]["met"]) == (1.4, False)


def test_a_target_without_measurements_is_left_out_rather_than_reported_as_met() -> None:
    assert targets.summarize([], {"a": 0.9}) == []


def test_the_targets_table_shows_the_median_ratio_its_range_and_the_verdict(tmp_path: Path) -> None:
    measured = [
        {"target": "Sample 64/req", "round": r, "ours": ours, "theirs": 100.0}
        for r, ours in enumerate((85.0, 91.0, 93.0), 1)
    ]
    results = {
        "paired_targets": {"summary": targets.summarize(measured, {"Sample 64/req": 0.9})},
        "service_cold_start": {"median_s": 0.2},
        "service": {"rss_after_warmup_mb": 300.0},
    }

    table = report.targets(results)

    assert "| Sample 64/req | 91.0 | 100 | 0.910 | 0.850-0.930 | 2 of 3 | >= 0.9 | yes |" in table
    assert "| resident memory after warm-up (MB, 10^6 bytes) | 300 | - | - | - | - | < 250 MB | no |" in table


def test_a_median_just_short_of_its_goal_reads_short_of_it_in_the_table() -> None:
    """Summarized and reported: 1.4996 is not the 1.5 of its goal, at either step."""
    measured = [{"target": "naive", "round": 1, "ours": 1499.6, "theirs": 1000.0}]
    summary = targets.summarize(measured, {"naive": 1.5})
    assert "| naive | 1,500 | 1,000 | 1.499 | 1.499-1.499 | 0 of 1 | >= 1.5 | no |" in report.targets(
        {"paired_targets": {"summary": summary}}
    )


def test_an_unknown_ceiling_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown layout 'two-thread'"):
        ceiling.layout_runs(Path("decoder.onnx"), {}, "two-thread")


@pytest.mark.parametrize(
    ("triton", "venv", "why"),
    [
        (False, "exists", "left out of this run by --no-triton or --quick"),
        (True, "missing", suite.TRITON_MISSING),
        (True, "exists", "triton failed to start: triton-2x1 exited with 1 before it was ready"),
    ],
)
def test_a_triton_that_is_not_there_says_why_its_target_is_not_measured(
    triton: bool, venv: str, why: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def exits(*args: object, **kwargs: object) -> servers.Server:
        raise servers.ServerFailed("triton-2x1 exited with 1 before it was ready")

    python = tmp_path / "python"
    if venv == "exists":
        python.touch()
    monkeypatch.setattr(suite, "BENCH_PYTHON", python)
    monkeypatch.setattr(suite, "start_triton", exits)

    plan = replace(suite.Plan(), triton=triton)
    assert suite._paired_triton(Path("bundle"), Path("logs"), plan) == why


def test_triton_that_fails_to_start_is_tried_once_more_then_given_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PyTriton's model load sometimes loses a race with its own handshake socket."""
    started: list[str] = []

    def fails_first(name: str, *args: object, **kwargs: object) -> object:
        started.append(name)
        if len(started) == 1:
            raise servers.ServerFailed(f"{name} exited with 1: see its log")
        return SimpleNamespace(cold_start_s=1.0, pid=1)

    monkeypatch.setattr(servers, "start", fails_first)
    suite.start_triton(Path("bundle"), tmp_path, instances=2, threads=1)
    assert started == ["triton-2x1", "triton-2x1-try2"]

    def always_fails(name: str, *args: object, **kwargs: object) -> object:
        started.append(name)
        raise servers.ServerFailed(f"{name} exited with 1: see its log")

    started.clear()
    monkeypatch.setattr(servers, "start", always_fails)
    with pytest.raises(servers.ServerFailed, match="triton-2x1-try2 exited with 1"):
        suite.start_triton(Path("bundle"), tmp_path, instances=2, threads=1)
    assert started == ["triton-2x1", "triton-2x1-try2"]


def test_a_peer_that_dies_after_a_round_answers_nothing_and_its_target_is_not_met() -> None:
    # A dead server refuses every request; the closed loop counts them as errors and 0 images/s.
    rates = iter([1200.0, 0.0])
    peer = targets.Target("naive", 1.5, lambda: 2400.0, lambda: next(rates))

    measured = targets.paired_rounds([peer], rounds=4)

    assert [m.get("error") for m in measured] == [None, "a side answered nothing: 2,400 against 0"]
    (row,) = targets.summarize(measured, {"naive": 1.5})
    assert (row["rounds"], row["failed_in_round"], row["ratio_median"], row["met"]) == (1, 2, 2.0, False)


@pytest.mark.parametrize(
    ("error", "recorded"),
    [
        (TimeoutError("requests still unanswered 60 s after the window closed"), "requests still unanswered"),
        (
            grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone"
            ),
            "UNAVAILABLE: gone",
        ),
    ],
)
def test_a_server_that_hangs_or_drops_a_stream_ends_its_target_not_the_run(
    error: Exception, recorded: str
) -> None:
    def stream() -> float:
        raise error

    measured = targets.paired_rounds(
        [
            targets.Target("stream", 0.8, stream, lambda: 100.0),
            targets.Target("other", 0.9, lambda: 95.0, lambda: 100.0),
        ],
        rounds=2,
    )

    assert [(m["target"], m["round"]) for m in measured] == [("stream", 1), ("other", 1), ("other", 2)]
    assert recorded in measured[0]["error"]


def test_a_failed_run_keeps_what_it_measured_beside_the_last_finished_runs_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.json").write_text("{}")

    def fails_in_the_second_stage(
        bundle: Path, plan: suite.Plan, work_dir: Path, results: dict[str, object]
    ) -> None:
        results["ceilings"] = [{"graph": "decoder", "items_per_s": 9000.0}]
        raise servers.ServerFailed("service exited with -9 mid-run")

    monkeypatch.setattr(suite, "run", fails_in_the_second_stage)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("prose\n")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "results.json").write_text('{"the last": "finished run"}')

    with pytest.raises(servers.ServerFailed, match="mid-run"):
        suite.main(["--bundle", str(bundle), "--work-dir", str(tmp_path / "work"), "--doc", str(doc)])

    partial = json.loads((tmp_path / "work" / "results.partial.json").read_text())
    assert partial["ceilings"][0]["items_per_s"] == 9000.0
    assert json.loads((tmp_path / "work" / "results.json").read_text()) == {"the last": "finished run"}
    assert doc.read_text() == "prose\n"


def _outcomes(*outcomes: float | Exception) -> targets.Measure:
    """A side that gives these outcomes in turn: images a second, or an exception to raise."""
    pending = iter(outcomes)

    def measure() -> float:
        outcome = next(pending)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return measure


def test_a_round_whose_window_had_failed_requests_gives_no_ratio_and_the_target_is_not_met(
    capsys: pytest.CaptureFixture[str],
) -> None:
    refused = targets.WindowErrors(2300.0, {"RESOURCE_EXHAUSTED": 12})
    service = _outcomes(2400.0, refused, 2500.0, 2400.0)
    peer = targets.Target("naive", 1.5, service, lambda: 1200.0)

    measured = targets.paired_rounds([peer], rounds=4)

    # Only that round is dropped: the server still answers, and the next rounds go on.
    assert [m["round"] for m in measured] == [1, 2, 3, 4]
    assert measured[1] == {
        "target": "naive",
        "round": 2,
        "ours": 2300.0,
        "theirs": 1200.0,
        "errors": {"ours": {"RESOURCE_EXHAUSTED": 12}},
    }
    printed = capsys.readouterr().out
    assert (
        "round 2: naive: 2,300 against 1,200: dropped, failed requests: ours: RESOURCE_EXHAUSTED 12"
        in printed
    )
    (row,) = targets.summarize(measured, {"naive": 1.5})
    assert (row["rounds"], row["dropped_rounds"], row["ratio_median"], row["met"]) == (3, [2], 2.0, False)
    assert (
        "| naive (round 2 dropped for failed requests) | 2,400 | 1,200 | 2.000 | 2.000-2.083 | 3 of 3 |"
        " >= 1.5 | no |" in report.targets({"paired_targets": {"summary": [row]}})
    )


def test_a_target_whose_every_round_had_failed_requests_is_listed_without_a_ratio_and_not_met() -> None:
    measured = [
        {"target": "a", "round": 1, "ours": 95.0, "theirs": 100.0, "errors": {"theirs": {"UNAVAILABLE": 3}}}
    ]

    (row,) = targets.summarize(measured, {"a": 0.9})

    assert (row["rounds"], row["dropped_rounds"], row["ratio_median"], row["met"]) == (0, [1], None, False)


def test_a_side_that_answered_nothing_fails_its_target_and_says_what_its_requests_got() -> None:
    dead = targets.WindowErrors(0.0, {"UNAVAILABLE": 40})
    measured = targets.paired_rounds(
        [targets.Target("naive", 1.5, lambda: 2400.0, _outcomes(dead))], rounds=2
    )

    assert measured == [
        {
            "target": "naive",
            "round": 1,
            "error": "a side answered nothing: 2,400 against 0 (theirs: UNAVAILABLE 40)",
        }
    ]


def _server(pid: int = 1) -> servers.Server:
    process = cast(subprocess.Popen[bytes], SimpleNamespace(pid=pid))
    return servers.Server("peer", process, "127.0.0.1:1", 0.0, Path("peer.log"))


def test_a_service_window_with_failed_requests_raises_them_rather_than_give_its_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def refused_twelve(*args: object, **kwargs: object) -> loadgen.Window:
        return loadgen.Window(32, 1.0, 90, 90, {"RESOURCE_EXHAUSTED": 12}, [1.0] * 90)

    monkeypatch.setattr(targets, "closed_loop", refused_twelve)
    side = targets.service_window(_server(), Shape("Sample", 1), 32, 2, 1.0, 0.1)

    with pytest.raises(targets.WindowErrors) as raised:
        side()
    assert (raised.value.items_per_s, raised.value.errors) == (90.0, {"RESOURCE_EXHAUSTED": 12})


def _triton_load_prints(monkeypatch: pytest.MonkeyPatch, stdout: str) -> None:
    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(subprocess, "run", run)


def test_triton_loads_windows_are_its_prefixed_lines_and_a_stray_line_is_not_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    window = {"concurrency": 32, "items_per_s": 1600.0, "errors": {}}
    stray = "W1206 12:00:00.000 grpc: a library's warning on stdout\n{not json either}\n"
    _triton_load_prints(monkeypatch, stray + loadgen.RESULT_PREFIX + json.dumps(window) + "\n")

    windows = suite.triton_windows(_server(), Shape("Sample", 1), [32], 2, suite.Plan())

    assert windows == [window]
    assert suite.triton_window(_server(), Shape("Sample", 1), 32, 2, suite.Plan())() == 1600.0


def test_only_the_sweeps_triton_windows_walk_its_processes_for_cpu_as_the_paired_windows_on_the_others_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The walk costs the load generator some milliseconds of the shared cores at each window's edges:
    a paired target's two sides are measured alike, without it."""
    commands: list[list[str]] = []
    window = {"concurrency": 32, "items_per_s": 1600.0, "errors": {}}

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, loadgen.RESULT_PREFIX + json.dumps(window) + "\n", "")

    monkeypatch.setattr(subprocess, "run", run)
    suite.triton_windows(_server(pid=4242), Shape("Sample", 1), [32], 2, suite.Plan())
    suite.triton_window(_server(pid=4242), Shape("Sample", 1), 32, 2, suite.Plan())()

    swept, paired = commands
    assert swept[swept.index("--server-pid") + 1] == "4242"
    assert "--server-pid" not in paired


@pytest.mark.parametrize(
    ("stdout", "recorded"),
    [
        ("no window at all\n", "triton_load printed 0 windows, not 1"),
        (loadgen.RESULT_PREFIX + '{"items_per_s": 16\n', "triton_load printed an unreadable window"),
    ],
)
def test_a_triton_load_without_a_readable_window_fails_its_target_not_the_run(
    stdout: str, recorded: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _triton_load_prints(monkeypatch, stdout)
    triton = suite.triton_window(_server(), Shape("Sample", 1), 32, 2, suite.Plan())

    measured = targets.paired_rounds([targets.Target("triton", 2.0, lambda: 2400.0, triton)], rounds=2)

    assert [m["round"] for m in measured] == [1]
    assert recorded in measured[0]["error"]


def test_a_triton_window_with_failed_requests_raises_them_rather_than_give_its_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    window = {"concurrency": 32, "items_per_s": 1500.0, "errors": {"UNAVAILABLE": 3}}
    _triton_load_prints(monkeypatch, loadgen.RESULT_PREFIX + json.dumps(window) + "\n")

    with pytest.raises(targets.WindowErrors) as raised:
        suite.triton_window(_server(), Shape("Sample", 1), 32, 2, suite.Plan())()
    assert (raised.value.items_per_s, raised.value.errors) == (1500.0, {"UNAVAILABLE": 3})


class _IdleServer:
    def stop(self) -> None:
        pass


def test_a_naive_server_that_fails_to_start_and_a_run_without_triton_list_their_targets_as_not_measured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def start(name: str, *args: object, **kwargs: object) -> servers.Server:
        if name == "naive-paired-1":
            raise servers.ServerFailed("naive-paired-1 exited with 1: see naive-paired-1.log")
        return cast(servers.Server, _IdleServer())

    monkeypatch.setattr(servers, "start", start)
    # Every other side answers at once: the ceilings at 100 images a second, the service at 95.
    monkeypatch.setattr(ceiling, "layout_runs", lambda *args: [])
    monkeypatch.setattr(targets, "ceiling_window", lambda *args: lambda: 100.0)
    monkeypatch.setattr(targets, "service_window", lambda *args, **kwargs: lambda: 95.0)
    monkeypatch.setattr(targets, "stream_window", lambda *args, **kwargs: lambda: 95.0)
    manifest = {"latent_dim": 2, "graphs": {"decoder": {"file": "d.onnx"}, "encoder": {"file": "e.onnx"}}}
    ceilings = [
        {"graph": graph, "rows": rows, "layout": "per-core", "items_per_s": 100.0}
        for graph in ("decoder", "encoder")
        for rows in (64, 256)
    ]
    plan = replace(suite.Plan(), triton=False, target_rounds=2)

    paired = suite.paired_targets(tmp_path, manifest, plan, ceilings, tmp_path / "logs")

    summary = {row["target"]: row for row in paired["summary"]}
    assert len(summary) == 8
    naive, triton = summary[suite.NAIVE_TARGET], summary[suite.TRITON_TARGET]
    assert (
        naive["not_measured"]
        == "the naive server failed to start: naive-paired-1 exited with 1: see naive-paired-1.log"
    )
    assert summary[suite.NAIVE_ONE_THREAD_TARGET]["rounds"] == 2  # the other naive server still ran
    assert triton["not_measured"] == "left out of this run by --no-triton or --quick"
    assert not naive["met"] and not triton["met"]
    assert all(
        row["rounds"] == 2 for name, row in summary.items() if name not in (naive["target"], triton["target"])
    )
    assert (
        "| Sample 1/req, 32 clients / triton (not measured: left out of this run by --no-triton or --quick)"
        " | - | - | - | - | 0 of 0 | >= 2.0 | no |" in report.targets({"paired_targets": paired})
    )


def answer_one_message(
    requests: Iterator[vae_pb2.EncodeRequest], context: grpc.ServicerContext
) -> Iterator[vae_pb2.EncodeResponse]:
    """An EncodeStream that answers its first message and then ends, as if all were done. It reads
    every message first: a stream ended while its client still sends fails the send, INTERNAL."""
    sizes = [request.images.shape[0] for request in requests]
    rows = sizes[0]
    codes = vae_pb2.Tensor(shape=[rows, 2], dtype=vae_pb2.DATA_TYPE_FLOAT32, data=bytes(8 * rows))
    yield vae_pb2.EncodeResponse(mean=codes)


def answer_every_message_then_pause(
    requests: Iterator[vae_pb2.EncodeRequest], context: grpc.ServicerContext
) -> Iterator[vae_pb2.EncodeResponse]:
    """An EncodeStream that answers at once, and sends its status only a second after the last answer."""
    for request in requests:
        rows = request.images.shape[0]
        yield vae_pb2.EncodeResponse(mean=vae_pb2.Tensor(shape=[rows, 2], dtype=vae_pb2.DATA_TYPE_FLOAT32))
    time.sleep(1.0)


@contextlib.contextmanager
def fake_encode_stream(answer: Callable[..., Iterator[vae_pb2.EncodeResponse]]) -> Iterator[str]:
    """A server on 127.0.0.1 whose EncodeStream is `answer`; yields its target."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.stream_stream_rpc_method_handler(
        answer,
        request_deserializer=vae_pb2.EncodeRequest.FromString,
        response_serializer=vae_pb2.EncodeResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("vae.v1.VaeService", {"EncodeStream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_a_stream_that_ends_before_its_last_image_is_a_failure_not_a_fast_stream() -> None:
    with fake_encode_stream(answer_one_message) as target:
        measure = targets.stream_window(cast(servers.Server, SimpleNamespace(target=target)), 256, 64)
        with pytest.raises(servers.ServerFailed, match="the EncodeStream answered 64 of 256 images"):
            measure()


def test_a_stream_is_timed_to_its_last_answer_not_to_the_status_after_it() -> None:
    async def timed(target: str) -> float:
        async with grpc.aio.insecure_channel(target) as channel:
            images = np.zeros((256, 28, 28), np.uint8)
            return await encode_stream(vae_pb2_grpc.VaeServiceStub(channel), images, 64)

    with fake_encode_stream(answer_every_message_then_pause) as target:
        seconds = asyncio.run(timed(target))
    assert 0 < seconds < 0.9


def test_a_sweeps_stream_that_ends_before_its_last_image_fails_its_stage_rather_than_divide_by_it() -> None:
    async def timed(target: str) -> float:
        async with grpc.aio.insecure_channel(target) as channel:
            return await encode_stream(
                vae_pb2_grpc.VaeServiceStub(channel), np.zeros((256, 28, 28), np.uint8), 64
            )

    with (
        fake_encode_stream(answer_one_message) as target,
        pytest.raises(servers.ServerFailed, match="the EncodeStream answered 64 of 256 images"),
    ):
        asyncio.run(timed(target))


def test_the_ceiling_measures_both_graphs_at_every_call_size_the_service_uses_and_those_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "The best at any rows a call" is a maximum over the sizes measured: a size left out could only
    flatter the service."""
    measured: list[tuple[str, int]] = []

    def layouts(path: Path, feed: dict[str, np.ndarray], duration_s: float, warmup_s: float) -> list[Any]:
        (rows,) = {len(value) for value in feed.values()}
        measured.append((path.stem, rows))
        return []

    monkeypatch.setattr(ceiling, "layouts", layouts)
    manifest = {
        "latent_dim": 2,
        "graphs": {"decoder": {"file": "decoder.onnx"}, "encoder": {"file": "encoder.onnx"}},
    }
    suite.ceilings(Path("bundle"), manifest, suite.Plan())

    service_rows = settings.Settings.max_batch_size
    assert {rows for graph, rows in measured if graph == "decoder"} == {1, 4, 8, service_rows, 32, 64, 256}
    assert {rows for graph, rows in measured if graph == "encoder"} == {4, service_rows, 32, 64, 256}
