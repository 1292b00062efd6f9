"""The run directory's JSON files: standard JSON, which jq, Go and JavaScript read."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from training.run import CHECKPOINT_FILE, METRICS_FILE, TrainConfig, load_metrics, load_run, save_metrics


def strict_json(text: str) -> Any:
    """The JSON in `text` as a strict parser reads it: bare NaN and Infinity, which Python's json
    writes and reads by default, are refused."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_metrics_that_are_not_finite_are_written_as_null_and_the_rest_as_they_are(tmp_path: Path) -> None:
    """A run whose evaluation overflowed, or diverged: the file stays JSON that any parser reads."""
    metrics = {
        "train_images": 4500,
        "history": [{"epoch": 1.0, "train_loss": math.nan, "val_loss": 180.5}],
        "evaluation": {
            "kind": "vae",
            "elbo_nats": math.inf,
            "kl_nats": -math.inf,
            "recon_nats": 150.25,
            "limitation_2_centre_and_range": {"mean": [math.nan, 0.5], "min": (-math.inf, -1.0)},
            "knn_accuracy": None,
        },
    }

    save_metrics(tmp_path, metrics)

    expected = {
        "train_images": 4500,
        "history": [{"epoch": 1.0, "train_loss": None, "val_loss": 180.5}],
        "evaluation": {
            "kind": "vae",
            "elbo_nats": None,
            "kl_nats": None,
            "recon_nats": 150.25,
            "limitation_2_centre_and_range": {"mean": [None, 0.5], "min": [None, -1.0]},
            "knn_accuracy": None,
        },
    }
    assert strict_json((tmp_path / METRICS_FILE).read_text()) == expected
    assert load_metrics(tmp_path) == expected


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"learning_rate": 0.0}, "learning_rate must be positive, got 0.0"),
        ({"beta": -1.0}, "beta must not be negative, got -1.0"),
        ({"kl_warmup_epochs": -1}, "kl_warmup_epochs must not be negative, got -1"),
        ({"weight_decay": -0.1}, "weight_decay must not be negative, got -0.1"),
    ],
)
def test_a_setting_out_of_its_range_is_refused_naming_it_and_its_value(
    setting: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        TrainConfig(**setting)  # type: ignore[arg-type]


def test_a_validation_fraction_that_is_not_a_number_is_refused_as_config_json_could_not_hold_it() -> None:
    with pytest.raises(ValueError, match="expected finite numbers, got validation_fraction nan"):
        TrainConfig(validation_fraction=math.nan)


def test_a_run_whose_weights_hold_nan_is_refused_naming_the_tensor_before_anything_uses_it(
    ae_run_dir: Path, tmp_path: Path
) -> None:
    """vae-evaluate would otherwise report NaN images as confident zeros (an argmax of NaN)."""
    run = tmp_path / "run"
    shutil.copytree(ae_run_dir, run)
    state = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    state["decoder.dense.bias"][0] = math.nan
    torch.save(state, run / CHECKPOINT_FILE)

    with pytest.raises(ValueError) as refused:
        load_run(run)

    assert str(refused.value).startswith(
        f"{run / CHECKPOINT_FILE}: NaN or infinite weights in decoder.dense.bias (a run that diverged)"
    )
