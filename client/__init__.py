"""Clients of the vae-serving service: the typed client, `vae-client`, and the batch encoding job."""

from client.client import (
    AsyncVaeClient,
    DecodeResult,
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
    "DecodeResult",
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
