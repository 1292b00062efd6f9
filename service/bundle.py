"""The model bundle: two ONNX graphs and the model.json that describes them.

BUNDLE_DIR/encoder.onnx  images [N,1,28,28] -> mean [N,D] (and log_var [N,D] for a VAE)
BUNDLE_DIR/decoder.onnx  z [N,D] -> images [N,1,28,28]
BUNDLE_DIR/model.json    name, version, kind, latent_dim, image_shape, each graph's file, sha256, opset,
                         precision, inputs and outputs, the training config and metrics, how it was
                         exported

The service owns this schema (the exporter writes it with `BundleSpec.to_dict`). `ModelBundle.load`
fails fast: a missing file, a wrong hash or a signature that is not the contract's raises BundleError
with a message naming the file and the mismatch, before the server reports SERVING.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from service.errors import BundleError

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
IMAGE_SHAPE = (1, 28, 28)
# The name of the dynamic batch axis in shapes: a string where the size is a number.
BATCH_AXIS = "N"

GraphName = Literal["encoder", "decoder"]
Kind = Literal["vae", "ae"]
Shape = tuple[int | str, ...]

FLOAT32 = "float32"
# How a graph's weights are stored. `vae-export --quantize-decoder` writes the int8 decoder; its
# input and output stay float32, so nothing but the pixels tells it apart. Only static quantization:
# a dynamic one scales each call's activations by that call's range, so an image's pixels would depend
# on the rows batched with it, and a seed would no longer give the same bytes.
INT8_PRECISIONS = ("int8-static",)
# Served until 2026-12: a bundle of it is refused with why, not as an unknown precision.
WITHDRAWN_PRECISION = "int8-dynamic"
PRECISIONS = (FLOAT32, *INT8_PRECISIONS)


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of a bundle: its file, hash, opset, and the signature the service relies on."""

    file: str
    sha256: str
    opset: int
    inputs: dict[str, Shape]
    outputs: dict[str, Shape]
    precision: str = FLOAT32

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "opset": self.opset,
            "precision": self.precision,
            "inputs": {name: {"dtype": "float32", "shape": list(s)} for name, s in self.inputs.items()},
            "outputs": {name: {"dtype": "float32", "shape": list(s)} for name, s in self.outputs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> GraphSpec:
        try:
            # Bundles written before precisions existed are float32.
            precision = data.get("precision", FLOAT32)
            if precision == WITHDRAWN_PRECISION:
                raise BundleError(
                    f"{where}.precision: {precision!r} is no longer served, as its pixels depend on "
                    "the rows batched with them; export the run again, in float32 or int8-static"
                )
            if precision not in PRECISIONS:
                raise BundleError(f"{where}.precision: {precision!r}, expected one of {list(PRECISIONS)}")
            return cls(
                file=_field(data, "file", str, f"{where}."),
                sha256=_field(data, "sha256", str, f"{where}."),
                opset=_field(data, "opset", int, f"{where}."),
                inputs=_signature(data.get("inputs"), f"{where}.inputs"),
                outputs=_signature(data.get("outputs"), f"{where}.outputs"),
                precision=precision,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # e.g. a list for a dict
            raise BundleError(f"{where}: malformed graph entry ({error!r})") from error


def _field(data: Mapping[str, Any], name: str, kind: type[Any], prefix: str) -> Any:
    """data[name], a `kind` as JSON writes it: an int no bool nor float, a str not empty and printable
    (names and versions end up in logs and metric labels). `prefix` names where data is in the error
    ("model.json: ", or "model.json: graphs.encoder.")."""
    if name not in data:
        raise BundleError(f"{prefix}{name}: missing")
    value = data[name]
    if type(value) is not kind or value == "" or (kind is str and not value.isprintable()):
        expected = "a non-empty string of printable characters" if kind is str else "an integer"
        raise BundleError(f"{prefix}{name}: {value!r}, expected {expected}")
    return value


def _signature(data: Any, where: str) -> dict[str, Shape]:
    if not isinstance(data, dict):
        raise BundleError(
            f"{where}: {data!r}, expected an object of tensors by name, each with dtype and shape"
        )
    signature: dict[str, Shape] = {}
    for name, tensor in data.items():
        if not isinstance(tensor, dict):
            raise BundleError(f"{where}.{name}: {tensor!r}, expected an object with dtype and shape")
        if tensor.get("dtype") != "float32":
            raise BundleError(f"{where}.{name}: dtype {tensor.get('dtype')!r}, expected 'float32'")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) in (int, str) for d in shape):
            raise BundleError(f"{where}.{name}.shape: {shape!r}, expected a list of sizes and {BATCH_AXIS!r}")
        signature[name] = tuple(shape)
    return signature


def expected_signatures(
    kind: Kind, latent_dim: int
) -> dict[GraphName, tuple[dict[str, Shape], dict[str, Shape]]]:
    """The contract's (inputs, outputs) of each graph; an AE encoder has `mean` alone."""
    images: Shape = (BATCH_AXIS, *IMAGE_SHAPE)
    codes: Shape = (BATCH_AXIS, latent_dim)
    encoder_outputs = {"mean": codes, "log_var": codes} if kind == "vae" else {"mean": codes}
    return {
        "encoder": ({"images": images}, encoder_outputs),
        "decoder": ({"z": codes}, {"images": images}),
    }


@dataclass(frozen=True)
class BundleSpec:
    """The contents of model.json."""

    name: str
    version: str
    kind: Kind
    latent_dim: int
    encoder: GraphSpec
    decoder: GraphSpec
    image_shape: tuple[int, ...] = IMAGE_SHAPE
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def graph(self, name: GraphName) -> GraphSpec:
        return self.encoder if name == "encoder" else self.decoder

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "latent_dim": self.latent_dim,
            "image_shape": list(self.image_shape),
            "graphs": {"encoder": self.encoder.to_dict(), "decoder": self.decoder.to_dict()},
            "training": self.training,
            "metrics": self.metrics,
            "export": self.export,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = MODEL_JSON) -> BundleSpec:
        version = data.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise BundleError(f"{where}: format_version {version!r}, expected {FORMAT_VERSION}")
        kind = data.get("kind")
        if kind not in ("vae", "ae"):
            raise BundleError(f"{where}: kind {kind!r}, expected 'vae' or 'ae'")
        image_shape = data.get("image_shape")
        if not isinstance(image_shape, list) or not all(type(d) is int for d in image_shape):
            raise BundleError(f"{where}: image_shape {image_shape!r}, expected {list(IMAGE_SHAPE)}")
        graphs = data.get("graphs")
        if not isinstance(graphs, dict):
            raise BundleError(f"{where}: graphs {graphs!r}, expected the encoder's and the decoder's entries")
        for graph, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
            if not isinstance(graphs.get(graph), dict):
                raise BundleError(f"{where}: graphs.{graph} {graphs.get(graph)!r}, expected its entry")
            # The bundle is one folder of these two names: a graph named elsewhere would not travel with it.
            if graphs[graph].get("file") != file:
                raise BundleError(
                    f"{where}: graphs.{graph}.file {graphs[graph].get('file')!r}, expected {file!r}"
                )
        for record in ("training", "metrics", "export"):
            if not isinstance(data.get(record, {}), dict):
                raise BundleError(f"{where}: {record} {data[record]!r}, expected an object")
        spec = cls(
            name=_field(data, "name", str, f"{where}: "),
            version=_field(data, "version", str, f"{where}: "),
            kind=kind,
            latent_dim=_field(data, "latent_dim", int, f"{where}: "),
            image_shape=tuple(image_shape),
            encoder=GraphSpec.from_dict(graphs["encoder"], f"{where}: graphs.encoder"),
            decoder=GraphSpec.from_dict(graphs["decoder"], f"{where}: graphs.decoder"),
            training=dict(data.get("training", {})),
            metrics=dict(data.get("metrics", {})),
            export=dict(data.get("export", {})),
        )
        spec.check_contract(where)
        return spec

    def check_contract(self, where: str = MODEL_JSON) -> None:
        """The signatures model.json declares must be the contract's for this kind and latent_dim."""
        if self.latent_dim < 1:
            raise BundleError(f"{where}: latent_dim {self.latent_dim}, expected at least 1")
        if self.image_shape != IMAGE_SHAPE:
            raise BundleError(f"{where}: image_shape {list(self.image_shape)}, expected {list(IMAGE_SHAPE)}")
        for graph, (inputs, outputs) in expected_signatures(self.kind, self.latent_dim).items():
            spec = self.graph(graph)
            _compare(f"{where}: graphs.{graph}.inputs", spec.inputs, inputs)
            _compare(f"{where}: graphs.{graph}.outputs", spec.outputs, outputs)


def _compare(where: str, actual: Mapping[str, Shape], expected: Mapping[str, Shape]) -> None:
    if list(actual) != list(expected):
        raise BundleError(f"{where}: names {list(actual)}, expected {list(expected)}")
    for name, shape in expected.items():
        if tuple(actual[name]) != tuple(shape):
            raise BundleError(f"{where}.{name}: shape {list(actual[name])}, expected {list(shape)}")


class NodeArg(Protocol):
    """What onnxruntime says of a graph's input or output (`onnxruntime.NodeArg`)."""

    name: str
    shape: Sequence[Any]
    type: str


def check_graph_signature(
    file: Path,
    spec: GraphSpec,
    inputs: Sequence[NodeArg],
    outputs: Sequence[NodeArg],
) -> None:
    """The inputs and outputs a loaded graph really has (onnxruntime's `get_inputs()` and
    `get_outputs()`) must be what model.json says: names, shapes, and float32 throughout.

    onnxruntime reports a dynamic axis as a string (or None); any such axis matches `N`.
    """
    for kind, declared, actual in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        names = [arg.name for arg in actual]
        if names != list(declared):
            raise BundleError(f"{file}: {kind} {names}, but model.json declares {list(declared)}")
        for arg in actual:
            if arg.type != "tensor(float)":
                raise BundleError(
                    f"{file}: {kind[:-1]} {arg.name!r} is {arg.type}, but model.json declares float32"
                )
            seen = tuple(BATCH_AXIS if not isinstance(d, int) else d for d in arg.shape)
            if seen != tuple(declared[arg.name]):
                raise BundleError(
                    f"{file}: {kind[:-1]} {arg.name!r} has shape {list(seen)}, "
                    f"but model.json declares {list(declared[arg.name])}"
                )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelBundle:
    """A bundle on disk whose model.json parsed and whose graph files match their hashes."""

    path: Path
    spec: BundleSpec
    graphs: Mapping[GraphName, bytes] = field(repr=False)
    """Each graph's bytes as hashed: the sessions load these, so a file replaced since (a new export
    into the folder) is not served under the old hash."""

    def graph_path(self, name: GraphName) -> Path:
        return self.path / self.spec.graph(name).file

    @classmethod
    def load(cls, path: Path) -> ModelBundle:
        """Read model.json and verify both graph files against it; raises BundleError."""
        if not path.is_dir():
            what = "not a directory" if path.exists() else "no such folder"
            raise BundleError(f"{path}: {what}; expected a model bundle written by vae-export")
        model_json = path / MODEL_JSON
        if not model_json.is_file():
            if (path / "checkpoint.pt").is_file():  # vae-train's: the service reads bundles alone
                raise BundleError(
                    f"{model_json}: not found; {path} is a training run: export it first "
                    f"(vae-export {path} --out BUNDLE) and serve BUNDLE"
                )
            raise BundleError(
                f"{model_json}: {_not_a_file(model_json)}; expected a model bundle written by vae-export"
            )
        try:
            data = json.loads(model_json.read_text())
        except (OSError, ValueError, RecursionError) as error:  # the last: nesting deeper than Python
            raise BundleError(f"{model_json}: not readable JSON ({error})") from error
        if not isinstance(data, dict):
            raise BundleError(f"{model_json}: expected a JSON object")
        spec = BundleSpec.from_dict(data, str(model_json))
        graphs: dict[GraphName, bytes] = {}
        for graph in ("encoder", "decoder"):
            graph_spec = spec.graph(graph)
            file = path / graph_spec.file
            if not file.is_file():
                raise BundleError(f"{file}: {_not_a_file(file)}; model.json names it as the {graph} graph")
            graphs[graph] = file.read_bytes()
            actual = hashlib.sha256(graphs[graph]).hexdigest()
            if actual != graph_spec.sha256:
                raise BundleError(f"{file}: sha256 {actual} does not match model.json's {graph_spec.sha256}")
        return cls(path=path, spec=spec, graphs=graphs)


def _not_a_file(path: Path) -> str:
    """Why a path that should be a file's is not one."""
    if path.exists():
        return "not a regular file"
    return "a symbolic link to nothing" if path.is_symlink() else "not found"
