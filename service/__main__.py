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


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# Until serve() takes it over. As a container's PID 1, a process ignores a signal it has no handler
# for: a `docker stop` during the imports waited out its timeout for a SIGKILL.
signal.signal(signal.SIGTERM, _exit_on_signal)

from service.allocator import reuse_large_blocks  # noqa: E402 (after the handler)
from service.errors import BundleError, DeviceError  # noqa: E402 (after the handler)
from service.server import start_server  # noqa: E402 (after the handler)
from service.settings import Settings, unknown_variables  # noqa: E402 (after the handler)

log = logging.getLogger("vae-serve")


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then drain within the grace period; returns the exit status: 0,
    or 1 where a second signal cut the drain short. A signal while the model loads ends the process
    there, with 0."""
    loop = asyncio.get_running_loop()
    # The first SIGTERM or SIGINT drains; a second, an operator's second Ctrl-C, cuts the drain short.
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    starting = asyncio.ensure_future(start_server(settings))
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, signalled), return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    if not starting.done():
        # Health still says NOT_SERVING and nothing was answered: nothing to drain. The model loads on
        # in a thread that nothing can stop and that an orderly exit would wait for (minutes of a GPU's
        # start-up, past Kubernetes' grace period), so the process ends here.
        log.info("signal received while the model loads: stopped before serving")
        logging.shutdown()
        os._exit(0)
    try:
        server = starting.result()
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
