"""The run directory: what `vae-train` writes and `vae-evaluate` and `vae-export` read.

RUN_DIR/config.json     TrainConfig, with the ModelConfig that rebuilds the network
RUN_DIR/checkpoint.pt   the model's state_dict only (torch.load(..., weights_only=True))
RUN_DIR/metrics.json    per-epoch losses, and the final evaluation once there is one
RUN_DIR/figures/        PNGs from vae-evaluate
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from training.models import ModelConfig, build_model

Likelihood = Literal["bernoulli", "gaussian"]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
FIGURES_DIR = "figures"


@dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters of one training run; with the weights, they rebuild the model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: str = "mnist-5k"
    data_dir: str | None = None
    limit: int | None = None
    validation_fraction: float = 0.1
    likelihood: Likelihood = "bernoulli"
    beta: float = 1.0
    # The book's Gaussian recipe scales the mean squared error by 1000 (its r_loss_factor).
    recon_weight: float = 1000.0
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 5e-4
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        values = dict(data)
        values["model"] = ModelConfig.from_dict(data.get("model", {}))
        return cls(**values)


def save_config(run_dir: Path, config: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a run directory written by vae-train?")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def save_checkpoint(run_dir: Path, model: nn.Module) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), run_dir / CHECKPOINT_FILE)


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> tuple[TrainConfig, nn.Module]:
    """The run's config and its model with trained weights, in eval mode."""
    config = load_config(run_dir)
    model = build_model(config.model)
    state = torch.load(run_dir / CHECKPOINT_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return config, model.to(device).eval()


def load_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    metrics: dict[str, Any] = json.loads(path.read_text())
    return metrics


def save_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Written whole to a temporary file and renamed, so a reader never sees half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(run_dir / METRICS_FILE)
