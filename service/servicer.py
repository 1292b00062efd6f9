"""vae.v1.VaeService on grpc.aio: requests -> arrays -> the model -> responses.

Each method is thin: it decodes tensors with the codec, awaits one call of the model, and builds the
response. Domain errors become status codes in one table, `STATUS_CODES`, applied by `_observe` and
`_observe_stream`, which wrap every method and also record the request metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from service import codec
from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded, ServiceError
from service.metrics import ServiceMetrics
from service.model import EXPECTED_IMAGE_SHAPES, VaeModel, checked_latents, deadline_after, images_to_float
from vae.v1 import vae_pb2, vae_pb2_grpc

log = logging.getLogger(__name__)

# The one place where domain errors meet gRPC.
STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# EncodeStream: how many requests of one stream may be in the batcher at once, so that a fast
# client cannot queue without bound, while a few in flight still fill batches.
ENCODE_STREAM_LOOKAHEAD = 4
# And at most this fraction of the encoder's queue in rows (a larger request runs alone): a stream
# of big requests must not fill the queue, and be refused, by itself.
ENCODE_STREAM_QUEUE_FRACTION = 0.25
# SampleStream: chunks being decoded ahead of the one being sent.
SAMPLE_STREAM_LOOKAHEAD = 2
# How long an EncodeStream whose requests have ended waits for gRPC to say that its client cancelled.
CANCEL_SETTLE_S = 0.002

# Every status a call of this service ends with. Each (rpc, code) series of vae_requests_total, and each
# RPC's series of vae_items_total and vae_request_duration_seconds, exists from the start at 0, because
# Prometheus's rate() and increase() take a series' first sample as their base: a count born at 1 would
# be lost, so a replica's first burst of errors would fire no alert, and its first images count none.
ANSWERED_CODES = (
    grpc.StatusCode.OK,
    *STATUS_CODES.values(),
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
)

# The RPCs that carry images or latent codes, counted in vae_items_total.
ITEM_RPCS = ("Encode", "Decode", "Sample", "EncodeStream", "SampleStream")

Request = TypeVar("Request")
Response = TypeVar("Response")
SHUTTING_DOWN = "the server is shutting down; retry on another replica"


def status_code_of(error: ServiceError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        code = STATUS_CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    """The six RPCs of the contract; refuses requests (UNAVAILABLE) until a model is attached, and
    again once draining starts."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.model: VaeModel | None = None
        self._draining = asyncio.Event()
        # Set when a drain's grace period has run out: gRPC cuts what still runs, with UNAVAILABLE.
        self.grace_over = False
        self.metrics = metrics
        for rpc in vae_pb2.DESCRIPTOR.services_by_name["VaeService"].methods_by_name:
            metrics.request_duration.labels(rpc)
            for code in ANSWERED_CODES:
                metrics.requests.labels(rpc, code.name)
        for rpc in ITEM_RPCS:
            metrics.items.labels(rpc)
        # Calls being answered: a drain waits for them before gRPC closes the connections.
        self._calls = 0
        self._no_calls = asyncio.Event()
        self._no_calls.set()

    def attach(self, model: VaeModel) -> None:
        self.model = model

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def start_draining(self) -> None:
        """From now on new requests get UNAVAILABLE, and so does a stream waiting for its next one."""
        self._draining.set()

    async def wait_until_idle(self) -> None:
        """Return once no call is being answered."""
        await self._no_calls.wait()

    def _call_began(self) -> None:
        self._calls += 1
        self._no_calls.clear()

    def _call_ended(self) -> None:
        self._calls -= 1
        if self._calls == 0:
            self._no_calls.set()

    def _ready_model(self) -> VaeModel:
        if self.draining:
            raise ModelNotReady(SHUTTING_DOWN)
        if self.model is None:
            raise ModelNotReady("the model is still loading; retry shortly")
        return self.model

    def _count_items(self, rpc: str, count: int) -> None:
        self.metrics.items.labels(rpc).inc(count)

    # --- unary -----------------------------------------------------------------------------------

    async def Encode(  # noqa: N802 (gRPC's method names)
        self, request: vae_pb2.EncodeRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> vae_pb2.EncodeResponse:
        return await _observe(self, "Encode", context, self._encode(request, context), vae_pb2.EncodeResponse)

    async def _encode(
        self, request: vae_pb2.EncodeRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> vae_pb2.EncodeResponse:
        model = self._ready_model()
        images = _images_of(_parsed(request))
        encoding = await model.encode(images, deadline_after(context.time_remaining()))
        self._count_items("Encode", len(images))
        context.set_trailing_metadata(((codec.ENCODER_SHA256_METADATA, model.spec.encoder.sha256),))
        return _encode_response(encoding.mean, encoding.log_var)

    async def Decode(  # noqa: N802
        self, request: vae_pb2.DecodeRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> vae_pb2.DecodeResponse:
        return await _observe(self, "Decode", context, self._decode(request, context), vae_pb2.DecodeResponse)

    async def _decode(
        self, request: vae_pb2.DecodeRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> vae_pb2.DecodeResponse:
        model = self._ready_model()
        request = _parsed(request)
        codec.check_output_dtype(request.output_dtype)
        if not request.HasField("latents"):
            raise InvalidInput(f"latents: missing; expected a FLOAT32 Tensor [N, {model.spec.latent_dim}]")
        latents = checked_latents(
            codec.from_tensor(
                request.latents, "latents", f"[N, {model.spec.latent_dim}]", dtypes=(codec.FLOAT32,)
            ),
            model.spec.latent_dim,
        )
        images = await model.decode(latents, deadline_after(context.time_remaining()))
        self._count_items("Decode", len(latents))
        context.set_trailing_metadata(((codec.DECODER_SHA256_METADATA, model.spec.decoder.sha256),))
        return vae_pb2.DecodeResponse(images=_images_tensor(images, request.output_dtype))

    async def Sample(  # noqa: N802
        self, request: vae_pb2.SampleRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> vae_pb2.SampleResponse:
        return await _observe(self, "Sample", context, self._sample(request, context), vae_pb2.SampleResponse)

    async def _sample(
        self, request: vae_pb2.SampleRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> vae_pb2.SampleResponse:
        model = self._ready_model()
        request = _parsed(request)
        codec.check_output_dtype(request.output_dtype)
        samples = await model.sample(
            request.num_samples,
            _seed_of(request),
            request.temperature,
            deadline_after(context.time_remaining()),
        )
        self._count_items("Sample", len(samples.images))
        return vae_pb2.SampleResponse(
            images=_images_tensor(samples.images, request.output_dtype),
            latents=codec.to_tensor(samples.latents),
            seed=samples.seed,
        )

    async def GetModelInfo(  # noqa: N802
        self, request: vae_pb2.GetModelInfoRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> vae_pb2.ModelInfo:
        return await _observe(self, "GetModelInfo", context, self._model_info(request), vae_pb2.ModelInfo)

    async def _model_info(self, request: vae_pb2.GetModelInfoRequest | Malformed) -> vae_pb2.ModelInfo:
        model = self._ready_model()
        _parsed(request)
        spec = model.spec
        return vae_pb2.ModelInfo(
            name=spec.name,
            version=spec.version,
            kind=spec.kind,
            latent_dim=spec.latent_dim,
            image_shape=spec.image_shape,
            execution_provider=model.execution_provider,
            max_batch_size=model.batching.max_batch_size,
            max_samples=model.batching.max_samples,
            encoder_sha256=spec.encoder.sha256,
            decoder_sha256=spec.decoder.sha256,
            decoder_precision=spec.decoder.precision,
            max_request_rows=model.encoder.max_queue_size,
        )

    # --- streams ---------------------------------------------------------------------------------

    async def EncodeStream(  # noqa: N802
        self,
        request_iterator: AsyncIterable[vae_pb2.EncodeRequest | Malformed],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vae_pb2.EncodeResponse]:
        async for response in _observe_stream(
            self, "EncodeStream", context, self._encode_stream(request_iterator, context)
        ):
            yield response

    async def _encode_stream(
        self,
        request_iterator: AsyncIterable[vae_pb2.EncodeRequest | Malformed],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vae_pb2.EncodeResponse]:
        model = self._ready_model()
        # Before any answer: which encoder made them (a job checks it after every reconnect).
        await context.send_initial_metadata(((codec.ENCODER_SHA256_METADATA, model.spec.encoder.sha256),))

        async def encode(index: int, images: np.ndarray[Any, np.dtype[np.float32]]) -> vae_pb2.EncodeResponse:
            with _naming_the_request(index):
                encoding = await model.encode(images, deadline_after(context.time_remaining()))
            self._count_items("EncodeStream", len(images))
            return _encode_response(encoding.mean, encoding.log_var)

        async def calls() -> AsyncIterator[tuple[int, Callable[[], Awaitable[vae_pb2.EncodeResponse]]]]:
            requests = aiter(request_iterator)
            index = 0
            while (request := await self._next_unless_draining(requests)) is not None:
                with _naming_the_request(index):
                    images = _images_of(_parsed(request))
                yield len(images), functools.partial(encode, index, images)
                index += 1

        max_rows = int(model.encoder.max_queue_size * ENCODE_STREAM_QUEUE_FRACTION)
        async for response in _in_order(calls(), ENCODE_STREAM_LOOKAHEAD, max_rows):
            yield response
        await self._let_a_cancel_settle(context)

    async def _let_a_cancel_settle(self, context: grpc.aio.ServicerContext) -> None:
        """grpc.aio ends the requests of a call its client cancelled as it ends those of a client that
        finished sending, and cancels the handler only a moment later: wait that moment, or a cancelled
        stream with nothing left to answer would be counted OK. Never into the client's deadline, nor
        once a drain began (its grace period may be short), which would fail a stream answered in full."""
        wait = CANCEL_SETTLE_S
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, remaining - DEADLINE_SLACK_S)
        if wait > 0 and not self.draining:
            await asyncio.sleep(wait)

    async def _next_unless_draining(self, requests: AsyncIterator[Request]) -> Request | None:
        """A stream's next request, None at its end, or ModelNotReady once draining starts, even while
        it waits: the drain answers what is in flight and sends the rest elsewhere, instead of being
        held open for its whole grace period by a job's stream that has nothing more to send yet."""
        if self.draining:
            raise ModelNotReady(SHUTTING_DOWN)
        next_request = asyncio.ensure_future(anext(requests, None))
        drain = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait((next_request, drain), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            next_request.cancel()
            raise
        finally:
            drain.cancel()
        if not next_request.done():  # the drain came first
            next_request.cancel()
            raise ModelNotReady(SHUTTING_DOWN)
        return next_request.result()

    async def SampleStream(  # noqa: N802
        self, request: vae_pb2.SampleRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vae_pb2.SampleResponse]:
        async for response in _observe_stream(
            self, "SampleStream", context, self._sample_stream(request, context)
        ):
            yield response

    async def _sample_stream(
        self, request: vae_pb2.SampleRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vae_pb2.SampleResponse]:
        model = self._ready_model()
        # Before any answer: which decoder made them (a resumed stream must continue on the same one).
        await context.send_initial_metadata(((codec.DECODER_SHA256_METADATA, model.spec.decoder.sha256),))
        request = _parsed(request)
        codec.check_output_dtype(request.output_dtype)
        # Drawn whole and then cut, so the chunks concatenate to exactly the unary Sample's answer.
        latents, used_seed = model.sample_latents(request.num_samples, _seed_of(request), request.temperature)
        chunk = request.chunk_size or model.batching.max_batch_size
        deadline = deadline_after(context.time_remaining())

        async def decode(offset: int) -> vae_pb2.SampleResponse:
            z = latents[offset : offset + chunk]
            images = await model.decode(z, deadline)
            self._count_items("SampleStream", len(z))
            return vae_pb2.SampleResponse(
                images=_images_tensor(images, request.output_dtype),
                latents=codec.to_tensor(z),
                seed=used_seed,
                offset=offset,
            )

        async def chunks() -> AsyncIterator[tuple[int, Callable[[], Awaitable[vae_pb2.SampleResponse]]]]:
            for offset in range(0, len(latents), chunk):
                yield len(latents[offset : offset + chunk]), functools.partial(decode, offset)

        # Bounded by the lookahead alone: a Sample, all its chunks together, fits the queue.
        async for response in _in_order(chunks(), SAMPLE_STREAM_LOOKAHEAD, model.decoder.max_queue_size):
            yield response


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse, handed to its method (see `add_to_server`), so that it
    is refused as bad input, INVALID_ARGUMENT, and counted, as any other."""

    message: str
    error: str


def _parsed(request: Request | Malformed) -> Request:
    if isinstance(request, Malformed):
        raise InvalidInput(f"the request is not a valid {request.message} message ({request.error})")
    return request


def _parse_as(message: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message.FromString(data)
        except DecodeError as error:
            return Malformed(message.DESCRIPTOR.full_name, str(error))

    return parse


# Each RPC's handler kind, by whether its requests and its responses stream.
_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: VaeServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` as the generated `add_VaeServiceServicer_to_server` does, except that a
    request that does not parse reaches its method as Malformed. (Where gRPC parses it, the call
    ends UNKNOWN, with a traceback in the log, before the method could count it.)"""
    service = vae_pb2.DESCRIPTOR.services_by_name["VaeService"]
    handlers = {}
    for method in service.methods:
        request: type[Message] = getattr(vae_pb2, method.input_type.name)
        response: type[Message] = getattr(vae_pb2, method.output_type.name)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_parse_as(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


@contextlib.contextmanager
def _naming_the_request(index: int) -> Iterator[None]:
    """A stream's request refused (bad input, a full queue), named by its place: the status ends the
    whole stream, so the client learns from it alone which request was refused (those before it are
    answered)."""
    try:
        yield
    except (InvalidInput, Overloaded) as error:
        raise type(error)(f"the stream's request {index} (counting from 0): {error}") from None


def _images_of(request: vae_pb2.EncodeRequest) -> np.ndarray[Any, np.dtype[np.float32]]:
    if not request.HasField("images"):
        raise InvalidInput(
            f"images: missing; expected a Tensor {EXPECTED_IMAGE_SHAPES} of FLOAT32 in [0,1] or UINT8"
        )
    return images_to_float(codec.from_tensor(request.images, "images", EXPECTED_IMAGE_SHAPES))


def _seed_of(request: vae_pb2.SampleRequest) -> int | None:
    return request.seed if request.HasField("seed") else None


def _images_tensor(images: np.ndarray[Any, np.dtype[np.float32]], output_dtype: int) -> vae_pb2.Tensor:
    return codec.to_tensor(codec.images_as(images, output_dtype))


def _encode_response(
    mean: np.ndarray[Any, Any], log_var: np.ndarray[Any, Any] | None
) -> vae_pb2.EncodeResponse:
    if log_var is None:
        return vae_pb2.EncodeResponse(mean=codec.to_tensor(mean))
    return vae_pb2.EncodeResponse(mean=codec.to_tensor(mean), log_var=codec.to_tensor(log_var))


async def _in_order(
    calls: AsyncIterable[tuple[int, Callable[[], Awaitable[Response]]]], lookahead: int, max_rows: int
) -> AsyncIterator[Response]:
    """Yield the calls' results in the order the calls came, as soon as each is ready.

    `calls` gives each call's rows and a function that starts it. A reader task starts them while
    fewer than `lookahead` calls, and at most `max_rows` rows, are started and not yet answered (a
    larger call starts once it would be alone). Reading and answering run concurrently, so a client
    that waits for each answer before sending its next request (ping-pong) is served as well as one
    that streams ahead.
    """
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(lookahead)
    rows = _RowBudget(max_rows)
    # Unbounded, but never holds more than `lookahead` calls: the semaphore bounds it.
    started: asyncio.Queue[tuple[int, asyncio.Future[Response]] | None] = asyncio.Queue()

    async def read() -> None:
        iterator = aiter(calls)
        try:
            while True:
                await slots.acquire()  # before reading: nothing is read or started beyond the bound
                call = await anext(iterator, None)
                if call is None:
                    break
                count, start = call
                await rows.take(count)
                started.put_nowait((count, asyncio.ensure_future(start())))
        except Exception as error:  # reading or checking the next request failed (bad input, a drain,
            # a broken stream): the answerer raises it in its turn
            failed: asyncio.Future[Response] = loop.create_future()
            failed.set_exception(error)
            started.put_nowait((0, failed))
            return
        started.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (next_call := await started.get()) is not None:
            count, future = next_call
            result = await future
            slots.release()
            rows.give(count)
            yield result
    finally:
        reader.cancel()
        while not started.empty():
            pending = started.get_nowait()
            if pending is not None:
                pending[1].cancel()


class _RowBudget:
    """The rows a stream has started and not yet answered: at most `limit`, or one call alone.
    Taken by one reader at a time, so calls start in their order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._given = asyncio.Event()

    async def take(self, rows: int) -> None:
        while self.held and self.held + rows > self.limit:
            self._given.clear()
            await self._given.wait()
        self.held += rows

    def give(self, rows: int) -> None:
        self.held -= rows
        self._given.set()


# A client cancels its call at its own deadline, which falls before the server's by the time the
# request took to arrive: a cancellation this close to the deadline is the deadline's.
DEADLINE_SLACK_S = 0.05


def code_of_cancellation(context: grpc.aio.ServicerContext, grace_over: bool = False) -> grpc.StatusCode:
    """The status to record for a call that was cut: UNAVAILABLE where a drain's grace period ended
    it (what its client sees), else DEADLINE_EXCEEDED or CANCELLED for a client that went away."""
    if grace_over:
        return grpc.StatusCode.UNAVAILABLE
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def _observe(
    servicer: VaeServicer,
    rpc: str,
    context: grpc.aio.ServicerContext,
    call: Awaitable[Response],
    response_type: Callable[[], Response],
) -> Response:
    """Await a unary call: map domain errors to status codes and record the request metrics. A
    failed call returns an empty response, which gRPC drops: the status set on the context is sent."""
    started = time.perf_counter()
    servicer._call_began()
    code: grpc.StatusCode | None = grpc.StatusCode.OK  # None: recorded already
    try:
        response = await call
        _raise_if_past_deadline(context)
        return response
    except asyncio.CancelledError:
        code = code_of_cancellation(context, servicer.grace_over)
        raise
    except Exception as error:
        code = None
        _fail(servicer, rpc, context, error, started)
        return response_type()
    finally:
        servicer._call_ended()
        if code is not None:
            _count_request(servicer, rpc, code, started)


async def _observe_stream(
    servicer: VaeServicer, rpc: str, context: grpc.aio.ServicerContext, responses: AsyncIterator[Response]
) -> AsyncGenerator[Response, None]:
    """`_observe` for a streaming call."""
    started = time.perf_counter()
    servicer._call_began()
    code: grpc.StatusCode | None = grpc.StatusCode.OK  # None: recorded already
    try:
        async for response in responses:
            yield response
        _raise_if_past_deadline(context)
    except (asyncio.CancelledError, GeneratorExit):  # the second: gRPC dropped the stream mid-answer
        code = code_of_cancellation(context, servicer.grace_over)
        raise
    except Exception as error:
        code = None
        _fail(servicer, rpc, context, error, started)
    finally:
        servicer._call_ended()
        if code is not None:
            _count_request(servicer, rpc, code, started)


def _fail(
    servicer: VaeServicer, rpc: str, context: grpc.aio.ServicerContext, error: Exception, started: float
) -> None:
    """End a failed call with its status code, counted first: a client that sees the status can
    already see it in /metrics. Errors that are not the service's own are logged, and INTERNAL.

    The status is set on the context, for gRPC to send once the handler returns, and not raised with
    `context.abort()`: gRPC keeps abort's exception, whose traceback holds the handler's frames and
    with them the request, in a reference cycle with the call's state. Only Python's rare full
    collections free those, so refused requests of 4,096 images held 12.8 MB each: 200 of them in a
    row took the server from 135 MB to 1 GB.
    """
    # Its client sees the deadline (see _raise_if_past_deadline); and what fails once gRPC has ended
    # the call (a stream's initial metadata, say) is no fault of the service's, to log as one.
    if _past_deadline(context):
        _count_request(servicer, rpc, grpc.StatusCode.DEADLINE_EXCEEDED, started)
        raise asyncio.CancelledError
    if isinstance(error, ServiceError):
        code, message = status_code_of(error), str(error)
    else:
        log.exception("%s failed", rpc, exc_info=error)
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"
    _count_request(servicer, rpc, code, started)
    context.set_code(code)
    context.set_details(message)


def _raise_if_past_deadline(context: grpc.aio.ServicerContext) -> None:
    """End a call whose deadline has passed as cancelled, counted DEADLINE_EXCEEDED, as its client sees
    it. The batcher checks deadlines only before rows run, so an answer may be ready just after:
    gRPC ends the call itself at its deadline, and an answer or status sent now would fail, which
    gRPC logs as a servicer failure, with its traceback."""
    if _past_deadline(context):
        raise asyncio.CancelledError


def _past_deadline(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _count_request(servicer: VaeServicer, rpc: str, code: grpc.StatusCode, started: float) -> None:
    metrics = servicer.metrics
    metrics.requests.labels(rpc, code.name).inc()
    metrics.request_duration.labels(rpc).observe(time.perf_counter() - started)


__all__ = ["STATUS_CODES", "Malformed", "VaeServicer", "add_to_server", "status_code_of"]
