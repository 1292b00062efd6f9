"""In-process levers in interleaved rounds: the variants take turns, and each keeps its median window."""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby

from bench import ceiling


def _runner(log: list[str], name: str) -> Callable[[], int]:
    def run() -> int:
        log.append(name)
        return 1

    return run


def test_the_variants_take_turns_and_every_other_round_runs_them_in_reverse() -> None:
    log: list[str] = []
    variants = {name: [_runner(log, name)] for name in ("a", "b", "c")}

    measured = ceiling.interleaved(variants, duration_s=0.002, warmup_s=0.0, rounds=3)

    # Rounds a-b-c, c-b-a, a-b-c: a variant that ends one round and starts the next runs twice in a row.
    runs_in_a_row = [name for name, _ in groupby(log)]
    assert runs_in_a_row == ["a", "b", "c", "b", "a", "b", "c"]
    assert list(measured) == ["a", "b", "c"]
    assert all(result.items_per_s > 0 for result in measured.values())


def test_a_variant_is_reported_by_its_median_window_not_its_best_or_its_worst() -> None:
    windows = [ceiling.Measured("x", rate, 0.1) for rate in (900.0, 1500.0, 1000.0)]

    assert ceiling.median_window(windows).items_per_s == 1000.0
    assert ceiling.median_window(windows[:2]).items_per_s == 900.0
