"""The AE-against-VAE note's links to its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.report import _relative, main, run_names, table


def test_a_figure_beside_or_below_the_note_is_linked_from_the_notes_folder(tmp_path: Path) -> None:
    assert _relative(tmp_path / "docs" / "figures" / "a.png", tmp_path / "docs") == "figures/a.png"


def test_a_figure_outside_the_notes_folder_is_linked_with_dot_dot(tmp_path: Path) -> None:
    assert _relative(tmp_path / "figs" / "a.png", tmp_path / "docs") == "../figs/a.png"


def test_each_runs_figures_get_a_name_of_their_own_even_when_two_runs_share_a_kind() -> None:
    assert run_names([{"kind": "ae", "latent_dim": 2}, {"kind": "vae", "latent_dim": 2}]) == ["ae", "vae"]
    runs = [
        {"kind": "vae", "latent_dim": 3},
        {"kind": "vae", "latent_dim": 16},
        {"kind": "ae", "latent_dim": 1},
    ]
    assert run_names(runs) == ["vae-z3", "vae-z16", "ae"]
    assert run_names([{"kind": "vae", "latent_dim": 2}] * 2) == ["vae-z2-1", "vae-z2-2"]


def test_a_report_run_from_another_folder_than_the_evaluation_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"runs": [{"kind": "vae", "latent_dim": 2, "run_dir": "runs/vae"}]}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([str(evaluation), "--out", str(tmp_path / "note.md")])
    assert exit_.value.code == 2
    assert "names runs/vae, not found from here: run the report in the folder vae-evaluate ran in" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "note.md").exists()


def test_a_measure_without_a_number_is_tabled_as_n_a_even_inside_a_list() -> None:
    """vae-evaluate writes null for a number that is not finite: an overflowed likelihood, say."""
    judged = {"mean_confidence": None, "predicted_digit_entropy_nats": None}
    run = {
        "kind": "vae",
        "latent_dim": 2,
        "test_set": {"images": 20, "dataset": "mnist-5k", "part": "held-out split"},
        "elbo_nats": None,
        "iw_nll_nats": None,
        "recon_nats": None,
        "kl_nats": None,
        "recon_mse": 0.05,
        "classifier": {"test_accuracy": 0.9},
        "limitation_1_empty_space": {
            "prior_samples": judged,
            "code_box_samples": judged,
            "real_test_images": judged,
        },
        "limitation_2_centre_and_range": {
            "mean": [None, 0.5],
            "std": [1.0, None],
            "fraction_in_prior_95": None,
        },
        "limitation_3_uneven_spread": {
            "trace_ratio": None,
            "largest_digit": 1,
            "smallest_digit": 0,
            "knn_accuracy": None,
        },
    }
    text = table([run])
    assert "| negative ELBO, nats (lower is better) | n/a |" in text
    assert "| **2. centre and range**: mean of the codes | (n/a, 0.50) |" in text
    assert "| standard deviation of the codes | (1.00, n/a) |" in text


def test_each_row_of_the_table_shows_the_measure_its_label_names() -> None:
    def judged(confidence: float, distance: float) -> dict[str, float]:
        return {
            "mean_confidence": confidence,
            "predicted_digit_entropy_nats": 2.0,
            "mean_distance_to_nearest_training_image": distance,
        }

    run = {
        "kind": "vae",
        "latent_dim": 2,
        "test_set": {"images": 500, "dataset": "mnist-5k", "part": "held-out split"},
        "elbo_nats": 101.0,
        "iw_nll_nats": 99.0,
        "recon_nats": 80.0,
        "kl_nats": 21.0,
        "recon_mse": 0.0123,
        "classifier": {"test_accuracy": 0.987},
        "limitation_1_empty_space": {
            "prior_samples": judged(0.1, 1.0),
            "code_box_samples": judged(0.2, 2.0),
            "code_box_nearest_quarter": judged(0.3, 3.0),
            "code_box_farthest_quarter": judged(0.4, 4.0),
            "test_reconstructions": judged(0.5, 5.0),
            "real_test_images": {"mean_confidence": 0.6},
        },
        "limitation_2_centre_and_range": {
            "mean": [0.25, -0.5],
            "std": [1.5, 2.5],
            "fraction_in_prior_95": 0.9,
        },
        "limitation_3_uneven_spread": {
            "trace_ratio": 6.0,
            "largest_digit": 1,
            "smallest_digit": 0,
            "knn_accuracy": 0.8,
        },
    }
    rows = dict(line.removeprefix("| ").rsplit(" | ", 1) for line in table([run]).splitlines()[2:])
    expected = {
        "negative ELBO, nats (lower is better)": "101.00",
        "importance-weighted -log p(x), nats": "99.00",
        "reconstruction NLL, nats (VAE: mean over z ~ q(z\\|x); AE: at its code)": "80.00",
        "KL to N(0, I), nats": "21.00",
        "reconstruction MSE per pixel": "0.0123",
        "**1. empty space**: classifier's own test accuracy": "98.7%",
        "decoded N(0, I) points: mean top-class confidence": "0.100",
        "decoded points uniform in the codes' box: confidence / entropy": "0.200 / 2.000",
        "the box's quarter nearest / farthest from any training code: confidence": "0.300 / 0.400",
        "distance to the nearest training image: N(0, I) points / the box's nearest / farthest quarter": (
            "1.00 / 3.00 / 4.00"
        ),
        "distance to the nearest training image: test images' reconstructions (the yardstick)": "5.00",
        "real test images: confidence (the yardstick)": "0.600",
        "**2. centre and range**: mean of the codes": "(0.25, -0.50)",
        "standard deviation of the codes": "(1.50, 2.50)",
        "codes inside the central 95% of N(0, I)": "90.0%",
        "**3. uneven spread**: largest / smallest digit spread (trace of covariance)": (
            "6.00 (digit 1 / digit 0)"
        ),
        "5-NN digit accuracy from the codes": "80.0%",
    }
    assert {label: rows[label].removesuffix(" |") for label in expected} == expected
