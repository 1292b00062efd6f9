"""vae-export: two graphs with a dynamic batch axis, model.json, and parity with PyTorch."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import exporter
from export.cli import main as export_main
from export.exporter import OPSET, PARITY_TOLERANCE, ExportError, export_run
from service.bundle import ModelBundle, sha256_of
from tests.unit.training.test_run import strict_json
from training.run import load_metrics, save_metrics


def test_a_vae_bundle_describes_itself(vae_bundle: Path, vae_run_dir: Path) -> None:
    spec = json.loads((vae_bundle / "model.json").read_text())
    assert spec["format_version"] == 1
    assert (spec["name"], spec["kind"], spec["latent_dim"]) == ("tiny-vae", "vae", 2)
    assert spec["image_shape"] == [1, 28, 28]
    assert spec["training"] == json.loads((vae_run_dir / "config.json").read_text())
    encoder, decoder = spec["graphs"]["encoder"], spec["graphs"]["decoder"]
    assert encoder["inputs"] == {"images": {"dtype": "float32", "shape": ["N", 1, 28, 28]}}
    assert list(encoder["outputs"]) == ["mean", "log_var"]
    assert decoder["inputs"] == {"z": {"dtype": "float32", "shape": ["N", 2]}}
    assert decoder["outputs"] == {"images": {"dtype": "float32", "shape": ["N", 1, 28, 28]}}
    for graph in (encoder, decoder):
        assert graph["opset"] == OPSET
        assert graph["sha256"] == sha256_of(vae_bundle / graph["file"])
        assert graph["precision"] == "float32"
    assert "decoder_quantization" not in spec["export"]
    parity = spec["export"]["parity_max_abs_diff"]
    assert set(parity) == {"encoder", "decoder"}
    assert all(0 <= diff < PARITY_TOLERANCE for diff in parity.values())
    assert {"torch_version", "onnx_version"} <= set(spec["export"])


def test_the_graphs_are_valid_onnx_at_the_pinned_opset(vae_bundle: Path) -> None:
    for file in ("encoder.onnx", "decoder.onnx"):
        model = onnx.load(str(vae_bundle / file))
        onnx.checker.check_model(model, full_check=True)
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}


def test_the_graphs_carry_no_local_paths_so_the_version_does_not_depend_on_the_checkout(
    vae_bundle: Path,
) -> None:
    project = str(Path(__file__).resolve().parents[3])
    for name in ("encoder.onnx", "decoder.onnx"):
        data = (vae_bundle / name).read_bytes()
        assert project.encode() not in data
        assert b"stack_trace" not in data


def test_the_batch_axis_is_dynamic(vae_bundle: Path) -> None:
    session = ort.InferenceSession(str(vae_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for batch_size in (1, 3, 300):
        (images,) = session.run(None, {"z": np.zeros((batch_size, 2), np.float32)})
        assert images.shape == (batch_size, 1, 28, 28)
        assert images.min() >= 0.0 and images.max() <= 1.0


def test_the_decoders_stride_1_hidden_layer_is_exported_as_the_convolution_it_equals(
    vae_bundle: Path,
) -> None:
    ops = [node.op_type for node in onnx.load(str(vae_bundle / "decoder.onnx")).graph.node]
    # The tiny VAE's decoder: 64 channels at stride 1, two stride-2 layers, the one-channel output.
    assert [op for op in ops if op.startswith("Conv")] == [
        "Conv",
        "ConvTranspose",
        "ConvTranspose",
        "ConvTranspose",
    ]


@pytest.mark.parametrize(
    ("kernel", "padding"), [((3, 3), (1, 1)), ((5, 5), (2, 2)), ((3, 3), (0, 0)), ((3, 5), (2, 1))]
)
def test_a_stride_1_transposed_convolution_equals_its_convolution(
    kernel: tuple[int, int], padding: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    transposed = nn.ConvTranspose2d(16, 32, kernel, padding=padding)
    conv = exporter._as_convolution(transposed)
    assert conv is not None
    features = torch.randn(3, 16, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(conv(features), transposed(features), rtol=0, atol=1e-5)


def test_a_transposed_convolution_with_a_stride_has_no_such_equal() -> None:
    assert (
        exporter._as_convolution(nn.ConvTranspose2d(16, 32, 3, stride=2, padding=1, output_padding=1)) is None
    )
    assert exporter._as_convolution(nn.ConvTranspose2d(16, 32, 3, padding=1, dilation=2)) is None


def test_an_ae_exports_its_code_as_mean_alone(ae_bundle: Path) -> None:
    bundle = ModelBundle.load(ae_bundle)
    assert bundle.spec.kind == "ae"
    assert list(bundle.spec.encoder.outputs) == ["mean"]
    session = ort.InferenceSession(str(ae_bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["mean"]


def test_the_default_version_is_a_hash_of_the_graphs(
    vae_run_dir: Path, vae_bundle: Path, tmp_path: Path
) -> None:
    again = export_run(vae_run_dir, tmp_path / "again")
    assert again.version == ModelBundle.load(vae_bundle).spec.version
    assert len(again.version) == 12
    assert again.name == vae_run_dir.name


def test_the_bundle_carries_the_runs_evaluation_once_it_has_one(vae_run_dir: Path, tmp_path: Path) -> None:
    trained = load_metrics(vae_run_dir)
    assert export_run(vae_run_dir, tmp_path / "trained").metrics == trained["final"]
    run = tmp_path / "run"
    shutil.copytree(vae_run_dir, run)
    evaluation = {"elbo_nats": -150.0, "kl_nats": 6.0}
    figures = {"figures": {"manifold": str(run / "figures" / "manifold.png")}}
    save_metrics(run, {**trained, "evaluation": {**evaluation, **figures}})
    assert export_run(run, tmp_path / "evaluated").metrics == evaluation  # not the run's local paths


def test_metrics_that_are_not_finite_reach_model_json_as_null_so_it_stays_json(
    vae_run_dir: Path, tmp_path: Path
) -> None:
    """A metrics.json written before such numbers were null holds bare NaN and Infinity, which
    Python reads and jq, Go and JavaScript do not; the bundle's model.json must be JSON."""
    run = tmp_path / "run"
    shutil.copytree(vae_run_dir, run)
    (run / "metrics.json").write_text(
        '{"evaluation": {"elbo_nats": Infinity, "kl_nats": NaN, "recon_nats": 150.5,'
        ' "limitation_2_centre_and_range": {"mean": [-Infinity, 0.5]}}}'
    )
    expected = {
        "elbo_nats": None,
        "kl_nats": None,
        "recon_nats": 150.5,
        "limitation_2_centre_and_range": {"mean": [None, 0.5]},
    }

    spec = export_run(run, tmp_path / "bundle")

    assert spec.metrics == expected
    assert strict_json((tmp_path / "bundle" / "model.json").read_text())["metrics"] == expected
    assert ModelBundle.load(tmp_path / "bundle").spec.metrics == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_weights_that_are_not_finite_are_refused_naming_the_checkpoint_and_the_tensor(
    ae_run_dir: Path, tmp_path: Path, value: float
) -> None:
    """Else parity, computing NaN on both sides, would only say the graphs differ "by nan"."""
    run = tmp_path / "run"
    shutil.copytree(ae_run_dir, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["decoder.dense.weight"][0, 0] = value
    torch.save(state, run / "checkpoint.pt")

    with pytest.raises(ExportError) as error:
        export_run(run, tmp_path / "bundle")

    assert (
        f"{run / 'checkpoint.pt'}: NaN or infinite weights in decoder.dense.weight (a run that diverged)"
        in str(error.value)
    )
    assert not (tmp_path / "bundle").exists()


def test_an_int8_decoder_replaces_the_float32_one_and_records_how_far_its_pixels_drift(
    int8_vae_bundle: Path, vae_bundle: Path
) -> None:
    spec = json.loads((int8_vae_bundle / "model.json").read_text())
    float_spec = json.loads((vae_bundle / "model.json").read_text())
    decoder = spec["graphs"]["decoder"]
    assert decoder["precision"] == "int8-static"
    assert decoder["sha256"] == sha256_of(int8_vae_bundle / "decoder.onnx")
    assert decoder["sha256"] != float_spec["graphs"]["decoder"]["sha256"]
    assert spec["graphs"]["encoder"] == float_spec["graphs"]["encoder"]
    assert spec["version"] != float_spec["version"]
    drift = spec["export"]["decoder_quantization"]
    assert (drift["method"], drift["points"]) == ("int8-static", 1000)
    assert 0 < drift["mean_abs_pixel_diff"] < drift["max_abs_pixel_diff"] < 0.5
    # Quantized per channel around the float operators.
    ops = {node.op_type for node in onnx.load(str(int8_vae_bundle / "decoder.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "ConvTranspose"} <= ops
    assert sorted(p.name for p in int8_vae_bundle.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json"]
    assert ModelBundle.load(int8_vae_bundle).spec.decoder.precision == "int8-static"


def test_an_int8_decoder_gives_a_row_the_same_pixels_whatever_rows_share_its_call(
    int8_vae_bundle: Path,
) -> None:
    """The batcher decides which rows share a call: a seed must give the same bytes all the same."""
    session = ort.InferenceSession(str(int8_vae_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    latent_dim = ModelBundle.load(int8_vae_bundle).spec.latent_dim
    z = np.random.default_rng(0).standard_normal((64, latent_dim), dtype=np.float32)
    together = session.run(None, {"z": z})[0]
    one_by_one = np.concatenate([session.run(None, {"z": z[i : i + 1]})[0] for i in range(len(z))])
    np.testing.assert_array_equal(one_by_one, together)


def test_the_int8_decoder_is_calibrated_on_fixed_points_so_the_same_run_gives_the_same_graph(
    vae_run_dir: Path, int8_vae_bundle: Path, tmp_path: Path
) -> None:
    again = export_run(vae_run_dir, tmp_path / "again", name="tiny-vae", quantize_decoder="int8-static")
    assert again.decoder.sha256 == ModelBundle.load(int8_vae_bundle).spec.decoder.sha256


def test_an_unknown_quantization_is_refused_before_anything_is_written(
    vae_run_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=r"quantize_decoder: 'int4', expected one of \['int8-static'"):
        export_run(vae_run_dir, tmp_path / "bundle", quantize_decoder="int4")
    assert not (tmp_path / "bundle").exists()


def test_an_aes_decoder_is_not_quantized_because_its_codes_are_not_the_prior_it_is_scored_on(
    ae_run_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        ExportError, match=r"an AE's decoder is not quantized, because its codes do not follow"
    ):
        export_run(ae_run_dir, tmp_path / "bundle", quantize_decoder="int8-static")
    assert not (tmp_path / "bundle").exists()


def _encoder_whose_log_var_drifts(graph: Any, images: torch.Tensor) -> Any:
    mean, log_var = graph.model.encode(images)
    return mean, log_var + 1e-3


def _decoder_whose_pixels_drift(graph: Any, z: torch.Tensor) -> Any:
    return graph.decoder(z) + 1e-3


@pytest.mark.parametrize(
    ("graph", "drifting_forward", "output"),
    [
        ("_EncoderGraph", _encoder_whose_log_var_drifts, "log_var"),
        ("_DecoderGraph", _decoder_whose_pixels_drift, "images"),
    ],
)
def test_a_graph_that_drifts_from_pytorch_fails_the_export_naming_the_output_and_the_figure(
    vae_run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    graph: str,
    drifting_forward: Callable[..., Any],
    output: str,
) -> None:
    """The exported graph computes a thousandth off what the trained model does: ten times the tolerance."""
    monkeypatch.setattr(getattr(exporter, graph), "forward", drifting_forward)
    figure = rf"output '{output}' differs from PyTorch by 0.001.* on batch size 1; the tolerance is 0.0001"
    with pytest.raises(ExportError, match=figure):
        export_run(vae_run_dir, tmp_path / "new" / "bundle")
    assert not any(tmp_path.iterdir())  # the folders it made for the bundle are gone


def test_the_cli_prints_a_summary_and_fails_clearly(
    vae_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    assert export_main([str(vae_run_dir), "--out", str(out), "--name", "digits", "--version", "2.0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["name"], summary["version"], summary["opset"]) == ("digits", "2.0", OPSET)
    assert (ModelBundle.load(out).spec.name, ModelBundle.load(out).spec.version) == ("digits", "2.0")
    assert export_main([str(tmp_path / "no-such-run"), "--out", str(tmp_path / "other")]) == 1
    assert "config.json: not found" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert export_main([str(vae_run_dir), "--out", str(tmp_path / "a-file")]) == 1
    assert "a-file: cannot make the bundle folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(vae_run_dir), "--out", str(tmp_path / "other"), "--quantize-decoder", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    for flag in ("--name", "--version"):  # before the export's work, as model.json may hold neither empty
        with pytest.raises(SystemExit):
            export_main([str(vae_run_dir), "--out", str(tmp_path / "other"), flag, " "])
        assert f"argument {flag}: expected a non-empty value" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            export_main([str(vae_run_dir), "--out", str(tmp_path / "other"), flag, "v1\nERROR"])
        assert f"argument {flag}: 'v1\\nERROR': expected printable characters only" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_the_clis_quantize_decoder_reaches_the_exporter_which_refuses_it_for_an_ae(
    ae_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exporter's refusal is the cheap proof that the flag got there: without it, the AE exports."""
    argv = [str(ae_run_dir), "--out", str(tmp_path / "bundle"), "--quantize-decoder", "int8-static"]
    assert export_main(argv) == 1
    assert "an AE's decoder is not quantized, because its codes do not follow" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()


def _rows_are(batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    """1.0 where `batch` has `batch_size` rows, else 0.0: computed in the graph, so that the exported
    graph, traced at TRACE_BATCH_SIZE, keeps the drift to that one size of the batches it runs."""
    rows = torch.ones_like(batch.flatten(1)[:, 0]).sum()
    return (rows == batch_size).to(batch.dtype)


def _encoder_whose_log_var_drifts_at(batch_size: int) -> Callable[..., Any]:
    def forward(graph: Any, images: torch.Tensor) -> Any:
        mean, log_var = graph.model.encode(images)
        return mean, log_var + 1e-3 * _rows_are(images, batch_size)

    return forward


def _decoder_whose_pixels_drift_at(batch_size: int) -> Callable[..., Any]:
    def forward(graph: Any, z: torch.Tensor) -> Any:
        return graph.decoder(z) + 1e-3 * _rows_are(z, batch_size)

    return forward


@pytest.mark.parametrize("batch_size", [1, 7, 256])
@pytest.mark.parametrize(
    ("graph", "drifting_at", "output"),
    [
        ("_EncoderGraph", _encoder_whose_log_var_drifts_at, "log_var"),
        ("_DecoderGraph", _decoder_whose_pixels_drift_at, "images"),
    ],
    ids=["encoder", "decoder"],
)
def test_parity_is_checked_on_every_parity_batch_size_of_both_graphs(
    vae_run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    graph: str,
    drifting_at: Callable[[int], Callable[..., Any]],
    output: str,
    batch_size: int,
) -> None:
    """A graph that drifts from PyTorch on one batch size alone fails the export naming that size: the
    comparison is made at each of PARITY_BATCH_SIZES, not only at the first."""
    assert batch_size in exporter.PARITY_BATCH_SIZES
    monkeypatch.setattr(getattr(exporter, graph), "forward", drifting_at(batch_size))
    figure = rf"output '{output}' differs from PyTorch by 0.001.* on batch size {batch_size}; the tolerance"
    with pytest.raises(ExportError, match=figure):
        export_run(vae_run_dir, tmp_path / "new" / "bundle")
    assert not any(tmp_path.iterdir())  # the folders it made for the bundle are gone


def test_a_failed_export_over_a_bundle_leaves_that_bundle_as_it_was(
    ae_bundle: Path, vae_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(ae_bundle, bundle)
    before = {path.name: path.read_bytes() for path in bundle.iterdir()}
    monkeypatch.setattr(exporter, "PARITY_TOLERANCE", 0.0)

    with pytest.raises(ExportError, match=f"^{bundle}/encoder.onnx: output 'mean' differs from PyTorch"):
        export_run(vae_run_dir, bundle, overwrite=True)

    assert {path.name: path.read_bytes() for path in bundle.iterdir()} == before  # nothing left behind
    assert ModelBundle.load(bundle).spec.kind == "ae"


def test_a_disk_that_fills_during_an_export_leaves_the_bundle_as_it_was_and_names_the_folder(
    ae_bundle: Path, vae_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(ae_bundle, bundle)
    before = {path.name: path.read_bytes() for path in bundle.iterdir()}

    def disk_full(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)  # model.json, the last file written

    with pytest.raises(ExportError, match=f"{bundle}: cannot write the bundle .*No space left on device"):
        export_run(vae_run_dir, bundle, overwrite=True)

    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in bundle.iterdir()} == before
    assert ModelBundle.load(bundle).spec.kind == "ae"


def test_an_export_replaces_the_bundles_files_rather_than_writing_through_their_links(
    ae_bundle: Path, vae_run_dir: Path, tmp_path: Path
) -> None:
    bundle, snapshot = tmp_path / "bundle", tmp_path / "snapshot"
    shutil.copytree(ae_bundle, bundle)
    snapshot.mkdir()
    for path in bundle.iterdir():  # as `cp -al` or `rsync --link-dest` keep an earlier version
        (snapshot / path.name).hardlink_to(path)

    export_run(vae_run_dir, bundle, overwrite=True)

    assert ModelBundle.load(bundle).spec.kind == "vae"
    assert ModelBundle.load(snapshot).spec.kind == "ae"
    assert sorted(path.name for path in bundle.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json"]


def test_a_bundle_of_another_models_name_is_replaced_only_when_told_to(
    ae_bundle: Path, vae_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its run may be gone: the bundle would be lost."""
    bundle = tmp_path / "bundle"
    shutil.copytree(ae_bundle, bundle)
    before = {path.name: path.read_bytes() for path in bundle.iterdir()}
    argv = [str(vae_run_dir), "--out", str(bundle), "--name", "vae-2"]

    assert export_main(argv) == 1
    assert (
        f"{bundle} holds the bundle of model 'tiny-ae', not 'vae-2'; pass --overwrite to replace it"
        in capsys.readouterr().err
    )
    assert {path.name: path.read_bytes() for path in bundle.iterdir()} == before

    assert export_main([*argv, "--overwrite"]) == 0
    assert ModelBundle.load(bundle).spec.name == "vae-2"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_that_holds_files_but_no_bundle_is_never_written_into(
    vae_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], overwrite: list[str]
) -> None:
    """A training run given as --out (the two arguments swapped), or a folder of the user's own."""
    run = tmp_path / "ae"
    shutil.copytree(vae_run_dir, run)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}

    assert export_main([str(vae_run_dir), "--out", str(run), *overwrite]) == 1
    assert (
        f"{run} holds files but no bundle (model.json; it holds checkpoint.pt, config.json, metrics.json); "
        "choose a new or empty --out"
    ) in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_an_empty_folder_or_one_a_killed_first_export_left_takes_the_bundle(
    vae_run_dir: Path, tmp_path: Path
) -> None:
    """Killed before its model.json moved in, an export leaves its staging folder or its graphs; a
    fresh volume holds lost+found."""
    (tmp_path / "empty" / "lost+found").mkdir(parents=True)
    (tmp_path / "killed" / ".export-x1y2").mkdir(parents=True)
    (tmp_path / "killed" / "encoder.onnx").write_bytes(b"half")
    for bundle in (tmp_path / "empty", tmp_path / "killed"):
        exported = export_run(vae_run_dir, bundle)
        assert ModelBundle.load(bundle).spec.version == exported.version


def test_a_bundle_of_the_same_name_is_replaced_without_asking(
    vae_bundle: Path, vae_run_dir: Path, tmp_path: Path
) -> None:
    """The run exported again, or trained again, as `make export` does after `make train`."""
    bundle = tmp_path / "bundle"
    shutil.copytree(vae_bundle, bundle)
    (bundle / "model.json").write_text(
        (bundle / "model.json").read_text().replace('"version": "', '"version": "old-')
    )
    spec = export_run(vae_run_dir, bundle, name="tiny-vae")
    assert ModelBundle.load(bundle).spec.version == spec.version == ModelBundle.load(vae_bundle).spec.version


@pytest.mark.parametrize(
    ("content", "reason"), [('{"final": ', "not valid JSON"), ("[]", "expected a JSON object, found list")]
)
def test_a_run_whose_metrics_cannot_be_read_is_refused_before_the_bundle_is_touched(
    vae_bundle: Path, vae_run_dir: Path, tmp_path: Path, content: str, reason: str
) -> None:
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    shutil.copytree(vae_run_dir, run)
    shutil.copytree(vae_bundle, bundle)
    (run / "metrics.json").write_text(content)

    with pytest.raises(ExportError, match=f"{run}/metrics.json: {reason}"):
        export_run(run, bundle)

    assert ModelBundle.load(bundle).spec.version == ModelBundle.load(vae_bundle).spec.version


def test_model_json_and_the_summary_give_the_opset_the_graphs_were_written_in(
    vae_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Asked for opset 13, torch's converter cannot convert its graph down and keeps the 18 it wrote.
    monkeypatch.setattr(exporter, "OPSET", 13)

    assert export_main([str(vae_run_dir), "--out", str(tmp_path / "bundle")]) == 0

    spec = ModelBundle.load(tmp_path / "bundle").spec
    for graph in (spec.encoder, spec.decoder):
        model = onnx.load(str(tmp_path / "bundle" / graph.file))
        assert {graph.opset} == {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert json.loads(capsys.readouterr().out)["opset"] == 18


def test_ctrl_c_ends_vae_export_with_one_line_and_exit_130_and_keeps_the_bundle(
    vae_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    assert export_main([str(vae_run_dir), "--out", str(out)]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "_check_parity", interrupted)  # once a new graph is written
    assert export_main([str(vae_run_dir), "--out", str(out), "--version", "2"]) == 130
    assert capsys.readouterr().err == "vae-export: interrupted\n"
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
