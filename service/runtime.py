"""onnxruntime sessions for a bundle's two graphs, on the execution provider `--device` chose.

onnxruntime silently falls back to the CPU when a provider cannot be used, so the provider really in
use is read back from `session.get_providers()`: `--device cuda` without it fails at start.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.bundle import GraphName, ModelBundle, check_graph_signature
from service.errors import BundleError, DeviceError

Device = Literal["auto", "cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Where onnxruntime reads the external data of a graph loaded from bytes (the working directory if unset).
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
# How far outside [0,1] a decoder's pixels may fall: an int8 decoder's dequantized top level may land an
# ulp above 1 (UINT8 answers clip them).
PIXEL_TOLERANCE = 1e-6

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadSettings:
    """onnxruntime's thread pool within a call; 0 lets onnxruntime pick (one thread per physical core).
    The graphs run their nodes in order (a chain gains nothing from parallel execution, which was far
    slower here: docs/BENCHMARKS.md), so there is no inter-op pool to size."""

    intra_op_threads: int = 1


def providers_for(device: Device) -> list[str]:
    """The providers to ask onnxruntime for, in order of preference."""
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


class GraphSession:
    """One graph: a session whose input and outputs were checked against model.json."""

    def __init__(
        self, bundle: ModelBundle, graph: GraphName, device: Device, threads: ThreadSettings
    ) -> None:
        path = bundle.graph_path(graph)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads.intra_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning workers would take the cores the event loop needs between calls (2-core boxes).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The arena keeps the largest batch's buffers for good, which --max-batch-size bounds (16
        # rows: a few MB). Without it every call allocates afresh, and the allocator's state after
        # a mixed load decided whether those allocations page-faulted: EncodeStream ran at 20,000 or
        # 25,600 images/s depending on what came before; with it, 23,000 every time, at less
        # resident memory (docs/BENCHMARKS.md).
        options.enable_cpu_mem_arena = True
        options.log_severity_level = 3
        try:
            # onnxruntime warns when a provider asked for is missing; the check below says it better.
            with warnings.catch_warnings(), tempfile.TemporaryDirectory() as nowhere:
                warnings.simplefilter("ignore", UserWarning)
                # A graph whose weights lie in a file beside it (ONNX external data) would have them
                # read from the working directory, unhashed: from an empty folder, they fail to load.
                options.add_session_config_entry(EXTERNAL_DATA_FOLDER, nowhere)
                self.session = ort.InferenceSession(
                    bundle.graphs[graph], options, providers=providers_for(device)
                )
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(
                f"{path}: onnxruntime cannot load the graph ({error}); a bundle's graphs are single "
                "files that hold their weights, as vae-export writes them"
            ) from error
        self.provider: str = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise DeviceError(
                f"--device cuda: onnxruntime runs {path.name} on {self.provider}, not {CUDA} "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu with a matching "
                "CUDA, or use --device auto or cpu"
            )
        spec = bundle.spec.graph(graph)
        check_graph_signature(path, spec, self.session.get_inputs(), self.session.get_outputs())
        self.input_name = next(iter(spec.inputs))
        self.output_names = list(spec.outputs)

    def run(self, inputs: npt.NDArray[np.float32]) -> Sequence[npt.NDArray[np.float32]]:
        """The graph's outputs for a batch; safe to call from a worker thread."""
        outputs: Sequence[npt.NDArray[np.float32]] = self.session.run(
            self.output_names, {self.input_name: inputs}
        )
        return outputs


class Runtime:
    """The encoder and decoder sessions of one bundle."""

    def __init__(
        self, bundle: ModelBundle, device: Device = "auto", threads: ThreadSettings | None = None
    ) -> None:
        threads = threads or ThreadSettings()
        self.bundle = bundle
        self.encoder = GraphSession(bundle, "encoder", device, threads)
        self.decoder = GraphSession(bundle, "decoder", device, threads)
        self.execution_provider = self.decoder.provider
        log.info(
            "loaded %s version %s (%s, %s decoder) from %s on %s",
            bundle.spec.name,
            bundle.spec.version,
            bundle.spec.kind,
            bundle.spec.decoder.precision,
            bundle.path,
            self.execution_provider,
        )

    def warm_up(self) -> None:
        """Calls of 1 row and of 2 to each graph, so that the first request does not pay for
        onnxruntime's lazy set-up. A graph that fails on them, that does not answer a row per row
        (its N declared, not honoured), that answers NaN or Inf, or a decoder whose pixels are not
        in [0,1] (a graph without its sigmoid) is refused before SERVING rather than failing, or
        answering garbage to, every request."""
        spec = self.bundle.spec
        rng = np.random.default_rng(0)
        graphs: tuple[tuple[GraphName, GraphSession, Callable[[int], npt.NDArray[np.float32]]], ...] = (
            (
                "decoder",
                self.decoder,
                lambda rows: rng.standard_normal((rows, spec.latent_dim), dtype=np.float32),
            ),
            ("encoder", self.encoder, lambda rows: rng.random((rows, *spec.image_shape), dtype=np.float32)),
        )
        for graph, session, feed in graphs:
            path = self.bundle.graph_path(graph)
            for rows in (1, 2):
                try:
                    outputs = session.run(feed(rows))
                except Exception as error:  # onnxruntime raises its own types
                    raise BundleError(f"{path}: fails on {rows} input rows ({error})") from error
                for name, output in zip(session.output_names, outputs, strict=True):
                    expected = (rows, *spec.graph(graph).outputs[name][1:])
                    if output.shape != expected:
                        raise BundleError(
                            f"{path}: output {name!r} has shape {list(output.shape)} for {rows} input rows, "
                            f"expected {list(expected)}"
                        )
                    if not np.isfinite(output).all():
                        raise BundleError(f"{path}: output {name!r} holds NaN or Inf for {rows} input rows")
                if graph == "decoder":
                    _check_pixels(path, outputs[0])


def _check_pixels(path: Path, images: npt.NDArray[np.float32]) -> None:
    low, high = float(images.min()), float(images.max())
    if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
        raise BundleError(
            f"{path}: images from {low:g} to {high:g}, expected pixels in [0,1] "
            "(the decoder's probabilities or means, as its final sigmoid makes them)"
        )
