"""Channels and stubs to the session's running server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.conftest import ServerThread
from vae.v1 import vae_pb2_grpc


@pytest.fixture(scope="module")
def channel(vae_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(vae_server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> vae_pb2_grpc.VaeServiceStub:
    return vae_pb2_grpc.VaeServiceStub(channel)
