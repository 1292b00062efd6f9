"""bench.ab: its extra cells (RPC:PER_REQUEST:CLIENTS), its versions, and medians of clean windows only."""

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
    def __init__(self, name: str = "") -> None:
        self.name = name

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


def test_a_window_with_failed_requests_is_left_out_of_the_medians_and_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.json").write_text(json.dumps({"latent_dim": 2}))
    windows = {"a": [(100.0, 0.5), (300.0, 0.7), (200.0, 0.6)], "b": [None, (50.0, 0.2), None]}

    async def measure(server: object, *args: object) -> dict[str, object]:
        return {"Sample 64/req, 4 clients": windows[server.name].pop(0)}  # type: ignore[attr-defined]

    monkeypatch.setattr(ab, "measure", measure)
    monkeypatch.setattr(servers, "start", lambda name, *args, **kwargs: _IdleServer(name))

    assert main(["--bundle", str(tmp_path), "--flags", "a=", "--flags", "b=", "--rounds", "3"]) == 0
    medians = capsys.readouterr().out.split("medians:")[1]
    assert "a 200 (0.600)  b 50 (0.200) [2 of 3 left out: failed requests]" in medians
