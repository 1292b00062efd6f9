"""bench.model_alone: the model's batcher driven in-process, paired with the ceiling."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import model_alone
from service.settings import Settings


def test_a_window_counts_whole_requests_answered_within_it(vae_bundle: Path) -> None:
    settings = Settings.from_args(["--model-dir", str(vae_bundle), "--max-concurrent-batches", "1"], {})
    images_per_s = model_alone.model_window(settings, per_request=8, concurrency=2, window_s=0.5)()
    images = round(images_per_s * 0.5)
    assert images > 0
    assert images % 8 == 0


def test_each_round_measures_both_sides_and_the_median_ratio_is_reported(
    vae_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", str(vae_bundle), "--per-request", "8", "--concurrency", "2", "--rounds", "2"]
    assert model_alone.main([*args, "--window", "0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[:2]] == ["round 1", "round 2"]
    assert "Sample 8/req, 2 clients, in-process / per-core" in lines[-1]
    assert " against " in lines[-1]
