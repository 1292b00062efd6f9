"""bench.ab's extra cells: RPC:PER_REQUEST:CLIENTS, refused with the expected form otherwise."""

import argparse
import json
from pathlib import Path

import pytest

from bench import ab, servers
from bench.ab import main, parse_cell
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


@pytest.mark.parametrize(
    ("versions", "refusal"),
    [
        (["--tree", "before"], "--tree 'before': expected NAME=VALUE"),
        (["--flags", "=--max-batch-size 8", "--naive"], "--flags '=--max-batch-size 8': expected NAME=VALUE"),
        (["--tree", "before=/nonexistent/tree", "--naive"], "holds no service/__main__.py"),
        (["--flags", "a=", "--flags", "a=--max-batch-size 64"], "a version named 'a' is already given"),
        (["--flags", "a="], "name at least two versions"),
    ],
)
def test_versions_are_named_once_and_a_tree_must_be_a_checkout(
    versions: list[str], refusal: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--bundle", "bundle", *versions])

    assert exit_.value.code == 2
    assert refusal in capsys.readouterr().err


class _IdleServer:
    def stop(self) -> None:
        pass


def test_requests_carry_the_latent_size_of_the_bundles_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model.json").write_text(json.dumps({"latent_dim": 8}))
    sizes: list[int] = []

    async def measure(server: object, cells: object, latent_dim: int, *args: object) -> dict[str, object]:
        sizes.append(latent_dim)
        return {}

    monkeypatch.setattr(ab, "measure", measure)
    monkeypatch.setattr(servers, "start", lambda *args, **kwargs: _IdleServer())

    assert main(["--bundle", str(tmp_path), "--flags", "a=", "--flags", "b=", "--rounds", "1"]) == 0
    assert sizes == [8, 8]
