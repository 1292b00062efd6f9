"""`make export`: the bundle follows the run it is made from."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[3]


def exports(runs: Path) -> bool:
    """Whether `make export` would run vae-export on the runs in `runs` (a dry run; the virtual
    environment counts as installed)."""
    dry_run = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "export", f"RUNS={runs}"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    return "vae-export" in dry_run.stdout


def touch(path: Path, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path, (mtime, mtime))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_export_exports_again_after_a_new_training_or_evaluation_and_only_then(tmp_path: Path) -> None:
    touch(tmp_path / "vae" / "checkpoint.pt", 1_000)
    touch(tmp_path / "vae" / "metrics.json", 1_000)
    touch(tmp_path / "bundle" / "model.json", 2_000)
    assert not exports(tmp_path)
    touch(tmp_path / "vae" / "metrics.json", 3_000)  # vae-evaluate recorded its result
    assert exports(tmp_path)
    touch(tmp_path / "bundle" / "model.json", 4_000)
    touch(tmp_path / "vae" / "checkpoint.pt", 5_000)  # trained again
    assert exports(tmp_path)
