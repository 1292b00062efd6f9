"""bench.model_alone: the model's batcher driven in-process, paired with the ceiling."""

from __future__ import annotations

import re
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

    def number(text: str) -> float:
        return float(text.replace(",", ""))

    # Each round: "ours against theirs" images/s, both measured; the summary: the median of the
    # rounds' ratios and their range (two rounds: the range is the two ratios, the median their mean).
    rounds = [re.search(r": ([\d,]+) against ([\d,]+)$", line) for line in lines[:2]]
    ratios = sorted(number(m[1]) / number(m[2]) for m in rounds if m is not None)
    assert len(ratios) == 2 and ratios[0] > 0
    summary = re.search(r" against [\d,]+ images/s, ([\d.]+) \(([\d.]+)-([\d.]+)\)$", lines[-1])
    assert summary is not None, lines[-1]
    median, low, high = (float(value) for value in summary.groups())

    # The rounds print whole images/s, the summary three decimals: equal to within that rounding.
    def close(ratio: float) -> object:
        return pytest.approx(ratio, rel=0.01, abs=0.002)

    assert (low, high) == (close(ratios[0]), close(ratios[1]))
    assert median == close(sum(ratios) / 2)
