"""The run directory: what `vae-train` writes and `vae-evaluate` and `vae-export` read.

RUN_DIR/config.json     TrainConfig, with the ModelConfig that rebuilds the network
RUN_DIR/checkpoint.pt   the model's state_dict only (torch.load(..., weights_only=True))
RUN_DIR/metrics.json    per-epoch losses, and the final evaluation once there is one
RUN_DIR/figures/        PNGs from vae-evaluate
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from training.models import VAE, AutoEncoder, ModelConfig, build_model, check_field_types

Likelihood = Literal["bernoulli", "gaussian"]
LrSchedule = Literal["constant", "cosine", "onecycle"]

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
    # The defaults below beat the reference recipe (Adam 5e-4, constant) by about 3 nats on the
    # held-out split; docs/ae-vs-vae.md has the measurements.
    learning_rate: float = 2e-3
    # Decoupled weight decay (AdamW, Loshchilov and Hutter, 2019); 0 is plain Adam.
    weight_decay: float = 0.05
    # How the learning rate moves over the run: constant, cosine decay to zero, or one-cycle
    # (a warm-up to learning_rate, then annealing; Smith and Topin, 2019).
    lr_schedule: LrSchedule = "onecycle"
    # Epochs over which the KL weight rises linearly from 0 to beta (0: no warm-up).
    kl_warmup_epochs: float = 0.0
    # Evaluate and save an exponential moving average of the weights with this decay per step
    # (Polyak averaging); 0 keeps the last weights.
    ema_decay: float = 0.0
    # Data augmentation: shift each training image by up to this many pixels in x and y (0: off).
    shift_pixels: int = 0
    # Dynamic binarization: each training batch is replaced by Bernoulli samples with the grey
    # levels as probabilities, as input and as target. The binary cross-entropy is linear in its
    # target, so the expected loss is the grey images' loss: the same objective, with noise.
    # Measured on the grey held-out images it is 1.5 nats worse (docs/ae-vs-vae.md), so it is off.
    binarize: bool = False
    # Encoder augmentation: each batch is shown to the encoder a second time, randomly rotated,
    # scaled and shifted, and scored by the model's loss with the decoder frozen, so that only the
    # encoder learns from it. The encoder meets more varied images; the decoder still models only
    # the real ones. This is the weight of that term (0: off); measured, it gains about 2 nats on
    # unseen images (docs/ae-vs-vae.md).
    encoder_augmentation: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        numbers = (
            "validation_fraction",
            "beta",
            "recon_weight",
            "learning_rate",
            "weight_decay",
            "kl_warmup_epochs",
            "encoder_augmentation",
        )
        not_finite = [
            f"{name} {getattr(self, name)}" for name in numbers if not math.isfinite(getattr(self, name))
        ]
        if not_finite:
            raise ValueError(f"expected finite numbers, got {', '.join(not_finite)}")
        if self.recon_weight <= 0:
            # A weight of 0 or less would train the decoder away from the images.
            raise ValueError(f"recon_weight must be positive, got {self.recon_weight}")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}")
        if self.lr_schedule not in ("constant", "cosine", "onecycle"):
            raise ValueError(f"lr_schedule must be constant, cosine or onecycle, got {self.lr_schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be at least 1, got {self.epochs}, {self.batch_size}"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("beta", "kl_warmup_epochs", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_decay > 0 and self.model.batch_norm:
            # Averaged weights do not match averaged batch statistics: measured, the validation
            # loss was far worse than either alone.
            raise ValueError("ema_decay cannot be combined with batch_norm")
        if self.encoder_augmentation < 0:
            raise ValueError(f"encoder_augmentation must not be negative, got {self.encoder_augmentation}")
        if not 0 <= self.shift_pixels <= 4:
            raise ValueError(f"shift_pixels must be between 0 and 4, got {self.shift_pixels}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        values = dict(data)
        model = data.get("model", {})
        if not isinstance(model, dict):
            raise ValueError(f"model: expected an object of model settings, got {model!r}")
        values["model"] = ModelConfig.from_dict(model)
        # Runs written before the encoder augmentation existed were trained without it.
        values.setdefault("encoder_augmentation", 0.0)
        return cls(**values)


def save_config(run_dir: Path, config: TrainConfig) -> None:
    """Start a run: its config, and no weights, metrics or figures until it makes them (so a run cut
    short by a Ctrl-C or a divergence never pairs this config with those of an earlier run in the
    same folder)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    if (run_dir / CONFIG_FILE).is_file():  # an earlier run's folder; any other keeps its files
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(run_dir / FIGURES_DIR, ignore_errors=True)
    # Settings, not measurements: TrainConfig keeps them finite, and a null would not load again.
    write_text_atomic(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2, allow_nan=False) + "\n")


def load_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a run directory written by vae-train?")
    data = read_json_object(path)
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as error:  # a field unknown, out of range or of the wrong type
        raise ValueError(f"{path}: not a training config that vae-train wrote ({error})") from error


def save_checkpoint(run_dir: Path, model: nn.Module) -> None:
    """Written whole to a temporary file and renamed: an interrupted save leaves no torn checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (CHECKPOINT_FILE + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(run_dir / CHECKPOINT_FILE)


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> tuple[TrainConfig, AutoEncoder | VAE]:
    """The run's config and its model with trained weights, in eval mode.

    Raises FileNotFoundError for a run without weights, ValueError for weights that are not a
    state_dict of the model config.json describes, or that hold NaN or an infinity: such a model
    answers NaN, which would pass for figures (an argmax of NaN is digit 0) or for a parity gap.
    """
    config = load_config(run_dir)
    model = build_model(config.model)
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; vae-train writes it when the run ends")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # whatever torch makes of a file that is not such a state_dict
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if isinstance(error, pickle.UnpicklingError):  # torch's first line advises weights_only=False
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
            first_line = "not tensors alone, which is all a checkpoint is read as" + (
                f": {detail.group(1).strip()}" if detail else ""
            )
        raise ValueError(
            f"{path}: not the weights of the model {CONFIG_FILE} describes ({first_line})"
        ) from error
    not_finite = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if not_finite:
        raise ValueError(
            f"{path}: NaN or infinite weights in {', '.join(not_finite)} (a run that diverged); "
            "train it again with a lower learning rate"
        )
    return config, model.to(device).eval()


def load_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file for anything else in it."""
    try:
        data = json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def save_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / METRICS_FILE, json_text(metrics) + "\n")


def finite_or_null(value: Any) -> Any:
    """`value` with every float that is NaN or infinite, in it or in its dicts, lists and tuples,
    replaced by None: the measure has no number."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def json_text(value: Any) -> str:
    """Standard JSON of measured numbers, indented, with a non-finite number as null.

    Python's json writes NaN and infinities as bare NaN and Infinity, which are not JSON: jq, Go and
    JavaScript refuse the file. allow_nan=False makes a number this misses raise instead.
    """
    return json.dumps(finite_or_null(value), indent=2, allow_nan=False)


def write_text_atomic(path: Path, text: str) -> None:
    """Written whole to a temporary file beside `path` and renamed over it: a reader, or a crash,
    never sees half a file, and the file it replaces stays whole until then."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
