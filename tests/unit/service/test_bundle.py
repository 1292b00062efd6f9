"""The bundle loader fails fast, naming the file and the mismatch."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest

from service.bundle import ModelBundle, sha256_of
from service.errors import BundleError
from service.runtime import Runtime


@pytest.fixture
def bundle_copy(vae_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(vae_bundle, copy)
    return copy


def edit_model_json(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / "model.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))


def test_a_good_bundle_loads(vae_bundle: Path) -> None:
    bundle = ModelBundle.load(vae_bundle)
    assert bundle.spec.kind == "vae"
    assert bundle.graph_path("decoder") == vae_bundle / "decoder.onnx"


def test_a_changed_graph_file_is_refused_by_its_hash(bundle_copy: Path) -> None:
    with (bundle_copy / "decoder.onnx").open("ab") as file:
        file.write(b"\0")
    with pytest.raises(BundleError, match=r"decoder\.onnx: sha256 [0-9a-f]+ does not match model\.json's"):
        ModelBundle.load(bundle_copy)


def test_a_missing_graph_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"encoder\.onnx: not found"):
        ModelBundle.load(bundle_copy)


def test_a_directory_without_model_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"model\.json: not found"):
        ModelBundle.load(tmp_path)


def test_a_bundle_path_that_is_missing_or_a_file_is_refused_saying_which(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"nowhere: no such folder; expected a model bundle written by"):
        ModelBundle.load(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BundleError, match=r"a-file: not a directory; expected a model bundle"):
        ModelBundle.load(tmp_path / "a-file")


def test_a_training_run_given_as_the_bundle_is_refused_saying_to_export_it(vae_run_dir: Path) -> None:
    with pytest.raises(BundleError) as refused:
        ModelBundle.load(vae_run_dir)
    assert str(refused.value) == (
        f"{vae_run_dir / 'model.json'}: not found; {vae_run_dir} is a training run: export it first "
        f"(vae-export {vae_run_dir} --out BUNDLE) and serve BUNDLE"
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(format_version=2), "format_version 2, expected 1"),
        (lambda s: s.update(kind="gan"), "kind 'gan', expected 'vae' or 'ae'"),
        (lambda s: s.pop("latent_dim"), "latent_dim"),
        (
            lambda s: s["graphs"]["decoder"].update(inputs=[]),
            "graphs.decoder.inputs: [], expected an object of tensors by name, each with dtype and shape",
        ),
        (
            lambda s: s["graphs"]["decoder"]["inputs"].update(z=[]),
            "graphs.decoder.inputs.z: [], expected an object with dtype and shape",
        ),
        (
            lambda s: s["graphs"]["decoder"]["inputs"]["z"].pop("shape"),
            "graphs.decoder.inputs.z.shape: None, expected a list of sizes and 'N'",
        ),
        # Names and versions end up in logs and metric labels, where a line break would forge a line.
        (
            lambda s: s.update(name="vae\nERROR forged"),
            "model.json: name: 'vae\\nERROR forged', expected a non-empty string of printable characters",
        ),
        (
            lambda s: s["graphs"]["decoder"]["inputs"]["z"].update(shape=["N", 3]),
            "graphs.decoder.inputs.z: shape ['N', 3], expected ['N', 2]",
        ),
        (
            lambda s: s["graphs"]["encoder"]["outputs"].pop("log_var"),
            "graphs.encoder.outputs: names ['mean'], expected ['mean', 'log_var']",
        ),
        (
            lambda s: s["graphs"]["decoder"].update(precision="int4"),
            "graphs.decoder.precision: 'int4', expected one of ['float32', 'int8-static']",
        ),
        (
            lambda s: s["graphs"]["decoder"].update(precision="int8-dynamic"),
            "'int8-dynamic' is no longer served, as its pixels depend on the rows batched with them; export",
        ),
        (lambda s: s.update(image_shape=[1, 32, 32]), "image_shape [1, 32, 32], expected [1, 28, 28]"),
        (
            lambda s: s["graphs"]["decoder"]["inputs"]["z"].update(dtype="float16"),
            "dtype 'float16', expected 'float32'",
        ),
        # JSON's true is Python's 1, and 2.0 equals 2: a schema of integers takes neither.
        (lambda s: s.update(format_version=True), "format_version True, expected 1"),
        (lambda s: s.update(latent_dim=2.0), "model.json: latent_dim: 2.0, expected an integer"),
        (lambda s: s.update(latent_dim="2"), "model.json: latent_dim: '2', expected an integer"),
        (lambda s: s.update(image_shape=[1, 28, 28.0]), "image_shape [1, 28, 28.0], expected [1, 28, 28]"),
        (lambda s: s.update(name=None), "model.json: name: None, expected a non-empty string"),
        (lambda s: s.update(version=""), "model.json: version: '', expected a non-empty string"),
        (lambda s: s.update(training=None), "model.json: training None, expected an object"),
        (lambda s: s.pop("graphs"), "model.json: graphs None, expected the encoder's and the decoder's"),
        (lambda s: s["graphs"].update(decoder=[]), "model.json: graphs.decoder [], expected its entry"),
        (
            lambda s: s["graphs"]["decoder"].update(opset=True),
            "graphs.decoder.opset: True, expected an integer",
        ),
        (lambda s: s["graphs"]["decoder"].pop("sha256"), "graphs.decoder.sha256: missing"),
        (
            lambda s: s["graphs"]["decoder"]["inputs"]["z"].update(shape=["N", 2.0]),
            "graphs.decoder.inputs.z.shape: ['N', 2.0], expected a list of sizes and 'N'",
        ),
        # A graph from outside the folder would not travel with the bundle.
        (
            lambda s: s["graphs"]["encoder"].update(file="../outside.onnx"),
            "graphs.encoder.file '../outside.onnx', expected 'encoder.onnx'",
        ),
        (
            lambda s: s["graphs"]["decoder"].update(file="encoder.onnx"),
            "graphs.decoder.file 'encoder.onnx', expected 'decoder.onnx'",
        ),
    ],
)
def test_a_model_json_off_the_contract_is_refused(
    bundle_copy: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_model_json(bundle_copy, edit)
    with pytest.raises(BundleError) as error:
        ModelBundle.load(bundle_copy)
    assert "model.json" in str(error.value)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not readable JSON"),
        ("[]", "expected a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "not readable JSON"),
    ],
)
def test_a_model_json_that_is_not_a_json_object_is_refused_by_name(
    bundle_copy: Path, text: str, message: str
) -> None:
    (bundle_copy / "model.json").write_text(text)
    with pytest.raises(BundleError) as error:
        ModelBundle.load(bundle_copy)
    assert "model.json" in str(error.value)
    assert message in str(error.value)


def test_a_model_json_or_graph_that_is_not_a_regular_file_is_refused_saying_so(bundle_copy: Path) -> None:
    (bundle_copy / "decoder.onnx").unlink()
    (bundle_copy / "decoder.onnx").symlink_to(bundle_copy / "gone.onnx")
    with pytest.raises(BundleError, match=r"decoder\.onnx: a symbolic link to nothing; model\.json names it"):
        ModelBundle.load(bundle_copy)
    (bundle_copy / "model.json").unlink()
    (bundle_copy / "model.json").mkdir()
    with pytest.raises(BundleError, match=r"model\.json: not a regular file; expected a model bundle"):
        ModelBundle.load(bundle_copy)


def test_a_graph_without_a_precision_is_float32_as_bundles_were_before_it(bundle_copy: Path) -> None:
    edit_model_json(bundle_copy, lambda s: s["graphs"]["decoder"].pop("precision"))
    assert ModelBundle.load(bundle_copy).spec.decoder.precision == "float32"


def test_a_graph_that_is_not_what_model_json_says_fails_when_loaded(
    bundle_copy: Path, ae_bundle: Path
) -> None:
    # An AE's encoder (mean only) under a VAE's model.json, with a hash that matches.
    shutil.copy(ae_bundle / "encoder.onnx", bundle_copy / "encoder.onnx")
    digest = sha256_of(bundle_copy / "encoder.onnx")
    edit_model_json(bundle_copy, lambda s: s["graphs"]["encoder"].update(sha256=digest))
    bundle = ModelBundle.load(bundle_copy)
    with pytest.raises(BundleError, match=r"encoder\.onnx: outputs \['mean'\], but model\.json declares"):
        Runtime(bundle, "cpu")


def test_a_graph_of_other_shapes_than_model_json_says_fails_when_loaded(bundle_copy: Path) -> None:
    # latent_dim 3 throughout model.json, over graphs whose codes are 2 wide.
    def widen(spec: dict[str, Any]) -> None:
        spec["latent_dim"] = 3
        for graph in spec["graphs"].values():
            for tensor in [*graph["inputs"].values(), *graph["outputs"].values()]:
                if tensor["shape"] == ["N", 2]:
                    tensor["shape"] = ["N", 3]

    edit_model_json(bundle_copy, widen)
    with pytest.raises(
        BundleError,
        match=r"encoder\.onnx: output 'mean' has shape \['N', 2\], but model\.json declares \['N', 3\]",
    ):
        Runtime(ModelBundle.load(bundle_copy), "cpu")


def test_a_graph_of_another_element_type_fails_when_loaded(bundle_copy: Path) -> None:
    # The decoder's names and shapes, in float64: it would fail on the first request, not at start-up.
    double = onnx.TensorProto.DOUBLE
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["z", "weights"], ["flat"]),
            onnx.helper.make_node("Reshape", ["flat", "shape"], ["images"]),
        ],
        "float64-decoder",
        [onnx.helper.make_tensor_value_info("z", double, ["N", 2])],
        [onnx.helper.make_tensor_value_info("images", double, ["N", 1, 28, 28])],
        [
            onnx.numpy_helper.from_array(np.zeros((2, 784)), "weights"),
            onnx.numpy_helper.from_array(np.array([-1, 1, 28, 28]), "shape"),
        ],
    )
    onnx.save(onnx.helper.make_model(graph), bundle_copy / "decoder.onnx")
    digest = sha256_of(bundle_copy / "decoder.onnx")
    edit_model_json(bundle_copy, lambda s: s["graphs"]["decoder"].update(sha256=digest))
    with pytest.raises(
        BundleError, match=r"decoder\.onnx: input 'z' is tensor\(double\), but model\.json declares float32"
    ):
        Runtime(ModelBundle.load(bundle_copy), "cpu")


def test_the_graphs_served_are_the_bytes_that_were_hashed_not_a_file_replaced_since(
    bundle_copy: Path, ae_bundle: Path
) -> None:
    """A new export into the folder between the check and the load would be served under the old hash."""
    bundle = ModelBundle.load(bundle_copy)
    z = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    verified = ort.InferenceSession(str(bundle_copy / "decoder.onnx")).run(None, {"z": z})[0]
    shutil.copy(ae_bundle / "decoder.onnx", bundle_copy / "decoder.onnx")  # the same signature
    replacement = ort.InferenceSession(str(bundle_copy / "decoder.onnx")).run(None, {"z": z})[0]
    assert not np.array_equal(verified, replacement)
    (served,) = Runtime(bundle, "cpu").decoder.run(z)
    np.testing.assert_array_equal(served, verified)


def serve_as_decoder(bundle: Path, nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray]) -> None:
    """A decoder of the contract's signature (z [N,2] -> images [N,1,28,28]) made of `nodes`, written
    into the bundle with model.json's hash to match: only its behaviour can give it away."""
    graph = onnx.helper.make_graph(
        nodes,
        "decoder",
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 2])],
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", 1, 28, 28])],
        [onnx.numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    onnx.save(onnx.helper.make_model(graph), bundle / "decoder.onnx")
    digest = sha256_of(bundle / "decoder.onnx")
    edit_model_json(bundle, lambda s: s["graphs"]["decoder"].update(sha256=digest))


def linear_decoder(weight: float) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """z @ W reshaped to images, W filled with `weight`: the nodes and weights of serve_as_decoder."""
    nodes = [
        onnx.helper.make_node("MatMul", ["z", "weights"], ["flat"]),
        onnx.helper.make_node("Reshape", ["flat", "shape"], ["images"]),
    ]
    return nodes, {"weights": np.full((2, 784), weight, np.float32), "shape": np.array([-1, 1, 28, 28])}


def test_a_graph_that_does_not_answer_a_row_per_row_is_refused_at_warm_up(bundle_copy: Path) -> None:
    """Its N is declared, so the signature passes; every request would fail with INTERNAL."""
    nodes, weights = linear_decoder(0.0)
    nodes[0].input[0] = "twice"  # the MatMul of z stacked twice
    serve_as_decoder(
        bundle_copy, [onnx.helper.make_node("Concat", ["z", "z"], ["twice"], axis=0), *nodes], weights
    )
    runtime = Runtime(ModelBundle.load(bundle_copy), "cpu")
    with pytest.raises(
        BundleError,
        match=r"decoder\.onnx: output 'images' has shape \[2, 1, 28, 28\] for 1 input rows, expected \[1, 1,",
    ):
        runtime.warm_up()


def test_a_graph_that_fails_on_two_rows_is_refused_at_warm_up_naming_it(bundle_copy: Path) -> None:
    """Its Reshape fixes the batch at one image, by a shape computed from z that onnxruntime cannot
    see when it loads the graph: onnxruntime's error on two rows, said as the bundle's."""
    nodes, weights = linear_decoder(0.0)
    nodes[1].input[1] = "one_image"
    nodes += [
        onnx.helper.make_node("ReduceSum", ["z"], ["total"], keepdims=0),
        onnx.helper.make_node("Mul", ["total", "zero"], ["nought"]),
        onnx.helper.make_node("Add", ["one_image_float", "nought"], ["one_image_as_float"]),
        onnx.helper.make_node("Cast", ["one_image_as_float"], ["one_image"], to=onnx.TensorProto.INT64),
    ]
    weights |= {"zero": np.array(0, np.float32), "one_image_float": np.array([1, 1, 28, 28], np.float32)}
    serve_as_decoder(bundle_copy, nodes, weights)
    runtime = Runtime(ModelBundle.load(bundle_copy), "cpu")
    with pytest.raises(BundleError, match=r"decoder\.onnx: fails on 2 input rows \(.*Reshape"):
        runtime.warm_up()


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        # A decoder without its sigmoid: its UINT8 pixels would be garbage.
        (-1.0, r"decoder\.onnx: images from -\d.* to \d.*, expected pixels in \[0,1\]"),
        (float("nan"), r"decoder\.onnx: output 'images' holds NaN or Inf for 1 input rows"),
    ],
)
def test_a_decoder_whose_pixels_are_not_in_0_1_is_refused_at_warm_up(
    bundle_copy: Path, weight: float, message: str
) -> None:
    serve_as_decoder(bundle_copy, *linear_decoder(weight))
    runtime = Runtime(ModelBundle.load(bundle_copy), "cpu")
    with pytest.raises(BundleError, match=message):
        runtime.warm_up()


def test_a_graph_whose_weights_lie_in_a_file_beside_it_is_refused_not_read_from_the_working_directory(
    bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX external data: the hash covers the graph file, not the weights, which onnxruntime would
    read from the working directory when the graph is loaded from its hashed bytes."""
    decoder = onnx.load(bundle_copy / "decoder.onnx")
    onnx.save_model(
        decoder,
        bundle_copy / "decoder.onnx",
        save_as_external_data=True,
        location="weights.data",
        size_threshold=0,
    )
    digest = sha256_of(bundle_copy / "decoder.onnx")
    edit_model_json(bundle_copy, lambda s: s["graphs"]["decoder"].update(sha256=digest))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(bundle_copy / "weights.data", elsewhere / "weights.data")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(
        BundleError, match=r"decoder\.onnx: onnxruntime cannot load the graph .*single files that hold"
    ):
        Runtime(ModelBundle.load(bundle_copy), "cpu")


def test_cuda_is_refused_when_onnxruntime_would_fall_back_to_the_cpu(vae_bundle: Path) -> None:
    import onnxruntime as ort

    from service.errors import DeviceError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here; the refusal needs a machine without it")
    with pytest.raises(
        DeviceError, match=r"--device cuda: onnxruntime runs encoder\.onnx on CPUExecutionProvider"
    ):
        Runtime(ModelBundle.load(vae_bundle), "cuda")
