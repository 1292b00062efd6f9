"""`vae-client` and `vae-encode-job` flags that argument parsing refuses, naming the flag, before any call."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from client import cli, encode_job

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


def test_the_largest_seed_is_taken() -> None:
    args = cli.build_parser().parse_args(["sample", "--seed", str(2**64 - 1), "--out", "grid.png"])
    assert args.seed == 2**64 - 1


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
@pytest.mark.parametrize(
    ("main", "command"),
    [
        (cli.main, ["info"]),
        (encode_job.main, ["--input", "x.npy", "--output", "out"]),
    ],
)
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str], main: Main, command: list[str], timeout: str
) -> None:
    err = refusal(main, [*command, "--timeout", timeout], capsys)
    assert f"argument --timeout: expected a number of seconds above 0, got {timeout}" in err


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
