"""vae-evaluate and the report: the measures on known inputs, and both on tiny trained runs."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training.evaluate as evaluate_module
from tests.unit.training.test_run import strict_json
from training.data import ImageSet, load_test_set, load_training_splits
from training.evaluate import (
    Evaluator,
    _standard_error,
    centre_and_range,
    chi2_quantile,
    class_probabilities,
    decode,
    decode_logits,
    encode,
    judge,
    main,
    nearest_and_farthest_quarters,
    nearest_distances,
    reconstruction_nll,
    spread_by_digit,
    train_classifier,
    vae_likelihood,
)
from training.figures import manifold_edge, plane
from training.models import VAE, ModelConfig
from training.report import BEGIN, END, write_note
from training.run import TrainConfig, load_metrics, load_run, save_config
from training.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for kind in ("ae", "vae"):
        config = TrainConfig(model=ModelConfig(kind=kind), limit=300, epochs=1, batch_size=32)
        train(config, root / kind, progress=False)
        paths[kind] = root / kind
    return paths


def write_t10k(folder: Path, count: int) -> None:
    """The two official t10k files, gzipped and named as on the MNIST site, from real digits."""
    test = load_test_set("mnist-5k", limit=count)
    pixels = np.rint(test.images[:, 0] * 255).astype(np.uint8)
    labels = test.labels.astype(np.uint8)
    for name, array in (("t10k-images-idx3-ubyte.gz", pixels), ("t10k-labels-idx1-ubyte.gz", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
        (folder / name).write_bytes(gzip.compress(header + array.tobytes()))


def test_the_chi2_quantile_matches_the_tables() -> None:
    assert chi2_quantile(1, 0.95) == pytest.approx(3.841, abs=1e-3)
    assert chi2_quantile(2, 0.95) == pytest.approx(5.991, abs=1e-3)
    assert chi2_quantile(10, 0.95) == pytest.approx(18.307, abs=1e-3)


def test_codes_drawn_from_the_prior_sit_95_percent_inside_its_central_region() -> None:
    codes = np.random.default_rng(0).standard_normal((20_000, 3))
    stats = centre_and_range(codes)
    assert stats["fraction_in_prior_95"] == pytest.approx(0.95, abs=0.01)
    assert stats["mean_norm"] < 0.05
    assert stats["std"] == pytest.approx([1.0] * 3, abs=0.02)
    assert centre_and_range(codes + 5.0)["fraction_in_prior_95"] < 0.01


def test_the_spread_ratio_and_the_knn_accuracy_see_what_was_built_in() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 500)
    centres = np.where(labels[:, None] == 0, -10.0, 10.0)
    scale = np.where(labels[:, None] == 0, 2.0, 1.0)  # digit 0: 4x the variance in each dimension
    codes = centres + scale * rng.standard_normal((1000, 2))
    stats = spread_by_digit(codes, labels, codes, labels)
    assert stats["trace_ratio"] == pytest.approx(4.0, rel=0.15)
    assert stats["largest_digit"] == 0 and stats["smallest_digit"] == 1
    assert stats["knn_accuracy"] == 1.0
    # A run of fewer training images than the vote's 5 neighbours (a tiny --limit) has no accuracy.
    assert spread_by_digit(codes, labels, codes[:4], labels[:4])["knn_accuracy"] is None


def test_the_knn_accuracy_votes_with_the_training_codes_on_the_test_codes() -> None:
    """Test codes whose digits sit where the training codes of the other digit are score 0."""
    rng = np.random.default_rng(2)
    train_labels = np.repeat([0, 1], 100)
    train_codes = np.where(train_labels[:, None] == 0, -10.0, 10.0) + rng.standard_normal((200, 2))
    swapped = 1 - train_labels  # the same places, the other digit
    assert spread_by_digit(train_codes, swapped, train_codes, train_labels)["knn_accuracy"] == 0.0


def test_nearest_distances_are_each_querys_distance_to_its_nearest_reference() -> None:
    rng = np.random.default_rng(0)
    reference = rng.random((700, 1, 4, 4)).astype(np.float32)  # more rows than one batch
    queries = np.concatenate([reference[[3, 650]], rng.random((1200, 1, 4, 4)).astype(np.float32)])
    brute = np.sqrt(((queries[:, None] - reference[None]) ** 2).sum(axis=(2, 3, 4))).min(axis=1)
    found = nearest_distances(queries, reference, torch.device("cpu"))
    np.testing.assert_allclose(found, brute, atol=1e-3)
    assert np.isfinite(found).all() and found[:2].max() < 1e-2  # a reference itself: never sqrt(< 0)


def test_the_quarters_are_the_points_nearest_and_farthest_from_the_training_codes() -> None:
    distances = np.random.default_rng(0).permutation(1000).astype(float)
    nearest, farthest = nearest_and_farthest_quarters(distances)
    assert sorted(distances[nearest]) == list(range(250))
    assert sorted(distances[farthest]) == list(range(750, 1000))
    few_nearest, few_farthest = nearest_and_farthest_quarters(np.array([2.0, 0.0, 1.0]))
    assert len(few_nearest) == len(few_farthest) == 0  # fewer than four points: no quarter, not all


def test_judge_reads_confidence_and_the_evenness_of_the_predicted_digits() -> None:
    uncertain = np.full((100, 10), 0.1)
    uncertain[np.arange(100), np.arange(100) % 10] += 1e-3
    assert judge(uncertain)["predicted_digit_entropy_nats"] == pytest.approx(math.log(10))
    assert judge(uncertain)["mean_confidence"] == pytest.approx(0.101)
    sure_of_one = np.zeros((50, 10))
    sure_of_one[:, 3] = 1.0
    assert judge(sure_of_one) == {
        "mean_confidence": 1.0,
        "fraction_confident_90": 1.0,
        "predicted_digit_counts": [0, 0, 0, 50, 0, 0, 0, 0, 0, 0],
        "predicted_digit_entropy_nats": 0.0,
    }
    assert math.copysign(1, judge(sure_of_one)["predicted_digit_entropy_nats"]) == 1  # not -0.0


def test_the_importance_weighted_bound_is_tighter_than_the_elbo(runs: dict[str, Path]) -> None:
    _, model = load_run(runs["vae"])
    assert isinstance(model, VAE)
    images = load_test_set("mnist-5k", limit=20).images
    terms = vae_likelihood(model, images, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    elbo = terms["recon"] + terms["kl"]
    assert terms["iw_nll"].mean() < elbo.mean()
    assert (terms["kl"] >= 0).all()


class _BlindDecoder:
    """q(z|x) = N(mean, exp(log_var) I), and a decoder whose logits do not depend on z: p(x) is then
    p(x|z) for any z, whatever the posterior."""

    def __init__(self, mean: float = 0.0, log_var: float = 0.0) -> None:
        self.decoder = self
        self.mean, self.log_var = mean, log_var

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((len(x), 2), self.mean), torch.full((len(x), 2), self.log_var)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full((len(z), 1, 28, 28), 0.3)


def test_where_every_importance_weight_is_the_same_the_bound_equals_the_elbo() -> None:
    # With q(z|x) = p(z) every importance weight is p(x), and the bound is exact.
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    model: Any = _BlindDecoder()
    terms = vae_likelihood(model, images, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    np.testing.assert_allclose(terms["kl"], 0.0, atol=1e-12)
    np.testing.assert_allclose(terms["iw_nll"], terms["recon"], rtol=1e-9)  # log(64) would show


def test_the_bound_weighs_each_sample_by_prior_over_posterior_so_it_finds_p_x_where_the_elbo_pays_kl() -> (
    None
):
    # A posterior away from the prior, wider than it: the ELBO is KL above -log p(x), while the
    # importance weights p(z)/q(z|x) average to 1 and the bound comes back to -log p(x|z) = -log p(x).
    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    model: Any = _BlindDecoder(mean=0.5, log_var=0.5)
    terms = vae_likelihood(model, images, 8192, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (terms["kl"] > 0.1).all()
    np.testing.assert_allclose(terms["iw_nll"], terms["recon"], atol=0.1)


def test_the_training_images_are_read_from_data_dir_when_it_names_the_runs_dataset() -> None:
    config = TrainConfig(dataset="mnist", data_dir="/where/it/trained")
    cpu = torch.device("cpu")
    moved = Evaluator(None, Path("/moved"), None, 1, 0, cpu)
    assert moved.training_data_dir(config) == Path("/moved")
    other_test_set = Evaluator("fashion-mnist", Path("/fashion"), None, 1, 0, cpu)
    assert other_test_set.training_data_dir(config) == Path("/where/it/trained")
    assert Evaluator(None, None, None, 1, 0, cpu).training_data_dir(config) == Path("/where/it/trained")


def test_a_data_dir_of_the_t10k_files_alone_leaves_the_training_images_where_the_run_found_them(
    tmp_path: Path,
) -> None:
    """As README and docs/ae-vs-vae.md suggest for the official test set; --data-dir is still the
    folder a missing file is looked for in, where neither folder holds the training files."""
    t10k, trained, empty = tmp_path / "t10k", tmp_path / "trained", tmp_path / "empty"
    for folder in (t10k, trained, empty):
        folder.mkdir()
    write_t10k(t10k, 10)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (trained / stem).write_bytes(b"")  # found by name: what is in them is read later
    cpu = torch.device("cpu")
    assert (
        Evaluator(None, t10k, None, 1, 0, cpu).training_data_dir(
            TrainConfig(dataset="mnist", data_dir=str(trained))
        )
        == trained
    )
    assert (
        Evaluator(None, t10k, None, 1, 0, cpu).training_data_dir(
            TrainConfig(dataset="mnist", data_dir=str(empty))
        )
        == t10k
    )


def test_evaluation_on_a_folder_with_only_the_two_official_t10k_files(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    write_t10k(data_dir, 60)
    out = tmp_path / "evaluation.json"
    argv = [str(runs["ae"]), str(runs["vae"]), "--dataset", "mnist", "--data-dir", str(data_dir)]
    assert main([*argv, "--iw-samples", "8", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    ae, vae = report["runs"]
    assert (
        ae["test_set"]
        == vae["test_set"]
        == {
            "dataset": "mnist",
            "part": "t10k",
            "data_dir": str(data_dir),
            "images": 60,
        }
    )
    assert vae["elbo_nats"] == pytest.approx(vae["recon_nats"] + vae["kl_nats"])
    assert 0 < vae["kl_nats"] < vae["elbo_nats"] < 543.0
    assert ae["elbo_nats"] is None and ae["recon_nats"] > 0
    assert 0.0 <= vae["limitation_2_centre_and_range"]["fraction_in_prior_95"] <= 1.0
    assert sum(vae["limitation_1_empty_space"]["prior_samples"]["predicted_digit_counts"]) == 1000
    for run in (ae, vae):
        empty_space = run["limitation_1_empty_space"]
        near, far = empty_space["code_box_nearest_quarter"], empty_space["code_box_farthest_quarter"]
        assert sum(near["predicted_digit_counts"]) == sum(far["predicted_digit_counts"]) == 250
        assert near["mean_distance_to_nearest_training_code"] < far["mean_distance_to_nearest_training_code"]
        decoded = ("prior_samples", "code_box_samples", "test_reconstructions", "code_box_nearest_quarter")
        for part in (*decoded, "code_box_farthest_quarter"):
            assert 0 < empty_space[part]["mean_distance_to_nearest_training_image"] < 28  # at most 1 a pixel
    for run in (ae, vae):
        assert {"latent_scatter", "prior_samples", "reconstructions", "manifold"} <= set(run["figures"])
        assert all(Path(path).stat().st_size > 1000 for path in run["figures"].values())
    assert load_metrics(runs["vae"])["evaluation"]["elbo_nats"] == vae["elbo_nats"]

    note = tmp_path / "docs" / "ae-vs-vae.md"
    note.parent.mkdir()
    note.write_text(f"# Notes\n\nWritten by hand.\n\n{BEGIN}\nold table\n{END}\n\nMore by hand.\n")
    write_note({**report, "source": str(out)}, note, note.parent / "figures")
    text = note.read_text()
    assert "Written by hand." in text and "More by hand." in text and "old table" not in text
    assert "| negative ELBO, nats (lower is better) | n/a | " in text
    assert (note.parent / "figures" / "ae-vs-vae.png").is_file()
    assert (note.parent / "figures" / "vae-manifold.png").is_file()


def test_a_missing_test_file_is_a_clear_error(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs["vae"]), "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-figures"])
    assert exit_info.value.code == 2
    assert "t10k-images-idx3-ubyte" in capsys.readouterr().err


def test_the_test_set_of_another_dataset_is_not_read_from_the_runs_folder() -> None:
    """The run's folder holds its own dataset's files: scoring them as Fashion-MNIST would mislabel them."""
    config = TrainConfig(dataset="mnist", data_dir="/where/it/trained")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="'fashion-mnist' reads IDX files: pass --data-dir"):
        Evaluator("fashion-mnist", None, None, 1, 0, cpu).test_set(config)


def test_a_run_trained_on_mnist_is_not_scored_on_mnist_5k_whose_images_it_trained_on() -> None:
    config = TrainConfig(dataset="mnist", data_dir="/where/it/trained")
    with pytest.raises(ValueError, match="mnist-5k's held-out split is not held out from it"):
        Evaluator("mnist-5k", None, None, 1, 0, torch.device("cpu")).test_set(config)


def test_runs_of_two_idx_datasets_are_not_scored_from_the_same_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mnist's and fashion-mnist's files have the same names: flat in one folder, one of the runs would
    be scored on the other's test set and judged by a classifier of the other's images."""
    for dataset in ("mnist", "fashion-mnist"):
        save_config(
            tmp_path / dataset, TrainConfig(dataset=dataset, data_dir=str(tmp_path / "data" / dataset))
        )
    write_t10k(tmp_path, 20)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "mnist"), str(tmp_path / "fashion-mnist"), "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert (
        f"trained on fashion-mnist and mnist, and {tmp_path} gives both the same files "
        f"({tmp_path / 't10k-images-idx3-ubyte.gz'}): put each in torchvision's layout"
    ) in capsys.readouterr().err


def test_runs_of_two_idx_datasets_are_scored_from_one_data_dir_in_torchvisions_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for dataset, folder in (("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")):
        save_config(tmp_path / dataset, TrainConfig(dataset=dataset))
        (tmp_path / folder / "raw").mkdir(parents=True)
        write_t10k(tmp_path / folder / "raw", 20)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "mnist"), str(tmp_path / "fashion-mnist"), "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2  # past the test sets, to the runs, which hold no weights here
    assert f"{tmp_path / 'mnist' / 'checkpoint.pt'}" in capsys.readouterr().err


def test_a_metrics_file_that_cannot_be_read_stops_the_command_before_it_evaluates(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Else minutes of evaluation would be thrown away when its result is to be written."""
    run = tmp_path / "run"
    shutil.copytree(runs["vae"], run, ignore=shutil.ignore_patterns("figures"))
    (run / "metrics.json").write_text("{bad")
    with pytest.raises(SystemExit) as exit_:
        main([str(run), "--device", "cpu"])
    assert exit_.value.code == 2
    assert f"{run / 'metrics.json'}: not valid JSON" in capsys.readouterr().err
    assert not (run / "figures").exists()


def test_a_run_that_cannot_be_loaded_stops_the_command_before_any_run_is_evaluated_or_written(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, broken = tmp_path / "first", tmp_path / "broken"
    shutil.copytree(runs["vae"], first, ignore=shutil.ignore_patterns("figures"))
    shutil.copytree(runs["vae"], broken, ignore=shutil.ignore_patterns("figures"))
    state = torch.load(broken / "checkpoint.pt", weights_only=True)
    state[next(name for name, tensor in state.items() if tensor.is_floating_point())].view(-1)[0] = math.nan
    torch.save(state, broken / "checkpoint.pt")
    metrics = (first / "metrics.json").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        main([str(first), str(broken), "--limit", "20", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "NaN" in capsys.readouterr().err
    assert (first / "metrics.json").read_bytes() == metrics
    assert not (first / "figures").exists()


def test_training_images_that_are_not_there_stop_the_command_before_any_run_is_evaluated(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The digit classifier and the kNN need the run's training images: found missing only once the
    first run's figures were drawn, they left it half evaluated."""
    first, moved = tmp_path / "first", tmp_path / "moved"
    shutil.copytree(runs["vae"], first, ignore=shutil.ignore_patterns("figures"))
    shutil.copytree(runs["vae"], moved, ignore=shutil.ignore_patterns("figures"))
    t10k_only = tmp_path / "t10k"
    t10k_only.mkdir()
    write_t10k(t10k_only, 20)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "dataset": "mnist", "data_dir": str(t10k_only)}))
    with pytest.raises(SystemExit) as exit_:
        main([str(first), str(moved), "--limit", "20", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "the run's training images are needed too" in capsys.readouterr().err
    assert not (first / "figures").exists()


def test_a_data_dir_for_runs_scored_on_mnist_5k_which_reads_none_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scoring the held-out split while the user thinks DIR's test set was read would mislead."""
    save_config(tmp_path / "run", TrainConfig(dataset="mnist-5k"))
    for dataset_flag in ([], ["--dataset", "mnist-5k"]):
        with pytest.raises(SystemExit) as exit_:
            main(
                [str(tmp_path / "run"), "--data-dir", str(tmp_path / "mnist"), *dataset_flag, "--no-figures"]
            )
        assert exit_.value.code == 2
        assert "reads no folder; for the IDX files there pass --dataset mnist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_tiny_test_set_gives_null_not_infinity_or_nan_in_the_json(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One image: no standard error; digits with one code or none apart: no spread ratio."""
    argv = [str(runs["vae"]), "--limit", "1", "--iw-samples", "2", "--device", "cpu", "--no-figures"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out  # which json.loads would accept
    (run,) = json.loads(out)["runs"]
    assert run["elbo_nats_stderr"] is None
    assert run["limitation_3_uneven_spread"]["trace_ratio"] is None


def run_with_weights(source: Path, run: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the run `source` at `run`, its checkpoint's tensors changed in place by `change`."""
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("figures"))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, run / "checkpoint.pt")
    return run


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
def test_a_likelihood_that_overflows_is_null_in_the_report_the_json_file_and_metrics_json(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A posterior variance of e^100 overflows float32, and with it the KL and the ELBO: all three
    files stay JSON that jq, Go and JavaScript read, with null where there is no number."""

    def huge_log_var(state: dict[str, torch.Tensor]) -> None:
        state["to_log_var.bias"].fill_(100.0)

    run = run_with_weights(runs["vae"], tmp_path / "run", huge_log_var)
    out = tmp_path / "evaluation.json"
    argv = [str(run), "--limit", "20", "--iw-samples", "2", "--device", "cpu", "--no-figures"]
    assert main([*argv, "--json", str(out)]) == 0
    report = strict_json(capsys.readouterr().out)
    assert strict_json(out.read_text()) == report
    assert report["kl_nats"] is None and report["elbo_nats"] is None
    assert isinstance(report["recon_mse"], float)  # decoded from the posterior means, which are finite
    assert strict_json((run / "metrics.json").read_text())["evaluation"] == report["runs"][0]


def test_the_aes_recon_nats_is_scored_from_its_decoders_logits_so_confident_mistakes_cost_in_full(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The output layer's weights ten times over saturate the decoder: some wrong pixels' float32
    probabilities fall below 1e-7, where a clamp would charge each 16.1 nats, whatever the logit."""

    def saturated(state: dict[str, torch.Tensor]) -> None:
        for name in [name for name in state if name.startswith("decoder.layers.")][-2:]:  # weight, bias
            state[name].mul_(10.0)

    run = run_with_weights(runs["ae"], tmp_path / "run", saturated)
    assert main([str(run), "--limit", "20", "--device", "cpu", "--no-figures"]) == 0
    report = json.loads(capsys.readouterr().out)

    cpu = torch.device("cpu")
    _, model = load_run(run)
    images = torch.from_numpy(load_test_set("mnist-5k", limit=20).images).double()
    codes = torch.from_numpy(encode(model, images.float().numpy(), cpu)[0]).float()
    with torch.no_grad():
        logits = model.decoder.logits(codes).double()
    wrong = ((images > 0) & (logits < -17.0)) | ((images < 1) & (logits > 17.0))
    assert wrong.sum() > 100
    exact = F.binary_cross_entropy_with_logits(logits, images, reduction="none").flatten(1).sum(dim=1)
    assert report["recon_nats"] == pytest.approx(float(exact.mean()), rel=1e-6)


def test_a_run_that_fails_part_way_leaves_the_earlier_runs_figures_and_metrics_as_they_were(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checks cannot foresee every failure (training images that are there but corrupt); the
    figures of the runs evaluated before it must still match their metrics.json."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(runs["vae"], first)
    shutil.copytree(runs["ae"], second)
    flags = ["--limit", "20", "--iw-samples", "2", "--device", "cpu"]
    assert main([str(first), *flags]) == 0
    before = {path.name: path.read_bytes() for path in (first / "figures").iterdir()}
    before["metrics.json"] = (first / "metrics.json").read_bytes()
    evaluate = evaluate_module.Evaluator.evaluate

    def fails_on_the_second(self: Any, run_dir: Path, figures_dir: Path | None = None) -> Any:
        if run_dir == second:
            raise OSError("train-images-idx3-ubyte.gz: truncated")
        return evaluate(self, run_dir, figures_dir)

    monkeypatch.setattr(evaluate_module.Evaluator, "evaluate", fails_on_the_second)
    with pytest.raises(SystemExit) as exit_:
        main([str(first), str(second), *flags, "--seed", "1"])
    assert exit_.value.code == 2 and "truncated" in capsys.readouterr().err
    after = {path.name: path.read_bytes() for path in (first / "figures").iterdir()}
    assert {**after, "metrics.json": (first / "metrics.json").read_bytes()} == before
    assert sorted(path.name for path in first.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "figures",
        "metrics.json",
    ]


def test_one_runs_figures_are_also_at_the_top_level_by_the_contracts_names(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(runs["vae"]), "--limit", "20", "--iw-samples", "2", "--device", "cpu", "--no-figures"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    (run,) = report["runs"]
    for name in ("elbo_nats", "recon_nats", "kl_nats", "recon_mse"):
        assert report[name] == run[name] and isinstance(report[name], float)


def test_a_json_file_that_fails_to_be_written_is_an_error_after_the_report_is_printed(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk (/dev/full) shows only when the report is written: it is on stdout all the same."""
    argv = [str(runs["ae"]), "--limit", "20", "--device", "cpu", "--no-figures", "--json", "/dev/full"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runs"][0]["test_set"]["images"] == 20
    assert "--json /dev/full: [Errno 28] No space left on device" in captured.err


@pytest.mark.parametrize(
    "name", ["checkpoint.pt", "metrics.json", "config.json", "figures/prior_samples.png"]
)
def test_a_json_path_that_is_a_file_of_a_run_being_evaluated_is_refused_before_anything_runs(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """The weights replaced by the report, after which vae-export refuses the run."""
    run = tmp_path / "run"
    shutil.copytree(runs["ae"], run)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main([str(run), "--device", "cpu", "--json", str(run / "." / name)])
    assert exit_.value.code == 2
    assert (
        f"a file of the run {run}, which it would replace; write the report elsewhere"
        in capsys.readouterr().err
    )
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(
    ("json_path", "message"),
    [
        ("report", "a folder; expected the name of the file to write"),
        ("a-file/report.json", "{tmp_path}/a-file is a file, not a folder to write it in"),
        ("a-file/deeper/report.json", "{tmp_path}/a-file is a file, not a folder to write it in"),
    ],
)
def test_a_json_path_that_cannot_be_written_is_refused_before_the_evaluation_not_after_it(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], json_path: str, message: str
) -> None:
    """The evaluation takes minutes, and rewrites the run's metrics.json and figures."""
    run = tmp_path / "run"
    shutil.copytree(runs["ae"], run)
    (tmp_path / "report").mkdir()
    (tmp_path / "a-file").write_text("")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main([str(run), "--device", "cpu", "--json", str(tmp_path / json_path)])
    assert exit_.value.code == 2
    assert f"--json {tmp_path / json_path}: {message.format(tmp_path=tmp_path)}" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: path.write_bytes(path.read_bytes()[:1000]), "not the weights of the model"),
        (lambda path: torch.save({"step": 1}, path), "not the weights of the model"),
        (lambda path: torch.save(Path("x"), path), "not the weights of the model"),  # not a state_dict
        (lambda path: torch.save(torch.zeros(3), path), "not the weights of the model"),
        (lambda path: path.write_bytes(b"not a checkpoint at all"), "not the weights of the model"),
        (lambda path: path.unlink(), "checkpoint.pt: not found"),
    ],
    ids=["truncated", "another dict", "not a dict", "a tensor", "not torch's", "missing"],
)
def test_a_broken_checkpoint_is_a_clear_error_naming_it(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, message: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["ae"], run)
    damage(run / "checkpoint.pt")
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--limit", "20", "--device", "cpu", "--no-figures"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    assert "weights_only" not in error  # torch's advice to load the file as a pickle, running its code


def test_the_manifold_is_decoded_row_by_row_from_the_top_left_corner_z2_falling_as_z1_rises(
    runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The picture's axes say z2 grows upwards: its first tile must come from (-3, 3)."""
    config, model = load_run(runs["vae"])
    assert config.model.latent_dim == 2
    grids: list[np.ndarray] = []
    real_decode = evaluate_module.decode

    def decode_spy(model: Any, points: np.ndarray, device: torch.device) -> np.ndarray:
        grids.append(points)
        return real_decode(model, points, device)

    monkeypatch.setattr(evaluate_module, "decode", decode_spy)
    test = load_test_set("mnist-5k", limit=12)
    codes, _ = encode(model, test.images, torch.device("cpu"))
    evaluator = Evaluator(None, None, 4, 4, 0, torch.device("cpu"))
    evaluator.draw(tmp_path, config, model, codes, test, test.images, test.images)
    (grid,) = grids
    side = 15
    np.testing.assert_array_equal(grid[0], [-3.0, 3.0])
    np.testing.assert_array_equal(grid[side - 1], [3.0, 3.0])
    np.testing.assert_array_equal(grid[-1], [3.0, -3.0])


def test_codes_of_any_size_are_drawn_in_a_plane_even_a_single_one() -> None:
    codes = np.random.default_rng(0).standard_normal((50, 16))
    assert plane(codes)[0].shape == (50, 2) and plane(codes)[1:] == ("PC1", "PC2")
    assert plane(codes[:, :2])[1:] == ("z1", "z2") and plane(codes[:, :1])[0].shape == (50, 2)
    assert plane(codes[:1])[0].shape == (1, 2)  # one code: one component, the plane's second axis 0
    assert plane(codes[:1])[0][0, 1] == 0


def test_codes_off_centre_are_drawn_off_centre_in_their_plane() -> None:
    """The plane's axes are the codes' principal directions, through the origin of the latent space:
    a scatter centred on the codes' mean would show every latent space centred (claim 2)."""
    rng = np.random.default_rng(0)
    codes = rng.standard_normal((500, 3)) * [3.0, 1.0, 0.1] + [8.0, 0.0, 6.0]
    points, _, _ = plane(codes)
    assert np.linalg.norm(points.mean(axis=0)) > 7  # the mean's part along the two main directions
    assert points[:, 0].std() == pytest.approx(3.0, rel=0.1)  # the spread is kept


def test_each_manifold_tile_is_centred_on_the_point_it_was_decoded_from() -> None:
    side, span = 15, 3.0
    edge = manifold_edge(side, span)
    tile_width = 2 * edge / side
    centres = -edge + tile_width * (np.arange(side) + 0.5)
    np.testing.assert_allclose(centres, np.linspace(-span, span, side))


def test_the_ae_and_the_vae_report_the_same_keys(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """So that a reader of the JSON can take any key from either; what an AE lacks is null."""
    argv = [str(runs["ae"]), str(runs["vae"]), "--limit", "20", "--iw-samples", "2", "--device", "cpu"]
    assert main([*argv, "--no-figures"]) == 0
    ae, vae = json.loads(capsys.readouterr().out)["runs"]
    assert ae.keys() == vae.keys()
    assert ae["elbo_nats"] is None and ae["elbo_nats_stderr"] is None


def test_claim_one_judges_the_decodes_of_normal_points_as_prior_samples_and_of_the_box_as_box_samples(
    runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: dict[int, np.ndarray] = {}  # id of the images -> the points they were decoded from
    judged: list[np.ndarray] = []
    real_decode, real_probabilities = evaluate_module.decode, evaluate_module.class_probabilities

    def decode_spy(model: Any, points: np.ndarray, device: torch.device) -> np.ndarray:
        images = real_decode(model, points, device)
        decoded[id(images)] = points
        return images

    def probabilities_spy(classifier: Any, images: np.ndarray, device: torch.device) -> np.ndarray:
        judged.append(decoded.get(id(images), np.empty((0, 2))))
        return real_probabilities(classifier, images, device)

    monkeypatch.setattr(evaluate_module, "decode", decode_spy)
    monkeypatch.setattr(evaluate_module, "class_probabilities", probabilities_spy)
    Evaluator(None, None, 100, 4, 0, torch.device("cpu")).evaluate(runs["ae"])
    box, prior = [points for points in judged if len(points)]  # the others are no decoder's output

    def kurtosis(points: np.ndarray) -> np.ndarray:  # 3 for a normal, 1.8 for a uniform
        centred = points - points.mean(axis=0)
        return np.asarray((centred**4).mean(axis=0) / centred.var(axis=0) ** 2)

    assert abs(prior.mean()) < 0.1 and abs(prior.std() - 1.0) < 0.1 and (kurtosis(prior) > 2.5).all()
    assert (kurtosis(box) < 2.2).all()  # uniform in the box the codes span
    # The box is each dimension's own range of the test codes, filled to its edges.
    cpu = torch.device("cpu")
    codes, _ = encode(load_run(runs["ae"])[1], load_test_set("mnist-5k", limit=100).images, cpu)
    low, high = codes.min(axis=0), codes.max(axis=0)
    assert (box.min(axis=0) >= low).all() and (box.max(axis=0) <= high).all()
    assert (box.max(axis=0) - box.min(axis=0) > 0.98 * (high - low)).all()


def test_centre_and_range_of_four_codes_worked_by_hand() -> None:
    # Squared norms 5, 8, 1 and 45 against chi-squared(2)'s 5.991: two of the four inside.
    codes = np.array([[-1.0, 2.0], [2.0, 2.0], [1.0, 0.0], [6.0, 3.0]])
    stats = centre_and_range(codes)
    assert stats["mean"] == pytest.approx([2.0, 1.75])
    assert stats["std"] == pytest.approx([math.sqrt(26 / 4), math.sqrt(4.75 / 4)])  # of the codes, not n-1
    assert stats["mean_norm"] == pytest.approx(math.sqrt(4 + 1.75**2))
    assert stats["min"] == [-1.0, 0.0] and stats["max"] == [6.0, 3.0]
    assert stats["fraction_in_prior_95"] == 0.5


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        ([5.0], None),
        ([1.0, 3.0], 1.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], math.sqrt(0.5)),
        ([2.0] * 3, 0.0),
    ],
)
def test_the_standard_error_is_the_sample_deviation_over_root_n_and_none_below_two_values(
    values: list[float], expected: float | None
) -> None:
    assert _standard_error(np.array(values)) == (None if expected is None else pytest.approx(expected))


def test_the_reconstruction_nll_is_the_bernoulli_nll_summed_over_each_images_pixels() -> None:
    images = np.stack([np.ones((1, 28, 28)), np.zeros((1, 28, 28)), np.full((1, 28, 28), 0.5)])
    logits = torch.full(images.shape, math.log(0.8 / 0.2))  # probability 0.8
    nll = reconstruction_nll(logits, images.astype(np.float32))
    expected = [-784 * math.log(0.8), -784 * math.log(0.2), -392 * (math.log(0.8) + math.log(0.2))]
    np.testing.assert_allclose(nll, expected, rtol=1e-6)


def test_a_confidently_wrong_pixel_costs_its_whole_logit_not_a_clamps_16_nats() -> None:
    """At a logit of 40 the float32 probability is 1.0; a clamp at 1e-7 would charge -log 1e-7 = 16.1."""
    images = np.stack([np.ones((1, 28, 28)), np.zeros((1, 28, 28))]).astype(np.float32)
    certain_and_wrong = torch.from_numpy(40.0 - 80.0 * images)  # -40 where the pixel is 1, 40 where 0
    np.testing.assert_allclose(reconstruction_nll(certain_and_wrong, images), 784 * 40.0, rtol=1e-6)


def test_confident_means_a_top_class_probability_above_0_9() -> None:
    top = np.array([0.95, 0.91, 0.9, 0.85, 0.5])
    probabilities = np.zeros((5, 10))
    probabilities[:, 0], probabilities[:, 1] = top, 1.0 - top
    assert judge(probabilities)["fraction_confident_90"] == pytest.approx(2 / 5)


@pytest.mark.parametrize(("image_passes", "epochs"), [(30_000, 10), (230, 2), (20, 1)])
def test_the_classifier_sees_about_its_image_passes_in_one_to_ten_epochs_and_reports_its_test_accuracy(
    monkeypatch: pytest.MonkeyPatch, image_passes: int, epochs: int
) -> None:
    monkeypatch.setattr(evaluate_module, "CLASSIFIER_IMAGE_PASSES", image_passes)
    train_set, _ = load_training_splits("mnist-5k", limit=128)
    held_out = load_test_set("mnist-5k", limit=60)
    # Half the test labels wrong: the accuracy is on these labels, not on the training images.
    test = ImageSet(
        held_out.images, np.where(np.arange(60) < 30, held_out.labels, (held_out.labels + 1) % 10)
    )
    cpu = torch.device("cpu")
    trained = train_classifier(train_set, test, cpu, seed=0)
    assert trained.train_images == len(train_set) and trained.epochs == epochs
    predicted = class_probabilities(trained.model, test.images, cpu).argmax(axis=1)
    assert trained.test_accuracy == pytest.approx((predicted == test.labels).mean())


@pytest.mark.parametrize("samples", [0, -3])
def test_fewer_than_one_importance_sample_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], samples: int
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--iw-samples", str(samples)])
    assert exit_info.value.code == 2
    assert f"--iw-samples must be at least 1, got {samples}" in capsys.readouterr().err


def test_the_reported_likelihoods_are_the_means_of_the_per_image_terms(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """recon_mse per pixel, the AE's recon_nats per image; the VAE's terms from one sample (the least)."""
    argv = [str(runs["ae"]), str(runs["vae"]), "--limit", "20", "--iw-samples", "1", "--device", "cpu"]
    assert main([*argv, "--no-figures"]) == 0
    ae, vae = json.loads(capsys.readouterr().out)["runs"]
    cpu = torch.device("cpu")
    images = load_test_set("mnist-5k", limit=20).images
    for run, kind in ((ae, "ae"), (vae, "vae")):
        _, model = load_run(runs[kind])
        codes = encode(model, images, cpu)[0]
        reconstructed = decode(model, codes, cpu)
        assert run["recon_mse"] == pytest.approx(((reconstructed - images) ** 2).mean(), rel=1e-6)
        if kind == "ae":
            logits = decode_logits(model, codes, cpu)
            assert run["recon_nats"] == pytest.approx(reconstruction_nll(logits, images).mean())
    assert isinstance(model, VAE) and vae["iw_samples"] == 1
    terms = vae_likelihood(model, images, 1, torch.Generator().manual_seed(0), cpu)
    assert vae["recon_nats"] == pytest.approx(terms["recon"].mean())
    assert vae["kl_nats"] == pytest.approx(terms["kl"].mean())
    assert vae["iw_nll_nats"] == pytest.approx(terms["iw_nll"].mean())
    assert vae["elbo_nats_stderr"] == pytest.approx(_standard_error(terms["recon"] + terms["kl"]))


def test_ctrl_c_ends_vae_evaluate_with_one_line_and_exit_130_and_saves_nothing(
    runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {kind: (run / "metrics.json").read_bytes() for kind, run in runs.items()}

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module.Evaluator, "evaluate", interrupted)
    assert main([str(runs["ae"]), str(runs["vae"]), "--no-figures"]) == 130
    assert capsys.readouterr().err == "vae-evaluate: interrupted\n"
    assert {kind: (run / "metrics.json").read_bytes() for kind, run in runs.items()} == before
