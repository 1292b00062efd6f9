"""GET /metrics after calls: the contract's names, with the right labels."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerThread
from vae.v1 import vae_pb2, vae_pb2_grpc


def scrape(server: ServerThread) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def test_metrics_appear_with_their_labels_after_calls(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    server = start_server_thread(vae_bundle)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        sample = stub.Sample(vae_pb2.SampleRequest(num_samples=10, seed=1))
        stub.Encode(vae_pb2.EncodeRequest(images=sample.images))
        stub.Decode(vae_pb2.DecodeRequest(latents=sample.latents))
        list(stub.SampleStream(vae_pb2.SampleRequest(num_samples=5, chunk_size=2)))
        stub.GetModelInfo(vae_pb2.GetModelInfoRequest())
        with pytest.raises(grpc.RpcError):
            stub.Sample(vae_pb2.SampleRequest(num_samples=0))
    samples = scrape(server)
    info = server.server.model
    assert info is not None
    assert (
        value(
            samples,
            "vae_model_info",
            name="tiny-vae",
            version=info.spec.version,
            kind="vae",
            execution_provider="CPUExecutionProvider",
        )
        == 1
    )
    assert value(samples, "vae_requests_total", rpc="Sample", code="OK") == 1
    assert value(samples, "vae_requests_total", rpc="Sample", code="INVALID_ARGUMENT") == 1
    for rpc in ("Encode", "Decode", "SampleStream", "GetModelInfo"):
        assert value(samples, "vae_requests_total", rpc=rpc, code="OK") == 1
        assert value(samples, "vae_request_duration_seconds_count", rpc=rpc) == 1
    assert value(samples, "vae_items_total", rpc="Sample") == 10
    assert value(samples, "vae_items_total", rpc="Encode") == 10
    assert value(samples, "vae_items_total", rpc="Decode") == 10
    assert value(samples, "vae_items_total", rpc="SampleStream") == 5
    for graph, rows in (("encoder", 10), ("decoder", 10 + 10 + 5)):
        assert value(samples, "vae_batch_size_sum", graph=graph) == rows
        assert value(samples, "vae_inference_duration_seconds_count", graph=graph) >= 1
        assert value(samples, "vae_queue_wait_seconds_count", graph=graph) >= 1
        assert value(samples, "vae_queue_depth", graph=graph) == 0
    assert value(samples, "process_cpu_seconds_total") > 0
