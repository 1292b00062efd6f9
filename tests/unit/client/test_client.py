"""The typed client without a model: backoff, retries against a closed port, request building."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client.client import (
    AsyncVaeClient,
    RetryPolicy,
    SampleResult,
    TlsOptions,
    VaeClient,
    VaeClientError,
    _ClientState,
    _numbered_as_the_callers,
    _Retrier,
    _SampleResume,
    as_wire_images,
    as_wire_latents,
    sample_request,
    tls_hint,
)
from service import codec
from service.server import grpc_options
from service.settings import Settings
from tests.conftest import free_port
from tests.unit.client.conftest import TlsFiles
from vae.v1 import vae_pb2

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    rng = random.Random(0)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        pauses = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert ceiling / 2 <= min(pauses) and max(pauses) <= ceiling
        assert max(pauses) - min(pauses) > ceiling / 4  # jittered, not fixed


@pytest.mark.parametrize("multiplier", [1.0, 2.0, 1e10])
def test_backoff_stays_at_the_cap_however_many_retries_came_before(multiplier: float) -> None:
    """2.0 ** 1024 overflows a float: a job retrying through an hour's outage reached it."""
    policy = RetryPolicy(max_attempts=10**6, initial_backoff_s=0.1, max_backoff_s=5.0, multiplier=multiplier)
    ceiling = 0.1 if multiplier == 1 else 5.0
    for retry in (1025, 10**6):
        assert ceiling / 2 <= policy.backoff_s(retry, random.Random(0)) <= ceiling


def test_a_policy_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_backoff_s <= max_backoff_s"):
        RetryPolicy(initial_backoff_s=2, max_backoff_s=1)


def test_an_unreachable_server_is_retried_up_to_the_limit_then_reported() -> None:
    with VaeClient(f"127.0.0.1:{free_port()}", retry=FAST, timeout_s=2) as client:
        with pytest.raises(VaeClientError) as error:
            client.model_info()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        assert error.value.attempts == 3
        assert "GetModelInfo failed with UNAVAILABLE after 3 attempts" in str(error.value)
        assert client.retries == 2


def test_an_encode_stream_to_an_unreachable_server_gives_up_after_the_limit() -> None:
    target = f"127.0.0.1:{free_port()}"
    failure = "EncodeStream failed with UNAVAILABLE after 3 attempts"
    with VaeClient(target, retry=FAST, timeout_s=2) as client, pytest.raises(VaeClientError, match=failure):
        list(client.encode_stream([np.zeros((1, 28, 28), np.uint8)]))


def test_the_async_client_retries_the_same_way() -> None:
    async def call() -> int:
        async with AsyncVaeClient(f"127.0.0.1:{free_port()}", retry=FAST, timeout_s=2) as client:
            with pytest.raises(VaeClientError, match="after 3 attempts"):
                await client.sample(4, seed=1)
            return client.retries

    assert asyncio.run(call()) == 2


def aio_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_a_full_queue_is_retried_with_backoff() -> None:
    """The server's RESOURCE_EXHAUSTED for a full queue says: come back a little later."""
    retrier = _Retrier("Sample", FAST, random.Random(0), lambda: False)
    full = aio_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "the decoder queue is full")
    assert retrier.pause_or_raise(full) > 0


def test_a_queue_still_full_after_the_last_attempt_says_what_to_change() -> None:
    retrier = _Retrier("Encode", RetryPolicy(max_attempts=2), random.Random(0), lambda: False)
    full = aio_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "the encoder queue is full; retry with backoff")
    retrier.pause_or_raise(full)
    with pytest.raises(VaeClientError) as refused:
        retrier.pause_or_raise(full)
    assert str(refused.value) == (
        "Encode failed with RESOURCE_EXHAUSTED after 2 attempts: the encoder queue is full; retry with "
        "backoff; the queue stayed full through 2 attempts: send fewer rows a request, allow more "
        "attempts (RetryPolicy.max_attempts, --attempts), or add replicas"
    )


def test_a_server_certificate_that_expired_is_said_so_not_blamed_on_the_clients_ca() -> None:
    details = "failed to connect to all addresses; ...: CERTIFICATE_VERIFY_FAILED: certificate has expired"
    assert tls_hint(details, tls=True) == (
        "the server's certificate has expired (or this machine's clock is wrong): it needs a renewed one"
    )
    assert "--ca-cert" in str(tls_hint("...: CERTIFICATE_VERIFY_FAILED: self-signed certificate", tls=True))


def test_a_call_the_server_cancelled_is_retried() -> None:
    """gRPC cancels the calls that reach a server as it shuts down."""
    retrier = _Retrier("Sample", FAST, random.Random(0), lambda: False)
    assert retrier.pause_or_raise(aio_error(grpc.StatusCode.CANCELLED, "CANCELLED")) > 0


@pytest.fixture
def never_answering_server() -> Iterator[str]:
    """A server whose GetModelInfo, SampleStream and EncodeStream never answer: its target."""
    answer = threading.Event()

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        answer.wait(10)
        return b""

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        answer.wait(10)
        yield from ()

    server = grpc.server(futures.ThreadPoolExecutor(4))
    handlers = {
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(unary),
        "SampleStream": grpc.unary_stream_rpc_method_handler(stream),
        "EncodeStream": grpc.stream_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("vae.v1.VaeService", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        answer.set()
        server.stop(None)


@contextlib.contextmanager
def serving_sample_stream(handler: Callable[..., Any]) -> Iterator[str]:
    """A gRPC server whose VaeService has only SampleStream, answered by `handler`: its target."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    method = grpc.unary_stream_rpc_method_handler(
        handler,
        request_deserializer=vae_pb2.SampleRequest.FromString,
        response_serializer=vae_pb2.SampleResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("vae.v1.VaeService", {"SampleStream": method})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture
def server_that_fails_after_its_last_chunk() -> Iterator[tuple[str, list[int]]]:
    """A SampleStream that sends every chunk, then ends UNAVAILABLE, as a replica killed between its
    last chunk and its status would: its target, and the num_samples of each call it took."""
    calls: list[int] = []

    def sample_stream(
        request: vae_pb2.SampleRequest, context: grpc.ServicerContext
    ) -> Iterator[vae_pb2.SampleResponse]:
        calls.append(request.num_samples)
        for offset in range(0, request.num_samples, 4):
            images = np.full((min(4, request.num_samples - offset), 1, 28, 28), offset, np.uint8)
            latents = np.zeros((len(images), 2), np.float32)
            yield vae_pb2.SampleResponse(
                images=codec.to_tensor(images), latents=codec.to_tensor(latents), seed=9, offset=offset
            )
        context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away after its last chunk")

    with serving_sample_stream(sample_stream) as target:
        yield target, calls


def test_a_sample_stream_broken_after_its_last_chunk_ends_with_every_image_and_asks_nothing_again(
    server_that_fails_after_its_last_chunk: tuple[str, list[int]],
) -> None:
    """It asked again for all of them and dropped the answer, then raised once the replica stayed
    away: list(client.sample_stream(8)) lost every image."""
    target, calls = server_that_fails_after_its_last_chunk
    with VaeClient(target, retry=FAST) as client:
        chunks = list(client.sample_stream(8))

    async def drawn_async() -> list[SampleResult]:
        async with AsyncVaeClient(target, retry=FAST) as client:
            return [chunk async for chunk in client.sample_stream(8)]

    for drawn in (chunks, asyncio.run(drawn_async())):
        assert [chunk.offset for chunk in drawn] == [0, 4]
    assert calls == [8, 8]  # one call from each client


def test_a_call_cut_by_closing_the_client_is_not_retried(never_answering_server: str) -> None:
    """Closing the channel ends its calls with CANCELLED too: the caller asked for it."""
    client = VaeClient(never_answering_server, retry=FAST, timeout_s=10)
    closer = threading.Timer(0.3, client.close)
    closer.start()
    with pytest.raises(VaeClientError, match="GetModelInfo failed with CANCELLED: the client was closed"):
        client.model_info()
    assert client.retries == 0


async def _first_answer(client: AsyncVaeClient, rpc: str) -> object:
    if rpc == "GetModelInfo":
        return await client.model_info()
    stream: Any  # an async generator, which aclosing closes
    if rpc == "SampleStream":
        stream = client.sample_stream(4, seed=1)
    else:
        stream = client.encode_stream([np.zeros((1, 28, 28), np.uint8)])
    async with contextlib.aclosing(stream):
        return await anext(stream)


@pytest.mark.parametrize("rpc", ["GetModelInfo", "SampleStream", "EncodeStream"])
def test_an_async_call_cut_by_closing_the_client_raises_the_clients_error(
    never_answering_server: str, rpc: str
) -> None:
    """Not asyncio.CancelledError, which says that the caller's own task was cancelled."""

    async def cut_by_close() -> None:
        client = AsyncVaeClient(never_answering_server, retry=FAST, timeout_s=10)
        call = asyncio.create_task(_first_answer(client, rpc))
        await asyncio.sleep(0.3)
        await client.close()
        with pytest.raises(VaeClientError, match=f"{rpc} failed with CANCELLED: the client was closed"):
            await call
        assert client.retries == 0

    asyncio.run(cut_by_close())


def test_an_async_call_whose_task_is_cancelled_raises_cancelled_error(never_answering_server: str) -> None:
    async def cancelled() -> None:
        async with AsyncVaeClient(never_answering_server, retry=FAST, timeout_s=10) as client:
            call = asyncio.create_task(client.model_info())
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(cancelled())


def test_an_async_client_made_outside_an_event_loop_is_refused_saying_where_to_make_it() -> None:
    """grpc.aio binds a channel to the loop it is made in: its first call would fail with "attached to
    a different loop", naming neither the client nor the fix."""
    with pytest.raises(RuntimeError, match=r"^AsyncVaeClient must be created inside the event loop"):
        AsyncVaeClient(f"127.0.0.1:{free_port()}")


# Pauses far longer than any test: a close must cut them short.
PATIENT = RetryPolicy(max_attempts=3, initial_backoff_s=60.0, max_backoff_s=60.0)


def test_a_client_closed_while_it_waits_to_retry_stops_waiting_and_makes_no_further_attempt() -> None:
    client = VaeClient(f"127.0.0.1:{free_port()}", retry=PATIENT, timeout_s=2)
    threading.Timer(0.5, client.close).start()
    started = time.monotonic()
    with pytest.raises(VaeClientError, match="Sample failed with CANCELLED: the client was closed"):
        client.sample(4, seed=1)
    assert client.retries == 1 and time.monotonic() - started < 20


def test_an_async_client_closed_while_it_waits_to_retry_stops_waiting_too() -> None:
    async def closed_in_the_pause() -> int:
        client = AsyncVaeClient(f"127.0.0.1:{free_port()}", retry=PATIENT, timeout_s=2)
        call = asyncio.create_task(client.sample(4, seed=1))
        await asyncio.sleep(0.5)
        await client.close()
        with pytest.raises(VaeClientError, match="Sample failed with CANCELLED: the client was closed"):
            await asyncio.wait_for(call, 20)
        return client.retries

    assert asyncio.run(closed_in_the_pause()) == 1


def test_a_request_grpc_aio_could_not_send_is_retried_but_the_servers_internal_error_is_not() -> None:
    retrier = _Retrier("EncodeStream", FAST, random.Random(0), lambda: False)
    assert retrier.pause_or_raise(aio_error(grpc.StatusCode.INTERNAL, "Internal error from Core")) > 0
    with pytest.raises(VaeClientError, match="internal error: KeyError") as error:
        retrier.pause_or_raise(aio_error(grpc.StatusCode.INTERNAL, "internal error: KeyError"))
    assert error.value.code == grpc.StatusCode.INTERNAL


def test_images_go_on_the_wire_as_uint8_or_float32() -> None:
    assert as_wire_images(np.zeros((1, 28, 28), np.uint8)).dtype == np.uint8
    assert as_wire_images(np.zeros((1, 28, 28), np.float64)).dtype == np.float32
    with pytest.raises(TypeError, match=r"uint8 .* or floating point"):
        as_wire_images(np.zeros((1, 28, 28), np.int64))


def test_latents_go_on_the_wire_as_float32_and_what_the_cast_would_change_is_refused() -> None:
    assert as_wire_latents(np.zeros((1, 2), np.float64)).dtype == np.float32
    np.testing.assert_array_equal(as_wire_latents(np.array([[0, -3]])), np.array([[0.0, -3.0]], np.float32))
    with pytest.raises(TypeError, match=r"real numbers .*, got complex128"):
        as_wire_latents(np.array([[0.5 + 3j, -1.0]]))  # the imaginary part would be dropped
    with pytest.raises(TypeError, match="got bool"):
        as_wire_latents(np.ones((1, 2), bool))
    with pytest.raises(ValueError, match=r"\|z\| = 1e\+39, beyond float32's range"):
        as_wire_latents(np.array([[1e39, np.nan]]))  # would reach the server as Inf
    assert np.isnan(as_wire_latents(np.array([[np.nan, 0.0]]))).any()  # the server names NaN itself


def test_a_sample_request_keeps_an_explicit_seed_and_leaves_an_absent_one_unset() -> None:
    assert sample_request(4, 0, 1.0, "uint8").HasField("seed")
    assert not sample_request(4, None, 1.0, "uint8").HasField("seed")
    with pytest.raises(ValueError, match="output_dtype"):
        sample_request(4, None, 1.0, "int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples"):
        sample_request(0, None, 1.0, "uint8")


@pytest.mark.parametrize("temperature", [0.0, 1e-50, -0.5, float("nan")])
def test_a_temperature_the_wire_would_read_as_one_is_refused(temperature: float) -> None:
    """0 on the wire means 1: asked for 0 (or 1e-50, 0 in float32), the sampler would draw at full
    temperature without a word."""
    with pytest.raises(ValueError, match=r"temperature must be above 0, got .*: the wire reads 0 as 1"):
        sample_request(4, 1, temperature, "uint8")
    assert sample_request(4, 1, 1e-40, "uint8").temperature > 0  # tiny, but still there in float32


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_outside_uint64_is_refused_naming_the_range(seed: int) -> None:
    assert sample_request(4, 2**64 - 1, 1.0, "uint8").seed == 2**64 - 1
    with pytest.raises(
        ValueError, match=rf"seed must be an integer from 0 to 2\*\*64-1 \(a uint64\), got {seed}"
    ):
        sample_request(4, seed, 1.0, "uint8")


@pytest.mark.parametrize(
    ("num_samples", "chunk_size", "message"),
    [
        (2**32, 0, r"num_samples must be at least 1 \(and at most 2\*\*32-1\), got 4294967296"),
        (4, -1, r"chunk_size must be 0 \(the server's batch size\) or more \(and at most 2\*\*32-1\), got"),
        (4, 2**32, r"chunk_size must be 0 .* got 4294967296"),
    ],
)
def test_counts_outside_uint32_are_refused_naming_the_field(
    num_samples: int, chunk_size: int, message: str
) -> None:
    """protobuf's own message says only "Value out of range"."""
    with pytest.raises(ValueError, match=message):
        sample_request(num_samples, None, 1.0, "uint8", chunk_size)


def test_a_deadline_of_zero_or_less_or_beyond_a_year_is_refused_where_it_is_given() -> None:
    """It would fail every attempt at once as DEADLINE_EXCEEDED, retries and all: gRPC takes an
    infinite deadline, or one billions of seconds away, for one already passed."""
    for timeout_s in (0.0, -5.0, float("nan"), float("inf"), 1e12):
        with pytest.raises(ValueError, match=r"timeout_s must be above 0 seconds and at most 3.1536e\+07"):
            VaeClient("127.0.0.1:1", timeout_s=timeout_s)
    with VaeClient("127.0.0.1:1", retry=FAST) as client:
        with pytest.raises(ValueError, match="timeout_s must be above 0 seconds"):
            client.model_info(timeout_s=0)
        assert client.retries == 0


def test_a_streams_arguments_are_checked_when_it_is_asked_for_not_at_its_first_answer() -> None:
    bad_streams: list[tuple[str, Callable[[Any], Any]]] = [
        ("num_samples", lambda client: client.sample_stream(0)),
        ("chunk_size", lambda client: client.sample_stream(4, chunk_size=-1)),
        ("timeout_s", lambda client: client.sample_stream(4, timeout_s=-1)),
        ("max_in_flight", lambda client: client.encode_stream([], max_in_flight=0)),
        ("timeout_s", lambda client: client.encode_stream([], timeout_s=0)),
        ("answer_timeout_s", lambda client: client.encode_stream([], answer_timeout_s=0)),
    ]
    with VaeClient("127.0.0.1:1") as client:
        for name, stream in bad_streams:
            with pytest.raises(ValueError, match=name):
                stream(client)

    async def asynchronous() -> None:
        async with AsyncVaeClient("127.0.0.1:1") as client:
            for name, stream in bad_streams:
                with pytest.raises(ValueError, match=name):
                    stream(client)

    asyncio.run(asynchronous())


def test_a_client_error_survives_pickling_as_a_process_pool_sends_it_back() -> None:
    error = VaeClientError("Sample", grpc.StatusCode.INVALID_ARGUMENT, "num_samples: 65 is more", attempts=2)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.rpc, copy.code, copy.details, copy.attempts) == ("Sample", error.code, error.details, 2)
    assert str(copy) == str(error)


def test_mutual_tls_needs_both_the_client_certificate_and_its_key_naming_the_flag_missing(
    tls_files: TlsFiles,
) -> None:
    with pytest.raises(
        ValueError,
        match=r"client certificate .*client.pem \(--client-cert\) is given without its private key "
        r"\(--client-key\); mutual TLS needs both",
    ):
        TlsOptions(certificate_chain=tls_files.client_cert).credentials()
    with pytest.raises(
        ValueError, match=r"client key .*client.key \(--client-key\) is given without its certificate"
    ):
        TlsOptions(private_key=tls_files.client_key).credentials()


def test_sound_tls_files_reach_grpc_each_as_what_it_is_and_no_files_mean_the_systems_roots(
    tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC takes any bytes in each of its three places and fails only at the handshake: a key handed
    over as the certificate chain would pass unnoticed until the first call."""
    handed: list[dict[str, bytes | None]] = []
    made = object()

    def ssl_channel_credentials(
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
    ) -> object:
        handed.append({"root": root_certificates, "key": private_key, "chain": certificate_chain})
        return made

    monkeypatch.setattr(grpc, "ssl_channel_credentials", ssl_channel_credentials)
    assert TlsOptions().credentials() is made
    assert handed == [{"root": None, "key": None, "chain": None}]  # the system's root certificates
    mutual = TlsOptions(
        tls_files.ca, certificate_chain=tls_files.client_cert, private_key=tls_files.client_key
    )
    assert mutual.credentials() is made
    assert handed[1] == {
        "root": tls_files.ca.read_bytes(),
        "key": tls_files.client_key.read_bytes(),
        "chain": tls_files.client_cert.read_bytes(),
    }


def _file(tls_files: TlsFiles, name: str) -> Path:
    return Path(getattr(tls_files, name))


@pytest.mark.parametrize(
    ("ca", "cert", "key"),
    [
        ("ca", "client_cert", "client_key"),
        ("ca_bundle", "chain", "client_key"),  # several certificates in one file
        ("trusted_ca", None, None),
        (None, "rsa_cert", "rsa_key"),  # 1024 bits: below OpenSSL's default security level
    ],
)
def test_tls_files_that_grpc_takes_pass_the_check(
    tls_files: TlsFiles, ca: str | None, cert: str | None, key: str | None
) -> None:
    TlsOptions(
        root_certificates=None if ca is None else _file(tls_files, ca),
        certificate_chain=None if cert is None else _file(tls_files, cert),
        private_key=None if key is None else _file(tls_files, key),
    ).check()


@pytest.mark.parametrize(
    ("ca", "cert", "key", "expected"),
    [
        # A key given as the CA file.
        ("ca_key", None, None, r"CA certificate \S*ca.key \(--ca-cert\): not a PEM certificate"),
        # The certificate and the key swapped: each is named for what it is not.
        (
            "ca",
            "client_key",
            "client_cert",
            r"client certificate \S*client.key \(--client-cert\): not a PEM certificate .*; "
            r"client key \S*client.pem \(--client-key\): not a PEM private key",
        ),
        (
            None,
            "client_cert",
            "other_key",
            r"client key \S*other.key \(--client-key\): not the private key of the client certificate "
            r"\S*client.pem \(--client-cert\)",
        ),
        # A key of another algorithm: an RSA key for an EC certificate.
        (
            None,
            "client_cert",
            "rsa_key",
            r"client key \S*rsa.key \(--client-key\): not the private key of the client certificate "
            r"\S*client.pem \(--client-cert\)",
        ),
        (
            None,
            "client_cert",
            "encrypted_key",
            r"client key \S*encrypted.key \(--client-key\): the private key is encrypted; gRPC needs it "
            "unencrypted",
        ),
    ],
)
def test_tls_files_that_are_not_what_their_flag_takes_are_refused_naming_the_file_and_what_it_should_be(
    tls_files: TlsFiles, ca: str | None, cert: str | None, key: str | None, expected: str
) -> None:
    """Else gRPC takes them and fails every handshake, UNAVAILABLE, retried as if the server were down."""
    options = TlsOptions(
        root_certificates=None if ca is None else _file(tls_files, ca),
        certificate_chain=None if cert is None else _file(tls_files, cert),
        private_key=None if key is None else _file(tls_files, key),
    )
    with pytest.raises(ValueError, match=expected):
        options.credentials()
    with pytest.raises(ValueError, match=expected):
        VaeClient("127.0.0.1:1", tls=options)


def test_a_pem_file_whose_block_does_not_decode_is_refused_by_openssl_naming_it(
    tls_files: TlsFiles, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=r"CA certificate \S*broken.pem \(--ca-cert\): not a readable PEM"):
        TlsOptions(root_certificates=broken).credentials()


def test_a_tls_file_that_cannot_be_read_is_named_with_its_flag(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"CA certificate \S*missing.pem \(--ca-cert\): cannot read the certificate \(No such file",
    ):
        TlsOptions(root_certificates=tmp_path / "missing.pem").credentials()


def test_a_sample_stream_without_a_seed_resumes_with_the_seed_and_chunk_size_of_its_first_chunk() -> None:
    """Asked again as first sent, the stream would draw other images under a new seed, cut other chunks."""
    resume = _SampleResume(sample_request(30, None, 1.0, "uint8"))
    first = vae_pb2.SampleResponse(
        images=codec.to_tensor(np.zeros((10, 1, 28, 28), np.uint8)),
        latents=codec.to_tensor(np.zeros((10, 2), np.float32)),
        seed=2**63 + 5,
        offset=0,
    )
    assert resume.accept(first, ()) is not None
    again = resume.request
    assert again.HasField("seed") and again.seed == 2**63 + 5 and again.chunk_size == 10
    assert resume.accept(first, ()) is None  # a chunk already given is not given twice


@pytest.mark.parametrize("max_in_flight", [1, 3])
def test_an_encode_stream_takes_at_most_max_in_flight_batches_ahead_of_its_answers(
    never_answering_server: str, max_in_flight: int
) -> None:
    """What bounds a job's memory: a server that does not answer gets no more than that to hold."""
    taken: list[int] = []

    def batches() -> Iterator[np.ndarray]:
        for index in range(100):
            taken.append(index)
            yield np.zeros((1, 28, 28), np.uint8)

    client = VaeClient(never_answering_server, retry=FAST, timeout_s=10)
    threading.Timer(0.5, client.close).start()
    with pytest.raises(VaeClientError, match="the client was closed"):
        list(client.encode_stream(batches(), max_in_flight=max_in_flight))
    assert len(taken) == max_in_flight

    async def the_async_client() -> None:
        async with AsyncVaeClient(never_answering_server, retry=FAST, timeout_s=10) as async_client:
            stream = async_client.encode_stream(batches(), max_in_flight=max_in_flight)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(stream), 0.5)

    taken.clear()
    asyncio.run(the_async_client())
    assert len(taken) == max_in_flight


class Interrupted(KeyboardInterrupt):
    """What the test's own SIGINT handler raises: a Ctrl-C, told apart from one meant for pytest."""


def test_a_ctrl_c_while_a_stream_waits_for_its_answer_is_raised_outside_grpcs_code(
    never_answering_server: str,
) -> None:
    """Raised inside gRPC's locks, it left them held or released twice: about one stopped vae-encode-job
    in twenty hung for good (or ended with "cannot release un-acquired lock")."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    client = VaeClient(never_answering_server, retry=FAST, timeout_s=10)
    previous = signal.signal(signal.SIGINT, interrupt)
    ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    try:
        ctrl_c.start()
        with pytest.raises(Interrupted) as interrupted:
            list(client.encode_stream([np.zeros((1, 28, 28), np.uint8)]))
    finally:
        ctrl_c.cancel()
        ctrl_c.join()
        signal.signal(signal.SIGINT, previous)
        client.close()
    frames = [entry.path for entry in interrupted.traceback]
    assert not [path for path in frames if "grpc" in Path(path).parts], frames


def test_a_stream_that_makes_progress_between_failures_is_not_given_up_on() -> None:
    """max_attempts counts failures in a row: each call here gives one more chunk, then breaks."""
    calls: list[int] = []

    def one_more_chunk_each_call(request: vae_pb2.SampleRequest, context: grpc.ServicerContext) -> Any:
        calls.append(1)
        chunk = request.chunk_size or 2
        for offset in range(0, min(len(calls) * chunk, request.num_samples), chunk):
            yield vae_pb2.SampleResponse(
                images=codec.to_tensor(np.zeros((chunk, 1, 28, 28), np.uint8)),
                latents=codec.to_tensor(np.zeros((chunk, 2), np.float32)),
                seed=request.seed,
                offset=offset,
            )
        if len(calls) * chunk < request.num_samples:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")

    with (
        serving_sample_stream(one_more_chunk_each_call) as target,
        VaeClient(target, retry=FAST, timeout_s=5) as client,
    ):
        offsets = [chunk.offset for chunk in client.sample_stream(10, chunk_size=2, seed=7)]
    assert offsets == [0, 2, 4, 6, 8]  # five calls, four failures: more than FAST's 3 attempts
    assert client.retries == 4


def test_a_refused_request_of_a_stream_opened_again_is_numbered_among_the_callers_batches() -> None:
    """After a break the new stream carries the batches not yet answered, which the server numbers from 0."""
    refused = VaeClientError(
        "EncodeStream",
        grpc.StatusCode.INVALID_ARGUMENT,
        "the stream's request 3 (counting from 0): images: contains NaN or Inf",
        attempts=2,
    )
    renumbered = _numbered_as_the_callers(refused, first=17)
    assert renumbered.details == "the stream's request 20 (counting from 0): images: contains NaN or Inf"
    assert (renumbered.rpc, renumbered.code, renumbered.attempts) == ("EncodeStream", refused.code, 2)
    assert _numbered_as_the_callers(refused, first=0) is refused
    other = VaeClientError("EncodeStream", grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
    assert _numbered_as_the_callers(other, first=17) is other


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((("Authorization", "Bearer x"),), "metadata key 'Authorization': expected lowercase letters"),
        ((("grpc-timeout", "1S"),), "not starting with 'grpc-'"),
        ((("trace-bin", "00"),), "metadata 'trace-bin': a key ending in -bin takes bytes"),
        (
            (("authorization", "Bearer \u00e9"),),
            "metadata 'authorization': expected a value of printable ASCII",
        ),
        ((("authorization", "Bearer x\n"),), "metadata 'authorization': expected a value of printable ASCII"),
        ({"authorization": "Bearer x"}, "metadata: expected (key, value) pairs"),
        (("authorization", "Bearer x"), "metadata: expected (key, value) pairs"),
    ],
)
@pytest.mark.parametrize("client_class", [VaeClient, AsyncVaeClient])
def test_metadata_that_grpc_would_refuse_at_the_first_call_is_refused_at_once_naming_the_key(
    client_class: Any, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        client_class("127.0.0.1:1", metadata=metadata)
    assert "Bearer" not in str(error.value)  # a value may be a credential


def test_the_server_takes_the_clients_keepalive_pings_on_a_quiet_call() -> None:
    """Pings more often than the server allows are strikes: GOAWAY, and every call on the connection
    fails UNAVAILABLE (an EncodeStream whose source paused for two minutes)."""
    client = dict(_ClientState("t", None, None, FAST, (), 1).options())
    server = dict(grpc_options(Settings(model_dir=Path("bundle"))))
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]


def test_metadata_of_lowercase_keys_ascii_values_and_binary_values_under_bin_keys_is_taken() -> None:
    metadata = (("authorization", "Bearer x.y-z"), ("x-request_id.1", "7"), ("trace-bin", b"\0\1"))
    with VaeClient("127.0.0.1:1", metadata=metadata):
        pass
