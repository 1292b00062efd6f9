"""The AE-against-VAE note's links to its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.report import _relative, main, run_names


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
