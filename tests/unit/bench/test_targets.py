"""The targets' paired rounds: both sides of a ratio measured back to back, judged on the median."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from bench import ceiling, report, servers, suite, targets


def _recorder(calls: list[str], name: str, value: float) -> targets.Measure:
    def measure() -> float:
        calls.append(name)
        return value

    return measure


def test_each_round_measures_both_sides_back_to_back_and_odd_rounds_swap_the_order() -> None:
    calls: list[str] = []
    pair = targets.Target("t", 0.9, _recorder(calls, "ours", 90.0), _recorder(calls, "theirs", 100.0))

    measured = targets.paired_rounds([pair], rounds=3)

    assert calls == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
    assert [(m["round"], m["ours"], m["theirs"]) for m in measured] == [
        (1, 90.0, 100.0),
        (2, 90.0, 100.0),
        (3, 90.0, 100.0),
    ]


def test_a_target_whose_peer_fails_is_measured_no_more_and_the_others_go_on() -> None:
    calls: list[str] = []
    answers = iter([1200.0])

    def triton_dies_in_round_two() -> float:
        calls.append("triton")
        try:
            return next(answers)
        except StopIteration:
            raise servers.ServerFailed("triton_load failed: connection refused") from None

    peer = targets.Target("triton", 2.0, _recorder(calls, "service", 2400.0), triton_dies_in_round_two)
    ceiling_pair = targets.Target(
        "ceiling", 0.9, _recorder(calls, "sample", 90.0), _recorder(calls, "ceiling", 100.0)
    )

    measured = targets.paired_rounds([peer, ceiling_pair], rounds=3)

    assert [(m["target"], m["round"]) for m in measured] == [
        ("triton", 1),
        ("ceiling", 1),
        ("triton", 2),
        ("ceiling", 2),
        ("ceiling", 3),
    ]
    assert measured[2]["error"] == "triton_load failed: connection refused"
    summary = {row["target"]: row for row in targets.summarize(measured, {"triton": 2.0, "ceiling": 0.9})}
    assert (summary["triton"]["rounds"], summary["triton"]["failed_in_round"]) == (1, 2)
    assert (summary["ceiling"]["rounds"], summary["ceiling"]["failed_in_round"]) == (3, None)
    assert (summary["triton"]["ratio_median"], summary["triton"]["met"]) == (2.0, False)
    assert (
        "| triton (failed in round 2) | 2,400 | 1,200 | 2.000 | 2.000-2.000 | 1 of 1 | >= 2.0 | no |"
        in report.targets({"paired_targets": {"summary": list(summary.values())}})
    )


def test_a_target_whose_peer_fails_in_the_first_round_is_still_listed_as_not_met() -> None:
    def dies() -> float:
        raise servers.ServerFailed("triton-paired exited with 1")

    measured = targets.paired_rounds([targets.Target("triton", 2.0, lambda: 2400.0, dies)], rounds=6)

    assert measured == [{"target": "triton", "round": 1, "error": "triton-paired exited with 1"}]
    (row,) = targets.summarize(measured, {"triton": 2.0})
    assert (row["rounds"], row["failed_in_round"], row["ratio_median"], row["met"]) == (0, 1, None, False)
    assert "| triton (failed in round 1) | - | - | - | - | 0 of 0 | >= 2.0 | no |" in report.targets(
        {"paired_targets": {"summary": [row]}}
    )


def test_a_target_is_judged_on_the_median_of_its_rounds_ratios_and_reports_their_range() -> None:
    measured = [
        {"target": "a", "round": 1, "ours": 88.0, "theirs": 100.0},
        {"target": "a", "round": 2, "ours": 95.0, "theirs": 100.0},
        {"target": "a", "round": 3, "ours": 92.0, "theirs": 100.0},
        {"target": "b", "round": 1, "ours": 140.0, "theirs": 100.0},
    ]

    summary = {row["target"]: row for row in targets.summarize(measured, {"a": 0.9, "b": 1.5})}

    assert summary["a"]["ratio_median"] == pytest.approx(0.92)
    assert (summary["a"]["ratio_low"], summary["a"]["ratio_high"]) == (0.88, 0.95)
    assert (summary["a"]["rounds_met"], summary["a"]["rounds"], summary["a"]["met"]) == (2, 3, True)
    assert (summary["b"]["ratio_median"], summary["b"]["met"]) == (1.4, False)


def test_a_target_without_measurements_is_left_out_rather_than_reported_as_met() -> None:
    assert targets.summarize([], {"a": 0.9}) == []


def test_the_targets_table_shows_the_median_ratio_its_range_and_the_verdict(tmp_path: Path) -> None:
    measured = [
        {"target": "Sample 64/req", "round": r, "ours": ours, "theirs": 100.0}
        for r, ours in enumerate((85.0, 91.0, 93.0), 1)
    ]
    results = {
        "paired_targets": {"summary": targets.summarize(measured, {"Sample 64/req": 0.9})},
        "service_cold_start": {"median_s": 0.2},
        "service": {"rss_after_warmup_mb": 300.0},
    }

    table = report.targets(results)

    assert "| Sample 64/req | 91.0 | 100 | 0.910 | 0.850-0.930 | 2 of 3 | >= 0.9 | yes |" in table
    assert "| resident memory after warm-up (MB) | 300 | - | - | - | - | < 250 MB | no |" in table


def test_an_unknown_ceiling_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown layout 'two-thread'"):
        ceiling.layout_runs(Path("decoder.onnx"), {}, "two-thread")


def test_a_triton_that_fails_to_start_leaves_out_its_target_not_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def exits(*args: object, **kwargs: object) -> servers.Server:
        raise servers.ServerFailed("triton-2x1 exited with 1 before it was ready")

    monkeypatch.setattr(suite, "start_triton", exits)
    assert suite._try_start_triton(Path("bundle"), Path("logs")) is None
    assert "triton failed, its target left out: triton-2x1 exited with 1" in capsys.readouterr().out


def test_a_peer_that_dies_after_a_round_answers_nothing_and_its_target_is_not_met() -> None:
    # A dead server refuses every request; the closed loop counts them as errors and 0 images/s.
    rates = iter([1200.0, 0.0])
    peer = targets.Target("naive", 1.5, lambda: 2400.0, lambda: next(rates))

    measured = targets.paired_rounds([peer], rounds=4)

    assert [m.get("error") for m in measured] == [None, "a side answered nothing: 2,400 against 0"]
    (row,) = targets.summarize(measured, {"naive": 1.5})
    assert (row["rounds"], row["failed_in_round"], row["ratio_median"], row["met"]) == (1, 2, 2.0, False)


@pytest.mark.parametrize(
    ("error", "recorded"),
    [
        (TimeoutError("requests still unanswered 60 s after the window closed"), "requests still unanswered"),
        (
            grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone"
            ),
            "UNAVAILABLE: gone",
        ),
    ],
)
def test_a_server_that_hangs_or_drops_a_stream_ends_its_target_not_the_run(
    error: Exception, recorded: str
) -> None:
    def stream() -> float:
        raise error

    measured = targets.paired_rounds(
        [
            targets.Target("stream", 0.8, stream, lambda: 100.0),
            targets.Target("other", 0.9, lambda: 95.0, lambda: 100.0),
        ],
        rounds=2,
    )

    assert [(m["target"], m["round"]) for m in measured] == [("stream", 1), ("other", 1), ("other", 2)]
    assert recorded in measured[0]["error"]


def test_a_failed_run_keeps_what_it_measured_beside_the_last_finished_runs_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.json").write_text("{}")

    def fails_in_the_second_stage(
        bundle: Path, plan: suite.Plan, work_dir: Path, results: dict[str, object]
    ) -> None:
        results["ceilings"] = [{"graph": "decoder", "items_per_s": 9000.0}]
        raise servers.ServerFailed("service exited with -9 mid-run")

    monkeypatch.setattr(suite, "run", fails_in_the_second_stage)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("prose\n")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "results.json").write_text('{"the last": "finished run"}')

    with pytest.raises(servers.ServerFailed, match="mid-run"):
        suite.main(["--bundle", str(bundle), "--work-dir", str(tmp_path / "work"), "--doc", str(doc)])

    partial = json.loads((tmp_path / "work" / "results.partial.json").read_text())
    assert partial["ceilings"][0]["items_per_s"] == 9000.0
    assert json.loads((tmp_path / "work" / "results.json").read_text()) == {"the last": "finished run"}
    assert doc.read_text() == "prose\n"
