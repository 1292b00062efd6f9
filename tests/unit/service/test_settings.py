"""Settings: flags over VAE_SERVE_* variables over defaults, validated once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import Settings, usable_cpus


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings.from_args(["--model-dir", "bundle"], {})
    assert settings.model_dir == Path("bundle")
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 50051, 9090)
    assert settings.device == "auto"
    assert settings.max_batch_size == 64


def test_environment_variables_fill_in_and_flags_win() -> None:
    environ = {
        "VAE_SERVE_MODEL_DIR": "from-env",
        "VAE_SERVE_PORT": "6000",
        "VAE_SERVE_MAX_QUEUE_DELAY_MS": "7.5",
    }
    settings = Settings.from_args(["--port", "7000"], environ)
    assert settings.model_dir == Path("from-env")
    assert settings.port == 7000
    assert settings.max_queue_delay_ms == 7.5


def test_model_dir_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args([], {})
    assert "--model-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--device", "tpu"], {}, "invalid choice: 'tpu'"),
        ([], {"VAE_SERVE_PORT": "eighty"}, "VAE_SERVE_PORT='eighty'"),
        (["--max-batch-size", "0"], {}, "max_batch_size 0: expected at least 1"),
        (["--max-queue-size", "8", "--max-batch-size", "16"], {}, "expected at least max_batch_size"),
        (["--port", "70000"], {}, "expected 0 to 65535"),
    ],
)
def test_bad_values_are_refused_with_what_was_expected(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args(["--model-dir", "bundle", *argv], environ)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", None), ("100000 100000\n", 1), ("150000 100000\n", 2), ("50000 100000\n", 1)],
)
def test_usable_cpus_follow_a_container_cpu_limit(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (cores if expected is None else min(cores, expected))
    assert usable_cpus(tmp_path / "missing") == cores
