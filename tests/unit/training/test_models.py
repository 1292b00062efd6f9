"""The AE and the VAE: shapes for several latent sizes, and the config round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models import IMAGE_SHAPE, VAE, AutoEncoder, ModelConfig, build_model


@pytest.mark.parametrize("latent_dim", [1, 2, 16])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_vae_maps_images_to_codes_and_back(latent_dim: int, batch_norm: bool) -> None:
    model = build_model(ModelConfig(kind="vae", latent_dim=latent_dim, batch_norm=batch_norm)).eval()
    assert isinstance(model, VAE)
    images = torch.rand(3, *IMAGE_SHAPE)
    mean, log_var = model.encode(images)
    assert mean.shape == log_var.shape == (3, latent_dim)
    decoded = model.decode(model.reparameterize(mean, log_var)).detach()
    assert decoded.shape == (3, *IMAGE_SHAPE)
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
    logits, _, _ = model(images)
    assert logits.shape == (3, *IMAGE_SHAPE)


@pytest.mark.parametrize("latent_dim", [2, 7])
def test_the_ae_maps_images_to_one_code_each(latent_dim: int) -> None:
    model = build_model(ModelConfig(kind="ae", latent_dim=latent_dim)).eval()
    assert isinstance(model, AutoEncoder)
    z = model.encode(torch.rand(4, *IMAGE_SHAPE))
    assert z.shape == (4, latent_dim)
    assert model.decode(z).shape == (4, *IMAGE_SHAPE)


def test_the_config_survives_a_json_round_trip_and_rejects_bad_values() -> None:
    config = ModelConfig(kind="ae", latent_dim=5, batch_norm=True)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="latent_dim"):
        ModelConfig(latent_dim=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kernel_size": 4}, "kernel_size must be odd"),
        (
            {"decoder_strides": (1, 2, 1, 1)},
            r"grow the encoder's 7x7 features to 14x14 images; expected 28x28",
        ),
        ({"encoder_strides": (2, 2, 2, 1)}, r"4x4 features to 16x16"),
        ({"encoder_strides": (1, 0, 2, 1)}, "every stride must be at least 1"),
        ({"decoder_strides": (-1, 2, 2, -1)}, "every stride must be at least 1"),
        ({"encoder_channels": (), "encoder_strides": ()}, "at least one layer each"),
    ],
)
def test_a_config_whose_layers_cannot_make_28x28_images_is_refused_before_any_training(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**options)  # type: ignore[arg-type]


def test_a_posterior_sample_is_the_mean_plus_sigma_times_standard_normal_noise() -> None:
    """z = mean + exp(log_var / 2) * eps: the samples of N(3, 2^2) have mean 3 and deviation 2."""
    torch.manual_seed(0)
    mean = torch.full((200_000, 1), 3.0)
    log_var = torch.full((200_000, 1), torch.log(torch.tensor(4.0)).item())
    z = VAE.reparameterize(mean, log_var)
    assert abs(z.mean().item() - 3.0) < 0.02
    assert abs(z.std().item() - 2.0) < 0.02
    mean.requires_grad_(True)
    VAE.reparameterize(mean, log_var).sum().backward()  # type: ignore[no-untyped-call]
    assert mean.grad is not None and torch.all(mean.grad == 1.0)  # gradients flow through the sample


def test_an_unknown_model_kind_is_refused_naming_the_two_kinds() -> None:
    with pytest.raises(ValueError, match="model kind must be 'vae' or 'ae', got 'gan'"):
        ModelConfig(kind="gan")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_decode_gives_the_sigmoid_of_the_decoders_logits(kind: str) -> None:
    model = build_model(ModelConfig(kind=kind)).eval()  # type: ignore[arg-type]
    z = 3 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), torch.sigmoid(model.decoder.logits(z)))


def test_the_aes_forward_gives_the_logits_of_decoding_its_code() -> None:
    model = AutoEncoder(ModelConfig(kind="ae")).eval()
    images = torch.rand(3, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(images)), model.decode(model.encode(images)))


def test_the_vaes_forward_decodes_one_reparameterized_sample_from_the_global_random_stream() -> None:
    """logits = decoder.logits(mean + exp(log_var / 2) * eps), with eps = torch.randn_like(mean):
    another seed, another sample and other logits, from the same posterior."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="vae"))  # in train mode, as training calls it
    images = torch.rand(3, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(1)
        logits, mean, log_var = model(images)
        torch.manual_seed(1)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        torch.testing.assert_close(logits, model.decoder.logits(z))
        torch.manual_seed(2)
        other_logits, other_mean, other_log_var = model(images)
    assert torch.equal(other_mean, mean) and torch.equal(other_log_var, log_var)
    assert not torch.allclose(other_logits, logits)


@pytest.mark.parametrize(
    ("batch_norm", "dropout", "encoder_layers", "decoder_layers"),
    [
        (False, 0.0, [nn.Conv2d, nn.LeakyReLU, nn.Flatten], [nn.ConvTranspose2d, nn.LeakyReLU]),
        (
            True,
            0.0,
            [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU, nn.Flatten],
            [nn.ConvTranspose2d, nn.BatchNorm2d, nn.LeakyReLU],
        ),
        (
            False,
            0.25,
            [nn.Conv2d, nn.LeakyReLU, nn.Dropout, nn.Flatten],
            [nn.ConvTranspose2d, nn.LeakyReLU, nn.Dropout],
        ),
        (
            True,
            0.25,
            [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU, nn.Dropout, nn.Flatten],
            [nn.ConvTranspose2d, nn.BatchNorm2d, nn.LeakyReLU, nn.Dropout],
        ),
    ],
)
def test_batch_norm_and_dropout_follow_each_hidden_layer_only_when_asked_for(
    batch_norm: bool, dropout: float, encoder_layers: list[type], decoder_layers: list[type]
) -> None:
    """A layer, [batch norm], LeakyReLU, [dropout]; the decoder's output layer is a bare convolution."""
    config = ModelConfig(
        encoder_channels=(4,),
        encoder_strides=(1,),
        decoder_channels=(4, 1),
        decoder_strides=(1, 1),
        batch_norm=batch_norm,
        dropout=dropout,
    )
    model = build_model(config)
    assert [type(layer) for layer in model.encoder.layers] == encoder_layers
    assert [type(layer) for layer in model.decoder.layers] == [*decoder_layers, nn.ConvTranspose2d]
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            assert layer.num_features == 4
        if isinstance(layer, nn.Dropout):
            assert layer.p == dropout
