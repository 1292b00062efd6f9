"""Clients of the vae-serving service: the typed client, `vae-client`, and the batch encoding job."""

from client.client import (
    AsyncVaeClient,
    EncodeResult,
    ModelInfo,
    RetryPolicy,
    SampleResult,
    TlsOptions,
    VaeClient,
    VaeClientError,
)
from client.encodings import EncodingsError, read_encodings

__all__ = [
    "AsyncVaeClient",
    "EncodeResult",
    "EncodingsError",
    "ModelInfo",
    "RetryPolicy",
    "SampleResult",
    "TlsOptions",
    "VaeClient",
    "VaeClientError",
    "read_encodings",
]
