"""The AutoEncoder and the VAE, on the convolutional backbone of the essay's source code.

The backbone is the MNIST VAE of Foster, 'Generative Deep Learning' (2019), chapter 3: four 3x3
convolutions with 32, 64, 64, 64 filters and strides 1, 2, 2, 1, LeakyReLU, a dense layer to the
latent code, and the mirror image with transposed convolutions back to a 28x28 image. The AE and the
VAE share every layer but the encoder's head: the VAE adds a second head for the log-variance.

`encode` and `decode` are the export seam: each becomes one ONNX graph.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

ModelKind = Literal["vae", "ae"]
IMAGE_SHAPE = (1, 28, 28)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved beside its weights in config.json."""

    kind: ModelKind = "vae"
    latent_dim: int = 2
    encoder_channels: tuple[int, ...] = (32, 64, 64, 64)
    encoder_strides: tuple[int, ...] = (1, 2, 2, 1)
    decoder_channels: tuple[int, ...] = (64, 64, 32, 1)
    decoder_strides: tuple[int, ...] = (1, 2, 2, 1)
    kernel_size: int = 3
    # The book's options; both off in its MNIST recipe.
    batch_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.kind not in ("vae", "ae"):
            raise ValueError(f"model kind must be 'vae' or 'ae', got {self.kind!r}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {self.latent_dim}")
        if not self.encoder_channels or not self.decoder_channels:
            raise ValueError("the encoder and the decoder need at least one layer each")
        if min(self.encoder_strides + self.decoder_strides) < 1:
            raise ValueError("every stride must be at least 1")
        if len(self.encoder_channels) != len(self.encoder_strides):
            raise ValueError("encoder_channels and encoder_strides must have the same length")
        if len(self.decoder_channels) != len(self.decoder_strides):
            raise ValueError("decoder_channels and decoder_strides must have the same length")
        if self.decoder_channels[-1] != IMAGE_SHAPE[0]:
            raise ValueError(f"the last decoder layer must have {IMAGE_SHAPE[0]} channel(s)")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:  # padding kernel_size // 2 keeps the side
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        features = _feature_shape(self)[1]
        side = features * math.prod(self.decoder_strides)
        if side != IMAGE_SHAPE[1]:
            raise ValueError(
                f"decoder_strides {list(self.decoder_strides)} grow the encoder's {features}x{features} "
                f"features to {side}x{side} images; expected {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]}"
            )
        if not 0.0 <= self.dropout < 1.0:  # NaN fails too
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from JSON, where tuples come back as lists."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def check_field_types(config: Any) -> None:
    """ValueError naming each field of a config dataclass whose value is not of its declared type: a
    config.json edited by hand, or of another program, would otherwise fail deep inside torch."""
    hints = typing.get_type_hints(type(config))
    wrong = [
        f"{field.name} {getattr(config, field.name)!r}"
        for field in dataclasses.fields(config)
        if not _is_a(getattr(config, field.name), hints[field.name])
    ]
    if wrong:
        raise ValueError(f"values of the wrong type: {', '.join(wrong)}")


def _is_a(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint`; an int is a float, a bool is not a number, and a
    Literal's values are left to the checks that name them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, arg) for arg in args)
    if origin is tuple:  # tuple[X, ...]
        return isinstance(value, tuple) and all(_is_a(item, args[0]) for item in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _block(layer: nn.Module, channels: int, config: ModelConfig) -> list[nn.Module]:
    """A layer, then the book's optional batch norm, LeakyReLU, and optional dropout."""
    modules = [layer]
    if config.batch_norm:
        modules.append(nn.BatchNorm2d(channels))
    modules.append(nn.LeakyReLU())
    if config.dropout > 0:
        modules.append(nn.Dropout(config.dropout))
    return modules


def _feature_shape(config: ModelConfig) -> tuple[int, int, int]:
    """The shape of the encoder's last feature map: each stride-2 layer halves the image side."""
    side = IMAGE_SHAPE[1]
    for stride in config.encoder_strides:
        side = (side - 1) // stride + 1
    return (config.encoder_channels[-1], side, side)


class Encoder(nn.Module):
    """Images [N,1,28,28] in [0,1] -> features; the heads live in the models below."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = IMAGE_SHAPE[0]
        for channels, stride in zip(config.encoder_channels, config.encoder_strides, strict=True):
            pad = config.kernel_size // 2
            conv = nn.Conv2d(in_channels, channels, config.kernel_size, stride=stride, padding=pad)
            layers += _block(conv, channels, config)
            in_channels = channels
        layers.append(nn.Flatten())
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        result: Tensor = self.layers(images)
        return result


class Decoder(nn.Module):
    """Latent codes [N,D] -> pixel probabilities [N,1,28,28] in [0,1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        shape = _feature_shape(config)
        self.dense = nn.Linear(config.latent_dim, shape[0] * shape[1] * shape[2])
        self.unflatten = nn.Unflatten(1, shape)
        layers: list[nn.Module] = []
        in_channels = shape[0]
        last = len(config.decoder_channels) - 1
        for i, (channels, stride) in enumerate(
            zip(config.decoder_channels, config.decoder_strides, strict=True)
        ):
            pad = config.kernel_size // 2
            conv = nn.ConvTranspose2d(
                in_channels,
                channels,
                config.kernel_size,
                stride=stride,
                padding=pad,
                output_padding=stride - 1,
            )
            layers += [conv] if i == last else _block(conv, channels, config)
            in_channels = channels
        self.layers = nn.Sequential(*layers)

    def logits(self, z: Tensor) -> Tensor:
        """Pre-sigmoid outputs: the loss uses them for a numerically stable cross-entropy."""
        result: Tensor = self.layers(self.unflatten(self.dense(z)))
        return result

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(z))


class AutoEncoder(nn.Module):
    """A plain AE: one code per image, no noise, no prior."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.to_code = nn.Linear(_flat_size(config), config.latent_dim)
        self.decoder = Decoder(config)

    def encode(self, images: Tensor) -> Tensor:
        result: Tensor = self.to_code(self.encoder(images))
        return result

    def decode(self, z: Tensor) -> Tensor:
        result: Tensor = self.decoder(z)
        return result

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction logits."""
        result: Tensor = self.decoder.logits(self.encode(images))
        return result


class VAE(nn.Module):
    """Kingma and Welling's VAE: q(z|x) = N(mean, diag(exp(log_var))), p(z) = N(0, I)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.to_mean = nn.Linear(_flat_size(config), config.latent_dim)
        self.to_log_var = nn.Linear(_flat_size(config), config.latent_dim)
        self.decoder = Decoder(config)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and log-variance, each [N,D]."""
        features = self.encoder(images)
        return self.to_mean(features), self.to_log_var(features)

    @staticmethod
    def reparameterize(mean: Tensor, log_var: Tensor) -> Tensor:
        """z = mean + sigma * eps, eps ~ N(0, I): a sample that gradients can flow through."""
        return mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)

    def decode(self, z: Tensor) -> Tensor:
        result: Tensor = self.decoder(z)
        return result

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction logits from one posterior sample, and the posterior's parameters."""
        mean, log_var = self.encode(images)
        z = self.reparameterize(mean, log_var)
        return self.decoder.logits(z), mean, log_var


def _flat_size(config: ModelConfig) -> int:
    channels, height, width = _feature_shape(config)
    return channels * height * width


def build_model(config: ModelConfig) -> AutoEncoder | VAE:
    return VAE(config) if config.kind == "vae" else AutoEncoder(config)
