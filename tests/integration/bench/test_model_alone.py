"""bench.model_alone: the model's batcher driven in-process, paired with the ceiling."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from bench import model_alone
from service.settings import Settings


def test_a_window_counts_the_requests_answered_within_it_and_none_of_the_warm_up(
    vae_bundle: Path,
) -> None:
    """A clock that moves 0.125 s at each look; the window is [0.3, 0.7). The one client's requests
    are answered at 0.25 (in the warm-up), 0.5 (inside) and 0.75 (late); at 0.875 it stops."""
    assert model_alone.WARMUP_S == 0.3
    ticks = itertools.count(0.0, 0.125)
    settings = Settings.from_args(["--model-dir", str(vae_bundle), "--max-concurrent-batches", "1"], {})
    window = model_alone.model_window(
        settings, per_request=8, concurrency=1, window_s=0.4, clock=ticks.__next__
    )
    assert window() == 1 * 8 / 0.4


def test_each_round_measures_both_sides_and_the_median_ratio_is_reported(
    vae_bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # At the images' nice 19, other work on a shared machine can starve the workers for a whole window.
    monkeypatch.setenv("VAE_SERVE_INFERENCE_NICE", "0")
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
