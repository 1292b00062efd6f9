"""`vae-healthcheck`: exit 0 when the server's grpc.health.v1 service says SERVING, 1 otherwise, 2
for bad arguments (a TLS file that cannot be read, or is not what its flag takes), 130 interrupted.

Used by the Docker HEALTHCHECK (one quick Check) and by `make demo` (`--wait 30`: block until the
freshly started server turns SERVING). `--wait` watches the status with the health service's Watch
stream and `wait_for_ready`, so it needs no polling loop: the call waits for the server to accept
connections and then for the status to change.

    vae-healthcheck --target localhost:50051 --wait 30
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.cli import add_connection_arguments, open_channel, seconds_or_zero, tls_from_args
from client.client import tls_hint

SERVING = health_pb2.HealthCheckResponse.SERVING
# Between a Watch that ended without SERVING (closed, or failed UNAVAILABLE) and the next: not a busy
# loop on the server's CPU.
REWATCH_PAUSE_S = 0.2
# After --wait ran out with no answer: the deadline of a last Check that says why.
LAST_TRY_S = 2.0


def status_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def check(channel: Any, service: str, timeout_s: float) -> int:
    """The status the server reports now for `service` ("" is the server as a whole)."""
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return int(response.status)


def wait_for_serving(channel: Any, service: str, wait_s: float) -> int:
    """Watch `service` until it reports SERVING or `wait_s` runs out; the last status seen.

    Raises TimeoutError when nothing answered within `wait_s`, and grpc.RpcError for an error other
    than the server not being up yet (NOT_FOUND for an unknown service, say).
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + wait_s
    last: int | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        call = stub.Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=remaining, wait_for_ready=True
        )
        try:
            for response in call:
                last = int(response.status)
                if last == SERVING:
                    return last
        except grpc.RpcError as error:
            # A server that stops (or restarts) while we watch ends the stream: watch again.
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                break
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
        finally:
            call.cancel()
        time.sleep(min(REWATCH_PAUSE_S, max(0.0, deadline - time.monotonic())))
    if last is None:
        raise TimeoutError(f"no answer within {wait_s:g} s")
    return last


def described(error: grpc.RpcError, tls: bool) -> str:
    """CODE: details, and what to change where the client's TLS settings and the server's disagree."""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNAVAILABLE and (hint := tls_hint(details, tls)):
        details += f"; {hint}"
    return f"{error.code().name}: {details}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vae-healthcheck", description="Exit 0 when the gRPC health service reports SERVING."
    )
    add_connection_arguments(
        parser, default_timeout_s=5.0, timeout_help="deadline of the one Check call (not used with --wait)"
    )
    parser.add_argument(
        "--service", default="", help="the service name to check (default: the server as a whole)"
    )
    parser.add_argument(
        "--wait",
        type=seconds_or_zero,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the server to start and turn SERVING (default: check once)",
    )
    args = parser.parse_args(argv)
    what = f"{args.target}" + (f" service {args.service!r}" if args.service else "")
    try:  # TlsOptions checks the TLS files: else --wait would wait out handshakes that cannot succeed
        tls = tls_from_args(args)
        channel = open_channel(args.target, tls)
    except (OSError, ValueError) as error:  # a TLS file unreadable, not what its flag takes, unpaired
        parser.exit(2, f"vae-healthcheck: {error}\n")
    try:
        if args.wait > 0:
            status = wait_for_serving(channel, args.service, args.wait)
        else:
            status = check(channel, args.service, args.timeout)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            print(f"vae-healthcheck: {what}: the server knows no such service", file=sys.stderr)
        else:
            print(f"vae-healthcheck: {what}: {described(error, tls is not None)}", file=sys.stderr)
        return 1
    except TimeoutError as error:
        why = ""
        try:  # wait_for_ready waits out a failure to connect: one last try says which it was
            check(channel, args.service, LAST_TRY_S)
        except grpc.RpcError as last:
            why = f"; the last try: {described(last, tls is not None)}"
        print(f"vae-healthcheck: {what}: {error}{why}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C during --wait: a line, not a traceback
        print("vae-healthcheck: interrupted", file=sys.stderr)
        return 130
    finally:
        channel.close()
    if status != SERVING:
        print(f"vae-healthcheck: {what} is {status_name(status)}", file=sys.stderr)
        return 1
    print(f"{what}: SERVING")
    return 0


if __name__ == "__main__":
    sys.exit(main())
