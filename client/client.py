"""Typed clients of `vae.v1.VaeService`: numpy arrays in and out, deadlines, retries, TLS.

`VaeClient` is synchronous, `AsyncVaeClient` runs on asyncio; both have the same methods. Transient
failures (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED) are retried with exponential
backoff and jitter up to `RetryPolicy.max_attempts`; anything else, INVALID_ARGUMENT first of all,
fails at once with a `VaeClientError` that carries the server's message.

Targets are gRPC target strings: `localhost:50051`, or `dns:///vae.default.svc:50051` to resolve every
address behind a name. The channel always balances round-robin over the addresses it resolves, so a
headless Kubernetes Service spreads the calls over every replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import queue
import random
import re
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt

from service import codec, tls_files
from service.errors import InvalidInput
from vae.v1 import vae_pb2, vae_pb2_grpc

ImageDtype = Literal["float32", "uint8"]
Metadata = tuple[tuple[str, str | bytes], ...]

# CANCELLED too: gRPC answers it to calls that reach a server as it shuts down (a rolling update's
# drain). This client's own cancellations are not retried: a closed channel ends its calls with
# CANCELLED (see _Retrier), a wait for an answer past its limit reports DEADLINE_EXCEEDED, and a
# closed generator or an asyncio cancellation raises no RpcError.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
# grpc.aio reports a request it could not send (the connection went, or the server had already ended
# the call) as INTERNAL with these details, in place of the call's own status. Where the server's
# status came first, AsyncVaeClient.encode_stream reports it (see _ServerStatus); else this is a
# broken call, retried as UNAVAILABLE is. The service's own INTERNAL says "internal error: <what>".
GRPC_AIO_SEND_FAILED = "Internal error from Core"
_OUTPUT_DTYPES: dict[str, int] = {"float32": codec.FLOAT32, "uint8": codec.UINT8}
_DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
UINT32_MAX = 2**32 - 1  # SampleRequest's num_samples and chunk_size


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: exponential backoff with jitter.

    The pause before retry k is drawn uniformly from [c/2, c] with c = min(max_backoff_s,
    initial_backoff_s * multiplier**(k-1)) ("equal jitter", AWS Architecture Blog, "Exponential
    Backoff and Jitter", 2015): replicas that failed together do not come back together, and no pause
    is so short that a restarting server is hammered.

    >>> RetryPolicy(max_attempts=1)  # never retry
    RetryPolicy(max_attempts=1, initial_backoff_s=0.1, max_backoff_s=5.0, multiplier=2.0)
    """

    max_attempts: int = 5
    """Attempts per call, the first included; a stream counts failures in a row without progress."""
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                "backoffs must satisfy 0 < initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """The pause in seconds before retry number `retry` (1 for the first retry)."""
        try:
            grown = self.initial_backoff_s * self.multiplier ** (retry - 1)
        except OverflowError:  # past a float's range, long past the cap
            grown = self.max_backoff_s
        ceiling = min(self.max_backoff_s, grown)
        return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel, from PEM files. With no files, the system's root certificates are trusted.

    >>> TlsOptions(root_certificates=Path("ca.pem"))  # a private CA  # doctest: +ELLIPSIS
    TlsOptions(root_certificates=PosixPath('ca.pem'), ...)
    """

    root_certificates: Path | None = None
    """The CA bundle that signed the server's certificate."""
    certificate_chain: Path | None = None
    """The client's own certificate, for mutual TLS (needs `private_key`)."""
    private_key: Path | None = None
    server_name_override: str | None = None
    """The name to check the server's certificate against, when it differs from the target's host."""

    def credentials(self) -> Any:
        """The grpc.ChannelCredentials these options describe, once `check` has found the files sound."""
        self.check()

        def read(path: Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_certificates),
            private_key=read(self.private_key),
            certificate_chain=read(self.certificate_chain),
        )

    def check(self) -> None:
        """Raise ValueError naming each file that is not what it should be, and its flag.

        gRPC takes any bytes here and only fails the handshake, as UNAVAILABLE, which a client retries
        as if the server were down. The messages name the command-line flags the CLIs fill these
        options from (client/cli.py's tls_from_args), beside the file.
        """
        ca, cert, key = (
            None if path is None else Path(path)
            for path in (self.root_certificates, self.certificate_chain, self.private_key)
        )
        if cert is not None and key is None:
            raise ValueError(
                f"client certificate {cert} (--client-cert) is given without its private key "
                "(--client-key); mutual TLS needs both"
            )
        if key is not None and cert is None:
            raise ValueError(
                f"client key {key} (--client-key) is given without its certificate (--client-cert); "
                "mutual TLS needs both"
            )
        named = [
            (
                f"CA certificate {ca} (--ca-cert)",
                ca and tls_files.certificate_problem(ca, "certificate", ca=True),
            ),
            (
                f"client certificate {cert} (--client-cert)",
                cert and tls_files.certificate_problem(cert, "certificate"),
            ),
            (f"client key {key} (--client-key)", key and tls_files.key_problem(key)),
        ]
        problems = [f"{name}: {problem}" for name, problem in named if problem]
        if problems:
            raise ValueError("; ".join(problems))
        # The PEM blocks are there: OpenSSL checks that they decode, and that the key fits.
        if cert is not None and key is not None:
            pair = tls_files.pair_problem(cert, key)
            if pair == tls_files.KEY_MISMATCH:
                problems.append(
                    f"client key {key} (--client-key): not the private key of the client certificate "
                    f"{cert} (--client-cert)"
                )
            elif pair:
                problems.append(
                    f"client certificate {cert} (--client-cert) and key {key} (--client-key): {pair}"
                )
        if ca is not None and (trouble := tls_files.ca_problem(ca, "certificate")):
            problems.append(f"CA certificate {ca} (--ca-cert): {trouble}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class EncodeResult:
    """The posterior of each image, row for row: mean and log-variance [N,D]; an AE has no log_var."""

    mean: npt.NDArray[np.float32]
    log_var: npt.NDArray[np.float32] | None
    encoder_sha256: str | None = None
    """The sha256 of the encoder graph that answered (the server's metadata; None from a server that
    does not send it). A stream that reconnects may reach another replica, so it is given with each
    result."""


@dataclass(frozen=True)
class DecodeResult:
    """Images [N,1,28,28] and the sha256 of the decoder graph that made them (the server's metadata;
    None from a server that does not send it): a file decoded in several requests is one model's
    images only where every answer names the same decoder."""

    images: npt.NDArray[np.generic]
    decoder_sha256: str | None


@dataclass(frozen=True)
class SampleResult:
    """Sampled images [N,1,28,28], the codes [N,D] they came from, and the seed that drew them."""

    images: npt.NDArray[np.generic]
    latents: npt.NDArray[np.float32]
    seed: int
    offset: int = 0
    """For a SampleStream chunk, the index of its first image within the whole sample."""


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo says about the served bundle."""

    name: str
    version: str
    kind: str
    latent_dim: int
    image_shape: tuple[int, ...]
    execution_provider: str
    max_batch_size: int
    max_samples: int
    encoder_sha256: str
    decoder_sha256: str
    decoder_precision: str
    max_request_rows: int
    """The most rows one Encode or Decode request may carry; 0 from a server that does not say."""

    @classmethod
    def from_message(cls, message: vae_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=message.name,
            version=message.version,
            kind=message.kind,
            latent_dim=message.latent_dim,
            image_shape=tuple(message.image_shape),
            execution_provider=message.execution_provider,
            max_batch_size=message.max_batch_size,
            max_samples=message.max_samples,
            encoder_sha256=message.encoder_sha256,
            decoder_sha256=message.decoder_sha256,
            # A server from before the field sends nothing: its decoders were all float32.
            decoder_precision=message.decoder_precision or "float32",
            max_request_rows=message.max_request_rows,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "image_shape": list(self.image_shape)}


class VaeClientError(Exception):
    """A call that failed for good: a status that is not retried, or retries exhausted.

    `code` is the last gRPC status (None when the call succeeded but its answers cannot be used: a
    malformed tensor, answers that do not match the requests, a stream resumed on another model) and
    `details` the server's message, or this client's, which says what was expected.
    """

    def __init__(self, rpc: str, code: Any, details: str, attempts: int = 1) -> None:
        self.rpc = rpc
        self.code = code
        self.details = details
        self.attempts = attempts
        status = code.name if code is not None else "an answer it cannot use"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{rpc} failed with {status}{tries}: {details}")

    def __reduce__(self) -> tuple[type[VaeClientError], tuple[str, Any, str, int]]:
        # Made again from its fields, not from its message: a process pool pickles a worker's error.
        return type(self), (self.rpc, self.code, self.details, self.attempts)


@dataclass
class _Retrier:
    """Counts one call's failures in a row and decides whether, and after how long, to try again.

    Each attempt runs in `with retrier:`, which swallows a failure worth retrying (its pause is then
    `pause_s`) and raises VaeClientError for any other:

        while True:
            with retrier:
                return stub.Encode(request)
            pause(retrier.pause_s)  # cut short by a close
    """

    rpc: str
    policy: RetryPolicy
    rng: random.Random
    client_closed: Callable[[], bool]
    on_retry: Callable[[], None] = lambda: None
    tls: bool = False
    failures: int = 0
    pause_s: float = 0.0

    def __enter__(self) -> None:
        self.raise_if_closed()

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> bool:
        if isinstance(error, asyncio.CancelledError):
            self.raise_if_cut_by_close()
        if not isinstance(error, grpc.RpcError | _NoAnswer):
            return False
        self.pause_s = self.pause_or_raise(error)
        self.on_retry()
        return True

    def raise_if_closed(self) -> None:
        """No attempt on a closed client, whose channel would refuse it with a bare ValueError."""
        if self.client_closed():
            raise VaeClientError(self.rpc, grpc.StatusCode.CANCELLED, "the client was closed", self.failures)

    def raise_if_cut_by_close(self) -> None:
        """grpc.aio ends a closed channel's calls with asyncio.CancelledError, which tells asyncio code
        that its own task was cancelled. Where it was not, report the close as VaeClient does."""
        task = asyncio.current_task()
        if task is not None and not task.cancelling():
            self.raise_if_closed()

    def pause_or_raise(self, error: Any) -> float:
        """The pause before the next attempt after `error` (a grpc.RpcError), or raise for good."""
        self.failures += 1
        self.raise_if_closed()  # a call the close itself cut (gRPC's CANCELLED): said as such
        code, details = error.code(), error.details() or ""
        # gRPC refuses a message over either side's size limit with RESOURCE_EXHAUSTED, as the server
        # does a full queue; but the same message would be refused again.
        too_large = "message larger than max" in details
        broken = code == grpc.StatusCode.INTERNAL and details == GRPC_AIO_SEND_FAILED
        retryable = (code in RETRYABLE_CODES or broken) and not too_large
        if not retryable or self.failures >= self.policy.max_attempts:
            if too_large:
                details += f"; {_too_large_hint(details)}"
            elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the server's full queue, retried already
                details += (
                    f"; the queue stayed full through {self.failures} attempts: send fewer rows a request, "
                    "allow more attempts (RetryPolicy.max_attempts, --attempts), or add replicas"
                )
            elif code == grpc.StatusCode.UNAVAILABLE and (hint := tls_hint(details, self.tls)):
                details += f"; {hint}"
            raise VaeClientError(self.rpc, code, details, self.failures) from error
        return self.policy.backoff_s(self.failures, self.rng)


def _too_large_hint(details: str) -> str:
    """What to change where a message passed a size limit: gRPC says "CLIENT: Received message larger
    than max" of an answer this client would not take, and "SERVER: ..." of a request."""
    if "CLIENT: Received message larger than max" in details:
        return (
            "the answer is larger than this client takes: ask for fewer images per request or for UINT8 "
            "images (4x smaller), or pass a larger max_message_bytes"
        )
    return "send fewer images per request (encode_stream takes them in batches)"


def tls_hint(details: str, tls: bool) -> str | None:
    """What to change where the connection failed as one does between a client and a server that
    disagree on TLS. gRPC's own words name neither side's settings."""
    if tls and "WRONG_VERSION_NUMBER" in details:  # the server's first bytes were not TLS
        return "the server does not seem to take TLS: connect without it (none of the TLS flags, tls=None)"
    if tls and "certificate has expired" in details:
        return (
            "the server's certificate has expired (or this machine's clock is wrong): it needs a renewed one"
        )
    if tls and "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            "the server's certificate is not from a CA this client trusts: pass the CA that signed it "
            "(--ca-cert, TlsOptions.root_certificates)"
        )
    # How a TLS port ends a plaintext connection, and mutual TLS a client it does not know.
    if details.endswith("Socket closed"):
        if not tls:
            return "if the server takes TLS only, connect with TLS (--tls or --ca-cert, TlsOptions)"
        return (
            "if the server takes only clients with a certificate (mutual TLS), pass one its CA signed "
            "(--client-cert and --client-key, TlsOptions.certificate_chain and private_key)"
        )
    return None


class _SourceFailed(Exception):
    """The caller's own batches raised `error` (a grpc.RpcError from a store they are read from, say):
    carried past the retrier, which would take it for the stream's failure and go on without the
    rest of them, and raised to the caller as it was."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


# The end of the caller's batches: not None, which a caller's loader may yield for a batch it lacks,
# and which must be refused as a bad batch, not taken for the end and the rest dropped without a word.
_END = object()


def _next_batch(source: Iterator[Any]) -> Any:
    """The caller's next batch, _END at their end."""
    try:
        return next(source, _END)
    except Exception as error:
        raise _SourceFailed(error) from None


async def _next_async_batch(source: AsyncIterator[Any]) -> Any:
    """The caller's next batch, _END at their end."""
    try:
        return await anext(source, _END)
    except Exception as error:
        raise _SourceFailed(error) from None


# How the server names the request of a stream that it refuses (service.servicer).
_STREAM_REQUEST = re.compile(r"the stream's request (\d+) ")


def refused_stream_request(error: VaeClientError) -> int | None:
    """The number, among the caller's batches from 0, of the stream request that the server refused,
    where its message names one."""
    match = _STREAM_REQUEST.match(error.details)
    return None if match is None else int(match[1])


def _numbered_as_the_callers(error: VaeClientError, first: int) -> VaeClientError:
    """`error` with the refused request numbered among the caller's batches. A stream opened again
    after a break is sent the batches not yet answered, and the server numbers them from 0."""
    match = _STREAM_REQUEST.match(error.details)
    if match is None or first == 0:
        return error
    details = f"the stream's request {first + int(match[1])} {error.details[match.end() :]}"
    return VaeClientError(error.rpc, error.code, details, error.attempts)


# gRPC's status codes by the number a grpc.aio status holds.
_CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class _ServerStatus:
    """The status that a grpc.aio stream call ended with, kept for the error of a failed write: the
    first to land, or the server's where a failed write's came first.

    grpc.aio writes the requests on a task of its own. A write that fails because the server has just
    ended the call (with INVALID_ARGUMENT, say) sets the call's status to INTERNAL
    GRPC_AIO_SEND_FAILED, over the server's status where that came first (grpc/grpc#36066): in 1 to 7
    of 10 streams that the server refuses while requests are still being written, as measured here.
    A done callback runs as the first status lands, and so still sees the server's.
    """

    def __init__(self, call: Any) -> None:
        self._status: Any = None
        call.add_done_callback(self._keep)

    def _keep(self, call: Any) -> None:
        # grpc.aio gives the status only to coroutines, which would run after the overwrite; they, and
        # grpc.aio's own code, read this attribute. A grpc without it keeps nothing: the INTERNAL stands.
        # The first status to land is kept, unless it is a failed write's, which a later one replaces.
        if self._status is None or self._status.details() == GRPC_AIO_SEND_FAILED:
            self._status = getattr(getattr(call, "_cython_call", None), "_status", None)

    def instead_of(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError | None:
        """The server's error where `error` is a failed write's INTERNAL put over it, else None."""
        if error.code() != grpc.StatusCode.INTERNAL or error.details() != GRPC_AIO_SEND_FAILED:
            return None
        status = self._status
        code = None if status is None else _CODE_OF_NUMBER.get(status.code())
        if code is None or code == grpc.StatusCode.OK or status.details() == GRPC_AIO_SEND_FAILED:
            return None  # the write failed first (a broken connection): its INTERNAL is all there is
        return grpc.aio.AioRpcError(
            code,
            error.initial_metadata(),
            grpc.aio.Metadata.from_tuple(status.trailing_metadata() or ()),
            status.details(),
            status.debug_error_string(),
        )


class _NoAnswer(Exception):
    """A stream abandoned because its next answer did not come within `seconds`: retried as a
    DEADLINE_EXCEEDED would be."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:g} s")
        self.seconds = seconds

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return f"no answer within {self.seconds:g} s, so the stream was abandoned"


class _AnswerReader:
    """Reads a stream's answers on a thread of its own, so that the caller waits on a queue rather
    than inside gRPC. An exception that a signal's handler raises (Ctrl-C, vae-encode-job's SIGTERM)
    then lands in that wait and leaves gRPC's locks alone; raised inside them, it hung about one
    stopped job in twenty, for good.

    A wait for the next answer longer than `seconds` (no limit for None) cancels the call: a replica
    whose server hangs while its connection lives (gRPC's core still answers keepalive pings) would
    otherwise hold a stream, and a batch job, forever. Only the waits count: time the caller spends
    between answers, writing them, say, does not. The answers read ahead are those of the requests
    in flight, which the caller bounds.
    """

    def __init__(self, call: Any, seconds: float | None) -> None:
        self._call = call
        self._seconds = seconds
        self._answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="answer-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for answer in self._call:
                self._answers.put(answer)
            self._answers.put(_END)
        except BaseException as error:  # the call's status, handed to the caller to raise
            self._answers.put(error)

    def next_answer(self) -> Any | None:
        """The next answer, or None at the stream's end."""
        seconds = self._seconds
        try:
            answer = self._answers.get(timeout=seconds)
        except queue.Empty:
            assert seconds is not None  # a wait without a limit never ends empty
            self._call.cancel()
            raise _NoAnswer(seconds) from None
        if answer is _END:
            return None
        if isinstance(answer, BaseException):
            raise answer
        return answer


# What gRPC takes as a metadata key.
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


@dataclass
class _ClientState:
    """What both clients share: the channel's settings and the state of its calls (retries, closed)."""

    target: str
    tls: TlsOptions | None
    timeout_s: float | None
    retry: RetryPolicy
    metadata: Metadata
    max_message_bytes: int
    rng: random.Random = field(default_factory=random.Random)
    retries: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        check_seconds("timeout_s", self.timeout_s)
        if isinstance(self.metadata, Mapping) or not all(
            isinstance(pair, tuple | list) and len(pair) == 2 for pair in self.metadata
        ):
            raise ValueError(
                "metadata: expected (key, value) pairs, such as [('x-request-id', '7')] "
                "(for a dict: list(metadata.items()))"
            )
        # Else gRPC refuses the first call: INTERNAL "Invalid metadata", or an error of its own type.
        for key, value in self.metadata:
            if not _METADATA_KEY.fullmatch(key) or key.startswith("grpc-"):
                raise ValueError(
                    f"metadata key {key!r}: expected lowercase letters, digits, '-', '_' or '.', not "
                    "starting with 'grpc-' (gRPC's own)"
                )
            # The values are not shown: they may be credentials.
            if key.endswith("-bin"):
                if not isinstance(value, bytes):
                    raise ValueError(f"metadata {key!r}: a key ending in -bin takes bytes")
            elif not (isinstance(value, str) and value.isascii() and value.isprintable()):
                raise ValueError(f"metadata {key!r}: expected a value of printable ASCII text")

    def retrier(self, rpc: str) -> _Retrier:
        return _Retrier(
            rpc, self.retry, self.rng, lambda: self.closed, self._count_retry, self.tls is not None
        )

    def _count_retry(self) -> None:
        self.retries += 1

    def options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            # round_robin connects to every resolved address (pick_first would pin one replica).
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Our own retries count and back off with jitter; grpc's transparent ones would hide them.
            ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if self.tls is not None and self.tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        return options

    def timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else check_seconds("timeout_s", timeout_s)

    def open(self, grpc_module: Any) -> Any:
        """A channel from `grpc_module` (grpc or grpc.aio) with these settings."""
        if self.tls is None:
            return grpc_module.insecure_channel(self.target, options=self.options())
        return grpc_module.secure_channel(self.target, self.tls.credentials(), options=self.options())


@dataclass
class _SampleResume:
    """What a SampleStream retry must ask for so that the caller sees each image once."""

    request: vae_pb2.SampleRequest
    delivered: int = 0
    decoder_sha256: str | None = None

    def accept(self, response: vae_pb2.SampleResponse, metadata: Any) -> SampleResult | None:
        """The chunk to yield, or None for one a retried stream had already delivered; `metadata` is
        the initial metadata of the call that sent it."""
        # A retry that reached a replica of another model would go on with that model's images.
        decoder = _graph_sha256(metadata, codec.DECODER_SHA256_METADATA)
        if decoder is not None and self.decoder_sha256 not in (None, decoder):
            raise VaeClientError(
                "SampleStream",
                None,
                f"the stream was resumed on a replica serving another decoder ({decoder[:12]}, not "
                f"{self.decoder_sha256[:12]}), whose images would not continue those given: ask again",
            )
        self.decoder_sha256 = self.decoder_sha256 or decoder
        # The first answer fixes the seed and the chunk size, so a retry (maybe on a replica of
        # another default chunk size) redraws and cuts the same images.
        self.request.seed = response.seed
        if response.offset < self.delivered:
            return None
        result = sample_result(response, "SampleStream")
        self.request.chunk_size = self.request.chunk_size or len(result.images)
        self.delivered = result.offset + len(result.images)
        return result

    @property
    def complete(self) -> bool:
        """Every image asked for delivered: a stream broken after its last chunk is not asked again."""
        return self.delivered >= self.request.num_samples


class VaeClient:
    """A synchronous client of VaeService.

    >>> with VaeClient("localhost:50051") as client:  # doctest: +SKIP
    ...     grid = client.sample(16, seed=1).images  # [16,1,28,28] float32 in [0,1]

    Every call takes `timeout_s` (the deadline of each attempt; None means the client's default, but
    no deadline for `encode_stream`, whose length is the input's) and is retried as `retry` says, so
    a call may take up to `retry.max_attempts` times its deadline, plus the pauses. `retries` counts
    the retries made so far, for reports.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: TlsOptions | None = None,
        timeout_s: float | None = 30.0,
        retry: RetryPolicy | None = None,
        metadata: Metadata = (),
        max_message_bytes: int = _DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._state = _ClientState(
            target, tls, timeout_s, retry or RetryPolicy(), metadata, max_message_bytes
        )
        self._channel = self._state.open(grpc)
        self._stub = vae_pb2_grpc.VaeServiceStub(self._channel)
        self._closing = threading.Event()  # wakes a call that waits to retry

    @property
    def retries(self) -> int:
        return self._state.retries

    @property
    def channel(self) -> Any:
        """The underlying grpc.Channel, e.g. for the health service."""
        return self._channel

    def close(self) -> None:
        self._state.closed = True  # before the channel ends its calls with CANCELLED
        self._closing.set()
        self._channel.close()

    def _pause(self, seconds: float) -> None:
        """The pause before a retry, cut short by `close`, after which no attempt is made."""
        self._closing.wait(seconds)

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unary(self, rpc: str, request: Any, timeout_s: float | None) -> tuple[Any, Any]:
        """The answer, and its trailing metadata."""
        method = getattr(self._stub, rpc)
        retrier = self._state.retrier(rpc)
        while True:
            with retrier:
                response, call = method.with_call(
                    request, timeout=self._state.timeout(timeout_s), metadata=self._state.metadata
                )
                return response, call.trailing_metadata()
            self._pause(retrier.pause_s)

    def encode(self, images: npt.NDArray[Any], *, timeout_s: float | None = None) -> EncodeResult:
        """Encode images [N,1,28,28] or [N,28,28], uint8 0-255 or float in [0,1].

        One request: N is at most the server's `ModelInfo.max_request_rows` (INVALID_ARGUMENT beyond
        it). `encode_stream` takes a data set of any size in batches.

        >>> result = client.encode(np.zeros((2, 28, 28), np.uint8))  # doctest: +SKIP
        >>> result.mean.shape  # (2, latent_dim)  # doctest: +SKIP
        """
        response, trailers = self._unary("Encode", encode_request(images), timeout_s)
        return encode_result(response, _graph_sha256(trailers, codec.ENCODER_SHA256_METADATA))

    def decode(
        self,
        latents: npt.NDArray[Any],
        *,
        output_dtype: ImageDtype = "float32",
        timeout_s: float | None = None,
    ) -> npt.NDArray[np.generic]:
        """Decode latent codes [N,D] to images [N,1,28,28] (float32 in [0,1], or uint8 0-255).

        One request: N is at most the server's `ModelInfo.max_request_rows` (INVALID_ARGUMENT beyond it).

        >>> images = client.decode(np.zeros((1, 2), np.float32))  # doctest: +SKIP
        """
        return self.decode_result(latents, output_dtype=output_dtype, timeout_s=timeout_s).images

    def decode_result(
        self,
        latents: npt.NDArray[Any],
        *,
        output_dtype: ImageDtype = "float32",
        timeout_s: float | None = None,
    ) -> DecodeResult:
        """`decode`, with the sha256 of the decoder that answered: the requests of one file may reach
        replicas of two models in a rolling update.

        >>> client.decode_result(np.zeros((1, 2), np.float32)).decoder_sha256  # doctest: +SKIP
        '5f0c...'
        """
        request = decode_request(latents, output_dtype)
        response, trailers = self._unary("Decode", request, timeout_s)
        return decode_result(response, trailers)

    def sample(
        self,
        num_samples: int,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        output_dtype: ImageDtype = "float32",
        timeout_s: float | None = None,
    ) -> SampleResult:
        """Draw `num_samples` images from the prior; the same seed gives the same images everywhere.

        >>> client.sample(64, seed=1, output_dtype="uint8").images.shape  # doctest: +SKIP
        (64, 1, 28, 28)
        """
        request = sample_request(num_samples, seed, temperature, output_dtype)
        response, _ = self._unary("Sample", request, timeout_s)
        return sample_result(response, "Sample")

    def sample_stream(
        self,
        num_samples: int,
        *,
        chunk_size: int = 0,
        seed: int | None = None,
        temperature: float = 1.0,
        output_dtype: ImageDtype = "float32",
        timeout_s: float | None = None,
    ) -> Generator[SampleResult, None, None]:
        """Draw `num_samples` images in chunks of `chunk_size` (0: the server's max batch size).

        A stream broken by a transient failure is asked again with the seed of its first chunk, and
        the chunks already yielded are skipped, so the caller sees each image once. A retry that
        reaches a replica serving another decoder raises VaeClientError rather than mix two models.

        >>> for chunk in client.sample_stream(1000, chunk_size=250, seed=7):  # doctest: +SKIP
        ...     print(chunk.offset, chunk.images.shape)
        """
        # Checked here, where the caller gets the stream, rather than at its first answer.
        request = sample_request(num_samples, seed, temperature, output_dtype, chunk_size)
        return self._sample_stream(request, self._state.timeout(timeout_s))

    def _sample_stream(
        self, request: vae_pb2.SampleRequest, timeout_s: float | None
    ) -> Generator[SampleResult, None, None]:
        retrier = self._state.retrier("SampleStream")
        resume = _SampleResume(request)
        while True:
            with retrier:
                call = self._stub.SampleStream(request, timeout=timeout_s, metadata=self._state.metadata)
                try:
                    for response in call:
                        if (result := resume.accept(response, call.initial_metadata())) is not None:
                            retrier.failures = 0
                            yield result
                    return
                finally:
                    call.cancel()
            if resume.complete:
                return
            self._pause(retrier.pause_s)

    def encode_stream(
        self,
        chunks: Iterable[npt.NDArray[Any]],
        *,
        max_in_flight: int = 4,
        timeout_s: float | None = None,
        answer_timeout_s: float | None = None,
    ) -> Generator[EncodeResult, None, None]:
        """Encode a stream of image batches over one EncodeStream call; one result per batch, in order.

        At most `max_in_flight` batches are sent and not yet answered, so memory stays bounded
        whatever the input's length. The input is read that far ahead before the next answer is handed
        back: one whose next batch waits on an earlier answer needs `max_in_flight=1`. When the stream
        breaks on a transient failure (a server restart, say), a new stream is opened and the
        unanswered batches are sent again: nothing is lost and nothing is answered twice. `timeout_s`
        bounds each stream attempt; None means no deadline. `answer_timeout_s` bounds each wait for
        the next answer: past it the stream is abandoned and opened again, as after a transient
        failure (None: wait as long as the connection lives).

        >>> batches = (images[i : i + 256] for i in range(0, len(images), 256))  # doctest: +SKIP
        >>> means = np.concatenate([r.mean for r in client.encode_stream(batches)])  # doctest: +SKIP
        """
        _check_stream_settings(max_in_flight, timeout_s, answer_timeout_s)
        return self._encode_stream(iter(chunks), max_in_flight, timeout_s, answer_timeout_s)

    def _encode_stream(
        self,
        source: Iterator[npt.NDArray[Any]],
        max_in_flight: int,
        timeout_s: float | None,
        answer_timeout_s: float | None,
    ) -> Generator[EncodeResult, None, None]:
        pending: collections.deque[Any] = collections.deque()
        exhausted = False
        answered = first = 0
        retrier = self._state.retrier("EncodeStream")

        def refill(requests: queue.SimpleQueue[Any]) -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < max_in_flight:
                chunk = _next_batch(source)
                if chunk is _END:
                    exhausted = True
                    break
                request = encode_request(chunk)
                pending.append(request)
                requests.put(request)
            if exhausted:
                # End the request side now: the server may hold answers back until it knows no more come.
                requests.put(None)

        try:
            while pending or not exhausted:
                with retrier:
                    first = answered  # the caller's number of the stream's request 0 on this attempt
                    # grpc reads the request iterator on its own thread; a queue hands the requests over.
                    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
                    for request in pending:
                        requests.put(request)
                    call = self._stub.EncodeStream(
                        iter(requests.get, None), timeout=timeout_s, metadata=self._state.metadata
                    )
                    answers = _AnswerReader(call, answer_timeout_s)
                    try:
                        refill(requests)
                        while (response := answers.next_answer()) is not None:
                            if not pending:
                                raise VaeClientError("EncodeStream", None, "more answers than requests")
                            pending.popleft()
                            answered += 1
                            retrier.failures = 0
                            yield encode_result(
                                response,
                                _graph_sha256(call.initial_metadata(), codec.ENCODER_SHA256_METADATA),
                            )
                            refill(requests)
                        if pending:
                            raise VaeClientError(
                                "EncodeStream",
                                None,
                                f"the stream ended with {len(pending)} requests unanswered",
                            )
                        return
                    finally:
                        requests.put(None)  # lets grpc's request thread finish
                        call.cancel()
                self._pause(retrier.pause_s)
        except _SourceFailed as failed:
            raise failed.error from failed.error.__cause__  # as it was raised, its own cause kept
        except VaeClientError as error:
            raise _numbered_as_the_callers(error, first) from error.__cause__

    def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """Describe the served bundle.

        >>> client.model_info().version  # doctest: +SKIP
        '20260101-abcdef'
        """
        message, _ = self._unary("GetModelInfo", vae_pb2.GetModelInfoRequest(), timeout_s)
        return ModelInfo.from_message(message)


class AsyncVaeClient:
    """An asyncio client of VaeService, with the methods of VaeClient: the unary calls as coroutines,
    the streams as async iterators (`async for`).

    >>> async with AsyncVaeClient("localhost:50051") as client:  # doctest: +SKIP
    ...     result = await client.encode(images)

    Create it inside the event loop that uses it (grpc.aio binds a channel to its loop); made outside
    one, it raises RuntimeError saying so.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: TlsOptions | None = None,
        timeout_s: float | None = 30.0,
        retry: RetryPolicy | None = None,
        metadata: Metadata = (),
        max_message_bytes: int = _DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._state = _ClientState(
            target, tls, timeout_s, retry or RetryPolicy(), metadata, max_message_bytes
        )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # Made outside, its first call would fail with grpc.aio's "attached to a different loop".
            raise RuntimeError(
                "AsyncVaeClient must be created inside the event loop that uses it (in a coroutine, as "
                "in `async with AsyncVaeClient(...)`): grpc.aio binds its channel to that loop. Outside "
                "an event loop, use VaeClient"
            ) from None
        self._channel = self._state.open(grpc.aio)
        self._stub = vae_pb2_grpc.VaeServiceStub(self._channel)
        self._closing = asyncio.Event()  # wakes a call that waits to retry

    @property
    def retries(self) -> int:
        return self._state.retries

    @property
    def channel(self) -> Any:
        """The underlying grpc.aio.Channel."""
        return self._channel

    async def close(self) -> None:
        self._state.closed = True
        self._closing.set()
        await self._channel.close()

    async def _pause(self, seconds: float) -> None:
        """The pause before a retry, cut short by `close`, after which no attempt is made."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def __aenter__(self) -> AsyncVaeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _unary(self, rpc: str, request: Any, timeout_s: float | None) -> tuple[Any, Any]:
        """The answer, and its trailing metadata."""
        method = getattr(self._stub, rpc)
        retrier = self._state.retrier(rpc)
        while True:
            with retrier:
                call = method(request, timeout=self._state.timeout(timeout_s), metadata=self._state.metadata)
                return await call, await call.trailing_metadata()
            await self._pause(retrier.pause_s)

    async def encode(self, images: npt.NDArray[Any], *, timeout_s: float | None = None) -> EncodeResult:
        """Encode images [N,1,28,28] or [N,28,28], uint8 0-255 or float in [0,1].

        >>> (await client.encode(np.zeros((2, 28, 28), np.uint8))).mean.shape  # doctest: +SKIP
        """
        response, trailers = await self._unary("Encode", encode_request(images), timeout_s)
        return encode_result(response, _graph_sha256(trailers, codec.ENCODER_SHA256_METADATA))

    async def decode(
        self,
        latents: npt.NDArray[Any],
        *,
        output_dtype: ImageDtype = "float32",
        timeout_s: float | None = None,
    ) -> npt.NDArray[np.generic]:
        """Decode latent codes [N,D] to images [N,1,28,28].

        >>> images = await client.decode(np.zeros((1, 2), np.float32), output_dtype="uint8")  # doctest: +SKIP
        """
        return (await self.decode_result(latents, output_dtype=output_dtype, timeout_s=timeout_s)).images

    async def decode_result(
        self,
        latents: npt.NDArray[Any],
        *,
        output_dtype: ImageDtype = "float32",
        timeout_s: float | None = None,
    ) -> DecodeResult:
        """`decode`, with the sha256 of the decoder that answered (VaeClient.decode_result)."""
        request = decode_request(latents, output_dtype)
        response, trailers = await self._unary("Decode", request, timeout_s)
        return decode_result(response, trailers)

    async def sample(
        self,
        num_samples: int,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        output_dtype: ImageDtype = "float32",
        timeout_s: float | None = None,
    ) -> SampleResult:
        """Draw `num_samples` images from the prior.

        >>> (await client.sample(8, seed=3)).seed  # doctest: +SKIP
        3
        """
        request = sample_request(num_samples, seed, temperature, output_dtype)
        response, _ = await self._unary("Sample", request, timeout_s)
        return sample_result(response, "Sample")

    def sample_stream(
        self,
        num_samples: int,
        *,
        chunk_size: int = 0,
        seed: int | None = None,
        temperature: float = 1.0,
        output_dtype: ImageDtype = "float32",
        timeout_s: float | None = None,
    ) -> AsyncGenerator[SampleResult, None]:
        """Draw `num_samples` images in chunks; a broken stream resumes as in VaeClient.sample_stream.

        >>> async for chunk in client.sample_stream(1000, chunk_size=250):  # doctest: +SKIP
        ...     print(chunk.offset)
        """
        request = sample_request(num_samples, seed, temperature, output_dtype, chunk_size)
        return self._sample_stream(request, self._state.timeout(timeout_s))

    async def _sample_stream(
        self, request: vae_pb2.SampleRequest, timeout_s: float | None
    ) -> AsyncGenerator[SampleResult, None]:
        retrier = self._state.retrier("SampleStream")
        resume = _SampleResume(request)
        while True:
            with retrier:
                call = self._stub.SampleStream(request, timeout=timeout_s, metadata=self._state.metadata)
                try:
                    async for response in call:
                        if (result := resume.accept(response, await call.initial_metadata())) is not None:
                            retrier.failures = 0
                            yield result
                    return
                finally:
                    call.cancel()
            if resume.complete:
                return
            await self._pause(retrier.pause_s)

    def encode_stream(
        self,
        chunks: Iterable[npt.NDArray[Any]] | AsyncIterable[npt.NDArray[Any]],
        *,
        max_in_flight: int = 4,
        timeout_s: float | None = None,
        answer_timeout_s: float | None = None,
    ) -> AsyncGenerator[EncodeResult, None]:
        """Encode a stream of image batches, at most `max_in_flight` unanswered; see VaeClient.encode_stream.

        >>> async for result in client.encode_stream(batches):  # doctest: +SKIP
        ...     store(result.mean)
        """
        _check_stream_settings(max_in_flight, timeout_s, answer_timeout_s)
        return self._encode_stream(_aiter(chunks), max_in_flight, timeout_s, answer_timeout_s)

    async def _encode_stream(
        self,
        source: AsyncIterator[npt.NDArray[Any]],
        max_in_flight: int,
        timeout_s: float | None,
        answer_timeout_s: float | None,
    ) -> AsyncGenerator[EncodeResult, None]:
        pending: collections.deque[Any] = collections.deque()
        exhausted = False
        answered = first = 0
        retrier = self._state.retrier("EncodeStream")

        async def refill(requests: asyncio.Queue[Any]) -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < max_in_flight:
                chunk = await _next_async_batch(source)
                if chunk is _END:
                    exhausted = True
                    break
                request = encode_request(chunk)
                pending.append(request)
                requests.put_nowait(request)
            if exhausted:
                # End the request side now: the server may hold answers back until it knows no more come.
                requests.put_nowait(None)

        try:
            while pending or not exhausted:
                with retrier:
                    first = answered  # the caller's number of the stream's request 0 on this attempt
                    # grpc reads the requests from an iterator, as in VaeClient.encode_stream, and the status
                    # comes from the read side. A request still being written when the server ends the call
                    # puts INTERNAL GRPC_AIO_SEND_FAILED over that status: _ServerStatus keeps the server's.
                    requests: asyncio.Queue[Any] = asyncio.Queue()
                    for request in pending:
                        requests.put_nowait(request)
                    call = self._stub.EncodeStream(
                        _until_none(requests), timeout=timeout_s, metadata=self._state.metadata
                    )
                    server_status = _ServerStatus(call)
                    responses = aiter(call)
                    try:
                        await refill(requests)
                        while (response := await _next_answer(responses, answer_timeout_s)) is not None:
                            if not pending:
                                raise VaeClientError("EncodeStream", None, "more answers than requests")
                            pending.popleft()
                            answered += 1
                            retrier.failures = 0
                            yield encode_result(
                                response,
                                _graph_sha256(await call.initial_metadata(), codec.ENCODER_SHA256_METADATA),
                            )
                            await refill(requests)
                        if pending:
                            raise VaeClientError(
                                "EncodeStream",
                                None,
                                f"the stream ended with {len(pending)} requests unanswered",
                            )
                        return
                    except grpc.aio.AioRpcError as error:
                        if (server_error := server_status.instead_of(error)) is None:
                            raise
                        raise server_error from error
                    finally:
                        requests.put_nowait(None)  # ends grpc's reading of the requests
                        call.cancel()
                await self._pause(retrier.pause_s)
        except _SourceFailed as failed:
            raise failed.error from failed.error.__cause__  # as it was raised, its own cause kept
        except VaeClientError as error:
            raise _numbered_as_the_callers(error, first) from error.__cause__

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """Describe the served bundle.

        >>> (await client.model_info()).latent_dim  # doctest: +SKIP
        2
        """
        message, _ = await self._unary("GetModelInfo", vae_pb2.GetModelInfoRequest(), timeout_s)
        return ModelInfo.from_message(message)


async def _next_answer(responses: AsyncIterator[Any], seconds: float | None) -> Any | None:
    """The next answer, None at the stream's end, or _NoAnswer after `seconds` (None: no limit)."""
    try:
        return await asyncio.wait_for(anext(responses, None), seconds)
    except TimeoutError:
        assert seconds is not None
        raise _NoAnswer(seconds) from None


async def _until_none(requests: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while (request := await requests.get()) is not None:
        yield request


async def _aiter(chunks: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


def _check_stream_settings(max_in_flight: int, timeout_s: float | None, answer_timeout: float | None) -> None:
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    check_seconds("timeout_s", timeout_s)
    check_seconds("answer_timeout_s", answer_timeout)


# gRPC takes a deadline billions of seconds away (or an infinite one) for one already passed.
MAX_SECONDS = 365 * 24 * 3600.0


def check_seconds(name: str, seconds: float | None) -> float | None:
    """`seconds` if it is None (no limit) or above 0 and at most a year: a deadline of 0 or less, or
    one gRPC cannot hold, fails every attempt at once, and the retries with it, as DEADLINE_EXCEEDED."""
    if seconds is not None and not 0 < seconds <= MAX_SECONDS:
        raise ValueError(
            f"{name} must be above 0 seconds and at most {MAX_SECONDS:g} (a year), or None for no limit; "
            f"got {seconds}"
        )
    return seconds


def as_wire_images(images: npt.NDArray[Any]) -> npt.NDArray[np.generic]:
    """Images as they travel: uint8 stays uint8 (4x fewer bytes), floats become float32.

    Raises TypeError for any other dtype, naming what is accepted.
    """
    if images is None:  # which np.asarray would make an array of one object
        raise TypeError("images must be uint8 (0-255) or floating point (0-1), got None")
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        return images.astype(np.float32, copy=False)
    raise TypeError(f"images must be uint8 (0-255) or floating point (0-1), got {images.dtype}")


def encode_request(images: npt.NDArray[Any]) -> vae_pb2.EncodeRequest:
    return vae_pb2.EncodeRequest(images=codec.to_tensor(as_wire_images(images)))


def as_wire_latents(latents: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Latent codes as they travel: float32.

    Raises TypeError for complex, boolean or text arrays, which numpy would cast without a word, and
    ValueError for finite values beyond float32's range, which the cast would turn into Inf.
    """
    latents = np.asarray(latents)
    if not np.issubdtype(latents.dtype, np.floating) and not np.issubdtype(latents.dtype, np.integer):
        raise TypeError(f"latents must be real numbers (floating point or integer), got {latents.dtype}")
    with np.errstate(over="ignore"):  # an overflow is refused just below, in words
        wire = latents.astype(np.float32, copy=False)
    overflowed = ~np.isfinite(wire) & np.isfinite(latents)
    if overflowed.any():
        largest = float(np.abs(latents[overflowed]).max())
        raise ValueError(f"latents reach |z| = {largest:g}, beyond float32's range")
    return wire


def decode_request(latents: npt.NDArray[Any], output_dtype: ImageDtype) -> vae_pb2.DecodeRequest:
    tensor = codec.to_tensor(as_wire_latents(latents))
    return vae_pb2.DecodeRequest(latents=tensor, output_dtype=_output_dtype(output_dtype))  # type: ignore[arg-type]


def sample_request(
    num_samples: int,
    seed: int | None,
    temperature: float,
    output_dtype: ImageDtype,
    chunk_size: int = 0,
) -> vae_pb2.SampleRequest:
    if not 1 <= num_samples <= UINT32_MAX:  # protobuf's own message says only "Value out of range"
        raise ValueError(f"num_samples must be at least 1 (and at most 2**32-1), got {num_samples}")
    if not 0 <= chunk_size <= UINT32_MAX:
        raise ValueError(
            f"chunk_size must be 0 (the server's batch size) or more (and at most 2**32-1), got {chunk_size}"
        )
    request = vae_pb2.SampleRequest(
        num_samples=num_samples,
        temperature=temperature,
        output_dtype=_output_dtype(output_dtype),  # type: ignore[arg-type]
        chunk_size=chunk_size,
    )
    if not request.temperature > 0:  # as the wire's float32 holds it: NaN, and what rounds to 0, too
        raise ValueError(
            f"temperature must be above 0, got {temperature}: the wire reads 0 as 1, which would sample "
            "at full temperature (decode zeros for the prior's centre, z = 0)"
        )
    if seed is not None:
        if not 0 <= seed < 2**64:  # protobuf's own message says only "Value out of range"
            raise ValueError(f"seed must be an integer from 0 to 2**64-1 (a uint64), got {seed}")
        request.seed = seed
    return request


def _output_dtype(name: str) -> int:
    if name not in _OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {sorted(_OUTPUT_DTYPES)}, got {name!r}")
    return _OUTPUT_DTYPES[name]


def _array(tensor: vae_pb2.Tensor, rpc: str, name: str) -> npt.NDArray[Any]:
    try:
        return codec.from_tensor(tensor, name)
    except InvalidInput as error:
        raise VaeClientError(rpc, None, str(error)) from error


def encode_result(response: vae_pb2.EncodeResponse, encoder_sha256: str | None = None) -> EncodeResult:
    mean = _array(response.mean, "Encode", "mean")
    log_var = _array(response.log_var, "Encode", "log_var") if response.HasField("log_var") else None
    return EncodeResult(mean=mean, log_var=log_var, encoder_sha256=encoder_sha256)


def decode_result(response: vae_pb2.DecodeResponse, trailing_metadata: Any) -> DecodeResult:
    images = _array(response.images, "Decode", "images")
    return DecodeResult(images, _graph_sha256(trailing_metadata, codec.DECODER_SHA256_METADATA))


def _graph_sha256(metadata: Any, key: str) -> str | None:
    """A graph's sha256 from a call's metadata (a codec *_SHA256_METADATA key), if sent."""
    return dict(metadata or ()).get(key)


def sample_result(response: vae_pb2.SampleResponse, rpc: str) -> SampleResult:
    return SampleResult(
        images=_array(response.images, rpc, "images"),
        latents=_array(response.latents, rpc, "latents"),
        seed=response.seed,
        offset=response.offset,
    )
