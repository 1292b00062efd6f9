"""`vae-client` and `vae-encode-job` flags: those argument parsing refuses, naming the flag, before any
call, and those it takes, each reaching the client, the call or the file it configures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from client import cli, encode_job, healthcheck
from client.client import DecodeResult, ModelInfo, RetryPolicy, SampleResult, TlsOptions

Main = Callable[[Sequence[str] | None], int]


def refusal(main: Main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What argparse says when it refuses `argv` (it exits 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        ("-1", "expected an integer from 0 to 2**64-1 (18446744073709551615), got -1"),
        (str(2**64), f"expected an integer from 0 to 2**64-1 (18446744073709551615), got {2**64}"),
        ("1.5", "expected an integer, got '1.5'"),
    ],
)
def test_a_seed_outside_0_to_2_64_minus_1_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str], seed: str, message: str
) -> None:
    err = refusal(cli.main, ["sample", "--seed", seed, "--out", "grid.png"], capsys)
    assert f"argument --seed: {message}" in err


@pytest.mark.parametrize(
    "target",
    [
        "localhost",  # gRPC would try port 443
        "127.0.0.1:99999",  # gRPC would try port 34463
        "127.0.0.1:0",
        "",
        "http://127.0.0.1:50051",
        "::1",
        "vae.example:port",
    ],
)
@pytest.mark.parametrize(
    "main", [cli.main, encode_job.main, healthcheck.main], ids=["vae-client", "job", "health"]
)
def test_a_target_that_is_not_host_port_or_a_grpc_uri_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str], main: Main, target: str
) -> None:
    commands: dict[Main, list[str]] = {
        cli.main: ["info"],
        encode_job.main: ["--input", "x.npy", "--output", "out"],
    }
    command = commands.get(main, [])
    err = refusal(main, [*command, "--target", target], capsys)
    assert (
        f"argument --target: expected HOST:PORT (localhost:50051, vae.example.com:443, [::1]:50051) or "
        f"dns:///HOST:PORT, got {target!r}" in err
    )


@pytest.mark.parametrize(
    "target",
    [
        "localhost:50051",
        "vae.example.com:443",
        "[::1]:50051",
        "dns:///vae-headless:50051",
        "unix:/run/vae.sock",
    ],
)
def test_host_port_and_grpc_uris_are_taken_as_targets(target: str) -> None:
    assert cli.build_parser().parse_args(["info", "--target", target]).target == target


def test_the_largest_seed_is_taken() -> None:
    args = cli.build_parser().parse_args(["sample", "--seed", str(2**64 - 1), "--out", "grid.png"])
    assert args.seed == 2**64 - 1


# gRPC takes a deadline of 1e10 s for one already passed, and fails every call at once.
@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "1e10"])
@pytest.mark.parametrize(
    ("main", "command", "flag"),
    [
        (cli.main, ["info"], "--timeout"),
        (encode_job.main, ["--input", "x.npy", "--output", "out"], "--timeout"),
        # 0 would reopen the stream before any answer could come: the job would never progress.
        (encode_job.main, ["--input", "x.npy", "--output", "out"], "--answer-timeout"),
        (healthcheck.main, [], "--timeout"),
    ],
)
def test_seconds_that_are_not_above_0_and_at_most_a_year_are_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str], main: Main, command: list[str], flag: str, seconds: str
) -> None:
    err = refusal(main, [*command, flag, seconds], capsys)
    assert (
        f"argument {flag}: expected a number of seconds above 0 and at most 3.1536e+07 (a year), got" in err
    )


def test_a_year_is_the_longest_timeout_taken() -> None:
    assert cli.build_parser().parse_args(["info", "--timeout", "31536000"]).timeout == 365 * 24 * 3600


@pytest.mark.parametrize("seconds", ["-1", "nan", "inf", "1e10"])
@pytest.mark.parametrize(
    ("main", "command", "flag"),
    [
        (healthcheck.main, [], "--wait"),  # 0: check once
        (encode_job.main, ["--input", "x.npy", "--output", "out"], "--log-every"),  # 0: at every answer
    ],
)
def test_flags_that_take_0_take_no_other_seconds_than_the_timeouts_do(
    capsys: pytest.CaptureFixture[str], main: Main, command: list[str], flag: str, seconds: str
) -> None:
    err = refusal(main, [*command, flag, seconds], capsys)
    assert (
        f"argument {flag}: expected 0, or a number of seconds above 0 and at most 3.1536e+07 (a year)" in err
    )


def test_the_healthchecks_wait_and_the_jobs_log_interval_take_0() -> None:
    assert cli.seconds_or_zero("0") == 0.0 and cli.seconds_or_zero("-0.0") == 0.0
    assert cli.seconds_or_zero("30") == 30.0
    argv = ["--input", "x.npy", "--output", "out", "--log-every", "0"]
    assert encode_job.build_parser().parse_args(argv).log_every == 0.0


@pytest.mark.parametrize(("attempts", "message"), [("0", "of at least 1, got 0"), ("two", "got 'two'")])
@pytest.mark.parametrize(
    ("main", "command"),
    [
        (cli.main, ["info"]),
        (encode_job.main, ["--input", "x.npy", "--output", "out"]),
    ],
)
def test_attempts_below_one_are_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str], main: Main, command: list[str], attempts: str, message: str
) -> None:
    err = refusal(main, [*command, "--attempts", attempts], capsys)
    assert "argument --attempts: expected a whole number" in err and message in err


@pytest.mark.parametrize("batch_size", ["0", "-3", "a few"])
@pytest.mark.parametrize(
    ("main", "command"),
    [
        (cli.main, ["encode", "--input", "x.npy", "--out", "m.npy"]),
        (cli.main, ["decode", "--input", "m.npy", "--out", "d.npy"]),
        (encode_job.main, ["--input", "x.npy", "--output", "out"]),
    ],
)
def test_a_batch_size_below_one_is_refused_naming_the_flag_before_any_call(
    capsys: pytest.CaptureFixture[str], main: Main, command: list[str], batch_size: str
) -> None:
    err = refusal(main, [*command, "--batch-size", batch_size, "--target", "127.0.0.1:1"], capsys)
    assert "argument --batch-size: expected a whole number" in err


def test_an_option_before_the_command_is_refused_saying_where_it_goes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = refusal(cli.main, ["--target", "localhost:50051", "sample", "--out", "g.png"], capsys)
    assert (
        "vae-client: error: --target: the command comes first, its options after it (vae-client sample "
        "--target ...)"
    ) in err
    (commands,) = (action for action in cli.build_parser()._actions if action.dest == "command")
    assert tuple(commands.choices or ()) == cli.COMMANDS


INFO = ModelInfo(
    name="vae",
    version="1",
    kind="vae",
    latent_dim=2,
    image_shape=(1, 28, 28),
    execution_provider="CPUExecutionProvider",
    max_batch_size=16,
    max_samples=1024,
    encoder_sha256="ab" * 32,
    decoder_sha256="cd" * 32,
    decoder_precision="float32",
    max_request_rows=4096,
)


class FakeClient:
    """Stands in for VaeClient, whose calls need a server: keeps what vae-client built it with and the
    image dtype each call asked for, and answers with black images of that dtype."""

    def __init__(self, target: str, **options: Any) -> None:
        self.target, self.options = target, options
        self.dtypes: list[str] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def model_info(self) -> ModelInfo:
        return INFO

    def decode_result(self, latents: npt.NDArray[Any], *, output_dtype: str) -> DecodeResult:
        self.dtypes.append(output_dtype)
        return DecodeResult(np.zeros((len(latents), 1, 28, 28), output_dtype), INFO.decoder_sha256)

    def sample(self, num_samples: int, *, output_dtype: str, **options: Any) -> SampleResult:
        self.dtypes.append(output_dtype)
        images = np.zeros((num_samples, 1, 28, 28), output_dtype)
        return SampleResult(images, np.zeros((num_samples, 2), np.float32), seed=1)


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> list[FakeClient]:
    """The clients vae-client makes, in order, in place of real ones."""
    made: list[FakeClient] = []

    def make(target: str, **options: Any) -> FakeClient:
        made.append(FakeClient(target, **options))
        return made[-1]

    monkeypatch.setattr(cli, "VaeClient", make)
    return made


def test_ctrl_c_ends_vae_client_with_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Interrupted(FakeClient):
        def model_info(self) -> ModelInfo:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "VaeClient", Interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "vae-client: interrupted\n"


def test_a_decode_whose_answers_come_from_two_decoders_exits_1_naming_both_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rolling update mid-file: the requests after the first reach a replica of another model."""

    class RollingUpdate(FakeClient):
        def decode_result(self, latents: npt.NDArray[Any], *, output_dtype: str) -> DecodeResult:
            answered = super().decode_result(latents, output_dtype=output_dtype)
            decoder = INFO.decoder_sha256 if len(self.dtypes) == 1 else "ef" * 32
            return DecodeResult(answered.images, decoder)

    monkeypatch.setattr(cli, "VaeClient", RollingUpdate)
    np.save(tmp_path / "z.npy", np.zeros((25, 2), np.float32))
    argv = ["decode", "--input", str(tmp_path / "z.npy"), "--batch-size", "10"]
    assert cli.main([*argv, "--out", str(tmp_path / "out.npy")]) == 1
    err = capsys.readouterr().err
    assert f"row 0 was answered by decoder sha256 {'cd' * 32}, row 10 by decoder sha256 {'ef' * 32}" in err
    assert "nothing was written" in err
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize(
    ("decoders", "refused"),
    [
        ([None, None, None], False),  # a server older than the metadata: nothing to check
        ([None, "cd" * 32, "cd" * 32], False),  # its upgrade, the model the same
        ([None, "cd" * 32, "ef" * 32], True),  # two named decoders: row 10's and row 20's
    ],
)
def test_a_decode_checks_only_the_answers_that_name_their_decoder(
    decoders: list[str | None],
    refused: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Named(FakeClient):
        def decode_result(self, latents: npt.NDArray[Any], *, output_dtype: str) -> DecodeResult:
            answered = super().decode_result(latents, output_dtype=output_dtype)
            return DecodeResult(answered.images, decoders[len(self.dtypes) - 1])

    monkeypatch.setattr(cli, "VaeClient", Named)
    np.save(tmp_path / "z.npy", np.zeros((25, 2), np.float32))
    argv = ["decode", "--input", str(tmp_path / "z.npy"), "--batch-size", "10"]
    assert cli.main([*argv, "--out", str(tmp_path / "out.npy")]) == (1 if refused else 0)
    if refused:
        assert "row 10 was answered by decoder sha256 cdcd" in capsys.readouterr().err
    assert (tmp_path / "out.npy").exists() is not refused


def test_connection_flags_reach_the_client_and_a_client_certificate_turns_tls_on(
    clients: list[FakeClient],
) -> None:
    argv = ["info", "--target", "vae.example:443", "--timeout", "4.5", "--attempts", "2"]
    flags = ["--client-cert", "me.pem", "--client-key", "me.key", "--server-name", "vae.internal"]
    assert cli.main([*argv, *flags]) == 0
    (client,) = clients
    assert client.target == "vae.example:443"
    assert client.options == {
        "tls": TlsOptions(
            certificate_chain=Path("me.pem"), private_key=Path("me.key"), server_name_override="vae.internal"
        ),
        "timeout_s": 4.5,
        "retry": RetryPolicy(max_attempts=2),
    }


@pytest.mark.parametrize(
    "flag",
    [
        ["--tls"],
        ["--ca-cert", "ca.pem"],
        ["--client-cert", "me.pem"],
        ["--client-key", "me.key"],
        ["--server-name", "vae.internal"],
    ],
)
def test_each_tls_flag_turns_tls_on_and_without_one_the_channel_is_plaintext(flag: list[str]) -> None:
    parser = cli.build_parser()
    assert cli.tls_from_args(parser.parse_args(["info", *flag])) is not None
    assert cli.tls_from_args(parser.parse_args(["info"])) is None


@pytest.mark.parametrize(
    ("command", "dtype"),
    [(["sample", "-n", "6"], "float32"), (["decode", "--input", "{dir}/latents.npy"], "uint8")],
)
def test_dtype_reaches_the_call_and_columns_the_grid_it_writes(
    tmp_path: Path, clients: list[FakeClient], command: list[str], dtype: str
) -> None:
    """Each command's dtype other than its default; 6 images 2 wide, where the default grid is 3 wide."""
    np.save(tmp_path / "latents.npy", np.zeros((6, 2), np.float32))
    argv = [arg.format(dir=tmp_path) for arg in command]
    assert cli.main([*argv, "--dtype", dtype, "--columns", "2", "--out", str(tmp_path / "grid.png")]) == 0
    (client,) = clients
    assert client.dtypes == [dtype]
    assert Image.open(tmp_path / "grid.png").size == (2 * 30 + 2, 3 * 30 + 2)
