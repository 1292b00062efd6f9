"""deploy/scripts/train-and-export.sh, the trainer image's entry point, with stand-ins for vae-train
and vae-export on its PATH: it publishes a bundle whole, and a stop reaches the step that runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import sigint_not_ignored

SCRIPT = Path(__file__).resolve().parents[3] / "deploy" / "scripts" / "train-and-export.sh"


def stand_ins(folder: Path, train: str) -> dict[str, str]:
    """An environment whose vae-train runs `train` (shell) and whose vae-export writes a model.json."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "vae-train").write_text(f"#!/bin/sh\n{train}\n")
    (bin_dir / "vae-export").write_text('#!/bin/sh\nmkdir -p "$3" && echo {} > "$3/model.json"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "BUNDLE_DIR": str(folder / "models" / "vae"),
        "VAE_TRAIN_RUN_DIR": str(folder / "run"),
    }


def test_a_trained_run_is_published_as_a_whole_bundle(tmp_path: Path) -> None:
    env = stand_ins(tmp_path, "exit 0")
    result = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["vae"]
    assert (tmp_path / "models" / "vae" / "model.json").is_file()


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_reaches_the_step_that_runs_and_nothing_is_published(
    tmp_path: Path, sent: signal.Signals, code: int
) -> None:
    """As PID 1 in its container, sh ignores SIGTERM: docker compose stop waited out its grace period."""
    stopped = tmp_path / "vae-train-stopped"
    started = tmp_path / "vae-train-started"
    env = stand_ins(
        tmp_path, f"trap 'touch {stopped}; kill $!; exit 143' TERM; touch {started}; sleep 60 & wait $!"
    )
    with sigint_not_ignored():  # a shell may not trap a signal it started with ignored
        script = subprocess.Popen(["sh", str(SCRIPT)], env=env)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "vae-train never started"
            time.sleep(0.05)
        script.send_signal(sent)
        assert script.wait(timeout=30) == code
    finally:
        script.kill()
    assert stopped.exists()
    assert not (tmp_path / "models").exists()
