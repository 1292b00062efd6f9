"""A training run directory -> a model bundle: encoder.onnx, decoder.onnx and model.json.

The graphs are deterministic: sampling (mean + sigma * eps for the posterior, z ~ N(0, I) for the prior)
stays out of them, and the service draws it from a seeded generator. Before `export_run` returns,
both graphs run in onnxruntime on batch sizes other than the traced one and are compared with
PyTorch; a difference above PARITY_TOLERANCE fails the export with the figure (the habit of
huggingface/optimum's validation after export). With `quantize_decoder`, the decoder that passed is
then replaced by its int8 version, and model.json records how far that one's pixels drift from it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export import quantize
from service.bundle import (
    BATCH_AXIS,
    DECODER_FILE,
    ENCODER_FILE,
    IMAGE_SHAPE,
    INT8_PRECISIONS,
    MODEL_JSON,
    BundleSpec,
    GraphName,
    GraphSpec,
    ModelBundle,
    Shape,
    check_graph_signature,
    expected_signatures,
    sha256_of,
)
from service.errors import BundleError
from training.models import VAE, AutoEncoder
from training.run import TrainConfig, finite_or_null, json_text, load_metrics, load_run

# Pinned so that a bundle's graphs do not change with the torch version; recorded in model.json.
OPSET = 18
TRACE_BATCH_SIZE = 2
PARITY_BATCH_SIZES = (1, 7, 256)
PARITY_TOLERANCE = 1e-4
# onnxruntime's CPU provider runs Conv in blocked (NCHWc) kernels, whose blocks hold 8 or 16 channels,
# and ConvTranspose as a matrix product then col2im. A stride-1 transposed convolution with whole
# blocks of output channels is therefore written into the graph as the convolution it equals: the
# decoder's 64-channel layer then takes about half the time, and the decoder 5-13% less
# (docs/BENCHMARKS.md, change 12). The one-channel output layer stays a ConvTranspose, as its Conv
# would fill a block with 15 empty channels.
CONV_CHANNEL_BLOCK = 16

log = logging.getLogger(__name__)


class ExportError(Exception):
    """The export failed: the run is unusable, a graph is invalid, or parity missed the tolerance."""


class _EncoderGraph(nn.Module):
    """images -> (mean, log_var) for a VAE, images -> mean for an AE."""

    def __init__(self, model: AutoEncoder | VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.model.encode(images)


class _DecoderGraph(nn.Module):
    """z -> images in [0,1] (the decoder's mean), its layers as onnxruntime runs them fastest."""

    def __init__(self, model: AutoEncoder | VAE) -> None:
        super().__init__()
        self.decoder = _with_plain_convolutions(model.decoder)

    def forward(self, z: Tensor) -> Tensor:
        result: Tensor = self.decoder(z)
        return result


def _with_plain_convolutions(decoder: nn.Module) -> nn.Module:
    """A copy of `decoder` in which each stride-1 transposed convolution with whole blocks of output
    channels (CONV_CHANNEL_BLOCK) is the convolution it equals."""
    decoder = copy.deepcopy(decoder)
    for name, layer in list(decoder.named_modules()):
        if isinstance(layer, nn.ConvTranspose2d) and layer.out_channels % CONV_CHANNEL_BLOCK == 0:
            conv = _as_convolution(layer)
            if conv is not None:
                decoder.set_submodule(name, conv)
    return decoder


def _as_convolution(layer: nn.ConvTranspose2d) -> nn.Conv2d | None:
    """The convolution a stride-1 transposed convolution equals: the same kernel flipped in space,
    with its input and output channels swapped, padded by kernel - 1 - padding. None for a layer
    that has no such equal (a stride, dilation, groups or output padding)."""
    (height, width), padding = layer.kernel_size, layer.padding
    if not (
        layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.output_padding == (0, 0)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and isinstance(padding, tuple)
        and padding[0] < height
        and padding[1] < width
    ):
        return None
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        (height, width),
        padding=(height - 1 - padding[0], width - 1 - padding[1]),
        bias=layer.bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(layer.weight.transpose(0, 1).flip(2, 3))
        if layer.bias is not None and conv.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


@dataclass(frozen=True)
class _Graph:
    name: GraphName
    file: str
    module: nn.Module  # what is exported
    reference: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]]  # the trained model, for parity
    inputs: dict[str, Shape]
    outputs: dict[str, Shape]


def export_run(
    run_dir: Path,
    bundle_dir: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    quantize_decoder: str | None = None,
    overwrite: bool = False,
) -> BundleSpec:
    """Export the run's model to `bundle_dir` and prove parity; returns what model.json says.

    `quantize_decoder` (one of INT8_PRECISIONS) ships the decoder in int8 instead of float32. A bundle
    of another model's name is replaced only with `overwrite`; one of the same name (the run exported
    again, or trained again) always is.
    """
    if quantize_decoder is not None and quantize_decoder not in INT8_PRECISIONS:
        raise ExportError(
            f"quantize_decoder: {quantize_decoder!r}, expected one of {list(INT8_PRECISIONS)} or None"
        )
    try:
        config, model = load_run(run_dir)
        metrics = _final_metrics(load_metrics(run_dir))
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise ExportError(f"{run_dir}: cannot load the run ({error})") from error
    name = name or run_dir.resolve().name
    _check_a_bundle_folder(bundle_dir)
    if not overwrite:
        _check_not_another_models(bundle_dir, name)
    kind = config.model.kind
    latent_dim = config.model.latent_dim
    if quantize_decoder is not None and kind == "ae":
        # The int8 decoder is calibrated and scored on N(0, I), which a VAE's codes are pulled toward;
        # an AE's are not (their range is the essay's second limit), so its recorded error would
        # understate the error on the codes it decodes.
        raise ExportError(
            f"{run_dir}: an AE's decoder is not quantized, because its codes do not follow N(0, I), the "
            "points the int8 decoder is calibrated and scored on; export it in float32"
        )
    signatures = expected_signatures(kind, latent_dim)
    graphs = [
        _Graph("encoder", ENCODER_FILE, _EncoderGraph(model).eval(), model.encode, *signatures["encoder"]),
        _Graph("decoder", DECODER_FILE, _DecoderGraph(model).eval(), model.decode, *signatures["decoder"]),
    ]
    made = [folder for folder in (bundle_dir, *bundle_dir.parents) if not folder.exists()]
    try:
        return _export_through_staging(
            bundle_dir,
            lambda folder: _export_into(folder, graphs, config, metrics, name, version, quantize_decoder),
        )
    except BaseException:
        for folder in made:  # the folders this export made, deepest first, each only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _export_through_staging(bundle_dir: Path, export_into: Callable[[Path], BundleSpec]) -> BundleSpec:
    """`export_into` writes the bundle into a staging folder inside `bundle_dir`; its files then
    replace the bundle's."""
    try:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        # Everything is written here first and moved into place once it loads: a failed export (a
        # full disk, a Ctrl-C, parity) leaves the bundle that was there whole, and the bundle's files
        # are replaced, never written through, so hard links and symlinks into other bundles keep
        # those bundles' graphs. Inside the bundle's folder, it is on the same file system.
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=bundle_dir))
        # Readable like the bundle, should a killed export leave it behind to be copied along with it.
        staging.chmod(0o755)
    except OSError as error:  # a file of that name, say
        raise ExportError(f"{bundle_dir}: cannot make the bundle folder ({error})") from error
    try:
        bundle = export_into(staging)
        # model.json last: until it is replaced, the old one names the old graphs' sha256s, so a
        # crash between the moves leaves a bundle that the service refuses, never a mixed one served.
        for file in (ENCODER_FILE, DECODER_FILE, MODEL_JSON):
            (staging / file).replace(bundle_dir / file)
    except OSError as error:
        raise ExportError(f"{bundle_dir}: cannot write the bundle ({error})") from error
    except (ExportError, BundleError) as error:  # named by the files they are about, not by staging's
        raise ExportError(str(error).replace(str(staging), str(bundle_dir))) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bundle


def _export_into(
    folder: Path,
    graphs: list[_Graph],
    config: TrainConfig,
    metrics: dict[str, Any],
    name: str,
    version: str | None,
    quantize_decoder: str | None,
) -> BundleSpec:
    """Both graphs, their parity with PyTorch, and model.json, written into `folder`, which must load."""
    latent_dim = config.model.latent_dim
    specs: dict[str, GraphSpec] = {}
    parity: dict[str, float] = {}
    for graph in graphs:
        path = folder / graph.file
        opset = _export_graph(graph, path, latent_dim)
        spec = GraphSpec(graph.file, sha256_of(path), opset, graph.inputs, graph.outputs)
        parity[graph.name] = _check_parity(graph, path, spec, latent_dim)
        specs[graph.name] = spec
    quantization: dict[str, Any] = {}
    if quantize_decoder is not None:
        specs["decoder"], quantization = _quantize(
            folder / DECODER_FILE, specs["decoder"], quantize_decoder, latent_dim
        )

    if version is None:
        # Content-addressed: the same weights exported twice give the same version.
        joined = (specs["encoder"].sha256 + specs["decoder"].sha256).encode()
        version = hashlib.sha256(joined).hexdigest()[:12]
    bundle = BundleSpec(
        name=name,
        version=version,
        kind=config.model.kind,
        latent_dim=latent_dim,
        encoder=specs["encoder"],
        decoder=specs["decoder"],
        image_shape=IMAGE_SHAPE,
        training=config.to_dict(),
        metrics=metrics,
        export={
            "parity_max_abs_diff": parity,
            "parity_batch_sizes": list(PARITY_BATCH_SIZES),
            "parity_tolerance": PARITY_TOLERANCE,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": ort.__version__,
            # Parity above is the float32 decoder's, before it was quantized.
            **({"decoder_quantization": quantization} if quantization else {}),
        },
    )
    (folder / MODEL_JSON).write_text(json_text(bundle.to_dict()) + "\n")
    # The consumer's own loader is the final word on whether the bundle is valid.
    ModelBundle.load(folder)
    return bundle


def _check_a_bundle_folder(bundle_dir: Path) -> None:
    """Refuse a folder that holds files but no bundle (a training run's, say: the arguments swapped),
    whatever --overwrite says: the bundle's files would be dropped among files that are not its own."""
    if (bundle_dir / MODEL_JSON).is_file() or not bundle_dir.is_dir():
        return
    # Not foreign: a bundle's own files (a first export killed before its model.json moved in, which
    # the next one replaces), hidden files (its staging folders, .gitkeep) and a volume's lost+found.
    own = {ENCODER_FILE, DECODER_FILE, MODEL_JSON, "lost+found"}
    present = sorted(
        path.name for path in bundle_dir.iterdir() if path.name not in own and path.name[0] != "."
    )
    if present:
        raise ExportError(
            f"{bundle_dir} holds files but no bundle ({MODEL_JSON}; it holds {', '.join(present[:3])}); "
            "choose a new or empty --out"
        )


def _check_not_another_models(bundle_dir: Path, name: str) -> None:
    """Refuse to replace the bundle of another model, whose run may be gone: it would be lost."""
    manifest = bundle_dir / MODEL_JSON
    if not manifest.is_file():
        return
    try:
        held = json.loads(manifest.read_text()).get("name")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        held = None
    if held != name:
        what = f"the bundle of model {held!r}" if isinstance(held, str) else f"a {MODEL_JSON} it cannot read"
        raise ExportError(
            f"{bundle_dir} holds {what}, not {name!r}; pass --overwrite to replace it, or choose "
            "another --out"
        )


def _final_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's evaluation (vae-evaluate) when it has one, else its last epoch's losses (vae-train).
    The figures stay behind: their paths mean nothing where the bundle goes. A number that is not
    finite (in a metrics.json written before they were null) becomes null, as model.json is JSON."""
    for key in ("evaluation", "final"):
        value = metrics.get(key)
        if isinstance(value, dict):
            return {name: finite_or_null(item) for name, item in value.items() if name != "figures"}
    return {}


def _export_graph(graph: _Graph, path: Path, latent_dim: int) -> int:
    """Writes the graph to `path`; returns the opset it has (the converter may keep a newer one than
    it was asked for)."""
    input_name = next(iter(graph.inputs))
    example = _example_input(graph.name, TRACE_BATCH_SIZE, latent_dim, seed=0)
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                graph.module,
                (torch.from_numpy(example),),
                str(path),
                input_names=[input_name],
                output_names=list(graph.outputs),
                # Keyed by forward()'s parameter name, which is the graph's input name.
                dynamic_shapes={input_name: {0: batch}},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        model = _drop_debug_metadata(path)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # the exporter raises many types; all mean the same to the caller
        raise ExportError(f"{path}: export of the {graph.name} failed ({error})") from error
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _drop_debug_metadata(path: Path) -> onnx.ModelProto:
    """Remove the exporter's per-node debug metadata (stack traces with this checkout's absolute
    paths, fx names): the graph, and so the bundle version, then depends on the weights alone, not
    on the directory the export ran in."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in model.graph.value_info:
        del value.metadata_props[:]
    onnx.save(model, str(path))
    return model


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about torchvision ops and deprecations that do not concern these graphs."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        exporter_log.setLevel(level)


def _example_input(graph: GraphName, batch_size: int, latent_dim: int, seed: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    if graph == "encoder":
        return rng.random((batch_size, *IMAGE_SHAPE), dtype=np.float32)
    return rng.standard_normal((batch_size, latent_dim), dtype=np.float32)


def _quantize(path: Path, spec: GraphSpec, method: str, latent_dim: int) -> tuple[GraphSpec, dict[str, Any]]:
    """Replace the float32 decoder at `path` by its int8 version; its spec, and its pixel error."""
    quantized = path.with_name(f"{path.stem}.{method}.onnx")
    try:
        quantize.quantize_decoder(path, quantized, method, latent_dim)
        drift = quantize.pixel_error(path, quantized, latent_dim)
        quantized.replace(path)
    except Exception as error:  # the quantizer raises many types; all mean the same to the caller
        raise ExportError(f"{path}: {method} quantization failed ({error})") from error
    finally:
        quantized.unlink(missing_ok=True)
    spec = replace(spec, sha256=sha256_of(path), precision=method)
    _checked_session(path, spec)
    log.info("%s: %s, max abs pixel diff %.3g", path, method, drift["max_abs_pixel_diff"])
    return spec, {"method": method, **drift}


def _checked_session(path: Path, spec: GraphSpec) -> ort.InferenceSession:
    """The graph loaded in onnxruntime, its inputs and outputs checked against `spec`."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    try:
        check_graph_signature(path, spec, session.get_inputs(), session.get_outputs())
    except BundleError as error:
        raise ExportError(str(error)) from error
    return session


def _check_parity(graph: _Graph, path: Path, spec: GraphSpec, latent_dim: int) -> float:
    """The largest |onnxruntime - PyTorch| over the parity batch sizes; raises past the tolerance."""
    session = _checked_session(path, spec)
    input_name = next(iter(graph.inputs))
    worst = 0.0
    for batch_size in PARITY_BATCH_SIZES:
        example = _example_input(graph.name, batch_size, latent_dim, seed=batch_size)
        with torch.no_grad():
            expected = graph.reference(torch.from_numpy(example))
        expected_arrays = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        actual_arrays = session.run(None, {input_name: example})
        for output, want, got in zip(graph.outputs, expected_arrays, actual_arrays, strict=True):
            if got.shape != want.shape:
                raise ExportError(
                    f"{path}: output {output!r} has shape {list(got.shape)} on batch size {batch_size}, "
                    f"PyTorch gives {list(want.shape)}"
                )
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            worst = max(worst, diff)
            if not diff < PARITY_TOLERANCE:
                raise ExportError(
                    f"{path}: output {output!r} differs from PyTorch by {diff:.3g} on batch size "
                    f"{batch_size}; the tolerance is {PARITY_TOLERANCE:g}"
                )
    log.info("%s: parity with PyTorch, max abs diff %.3g", path, worst)
    return worst
