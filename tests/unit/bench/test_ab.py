"""bench.ab's extra cells: RPC:PER_REQUEST:CLIENTS, refused with the expected form otherwise."""

import argparse

import pytest

from bench.ab import parse_cell
from bench.workloads import Shape


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sample:8:32", (Shape("Sample", 8), 32)),
        ("Decode:64:4", (Shape("Decode", 64), 4)),
        ("Encode:1:1", (Shape("Encode", 1), 1)),
    ],
)
def test_a_cell_names_the_rpc_the_images_a_request_and_the_clients(text: str, expected: object) -> None:
    assert parse_cell(text) == expected


@pytest.mark.parametrize(
    "text", ["Sample:8", "Sample:8:32:1", "Stream:8:32", "Sample:0:4", "Sample:8:-1", "Sample:x:4", ""]
)
def test_anything_else_is_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected RPC:PER_REQUEST:CLIENTS"):
        parse_cell(text)
