"""A closed-loop load generator, the way perf_analyzer measures a server.

`concurrency` workers each send one request, wait for its answer and send the next, for a warm-up and
then a fixed-duration window; only requests that complete inside the window count. After a failed
request a worker backs off briefly, as a client of the service would. The request itself
is any coroutine that returns how many items (images or latents) it carried, so the same loop drives
the service, the naive peer and Triton (whose client runs in another virtual environment: this module
therefore needs nothing but numpy and the standard library).

The server's CPU time comes from /proc/<pid>/stat of the server process and its descendants, sampled at
both ends of the window: CPU seconds per image is the figure that other load on the machine moves least.
The load generator's own CPU time per request is recorded too: on a 2-core machine the client and the
server share the cores, so a cheap server request can still be capped by the client's cost. Its window
lies inside the server's samples, so that their walk of /proc (a few ms of CPU) is not billed to the client.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RequestFn = Callable[[], Awaitable[int]]
"""One request: sends it, awaits the answer, returns the number of items it carried."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A worker's pause after a failed request: VaeClient's first backoff (RetryPolicy.initial_backoff_s).
ERROR_BACKOFF_S = 0.1
# How long after its window a request may still be in flight before the server is taken to hang.
UNANSWERED_LIMIT_S = 60.0
# bench.peers.triton_load prints each window's summary on a line of its own after this prefix: a stray
# line on its stdout (a library's print) is then never taken for a result.
RESULT_PREFIX = "bench-window: "


@dataclass(frozen=True)
class Window:
    """What one measurement window saw."""

    concurrency: int
    duration_s: float
    requests: int
    items: int
    errors: dict[str, int]
    latencies_ms: Sequence[float] = field(repr=False)
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None

    @property
    def items_per_s(self) -> float:
        return self.items / self.duration_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def requests_sent(self) -> int:
        """Answered or failed: the client spent its CPU on both."""
        return self.requests + sum(self.errors.values())

    def latency_ms(self, quantile: float) -> float:
        return percentile(self.latencies_ms, quantile)

    @property
    def cpu_ms_per_item(self) -> float | None:
        if self.server_cpu_s is None or self.items == 0:
            return None
        return 1000.0 * self.server_cpu_s / self.items

    def summary(self) -> dict[str, Any]:
        """The figures a table shows, JSON-ready."""
        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "items": self.items,
            "items_per_s": round(self.items_per_s, 1),
            "requests_per_s": round(self.requests_per_s, 1),
            "p50_ms": round(self.latency_ms(0.50), 3),
            "p90_ms": round(self.latency_ms(0.90), 3),
            "p99_ms": round(self.latency_ms(0.99), 3),
            "errors": dict(self.errors),
            "server_cpu_ms_per_item": _rounded(self.cpu_ms_per_item),
            "client_cpu_ms_per_request": _rounded(
                None
                if self.client_cpu_s is None or not self.requests_sent
                else 1000 * self.client_cpu_s / self.requests_sent
            ),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def percentile(values: Sequence[float], quantile: float) -> float:
    """The nearest-rank percentile; NaN for no values."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(quantile * len(ordered)))
    return ordered[rank - 1]


def error_name(error: BaseException) -> str:
    """A short label for a failed request: the gRPC status code where there is one."""
    code = getattr(error, "code", None)
    if callable(code):
        try:
            return str(getattr(code(), "name", code()))
        except Exception:  # a `code` that is not grpc's
            pass
    status = getattr(error, "status", None)  # tritonclient's InferenceServerException
    if callable(status):
        try:
            return str(status())
        except Exception:
            pass
    return type(error).__name__


async def closed_loop(
    make_request: Callable[[int], RequestFn],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    server_pid: int | None = None,
) -> Window:
    """Run `concurrency` closed-loop workers; measure the window that follows the warm-up.

    `make_request(worker_index)` gives each worker its own request function (its own seed, say).
    Requests in flight when the window closes are awaited but not counted; if some are still
    unanswered UNANSWERED_LIMIT_S later, TimeoutError.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    loop = asyncio.get_running_loop()
    window_open = loop.create_future()
    started = time.perf_counter()
    window_start = started + warmup_s
    window_end = window_start + duration_s
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counts = [0, 0]  # requests, items
    cpu_at_open: list[float] = []
    client_cpu_at_open: list[float] = []

    def open_window() -> None:
        # The server's sample first, the client's clock after it; at the close the other way round.
        if server_pid is not None:
            cpu_at_open.append(process_tree_cpu_s(server_pid))
        client_cpu_at_open.append(time.process_time())
        window_open.set_result(None)

    loop.call_at(loop.time() + warmup_s, open_window)

    async def worker(index: int) -> None:
        request = make_request(index)
        while True:
            sent = time.perf_counter()
            if sent >= window_end:
                return
            try:
                items = await request()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                done = time.perf_counter()
                if window_start <= done < window_end:
                    name = error_name(error)
                    errors[name] = errors.get(name, 0) + 1
                # As VaeClient does before a retry: sent again at once, a refused request (a full
                # queue) would turn the window into a storm of refusals that burns the shared cores.
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            done = time.perf_counter()
            if window_start <= done < window_end:
                counts[0] += 1
                counts[1] += items
                latencies.append(1000.0 * (done - sent))

    workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await window_open
    await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
    client_cpu = time.process_time() - client_cpu_at_open[0]
    cpu_at_close = process_tree_cpu_s(server_pid) if server_pid is not None else None
    try:
        await asyncio.wait_for(asyncio.gather(*workers), UNANSWERED_LIMIT_S)
    except TimeoutError:
        raise TimeoutError(
            f"requests still unanswered {UNANSWERED_LIMIT_S:g} s after the window closed: the server hangs"
        ) from None
    return Window(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=counts[0],
        items=counts[1],
        errors=errors,
        latencies_ms=latencies,
        server_cpu_s=None if cpu_at_close is None else cpu_at_close - cpu_at_open[0],
        client_cpu_s=client_cpu,
    )


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found = [pid]
    for current in found:
        found.extend(children.get(current, []))
    return found


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of one live process (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (Triton runs its model in a child)."""
    total = 0.0
    for member in descendants(pid):
        try:
            total += process_cpu_s(member)
        except OSError:
            continue
    return total


def _proc_bytes(path: Path, field: str) -> int | None:
    """The `FIELD:  N kB` line of a /proc file, in bytes; None where the file or the line is missing."""
    try:
        text = path.read_text()
    except OSError:  # exited meanwhile, or not this kernel's
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def process_memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """One process's memory from /proc/<pid>/status: VmRSS, resident now; VmHWM, the most resident
    at any moment so far."""
    found = _proc_bytes(Path(f"/proc/{pid}/status"), field)
    if found is None:
        raise ProcessLookupError(f"no {field} for pid {pid}")
    return found


def process_tree_pss_bytes(pid: int) -> int:
    """Proportional set size of a process and its live descendants, from /proc/<pid>/smaps_rollup:
    each shared page is split among the processes that map it, where VmRSS summed over a tree
    (tritonserver, its Python stubs, PyTriton) counts it once per process. VmRSS where a kernel has
    no smaps_rollup."""
    total = 0
    for member in descendants(pid):
        pss = _proc_bytes(Path(f"/proc/{member}/smaps_rollup"), "Pss")
        total += pss if pss is not None else _proc_bytes(Path(f"/proc/{member}/status"), "VmRSS") or 0
    return total


def as_dict(window: Window) -> dict[str, Any]:
    """Everything, latencies included (for saving raw results)."""
    return asdict(window)
