"""The AE-against-VAE note's links to its figures."""

from __future__ import annotations

from pathlib import Path

from training.report import _relative


def test_a_figure_beside_or_below_the_note_is_linked_from_the_notes_folder(tmp_path: Path) -> None:
    assert _relative(tmp_path / "docs" / "figures" / "a.png", tmp_path / "docs") == "figures/a.png"


def test_a_figure_outside_the_notes_folder_is_linked_with_dot_dot(tmp_path: Path) -> None:
    assert _relative(tmp_path / "figs" / "a.png", tmp_path / "docs") == "../figs/a.png"
