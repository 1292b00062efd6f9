"""Every RPC of vae.v1.VaeService, through the generated stubs, against the real server."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

import service.servicer
from service import codec
from tests.conftest import ServerThread
from tests.integration.service.conftest import (
    StartServer,
    decoder_batches,
    held_decoder,
    held_inference,
    occupy_decoder,
    start_busy_server,
    wait_for_queue_depth,
)
from vae.v1 import vae_pb2, vae_pb2_grpc


def array(tensor: vae_pb2.Tensor) -> np.ndarray:
    return codec.from_tensor(tensor, "response")


def digits(stub: vae_pb2_grpc.VaeServiceStub, count: int) -> np.ndarray:
    """Some images the model can encode: its own samples."""
    return array(stub.Sample(vae_pb2.SampleRequest(num_samples=count, seed=99)).images)


def queue_depth(server: ServerThread, graph: str) -> float:
    """Rows waiting in the graph's queue, as the server's gauge reads."""
    return server.metrics.registry.get_sample_value("vae_queue_depth", {"graph": graph}) or 0.0


def test_model_info_describes_the_bundle(stub: vae_pb2_grpc.VaeServiceStub, vae_bundle: Path) -> None:
    spec = json.loads((vae_bundle / "model.json").read_text())
    info = stub.GetModelInfo(vae_pb2.GetModelInfoRequest())
    assert (info.name, info.version, info.kind, info.latent_dim) == ("tiny-vae", spec["version"], "vae", 2)
    assert list(info.image_shape) == [1, 28, 28]
    assert info.execution_provider == "CPUExecutionProvider"
    assert (info.max_batch_size, info.max_samples, info.max_request_rows) == (16, 1024, 4096)
    assert info.encoder_sha256 == spec["graphs"]["encoder"]["sha256"]
    assert info.decoder_sha256 == spec["graphs"]["decoder"]["sha256"]
    assert info.decoder_precision == "float32"


def test_sample_is_the_decoder_applied_to_seeded_pcg64_normals(
    stub: vae_pb2_grpc.VaeServiceStub, vae_bundle: Path
) -> None:
    response = stub.Sample(vae_pb2.SampleRequest(num_samples=5, seed=42, temperature=0.5))
    latents = array(response.latents)
    expected_z = np.random.Generator(np.random.PCG64(42)).standard_normal((5, 2), dtype=np.float32)
    np.testing.assert_array_equal(latents, expected_z * np.float32(0.5))
    session = ort.InferenceSession(str(vae_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    (expected_images,) = session.run(None, {"z": latents})
    images = array(response.images)
    assert images.shape == (5, 1, 28, 28) and images.dtype == np.float32
    np.testing.assert_allclose(images, expected_images, atol=1e-6)
    assert response.seed == 42


def test_the_same_seed_gives_byte_identical_images_even_amid_other_traffic(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """Requests that share one onnxruntime call, each at its own offset in it, get the very bytes that
    each gets in a call of its own."""
    server = start_busy_server(vae_bundle, start_server_thread)
    seeded = vae_pb2.SampleRequest(num_samples=37, seed=1234)
    others = [vae_pb2.SampleRequest(num_samples=n, seed=n) for n in (3, 100, 250, 7)]
    requests = [others[0], seeded, others[1], seeded, others[2], seeded, others[3]]
    rows = sum(request.num_samples for request in requests)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        alone = [stub.Sample(request, timeout=30).images.data for request in requests]  # a call each
        with held_decoder(server):
            busy = occupy_decoder(server, stub)
            calls_before, rows_before = decoder_batches(server)
            amid = [stub.Sample.future(request, timeout=30) for request in requests]
            wait_for_queue_depth(server, rows)  # all of them wait behind the held call
        busy.result(timeout=30)
        shared = [call.result(timeout=30).images.data for call in amid]
        calls, rows_run = decoder_batches(server)
        different_seed = stub.Sample(vae_pb2.SampleRequest(num_samples=37, seed=1235), timeout=30)
    assert (calls - calls_before, rows_run - rows_before) == (1, rows)  # seven requests, one call
    for request, answer, answer_alone in zip(requests, shared, alone, strict=True):
        assert answer == answer_alone, f"Sample of {request.num_samples} with seed {request.seed}"
    assert alone[1] == alone[3] == alone[5]  # `seeded`, sent three times
    assert different_seed.images.data != alone[1]


def test_the_same_seed_gives_the_same_bytes_on_another_replica(
    stub: vae_pb2_grpc.VaeServiceStub, vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    request = vae_pb2.SampleRequest(num_samples=20, seed=2024, temperature=0.7)
    with grpc.insecure_channel(start_server_thread(vae_bundle).target) as channel:
        other = vae_pb2_grpc.VaeServiceStub(channel).Sample(request)
    here = stub.Sample(request)
    assert (other.latents.data, other.images.data) == (here.latents.data, here.images.data)


def test_an_unset_or_zero_temperature_samples_the_prior_itself(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    unset = stub.Sample(vae_pb2.SampleRequest(num_samples=5, seed=42))
    expected_z = np.random.Generator(np.random.PCG64(42)).standard_normal((5, 2), dtype=np.float32)
    np.testing.assert_array_equal(array(unset.latents), expected_z)  # temperature 1
    zero = stub.Sample(vae_pb2.SampleRequest(num_samples=5, seed=42, temperature=0.0))
    assert (zero.latents.data, zero.images.data) == (unset.latents.data, unset.images.data)


def test_without_a_seed_the_server_picks_one_that_repeats_the_call(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    first = stub.Sample(vae_pb2.SampleRequest(num_samples=4))
    second = stub.Sample(vae_pb2.SampleRequest(num_samples=4))
    assert first.seed != second.seed and first.images.data != second.images.data
    repeated = stub.Sample(vae_pb2.SampleRequest(num_samples=4, seed=first.seed))
    assert repeated.images.data == first.images.data


def test_a_smaller_sample_of_a_seed_is_the_start_of_a_larger_one(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    """z is drawn row after row, and each row's image does not depend on the others."""
    five = stub.Sample(vae_pb2.SampleRequest(num_samples=5, seed=8))
    two = stub.Sample(vae_pb2.SampleRequest(num_samples=2, seed=8))
    assert two.latents.data == five.latents.data[: 2 * 2 * 4]  # float32 bytes: [2, D=2]
    assert two.images.data == five.images.data[: 2 * 28 * 28 * 4]


def test_seed_zero_is_a_seed_like_any_other(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    zero = stub.Sample(vae_pb2.SampleRequest(num_samples=4, seed=0))
    assert zero.seed == 0
    assert stub.Sample(vae_pb2.SampleRequest(num_samples=4, seed=0)).images.data == zero.images.data


def test_uint8_output_is_the_rounded_float_output(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    floats = array(stub.Sample(vae_pb2.SampleRequest(num_samples=6, seed=5)).images)
    as_bytes = stub.Sample(vae_pb2.SampleRequest(num_samples=6, seed=5, output_dtype=codec.UINT8)).images
    assert as_bytes.dtype == codec.UINT8
    assert len(as_bytes.data) == 6 * 28 * 28
    np.testing.assert_array_equal(array(as_bytes), np.rint(floats * 255).astype(np.uint8))


def test_a_sample_larger_than_the_batch_is_served_whole(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    response = stub.Sample(vae_pb2.SampleRequest(num_samples=600, seed=3, output_dtype=codec.UINT8))
    assert list(response.images.shape) == [600, 1, 28, 28]
    again = stub.Sample(vae_pb2.SampleRequest(num_samples=600, seed=3, output_dtype=codec.UINT8))
    assert again.images.data == response.images.data


def test_num_samples_from_one_up_to_the_advertised_limit_is_served(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    limit = stub.GetModelInfo(vae_pb2.GetModelInfoRequest()).max_samples
    for count in (1, limit):  # the edges of "expected 1 to <limit>" (tested refused one beyond)
        response = stub.Sample(vae_pb2.SampleRequest(num_samples=count, seed=4, output_dtype=codec.UINT8))
        assert list(response.images.shape) == [count, 1, 28, 28]


def test_sample_stream_chunks_concatenate_to_the_unary_answer(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    request = vae_pb2.SampleRequest(num_samples=250, seed=8, chunk_size=64, output_dtype=codec.UINT8)
    unary = stub.Sample(request)
    chunks = list(stub.SampleStream(request))
    assert [c.offset for c in chunks] == [0, 64, 128, 192]
    assert [c.images.shape[0] for c in chunks] == [64, 64, 64, 58]
    assert all(c.seed == 8 for c in chunks)
    assert b"".join(c.images.data for c in chunks) == unary.images.data
    assert b"".join(c.latents.data for c in chunks) == unary.latents.data


def test_sample_stream_picks_a_seed_and_defaults_to_batch_sized_chunks(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    chunks = list(stub.SampleStream(vae_pb2.SampleRequest(num_samples=40)))
    assert [c.images.shape[0] for c in chunks] == [16, 16, 8]
    assert chunks[0].seed != 0 and chunks[0].seed == chunks[1].seed == chunks[2].seed


def test_a_sample_stream_decodes_at_most_two_chunks_ahead_of_the_one_it_sends(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """A Sample of 64 images in chunks of 4 gives the decoder two chunks at a time, not sixteen: a
    client that reads slowly holds no more of the server's work than that, and other calls get the
    decoder between its chunks."""
    server = start_server_thread(vae_bundle, max_concurrent_batches=1)
    request = vae_pb2.SampleRequest(num_samples=64, seed=3, chunk_size=4, output_dtype=codec.UINT8)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        with held_decoder(server):
            chunks = stub.SampleStream(request, timeout=60)
            deadline = time.monotonic() + 30
            while decoder_batches(server)[0] < 1:
                assert time.monotonic() < deadline, "the decoder never took the stream's first chunks"
                time.sleep(0.005)
            looked_until = time.monotonic() + 0.3  # all sixteen chunks would be in the decoder by now
            while time.monotonic() < looked_until:
                rows_taken = decoder_batches(server)[1] + queue_depth(server, "decoder")
                assert rows_taken <= 2 * 4, f"{rows_taken} rows of the stream in the decoder"
                time.sleep(0.01)
        assert [chunk.offset for chunk in chunks] == list(range(0, 64, 4))


def test_encode_gives_the_posterior_of_each_image(
    stub: vae_pb2_grpc.VaeServiceStub, vae_bundle: Path
) -> None:
    images = digits(stub, 9)
    response = stub.Encode(vae_pb2.EncodeRequest(images=codec.to_tensor(images)))
    session = ort.InferenceSession(str(vae_bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
    mean, log_var = session.run(None, {"images": images})
    np.testing.assert_allclose(array(response.mean), mean, atol=1e-6)
    np.testing.assert_allclose(array(response.log_var), log_var, atol=1e-6)


def test_encode_takes_uint8_and_unbatched_channel_layouts(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    images = np.rint(digits(stub, 4) * 255).astype(np.uint8)
    from_bytes = stub.Encode(vae_pb2.EncodeRequest(images=codec.to_tensor(images.reshape(4, 28, 28))))
    from_floats = stub.Encode(vae_pb2.EncodeRequest(images=codec.to_tensor(images.astype(np.float32) / 255)))
    assert list(from_bytes.mean.shape) == [4, 2]
    np.testing.assert_allclose(array(from_bytes.mean), array(from_floats.mean), atol=1e-5)


def test_decode_returns_one_image_per_code_in_either_dtype(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    sample = stub.Sample(vae_pb2.SampleRequest(num_samples=3, seed=11))
    decoded = stub.Decode(vae_pb2.DecodeRequest(latents=sample.latents))
    assert decoded.images.data == sample.images.data
    as_bytes = stub.Decode(vae_pb2.DecodeRequest(latents=sample.latents, output_dtype=codec.UINT8))
    assert list(as_bytes.images.shape) == [3, 1, 28, 28] and as_bytes.images.dtype == codec.UINT8


def test_encode_and_decode_name_the_graph_that_answered_in_their_trailing_metadata(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    """A client that stores codes checks which encoder made them, and which decoder drew its images:
    each RPC names its own graph's sha256, as GetModelInfo does."""
    info = stub.GetModelInfo(vae_pb2.GetModelInfoRequest())
    assert info.encoder_sha256 != info.decoder_sha256
    sample = stub.Sample(vae_pb2.SampleRequest(num_samples=2, seed=1))
    _, encoded = stub.Encode.with_call(vae_pb2.EncodeRequest(images=sample.images), timeout=30)
    _, decoded = stub.Decode.with_call(vae_pb2.DecodeRequest(latents=sample.latents), timeout=30)
    assert dict(encoded.trailing_metadata()).get(codec.ENCODER_SHA256_METADATA) == info.encoder_sha256
    assert dict(decoded.trailing_metadata()).get(codec.DECODER_SHA256_METADATA) == info.decoder_sha256


def test_encode_stream_answers_every_request_in_order(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    batches = [
        digits(stub, 20)[i : i + size] for i, size in ((0, 1), (1, 5), (6, 2), (8, 12), (3, 3), (0, 20))
    ]
    expected = [stub.Encode(vae_pb2.EncodeRequest(images=codec.to_tensor(b))).mean.data for b in batches]
    requests = (vae_pb2.EncodeRequest(images=codec.to_tensor(b)) for b in batches)
    answers = list(stub.EncodeStream(requests))
    assert [a.mean.data for a in answers] == expected


def test_a_stream_of_requests_larger_than_a_share_of_the_queue_is_not_refused_on_an_idle_server(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    """Four requests of 40 rows in flight would be 160 rows in a queue of 64: the stream's own
    lookahead must not fill the queue."""
    server = start_server_thread(vae_bundle, max_queue_size=64, max_samples=64)
    with grpc.insecure_channel(server.target) as channel:
        small = vae_pb2_grpc.VaeServiceStub(channel)
        images = digits(small, 40)
        requests = [vae_pb2.EncodeRequest(images=codec.to_tensor(images))] * 6
        answers = list(small.EncodeStream(iter(requests), timeout=60))
    assert len(answers) == 6 and len({a.mean.data for a in answers}) == 1


def test_an_encode_stream_is_read_at_most_four_requests_ahead_of_its_answers(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    """docs/api.md: a client may send as fast as it likes; the server holds no more than 4 of its requests."""
    server = start_server_thread(vae_bundle)
    encoder = server.server.model.encoder  # type: ignore[union-attr]
    release, submitted = threading.Event(), []
    infer, submit = encoder._infer, encoder.submit

    def held(rows: np.ndarray) -> Any:
        release.wait(30)
        return infer(rows)

    async def counted(rows: np.ndarray, deadline: float | None = None) -> Any:
        submitted.append(len(rows))
        return await submit(rows, deadline)

    encoder._infer, encoder.submit = held, counted  # type: ignore[method-assign]
    request = vae_pb2.EncodeRequest(images=codec.to_tensor(np.zeros((1, 28, 28), np.uint8)))
    try:
        with grpc.insecure_channel(server.target) as channel:
            answers = vae_pb2_grpc.VaeServiceStub(channel).EncodeStream(iter([request] * 10), timeout=60)
            deadline = time.monotonic() + 30
            while len(submitted) < 4:
                assert time.monotonic() < deadline, f"only {len(submitted)} requests reached the encoder"
                time.sleep(0.01)
            time.sleep(0.5)  # the other six have arrived by now, and wait unread
            assert len(submitted) == 4
            release.set()
            assert len(list(answers)) == 10
    finally:
        release.set()


def test_an_encode_stream_holds_at_most_a_quarter_of_the_encoders_queue_in_rows(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """Its four requests of lookahead would be 400 rows: the stream takes 256 (a quarter of 1,024), so
    that a job's big requests leave room for everyone else's and are never refused for a queue that
    they alone filled."""
    server = start_server_thread(
        vae_bundle, max_queue_size=1024, max_batch_size=100, max_concurrent_batches=1
    )
    request = vae_pb2.EncodeRequest(images=codec.to_tensor(np.zeros((100, 28, 28), np.uint8)))
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        with held_inference(server, "encoder"):
            answers = stub.EncodeStream(iter([request] * 4), timeout=60)
            # The first request runs (held); the second waits in the queue; the third would make 300.
            deadline = time.monotonic() + 30
            while queue_depth(server, "encoder") < 100:
                assert time.monotonic() < deadline, "the second request never reached the queue"
                time.sleep(0.005)
            time.sleep(0.5)  # the other two have arrived by now, and wait unread
            assert queue_depth(server, "encoder") == 100
        assert [list(answer.mean.shape) for answer in answers] == [[100, 2]] * 4


def test_a_request_of_max_request_rows_float32_images_is_received_whatever_the_queue_size(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    """11,000 FLOAT32 images are 34.5 MB: more than the default message limit of 32 MiB."""
    rows = 11_000
    server = start_server_thread(vae_bundle, max_queue_size=rows)
    images = np.random.default_rng(0).random((rows, 1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        big = vae_pb2_grpc.VaeServiceStub(channel)
        assert big.GetModelInfo(vae_pb2.GetModelInfoRequest()).max_request_rows == rows
        answer = big.Encode(vae_pb2.EncodeRequest(images=codec.to_tensor(images)), timeout=120)
    assert array(answer.mean).shape[0] == rows


def test_an_ae_bundle_encodes_to_mean_alone_and_the_server_warns_that_its_samples_are_poor(
    ae_bundle: Path, start_server_thread: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server_thread(ae_bundle)
    assert "Sample decodes z ~ N(0, I), a prior the AE was never trained on" in caplog.text
    with grpc.insecure_channel(server.target) as channel:
        ae = vae_pb2_grpc.VaeServiceStub(channel)
        assert ae.GetModelInfo(vae_pb2.GetModelInfoRequest()).kind == "ae"
        images = array(ae.Sample(vae_pb2.SampleRequest(num_samples=2, seed=1)).images)
        response = ae.Encode(vae_pb2.EncodeRequest(images=codec.to_tensor(images)))
        assert list(response.mean.shape) == [2, 2]
        assert not response.HasField("log_var")


def test_an_int8_decoder_is_served_and_says_so(
    int8_vae_bundle: Path, stub: vae_pb2_grpc.VaeServiceStub, start_server_thread: Callable[..., ServerThread]
) -> None:
    server = start_server_thread(int8_vae_bundle)
    with grpc.insecure_channel(server.target) as channel:
        int8 = vae_pb2_grpc.VaeServiceStub(channel)
        assert int8.GetModelInfo(vae_pb2.GetModelInfoRequest()).decoder_precision == "int8-static"
        request = vae_pb2.SampleRequest(num_samples=64, seed=5)
        int8_sample, float_sample = int8.Sample(request), stub.Sample(request)
        # Chunks of one image, in calls of one to a few rows: still the same bytes as in calls of 16.
        chunks = int8.SampleStream(vae_pb2.SampleRequest(num_samples=64, seed=5, chunk_size=1))
        one_by_one = np.concatenate([array(chunk.images) for chunk in chunks])
    np.testing.assert_array_equal(one_by_one, array(int8_sample.images))
    # The same z, decoded by the float32 decoder and by its int8 version.
    assert int8_sample.latents == float_sample.latents
    drift = np.abs(array(int8_sample.images) - array(float_sample.images))
    assert 0 < drift.max() < 0.5


def test_encode_stream_answers_a_client_that_waits_for_each_answer(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    """Ping-pong: the next request is sent only after the previous answer arrived."""
    images = digits(stub, 3)
    answered: queue.Queue[vae_pb2.EncodeResponse] = queue.Queue()

    def requests() -> Iterator[vae_pb2.EncodeRequest]:
        for i in range(3):
            if i:
                answered.get(timeout=30)
            yield vae_pb2.EncodeRequest(images=codec.to_tensor(images[i : i + 1]))

    count = 0
    for response in stub.EncodeStream(requests(), timeout=30):
        answered.put(response)
        count += 1
    assert count == 3


def test_an_encode_stream_answered_in_full_ends_ok_even_where_its_deadline_is_near(
    stub: vae_pb2_grpc.VaeServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream's wait at its end for a late cancel (made long here) stops short of the deadline."""
    monkeypatch.setattr(service.servicer, "CANCEL_SETTLE_S", 30.0)
    images = digits(stub, 2)
    call = stub.EncodeStream(iter([vae_pb2.EncodeRequest(images=codec.to_tensor(images))] * 2), timeout=1.5)
    assert len(list(call)) == 2
    assert call.code() == grpc.StatusCode.OK
