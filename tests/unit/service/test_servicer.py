"""The servicer's helpers below the transport: the in-order answering of streams, the error table,
and what a stream's metrics record."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import service.servicer
from service.codec import to_tensor
from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from service.metrics import ServiceMetrics
from service.servicer import (
    DEADLINE_SLACK_S,
    SHUTTING_DOWN,
    VaeServicer,
    _in_order,
    _observe,
    _observe_stream,
    code_of_cancellation,
    status_code_of,
)
from tests.unit.service.test_model import small_model
from vae.v1 import vae_pb2


def _run_stream(sizes: list[int], lookahead: int, max_rows: int) -> tuple[list[int], int, list[int]]:
    """Stream calls of `sizes` rows through _in_order: the answers, the most calls started and not
    yet answered, and the rows that were so at each start."""

    async def scenario() -> tuple[list[int], int, list[int]]:
        outstanding: dict[int, int] = {}
        most_calls, rows_at_start = 0, []

        async def call(i: int) -> int:
            nonlocal most_calls
            outstanding[i] = sizes[i]
            most_calls = max(most_calls, len(outstanding))
            rows_at_start.append(sum(outstanding.values()))
            for _ in range(3 - i % 3):  # later calls of each group of three finish first
                await asyncio.sleep(0)
            return i

        async def calls() -> AsyncIterator[tuple[int, Callable[[], Coroutine[Any, Any, int]]]]:
            for i, size in enumerate(sizes):
                yield size, functools.partial(call, i)

        results = []
        async for result in _in_order(calls(), lookahead=lookahead, max_rows=max_rows):
            del outstanding[result]
            results.append(result)
        return results, most_calls, rows_at_start

    return asyncio.run(scenario())


def test_streamed_calls_are_answered_in_order_with_at_most_lookahead_started_and_unanswered() -> None:
    results, most_calls, _ = _run_stream([1] * 12, lookahead=3, max_rows=100)
    assert results == list(range(12))
    assert most_calls == 3


def test_a_stream_of_large_calls_holds_at_most_max_rows_or_one_call() -> None:
    """So that a stream of big requests cannot fill the batcher's queue, and be refused, by itself."""
    sizes = [3, 3, 3, 10, 1, 1, 6, 2]
    results, _, rows_at_start = _run_stream(sizes, lookahead=4, max_rows=6)
    assert results == list(range(len(sizes)))
    for size, rows in zip(sizes, rows_at_start, strict=True):
        assert rows <= 6 or rows == size  # within the budget, or alone
    assert max(rows_at_start) == 10  # the call larger than the budget still ran


def test_a_stream_fills_its_row_budget_exactly() -> None:
    _, most_calls, rows_at_start = _run_stream([3, 3, 3, 3], lookahead=4, max_rows=6)
    assert (most_calls, max(rows_at_start)) == (2, 6)


def test_each_domain_error_has_its_status_code() -> None:
    assert status_code_of(InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code_of(Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code_of(ModelNotReady("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_code_of(DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED


class _Remaining:
    """The one part of a ServicerContext that code_of_cancellation reads."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def time_remaining(self) -> float | None:
        return self.seconds


def test_a_cancellation_at_or_near_the_deadline_counts_as_the_deadline() -> None:
    # The client's deadline passes first: its cancellation can arrive just before the server's own.
    for remaining in (-1.0, 0.0, DEADLINE_SLACK_S / 2, DEADLINE_SLACK_S):
        assert code_of_cancellation(_Remaining(remaining)) == grpc.StatusCode.DEADLINE_EXCEEDED
    for earlier in (None, DEADLINE_SLACK_S * 2, 30.0):
        assert code_of_cancellation(_Remaining(earlier)) == grpc.StatusCode.CANCELLED


def test_a_call_cut_when_a_drains_grace_period_ran_out_counts_as_unavailable_as_its_client_sees_it() -> None:
    for remaining in (None, 0.0, 30.0):
        assert code_of_cancellation(_Remaining(remaining), grace_over=True) == grpc.StatusCode.UNAVAILABLE


def test_a_stream_answered_in_full_waits_for_a_late_cancel_but_never_into_its_deadline_or_a_drain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settle = 1.0  # long enough to tell a wait from none on a busy machine
    monkeypatch.setattr(service.servicer, "CANCEL_SETTLE_S", settle)

    async def waited(remaining: float | None, draining: bool = False) -> float:
        servicer = VaeServicer(ServiceMetrics.create(process=False))
        if draining:
            servicer.start_draining()
        started = time.monotonic()
        await servicer._let_a_cancel_settle(_Remaining(remaining))
        return time.monotonic() - started

    async def scenario() -> list[float]:
        return list(
            await asyncio.gather(
                waited(None),
                waited(30.0),
                waited(DEADLINE_SLACK_S + 0.1),  # waits until the deadline is DEADLINE_SLACK_S away
                waited(DEADLINE_SLACK_S / 2),
                waited(None, draining=True),
            )
        )

    no_deadline, far_deadline, *stopped_short = asyncio.run(scenario())
    assert no_deadline >= settle * 0.95 and far_deadline >= settle * 0.95
    assert all(seconds < settle / 2 for seconds in stopped_short), stopped_short


def test_every_status_of_every_rpc_is_exported_at_zero_before_the_first_call() -> None:
    """Prometheus's rate() takes a series' first sample as its base: a count born at 1 is never seen,
    so a replica's first burst of errors would fire no alert."""
    metrics = ServiceMetrics.create(process=False)
    VaeServicer(metrics)
    rpcs = ("Encode", "Decode", "Sample", "EncodeStream", "SampleStream", "GetModelInfo")
    codes = (
        "OK",
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "CANCELLED",
        "INTERNAL",
    )
    for rpc in rpcs:
        for code in codes:
            assert metrics.registry.get_sample_value("vae_requests_total", {"rpc": rpc, "code": code}) == 0
        assert metrics.registry.get_sample_value("vae_request_duration_seconds_count", {"rpc": rpc}) == 0


def test_the_items_of_every_rpc_that_carries_them_are_exported_at_zero_before_the_first_call() -> None:
    """Else a replica's first images would be missing from rate(vae_items_total), the Images/s panel."""
    metrics = ServiceMetrics.create(process=False)
    VaeServicer(metrics)
    for rpc in ("Encode", "Decode", "Sample", "EncodeStream", "SampleStream"):
        assert metrics.registry.get_sample_value("vae_items_total", {"rpc": rpc}) == 0, rpc


def test_a_stream_dropped_while_it_answers_is_counted_as_cancelled_not_ok() -> None:
    """gRPC closes a stream's generator when its client goes away while an answer is being written."""
    servicer = VaeServicer(ServiceMetrics.create(process=False))

    async def answers() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    async def scenario() -> None:
        stream = _observe_stream(servicer, "EncodeStream", _Remaining(None), answers())
        assert await anext(stream) == 0
        await stream.aclose()  # what gRPC does to a stream whose client went away
        await asyncio.wait_for(servicer.wait_until_idle(), 10)  # and the drain does not wait for it

    asyncio.run(scenario())
    requests = servicer.metrics.registry.get_sample_value
    assert requests("vae_requests_total", {"rpc": "EncodeStream", "code": "CANCELLED"}) == 1
    assert requests("vae_requests_total", {"rpc": "EncodeStream", "code": "OK"}) == 0


def test_once_draining_a_streams_next_request_is_refused_even_when_it_has_already_arrived() -> None:
    """The drain answers what is in flight and sends the rest of a job's stream elsewhere: a request
    that has already arrived is not started either, however fast its client sent it."""
    servicer = VaeServicer(ServiceMetrics.create(process=False))
    servicer.start_draining()

    async def requests() -> AsyncIterator[vae_pb2.EncodeRequest]:
        yield vae_pb2.EncodeRequest()

    async def scenario() -> None:
        with pytest.raises(ModelNotReady, match=re.escape(SHUTTING_DOWN)):
            await servicer._next_unless_draining(aiter(requests()))

    asyncio.run(asyncio.wait_for(scenario(), 10))


class _Context(_Remaining):
    """The part of a grpc.aio.ServicerContext that a failed call uses."""

    def __init__(self, seconds: float | None) -> None:
        super().__init__(seconds)
        self.status: list[Any] = []

    def set_code(self, code: grpc.StatusCode) -> None:
        self.status.append(code)

    def set_details(self, details: str) -> None:
        self.status.append(details)


async def _refused() -> vae_pb2.DecodeResponse:
    raise InvalidInput("latents: contains NaN or Inf; expected finite values")


def test_a_failed_call_sets_its_status_for_grpc_to_send_and_is_counted_once() -> None:
    servicer = VaeServicer(ServiceMetrics.create(process=False))
    context = _Context(30.0)
    answer = asyncio.run(_observe(servicer, "Decode", context, _refused(), vae_pb2.DecodeResponse))
    assert answer == vae_pb2.DecodeResponse()  # dropped by gRPC: a non-OK status goes alone
    assert context.status == [
        grpc.StatusCode.INVALID_ARGUMENT,
        "latents: contains NaN or Inf; expected finite values",
    ]
    requests = servicer.metrics.registry.get_sample_value
    assert requests("vae_requests_total", {"rpc": "Decode", "code": "INVALID_ARGUMENT"}) == 1


def test_an_unexpected_fault_is_internal_naming_only_its_kind_and_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = VaeServicer(ServiceMetrics.create(process=False))
    context = _Context(30.0)

    async def broken() -> vae_pb2.DecodeResponse:
        raise RuntimeError("a detail for the server's log, not for the client")

    asyncio.run(_observe(servicer, "Decode", context, broken(), vae_pb2.DecodeResponse))

    assert context.status == [grpc.StatusCode.INTERNAL, "internal error: RuntimeError"]
    requests = servicer.metrics.registry.get_sample_value
    assert requests("vae_requests_total", {"rpc": "Decode", "code": "INTERNAL"}) == 1
    assert "Decode failed" in caplog.text and "a detail for the server's log" in caplog.text


def test_a_failure_that_finds_its_call_past_its_deadline_is_counted_and_ends_as_cancelled() -> None:
    """The batcher's deadline is gRPC's own: the two race, and gRPC may end the call first. A status
    sent then would fail, and gRPC would log that with its traceback as a servicer failure."""
    servicer = VaeServicer(ServiceMetrics.create(process=False))
    context = _Context(0.0)

    async def queued_past_its_deadline() -> vae_pb2.DecodeResponse:
        raise DeadlineExceeded("the deadline passed while the request was queued")

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_observe(servicer, "Decode", context, queued_past_its_deadline(), vae_pb2.DecodeResponse))
    # Any refusal: its client sees the deadline, not the refusal, and so does /metrics.
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_observe(servicer, "Decode", context, _refused(), vae_pb2.DecodeResponse))
    assert context.status == []
    requests = servicer.metrics.registry.get_sample_value
    assert requests("vae_requests_total", {"rpc": "Decode", "code": "DEADLINE_EXCEEDED"}) == 2
    assert requests("vae_requests_total", {"rpc": "Decode", "code": "INVALID_ARGUMENT"}) == 0


def test_a_fault_that_finds_its_call_past_its_deadline_is_not_logged_as_the_services(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream's initial metadata, sent after its client's deadline, fails inside gRPC: that is the
    deadline, not a fault to log with its traceback (log-based alerts would fire on client timeouts)."""
    servicer = VaeServicer(ServiceMetrics.create(process=False))

    async def metadata_after_the_deadline() -> vae_pb2.DecodeResponse:
        raise RuntimeError("Failed 'execute_batch': SendInitialMetadataOperation")

    with caplog.at_level(logging.ERROR), pytest.raises(asyncio.CancelledError):
        asyncio.run(
            _observe(servicer, "Decode", _Context(0.0), metadata_after_the_deadline(), vae_pb2.DecodeResponse)
        )
    assert caplog.text == ""
    requests = servicer.metrics.registry.get_sample_value
    assert requests("vae_requests_total", {"rpc": "Decode", "code": "DEADLINE_EXCEEDED"}) == 1
    assert requests("vae_requests_total", {"rpc": "Decode", "code": "INTERNAL"}) == 0


def test_an_answer_ready_only_after_the_deadline_counts_as_the_deadline_the_client_sees() -> None:
    """The batcher checks a deadline before rows run, not after: an answer may come too late to send."""
    servicer = VaeServicer(ServiceMetrics.create(process=False))

    async def answered_late() -> vae_pb2.DecodeResponse:
        return vae_pb2.DecodeResponse()

    async def answers_late() -> AsyncIterator[int]:
        yield 1

    async def stream_to_its_end() -> None:
        async for _ in _observe_stream(servicer, "SampleStream", _Remaining(-0.01), answers_late()):
            pass

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_observe(servicer, "Decode", _Context(-0.01), answered_late(), vae_pb2.DecodeResponse))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(stream_to_its_end())
    requests = servicer.metrics.registry.get_sample_value
    for rpc in ("Decode", "SampleStream"):
        assert requests("vae_requests_total", {"rpc": rpc, "code": "DEADLINE_EXCEEDED"}) == 1
        assert requests("vae_requests_total", {"rpc": rpc, "code": "OK"}) == 0
    # In time, the same answers are OK.
    asyncio.run(_observe(servicer, "Decode", _Context(1.0), answered_late(), vae_pb2.DecodeResponse))
    assert requests("vae_requests_total", {"rpc": "Decode", "code": "OK"}) == 1


def test_a_stream_that_fails_cancels_the_calls_it_started_ahead() -> None:
    cancelled: list[int] = []

    async def scenario() -> None:
        forever = asyncio.Event()

        async def call(i: int) -> int:
            if i == 0:
                await asyncio.sleep(0)
                raise RuntimeError("first call failed")
            try:
                await forever.wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise
            return i

        async def calls() -> AsyncIterator[Any]:
            for i in range(3):
                yield 1, functools.partial(call, i)

        with pytest.raises(RuntimeError, match="first call failed"):
            async for _ in _in_order(calls(), lookahead=3, max_rows=100):
                pass
        for _ in range(3):
            await asyncio.sleep(0)
        assert sorted(cancelled) == [1, 2]  # now, not when the loop shuts down

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert sorted(cancelled) == [1, 2]


@pytest.mark.parametrize(
    ("rpc", "request_message"),
    [
        ("Decode", vae_pb2.DecodeRequest(latents=to_tensor(np.zeros((3, 2), np.float32)), output_dtype=7)),  # type: ignore[arg-type]
        ("Sample", vae_pb2.SampleRequest(num_samples=3, seed=1, output_dtype=7)),  # type: ignore[arg-type]
    ],
)
def test_an_unknown_output_dtype_is_refused_before_anything_is_decoded(
    vae_bundle: Path, rpc: str, request_message: Any
) -> None:
    metrics = ServiceMetrics.create(process=False)
    servicer = VaeServicer(metrics)
    context = _Context(30.0)

    async def scenario() -> None:
        model = small_model(vae_bundle, metrics)
        model.start()
        servicer.attach(model)
        await getattr(servicer, rpc)(request_message, context)
        await model.stop()

    asyncio.run(scenario())
    expected = "output_dtype: unknown value 7; expected DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8"
    assert context.status == [grpc.StatusCode.INVALID_ARGUMENT, expected]
    samples = metrics.registry.get_sample_value
    assert samples("vae_batch_size_count", {"graph": "decoder"}) == 0
    assert samples("vae_items_total", {"rpc": rpc}) in (None, 0)


def test_a_servicer_refuses_calls_as_unavailable_while_its_model_loads_and_once_it_drains() -> None:
    servicer = VaeServicer(ServiceMetrics.create(process=False))
    loading, draining = _Context(30.0), _Context(30.0)
    asyncio.run(servicer.GetModelInfo(vae_pb2.GetModelInfoRequest(), loading))
    servicer.start_draining()
    asyncio.run(servicer.GetModelInfo(vae_pb2.GetModelInfoRequest(), draining))
    assert loading.status == [grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly"]
    assert draining.status == [grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN]
