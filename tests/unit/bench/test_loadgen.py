"""The closed loop's own rules, on requests that need no server."""

from __future__ import annotations

import asyncio

import pytest

from bench import loadgen


def test_a_server_that_never_answers_ends_the_window_with_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loadgen, "UNANSWERED_LIMIT_S", 0.2)

    def make(worker: int) -> loadgen.RequestFn:
        async def never_answered() -> int:
            await asyncio.Event().wait()
            return 1

        return never_answered

    async def window() -> loadgen.Window:
        return await loadgen.closed_loop(make, concurrency=2, duration_s=0.1, warmup_s=0.0)

    hangs = r"requests still unanswered 0\.2 s after the window closed: the server hangs"
    with pytest.raises(TimeoutError, match=hangs):
        asyncio.run(asyncio.wait_for(window(), 5.0))
