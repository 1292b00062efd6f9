"""`vae-export RUN_DIR --out BUNDLE_DIR [--name NAME] [--version VERSION] [--quantize-decoder METHOD]
[--overwrite]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.exporter import OPSET, PARITY_TOLERANCE, ExportError, export_run
from service.bundle import INT8_PRECISIONS
from service.errors import BundleError
from training.run import json_text


def non_empty(text: str) -> str:
    """An argparse type for --name and --version, which the service refuses in model.json empty or
    with characters that are not printable (a line break would forge a log line)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r}: expected printable characters only")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vae-export",
        description=(
            "Export a training run to a model bundle (encoder.onnx, decoder.onnx, model.json), "
            f"opset {OPSET}, checked against PyTorch (max abs diff < {PARITY_TOLERANCE:g})."
        ),
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by vae-train")
    parser.add_argument("--out", type=Path, required=True, help="the bundle directory to write")
    parser.add_argument("--name", type=non_empty, help="the model's name (default: the run directory's name)")
    parser.add_argument(
        "--version", type=non_empty, help="the model's version (default: a hash of the two graphs)"
    )
    parser.add_argument(
        "--quantize-decoder",
        choices=INT8_PRECISIONS,
        help=(
            "ship the decoder in int8, quantized by onnxruntime after the float32 one passed parity; "
            "model.json records its pixel error against float32. Not faster on the CPU measured "
            "(docs/BENCHMARKS.md)"
        ),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a bundle in --out of another model's name (one of the same name is always replaced)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = export_run(
            args.run_dir,
            args.out,
            name=args.name,
            version=args.version,
            quantize_decoder=args.quantize_decoder,
            overwrite=args.overwrite,
        )
    except (ExportError, BundleError, ValueError, OSError) as error:  # a broken metrics.json, a full disk
        print(f"vae-export: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # an existing bundle is kept whole: the export writes beside it first
        print("vae-export: interrupted", file=sys.stderr)
        return 130
    summary = {
        "bundle": str(args.out),
        "name": spec.name,
        "version": spec.version,
        "kind": spec.kind,
        "latent_dim": spec.latent_dim,
        "opset": spec.encoder.opset,
        "parity_max_abs_diff": spec.export["parity_max_abs_diff"],
        "decoder_precision": spec.decoder.precision,
    }
    if "decoder_quantization" in spec.export:
        summary["decoder_quantization"] = spec.export["decoder_quantization"]
    print(json_text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
