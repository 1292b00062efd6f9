"""`vae-client` and `vae-healthcheck` against the real server, called through their main functions."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from client import VaeClient, cli, healthcheck
from tests.conftest import ServerThread, free_port
from tests.integration.service.conftest import held_inference

pytestmark = pytest.mark.slow


def test_sample_writes_a_png_grid_and_says_which_seed(
    vae_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid.png"
    assert (
        cli.main(["sample", "--target", vae_server.target, "-n", "64", "--seed", "1", "--out", str(out)]) == 0
    )
    assert "64 images, seed 1" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.mode == "L" and grid.size == (8 * 30 + 2, 8 * 30 + 2)
    again = tmp_path / "again.png"
    cli.main(["sample", "--target", vae_server.target, "-n", "64", "--seed", "1", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()


def test_info_prints_model_info_as_json(vae_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--target", vae_server.target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "tiny-vae" and info["latent_dim"] == 2 and info["image_shape"] == [1, 28, 28]


def test_info_into_a_pipe_whose_reader_is_gone_exits_quietly_as_sigpipe_would(
    vae_server: ServerThread,
) -> None:
    """`vae-client info | head -c 10`: the reader had what it wanted; no error, no exit 2 (bad input)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "wb") as gone:
        done = subprocess.run(
            [sys.executable, "-m", "client.cli", "info", "--target", vae_server.target],
            stdout=gone,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert (done.returncode, done.stderr) == (cli.BROKEN_PIPE, "")


def test_encode_then_decode_round_trips_through_files_as_the_python_client_answers(
    vae_server: ServerThread, tmp_path: Path, digits: np.ndarray
) -> None:
    """mean.npy and log_var.npy hold, row for row, the posterior VaeClient.encode gives for the same
    images (the PNG first, then the array), and d.npy the images VaeClient.decode gives for mean.npy."""
    Image.fromarray(digits[0, 0]).save(tmp_path / "digit.png")
    np.save(tmp_path / "many.npy", digits[:300])
    target = ["--target", vae_server.target]
    code = cli.main(
        [
            "encode",
            *target,
            "--input",
            str(tmp_path / "digit.png"),
            str(tmp_path / "many.npy"),
            "--out",
            str(tmp_path / "mean.npy"),
            "--log-var-out",
            str(tmp_path / "log_var.npy"),
            "--batch-size",
            "128",
        ]
    )
    assert code == 0
    with VaeClient(vae_server.target) as client:
        expected = client.encode(np.concatenate([digits[:1], digits[:300]]))
        assert expected.log_var is not None
        # Not the means again: a VAE's log-variances are another output of the encoder.
        assert not np.array_equal(expected.log_var, expected.mean)
        mean = np.load(tmp_path / "mean.npy")
        np.testing.assert_array_equal(mean, expected.mean)
        np.testing.assert_array_equal(np.load(tmp_path / "log_var.npy"), expected.log_var)
        decoded = client.decode(mean)
    assert mean.shape == (301, 2)
    np.testing.assert_array_equal(mean[0], mean[1])  # the PNG is the first row of the array
    assert (
        cli.main(["decode", *target, "--input", str(tmp_path / "mean.npy"), "--out", str(tmp_path / "d.npy")])
        == 0
    )
    assert decoded.shape == (301, 1, 28, 28)
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), decoded)
    assert (
        cli.main(["decode", *target, "--input", str(tmp_path / "mean.npy"), "--out", str(tmp_path / "d.png")])
        == 0
    )
    assert Image.open(tmp_path / "d.png").size[0] == 18 * 30 + 2  # ceil(sqrt(301)) images wide


def test_decode_takes_integer_latent_codes_as_the_library_does(
    vae_server: ServerThread, tmp_path: Path
) -> None:
    grid = np.array([[-1, 0], [0, 0], [1, 2]], np.int64)  # a grid of points, saved as integers
    np.save(tmp_path / "grid.npy", grid)
    target = ["--target", vae_server.target]
    assert (
        cli.main(["decode", *target, "--input", str(tmp_path / "grid.npy"), "--out", str(tmp_path / "d.npy")])
        == 0
    )
    with VaeClient(vae_server.target) as client:
        expected = client.decode(grid.astype(np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), expected)


def test_decode_takes_back_a_file_larger_than_one_request_in_batches_in_order(
    vae_server: ServerThread, tmp_path: Path
) -> None:
    """The mean.npy of a whole data set is more rows than one request may carry (max_request_rows)."""
    with VaeClient(vae_server.target) as client:
        most = client.model_info().max_request_rows
        latents = np.random.default_rng(3).normal(size=(most + 500, 2)).astype(np.float32)
        expected = np.concatenate([client.decode(latents[:most]), client.decode(latents[most:])])
    np.save(tmp_path / "mean.npy", latents)
    argv = ["decode", "--target", vae_server.target, "--input", str(tmp_path / "mean.npy")]
    assert cli.main([*argv, "--out", str(tmp_path / "d.npy")]) == 0  # --batch-size 256 by default
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), expected)
    assert cli.main([*argv, "--batch-size", "999", "--out", str(tmp_path / "d999.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "d999.npy"), expected)


def test_encode_and_decode_send_no_more_rows_a_request_than_the_server_takes(
    vae_bundle: Path, tmp_path: Path, digits: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against a server that takes 100 rows a request: by default a quarter of that, as a request of the
    whole queue would fit only an empty one; an explicit --batch-size beyond it is refused."""
    server = ServerThread(vae_bundle, max_queue_size=100, max_samples=100)
    try:
        np.save(tmp_path / "images.npy", digits[:300])
        argv = ["--target", server.target, "--out"]
        assert (
            cli.main(["encode", "--input", str(tmp_path / "images.npy"), *argv, str(tmp_path / "m.npy")]) == 0
        )
        assert cli.main(["decode", "--input", str(tmp_path / "m.npy"), *argv, str(tmp_path / "d.npy")]) == 0
        decodes = {"rpc": "Decode", "code": "OK"}
        assert server.metrics.registry.get_sample_value("vae_requests_total", decodes) == 300 / 25
        for command, input_name in (("encode", "images.npy"), ("decode", "m.npy")):
            given = [command, "--input", str(tmp_path / input_name), "--batch-size", "101"]
            assert cli.main([*given, *argv, str(tmp_path / "refused.npy")]) == 2
            assert (
                f"--batch-size 101 is more than {server.target} takes in one request (100 rows); pass "
                "--batch-size 100 or less, or leave it out (25 by default)"
            ) in capsys.readouterr().err
        assert not (tmp_path / "refused.npy").exists()
        with VaeClient(server.target) as client:
            mean = np.concatenate([client.encode(digits[i : i + 100]).mean for i in (0, 100, 200)])
            images = np.concatenate([client.decode(mean[i : i + 100]) for i in (0, 100, 200)])
    finally:
        server.stop(grace_s=0)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), mean)
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), images)


def test_sample_beyond_the_servers_limit_exits_2_naming_the_flag_and_the_limit(
    vae_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SampleStream is held to max_samples as Sample is: no call carries more images."""
    argv = ["sample", "--target", vae_server.target, "-n", "2000", "--out", str(tmp_path / "g.npy")]
    assert cli.main(argv) == 2
    assert (
        f"-n/--num-samples 2000 is more than {vae_server.target} draws in one request "
        "(1024, ModelInfo.max_samples); pass -n 1024 or less"
    ) in capsys.readouterr().err
    assert not (tmp_path / "g.npy").exists()


def hold_graph_once_rows_were_answered(
    server: ServerThread, graph: str, rows: int
) -> tuple[threading.Event, threading.Event]:
    """Make the first call of `graph` ("encoder" or "decoder") after `rows` rows wait: (an event set
    once it waits, its release)."""
    held, release = threading.Event(), threading.Event()
    batcher = getattr(server.server.model, graph)
    infer, seen = batcher._infer, [0]

    def held_after(inputs: np.ndarray) -> Any:
        if seen[0] >= rows and not held.is_set():
            held.set()
            release.wait(30)
        seen[0] += len(inputs)
        return infer(inputs)

    batcher._infer = held_after
    return held, release


def wait_until_free(port: int) -> None:
    """Return once nothing listens on `port` (a stopped server has let it go)."""
    for _ in range(3000):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.01)
    raise AssertionError(f"port {port} still taken")


@contextlib.contextmanager
def rolling_update(first: Path, then: Path, graph: str, rows: int) -> Iterator[int]:
    """A server of the bundle `first`, replaced on its port by one of `then` once its `graph` has
    answered `rows` rows: the next call of that graph waits while the server stops at once (a stream
    is cut, the waiting call fails) and the new one starts. Yields the port."""
    servers = [ServerThread(first)]
    port = servers[0].server.port
    held, release = hold_graph_once_rows_were_answered(servers[0], graph, rows)

    def roll_out() -> None:
        if not held.wait(60):
            return
        stopping = threading.Thread(target=servers[0].stop, kwargs={"grace_s": 0})
        stopping.start()
        wait_until_free(port)
        servers.append(ServerThread(then, port=port))
        release.set()
        stopping.join()

    update = threading.Thread(target=roll_out)
    update.start()
    try:
        yield port
    finally:
        held.set()
        release.set()
        update.join()
        for server in servers:
            server.stop(grace_s=0)


def graph_sha256(bundle: Path, graph: str) -> str:
    return hashlib.sha256((bundle / f"{graph}.onnx").read_bytes()).hexdigest()


def test_an_encode_whose_stream_reconnects_to_another_encoder_exits_1_naming_both_and_writes_nothing(
    vae_bundle: Path, ae_bundle: Path, tmp_path: Path, digits: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rolling update mid-encode: the stream's reconnect reaches a replica of another model."""
    np.save(tmp_path / "images.npy", digits)
    # Requests of 10 rows, 4 in flight: the encoder sees rows 40 on only once an answer has come back.
    with rolling_update(vae_bundle, ae_bundle, "encoder", rows=40) as port:
        argv = ["encode", "--target", f"127.0.0.1:{port}", "--input", str(tmp_path / "images.npy")]
        code = cli.main(
            [*argv, "--batch-size", "10", "--attempts", "20", "--out", str(tmp_path / "mean.npy")]
        )
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"row 0 was answered by encoder sha256 {graph_sha256(vae_bundle, 'encoder')}" in err
    assert f"by encoder sha256 {graph_sha256(ae_bundle, 'encoder')}" in err and "nothing was written" in err
    assert not (tmp_path / "mean.npy").exists()


def test_a_decode_whose_later_requests_reach_another_decoder_exits_1_naming_both_and_writes_nothing(
    vae_bundle: Path, ae_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rolling update mid-file: the retried request, and those after it, reach a replica of another
    model, whose images would pass for the first model's."""
    np.save(tmp_path / "z.npy", np.random.default_rng(0).normal(size=(70, 2)).astype(np.float32))
    with rolling_update(vae_bundle, ae_bundle, "decoder", rows=40) as port:
        argv = ["decode", "--target", f"127.0.0.1:{port}", "--input", str(tmp_path / "z.npy")]
        code = cli.main([*argv, "--batch-size", "10", "--attempts", "20", "--out", str(tmp_path / "out.npy")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"row 0 was answered by decoder sha256 {graph_sha256(vae_bundle, 'decoder')}" in err
    assert f"row 40 by decoder sha256 {graph_sha256(ae_bundle, 'decoder')}" in err
    assert "nothing was written" in err and not (tmp_path / "out.npy").exists()


def test_encode_takes_uint8_and_float32_inputs_in_one_call(
    vae_server: ServerThread, tmp_path: Path, digits: np.ndarray
) -> None:
    np.save(tmp_path / "bytes.npy", digits[:3])
    np.save(tmp_path / "floats.npy", digits[:3].astype(np.float32) / 255)  # as the training data is
    code = cli.main(
        [
            "encode",
            "--target",
            vae_server.target,
            "--input",
            str(tmp_path / "bytes.npy"),
            str(tmp_path / "floats.npy"),
            "--out",
            str(tmp_path / "mean.npy"),
        ]
    )
    assert code == 0
    mean = np.load(tmp_path / "mean.npy")
    np.testing.assert_array_equal(mean[:3], mean[3:])  # the same images, as bytes and as [0,1] floats


def test_encode_given_input_twice_encodes_both_in_order(
    vae_server: ServerThread, tmp_path: Path, digits: np.ndarray
) -> None:
    np.save(tmp_path / "first.npy", digits[:3])
    np.save(tmp_path / "second.npy", digits[3:5])
    twice = ["--input", str(tmp_path / "first.npy"), "--input", str(tmp_path / "second.npy")]
    once = ["--input", str(tmp_path / "first.npy"), str(tmp_path / "second.npy")]
    for name, inputs in (("twice", twice), ("once", once)):
        out = str(tmp_path / f"{name}.npy")
        assert cli.main(["encode", "--target", vae_server.target, *inputs, "--out", out]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "twice.npy"), np.load(tmp_path / "once.npy"))
    assert np.load(tmp_path / "twice.npy").shape == (5, 2)


def test_encode_gives_up_on_a_server_that_stops_answering_after_timeout_instead_of_hanging(
    vae_bundle: Path,
    start_server_thread: Callable[..., ServerThread],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server_thread(vae_bundle)
    np.save(tmp_path / "images.npy", np.zeros((3, 28, 28), np.uint8))
    argv = ["encode", "--target", server.target, "--input", str(tmp_path / "images.npy")]
    argv += ["--out", str(tmp_path / "mean.npy"), "--timeout", "0.5", "--attempts", "1"]
    with held_inference(server, "encoder"):
        assert cli.main(argv) == 1
    assert "DEADLINE_EXCEEDED: no answer within 0.5 s, so the stream was abandoned" in capsys.readouterr().err
    assert not (tmp_path / "mean.npy").exists()


def test_encode_skip_bad_leaves_out_the_bad_files_of_a_png_folder_and_names_them(
    vae_server: ServerThread, tmp_path: Path, digits: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(digits[i, 0]).save(folder / f"digit-{i}.png")
    Image.new("RGB", (28, 28)).save(folder / "colour.png")
    command = [
        "encode",
        "--target",
        vae_server.target,
        "--input",
        str(folder),
        "--out",
        str(tmp_path / "m.npy"),
    ]
    assert cli.main(command) == 2
    assert "pass --skip-bad" in capsys.readouterr().err
    assert cli.main([*command, "--skip-bad"]) == 0
    assert "skipped colour.png" in capsys.readouterr().err
    assert np.load(tmp_path / "m.npy").shape == (2, 2)


def test_a_call_the_server_refuses_as_bad_input_exits_2_with_the_servers_message(
    vae_server: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = cli.main(
        ["sample", "--target", vae_server.target, "--temperature", "1e9", "--out", str(tmp_path / "g.png")]
    )
    assert code == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_a_call_that_fails_for_any_other_reason_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    code = cli.main(["info", "--target", nobody, "--attempts", "1", "--timeout", "5"])
    assert code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_asking_an_ae_for_log_variances_writes_no_file_and_encodes_nothing(
    ae_bundle: Path,
    start_server_thread: Callable[..., ServerThread],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    server = start_server_thread(ae_bundle)
    np.save(tmp_path / "images.npy", np.zeros((3, 28, 28), np.uint8))
    argv = ["encode", "--target", server.target, "--input", str(tmp_path / "images.npy")]
    code = cli.main([*argv, "--out", str(tmp_path / "mean.npy"), "--log-var-out", str(tmp_path / "lv.npy")])
    assert code == 2
    assert "the served model is an AE, which has no log-variance" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images.npy"]
    assert server.metrics.items.labels("EncodeStream")._value.get() == 0  # refused before the call


def test_a_bad_input_file_exits_2_naming_it(
    vae_server: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    Image.new("RGB", (28, 28)).save(tmp_path / "colour.png")
    code = cli.main(
        [
            "encode",
            "--target",
            vae_server.target,
            "--input",
            str(tmp_path / "colour.png"),
            "--out",
            str(tmp_path / "m.npy"),
        ]
    )
    assert code == 2
    assert "colour.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["decode", "--input", "{dir}/complex.npy"], "complex.npy: latents must be real numbers"),
        (
            ["decode", "--input", "{dir}/ok.npy"],
            "ok.npy: expected one array of latent codes [N,D], got an array of shape [2, 28, 28] (images are "
            "encoded with `vae-client encode`)",
        ),
        (
            ["decode", "--input", "{dir}/bool.npy"],
            "bool.npy: latents must be real numbers (floating point or integer), got bool",
        ),
        (
            ["decode", "--input", "{dir}/huge.npy"],
            "huge.npy: latents reach |z| = 1e+300, beyond float32's range",
        ),
        (["encode", "--input", "{dir}/ok.npy", "--log-var-out", "{dir}/lv"], "lv: expected a .npy file"),
        (["sample", "--out", "{dir}/grid.jpg"], "grid.jpg: expected a .png or .npy file"),
        (["decode", "--input", "{dir}/ok.npy", "--out", "{dir}/nowhere/d.png"], "no folder"),
        # /proc takes no new files, whoever asks (tests may run as root, whom permissions do not stop).
        (["sample", "--out", "/proc/g.png"], "/proc/g.png: cannot write in /proc"),
        (["encode", "--input", "{dir}/ok.npy", "--out", "/proc/m.npy"], "/proc/m.npy: cannot write in /proc"),
        (["encode", "--input", "{dir}/missing.npy"], "missing.npy"),
        (
            ["encode", "--input", "{dir}/ok.npy", "--out", "{dir}/m.npy", "--log-var-out", "{dir}/./m.npy"],
            "is --out too: the log-variances would replace the means",
        ),
        (["encode", "--input", "{dir}/ok.npy", "{dir}/complex.npy"], "complex.npy"),
        (["encode", "--input", "{dir}/ok.npy", "--out", "{dir}/ok.npy"], "is an --input too"),
        (
            [
                "encode",
                "--input",
                "{dir}/ok.npy",
                "--out",
                "{dir}/m.npy",
                "--log-var-out",
                "{dir}/../{name}/ok.npy",
            ],
            "--log-var-out {dir}/../{name}/ok.npy is an --input too: the answer would replace its input",
        ),
        (["decode", "--input", "{dir}/ok.npy", "--out", "{dir}/./ok.npy"], "is an --input too"),
        (["sample", "--columns", "-1", "--out", "{dir}/g.png"], "--columns must be at least 1, got -1"),
        (["sample", "-n", "0", "--out", "{dir}/g.png"], "-n/--num-samples must be at least 1, got 0"),
        (
            ["decode", "--input", "{dir}/empty.npy"],
            "empty.npy: not a readable .npy array (No data left in file)",
        ),
        (["decode", "--input", "{dir}/ok.npy", "--columns", "0"], "--columns must be at least 1, got 0"),
        (
            ["decode", "--input", "{dir}/nan.npy"],
            "nan.npy: NaN or Inf in 1 of its 40 latent codes, the first in row 35 (counting from 0); "
            "nothing was decoded",
        ),
        (["sample", "--out", "{dir}/folder.png"], "folder.png: is a folder; expected a .png or .npy file"),
        (["encode", "--input", "{dir}/ok.npy", "--out", "{dir}/folder.npy"], "folder.npy: is a folder"),
        (["sample", "--temperature", "0", "--out", "{dir}/g.png"], "temperature must be above 0, got 0.0"),
        (["sample", "--columns", "4", "--out", "{dir}/g.npy"], "--columns: lays out a .png grid"),
    ],
)
def test_bad_arguments_and_latent_files_exit_2_before_any_call(
    vae_server: ServerThread,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: list[str],
    message: str,
) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((2, 28, 28), np.uint8))
    np.save(tmp_path / "complex.npy", np.zeros((2, 2), np.complex64))
    np.save(tmp_path / "bool.npy", np.zeros((2, 2), bool))
    np.save(tmp_path / "huge.npy", np.full((2, 2), 1e300))
    (tmp_path / "empty.npy").write_bytes(b"")
    codes = np.zeros((40, 2), np.float32)
    codes[35, 1] = np.nan
    np.save(tmp_path / "nan.npy", codes)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "folder.npy").mkdir()
    argv = [part.format(dir=tmp_path, name=tmp_path.name) for part in command]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out.npy")]
    answered = requests_answered(vae_server)
    assert cli.main([*argv, "--target", vae_server.target, *out]) == 2
    assert message.format(dir=tmp_path, name=tmp_path.name) in capsys.readouterr().err
    assert requests_answered(vae_server) == answered  # the server saw no call
    assert np.load(tmp_path / "ok.npy").shape == (2, 28, 28)  # no input replaced


def requests_answered(server: ServerThread) -> float:
    """Every request the server has counted, whatever its RPC and status."""
    (requests,) = (family for family in server.metrics.registry.collect() if family.name == "vae_requests")
    return sum(sample.value for sample in requests.samples if sample.name == "vae_requests_total")


def test_healthcheck_exits_0_for_a_serving_server(vae_server: ServerThread) -> None:
    assert healthcheck.main(["--target", vae_server.target]) == 0
    assert healthcheck.main(["--target", vae_server.target, "--service", "vae.v1.VaeService"]) == 0


def test_healthcheck_exits_1_with_a_message_when_nobody_or_nothing_serves(
    vae_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert healthcheck.main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert healthcheck.main(["--target", vae_server.target, "--service", "no.such.Service"]) == 1
    assert "no such service" in capsys.readouterr().err
    assert healthcheck.main(["--target", f"127.0.0.1:{free_port()}", "--wait", "0.5"]) == 1
    assert "no answer within 0.5 s" in capsys.readouterr().err


def test_healthcheck_exits_2_naming_a_certificate_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ca.crt"
    with pytest.raises(SystemExit) as stopped:
        healthcheck.main(["--target", f"127.0.0.1:{free_port()}", "--ca-cert", str(missing)])
    assert stopped.value.code == 2
    assert str(missing) in capsys.readouterr().err


def test_healthcheck_reports_a_draining_server_as_not_serving(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server_thread(vae_bundle)
    server.call(server.server.begin_drain())
    assert healthcheck.main(["--target", server.target]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_healthcheck_wait_returns_once_a_loading_server_turns_serving(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    # Bound on port 0 but not loaded yet: health says NOT_SERVING until the model is in.
    server = start_server_thread(vae_bundle, load=False)
    codes: list[int] = []
    waiter = threading.Thread(
        target=lambda: codes.append(healthcheck.main(["--target", server.target, "--wait", "60"]))
    )
    waiter.start()
    try:
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and codes == [], "--wait returned while the server was NOT_SERVING"
    finally:
        server.call(server.server.load_model())
        waiter.join(timeout=60)
    assert codes == [0]
