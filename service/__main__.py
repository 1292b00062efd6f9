"""`vae-serve`: settings from flags and VAE_SERVE_* variables, the server, and a SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

# onnxruntime records a device id under ~/.cache/Microsoft as it is imported, for its usage events,
# unless this is set first: a server has no business writing there (a read-only root in its image).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from service.allocator import reuse_large_blocks
from service.errors import BundleError, DeviceError
from service.server import start_server
from service.settings import Settings, unknown_variables

log = logging.getLogger("vae-serve")


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then drain within the grace period; returns the exit status: 0,
    or 1 where a second signal cut the drain short."""
    loop = asyncio.get_running_loop()
    # The first SIGTERM or SIGINT drains; a second, an operator's second Ctrl-C, cuts the drain short.
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        server = await start_server(settings)
    except (BundleError, DeviceError, OSError) as error:
        log.error("cannot serve: %s", error)
        return 1
    # The tens of thousands of objects of the imports and the loaded model live as long as the
    # process: out of the collector's sight, a full collection takes under 1 ms instead of 10 ms or
    # more, a pause every request in flight would wait through (docs/BENCHMARKS.md).
    gc.collect()
    gc.freeze()
    log.info("%d start-up objects moved out of the garbage collector's sight", gc.get_freeze_count())
    await stop.wait()
    log.info(
        "signal received: draining for up to %.1f s (a second signal stops at once)", settings.grace_period_s
    )
    drain = asyncio.ensure_future(server.stop())
    second_signal = asyncio.ensure_future(hurry.wait())
    await asyncio.wait((drain, second_signal), return_when=asyncio.FIRST_COMPLETED)
    second_signal.cancel()
    if drain.done():
        drain.result()  # its error, if it raised one
    else:
        log.warning("second signal received: the drain cut short, calls still running cancelled")
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await server.stop(0)
        log.info("stopped")
        return 1
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_args(argv, os.environ)
    except SystemExit as refused:
        if refused.code:  # not --help: a misspelt variable may be why ("--model-dir is required")
            for warning in unknown_variables(os.environ):
                print(f"vae-serve: {warning}", file=sys.stderr)
        raise
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for warning in unknown_variables(os.environ):
        log.warning(warning)
    if not reuse_large_blocks():
        log.debug("no glibc mallopt here: large responses use the C library's default allocator")
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
