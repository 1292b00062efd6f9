"""`vae-client`: call the service from a shell.

    vae-client sample --target localhost:50051 -n 64 --seed 1 --out grid.png
    vae-client encode --target localhost:50051 --input digit.png --out mean.npy
    vae-client decode --target localhost:50051 --input mean.npy --out decoded.png
    vae-client info --target localhost:50051

Exit status: 0 on success, 1 when the call failed (the server's message is printed), 2 for bad
arguments or input files, or input the server refuses (INVALID_ARGUMENT), 130 when interrupted, 141
(quietly) when what reads its output is gone (`vae-client info | head -c 10`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from client.client import (
    MAX_SECONDS,
    DecodeResult,
    EncodeResult,
    ModelInfo,
    RetryPolicy,
    TlsOptions,
    VaeClient,
    VaeClientError,
    as_wire_latents,
    sample_request,
)
from client.images import InputError, load_npy, npy_bytes, read_images, save_images, write_whole

DEFAULT_TARGET = "localhost:50051"
COMMANDS = ("sample", "encode", "decode", "info")
SEED_MAX = 2**64 - 1  # SampleRequest.seed is a uint64
# The status of a process that SIGPIPE ended, as a shell reports it: 128 + 13.
BROKEN_PIPE = 141


class MixedModels(Exception):
    """An encode or decode whose answers came from two models' graphs (in a rolling update, a reconnect
    or a later request reached a replica of another model)."""


@dataclass
class OneModel:
    """Refuses a file's answers once they name a second graph: `check` each answer's sha256 with the
    row it starts at. An answer that names none (a server older than the metadata) is not checked."""

    graph: str  # "encoder" or "decoder"
    target: str
    first: tuple[int, str] | None = None  # the first row whose answer named its graph, and the graph

    def check(self, row: int, sha256: str | None) -> None:
        if sha256 is None:
            return
        if self.first is None:
            self.first = (row, sha256)
        elif sha256 != self.first[1]:
            first_row, first_sha256 = self.first
            raise MixedModels(
                f"row {first_row} was answered by {self.graph} sha256 {first_sha256}, row {row} by "
                f"{self.graph} sha256 {sha256}: {self.target} changed model mid-way, and one file cannot "
                "hold two models' answers; nothing was written. Run the command again once every "
                "replica serves the same model"
            )


# gRPC's own name-resolver schemes, passed on as they are: `dns:///HOST:PORT` balances over every address.
GRPC_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def grpc_target(text: str) -> str:
    """An argparse type: HOST:PORT, or a target in one of gRPC's schemes. gRPC itself would take a
    port past 65535 modulo 65536, a bare host as port 443, and an http:// URL as a host name."""
    if text.startswith(GRPC_TARGET_SCHEMES):
        return text
    host, _, port = text.rpartition(":")
    host_ok = bool(host) and "/" not in host and (":" not in host or host[0] + host[-1] == "[]")
    if not (host_ok and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (localhost:50051, vae.example.com:443, [::1]:50051) or dns:///HOST:PORT, "
            f"got {text!r}"
        )
    return text


def positive_seconds(text: str) -> float:
    """An argparse type: seconds above 0 (a deadline of 0 fails every call at once), a year at most."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds above 0 and at most {MAX_SECONDS:g} (a year), got {text}"
        )
    return value


def seconds_or_zero(text: str) -> float:
    """An argparse type: 0, or the seconds positive_seconds takes."""
    try:
        return 0.0 if float(text) == 0 else positive_seconds(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected 0, or a number of seconds above 0 and at most {MAX_SECONDS:g} (a year), got {text}"
        ) from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def sample_seed(text: str) -> int:
    """An argparse type: an integer seed that a SampleRequest can carry."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64-1 ({SEED_MAX}), got {text}")
    return value


def add_connection_arguments(
    parser: argparse.ArgumentParser,
    default_timeout_s: float = 30.0,
    timeout_help: str = "deadline of each attempt of a call; of each answer of encode's stream",
) -> None:
    """The flags that say where the server is and how to reach it, shared by every client command."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        type=grpc_target,
        default=DEFAULT_TARGET,
        help=f"HOST:PORT, or dns:///HOST:PORT to balance over every address (default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout",
        type=positive_seconds,
        default=default_timeout_s,
        metavar="SECONDS",
        help=f"{timeout_help} (default {default_timeout_s:g})",
    )
    group.add_argument("--tls", action="store_true", help="use TLS (system root certificates by default)")
    group.add_argument(
        "--ca-cert", type=Path, help="PEM file of the CA that signed the server (implies --tls)"
    )
    group.add_argument("--client-cert", type=Path, help="PEM certificate for mutual TLS (implies --tls)")
    group.add_argument("--client-key", type=Path, help="PEM private key for mutual TLS")
    group.add_argument(
        "--server-name", help="the name on the server's certificate, if not the target's host (implies --tls)"
    )


def tls_from_args(args: argparse.Namespace) -> TlsOptions | None:
    # Any flag that only means something over TLS turns it on, rather than being ignored in plaintext.
    if not (args.tls or args.ca_cert or args.client_cert or args.client_key or args.server_name):
        return None
    return TlsOptions(
        root_certificates=args.ca_cert,
        certificate_chain=args.client_cert,
        private_key=args.client_key,
        server_name_override=args.server_name,
    )


def open_channel(target: str, tls: TlsOptions | None) -> Any:
    """A plain grpc.Channel to `target`, over TLS where `tls` is given (for services other than vae.v1)."""
    if tls is None:
        return grpc.insecure_channel(target)
    options = (
        [("grpc.ssl_target_name_override", tls.server_name_override)] if tls.server_name_override else []
    )
    return grpc.secure_channel(target, tls.credentials(), options=options)


def _client(args: argparse.Namespace) -> VaeClient:
    return VaeClient(
        args.target,
        tls=tls_from_args(args),
        timeout_s=args.timeout,
        retry=RetryPolicy(max_attempts=args.attempts),
    )


def _check_output(path: Path | None, suffixes: tuple[str, ...]) -> None:
    """Refuse an output the command could not write, before its call is made (and its answer lost)."""
    if path is None:
        return
    if path.suffix.lower() not in suffixes:
        raise InputError(f"{path}: expected a {' or '.join(suffixes)} file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a {' or '.join(suffixes)} file")
    if not path.parent.is_dir():
        raise InputError(f"{path}: no folder {path.parent} to write it in")
    try:  # a file made and dropped at once: what the command will do there, permissions and all
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        raise InputError(f"{path}: cannot write in {path.parent} ({error.strerror})") from None


def _check_not_an_input(flag: str, output: Path | None, inputs: Sequence[Path]) -> None:
    """Refuse an output that is one of the command's inputs, which its answer would replace."""
    if output is not None and any(output.resolve() == source.resolve() for source in inputs):
        raise InputError(f"{flag} {output} is an --input too: the answer would replace its input")


def _check_image_output(args: argparse.Namespace) -> None:
    """--out and --columns of the commands that write images."""
    _check_output(args.out, (".png", ".npy"))
    if args.columns is not None and args.columns < 1:
        raise InputError(f"--columns must be at least 1, got {args.columns}")
    if args.columns is not None and args.out.suffix.lower() != ".png":
        raise InputError(f"--columns: lays out a .png grid, and {args.out} is an array")


# Rows per Encode or Decode request when --batch-size is not given, or fewer (rows_per_request).
DEFAULT_BATCH_SIZE = 256


def rows_per_request(info: ModelInfo, batch_size: int | None, target: str) -> int:
    """--batch-size, which the server must take in one request, or else the default, cut to a quarter
    of the server's most.

    A quarter, as the server holds a stream to a quarter of its queue: a request of the whole queue
    fits only an empty one, and beside light traffic from other clients it was refused until the
    client gave up (a 256-row queue, three clients of 64 rows)."""
    most = info.max_request_rows  # 0: a server that does not say
    default = min(DEFAULT_BATCH_SIZE, max(1, most // 4)) if most > 0 else DEFAULT_BATCH_SIZE
    if batch_size is None:
        return default
    if 0 < most < batch_size:
        raise InputError(
            f"--batch-size {batch_size} is more than {target} takes in one request ({most} rows); "
            f"pass --batch-size {most} or less, or leave it out ({default} by default)"
        )
    return batch_size


def _sample(client: VaeClient, args: argparse.Namespace) -> None:
    _check_image_output(args)
    if args.num_samples < 1:  # before asking the server anything
        raise InputError(f"-n/--num-samples must be at least 1, got {args.num_samples}")
    sample_request(args.num_samples, args.seed, args.temperature, args.dtype)  # the rest, likewise
    # A SampleStream is held to the same limit, so the only way past it is several seeds: say so here
    # in words of this command's flags, rather than pass on the server's "num_samples".
    most = client.model_info().max_samples
    if 0 < most < args.num_samples:
        raise InputError(
            f"-n/--num-samples {args.num_samples} is more than {args.target} draws in one request "
            f"({most}, ModelInfo.max_samples); pass -n {most} or less (and run again with another --seed "
            "for more)"
        )
    result = client.sample(
        args.num_samples, seed=args.seed, temperature=args.temperature, output_dtype=args.dtype
    )
    save_images(result.images, args.out, args.columns)
    print(f"wrote {args.out}: {len(result.images)} images, seed {result.seed}")


def _encode(client: VaeClient, args: argparse.Namespace) -> None:
    _check_output(args.out, (".npy",))
    _check_output(args.log_var_out, (".npy",))
    if args.log_var_out is not None and args.log_var_out.resolve() == args.out.resolve():
        raise InputError(
            f"--log-var-out {args.log_var_out} is --out too: the log-variances would replace the means"
        )
    _check_not_an_input("--out", args.out, args.input)
    _check_not_an_input("--log-var-out", args.log_var_out, args.input)
    inputs = []  # read before any call, so that a bad file is named as such, whatever the server
    for path in args.input:
        source = read_images(path, skip_bad=args.skip_bad)
        for name, reason in source.rejected:
            print(f"vae-client: skipped {name}: {reason}", file=sys.stderr)
        inputs.append(source.images)
    info = client.model_info()
    batch = rows_per_request(info, args.batch_size, args.target)
    if args.log_var_out is not None and info.kind != "vae":
        raise InputError("--log-var-out: the served model is an AE, which has no log-variance")
    # One stream of bounded requests, so that a large array stays under the message size limit. Each
    # input keeps its own dtype (uint8 and float32 files may be mixed): the server scales each request.
    chunks = (images[start : start + batch] for images in inputs for start in range(0, len(images), batch))
    results: list[EncodeResult] = []
    one_model, row = OneModel("encoder", args.target), 0
    # A server that hangs while its connection lives would hold the stream, and the command, forever.
    for result in client.encode_stream(chunks, answer_timeout_s=args.timeout):
        one_model.check(row, result.encoder_sha256)  # a reconnect may reach a replica of another model
        results.append(result)
        row += len(result.mean)
    log_vars = [result.log_var for result in results]
    if args.log_var_out is not None and any(log_var is None for log_var in log_vars):
        raise InputError("--log-var-out: the served model is an AE, which has no log-variance")
    mean = np.concatenate([result.mean for result in results])
    outputs = {args.out: npy_bytes(mean)}
    if args.log_var_out is not None:
        log_var = np.concatenate([lv for lv in log_vars if lv is not None])
        outputs[args.log_var_out] = npy_bytes(log_var)
    write_whole(outputs)  # the two files together: never a new mean.npy beside an old log_var.npy
    print(f"wrote {args.out}: mean {list(mean.shape)}")
    if args.log_var_out is not None:
        print(f"wrote {args.log_var_out}: log_var {list(log_var.shape)}")


def _decode(client: VaeClient, args: argparse.Namespace) -> None:
    _check_image_output(args)
    _check_not_an_input("--out", args.out, [args.input])
    latents = load_npy(args.input, "latent codes [N,D], real numbers")
    if not isinstance(latents, np.ndarray) or latents.ndim != 2:
        got = f", got an array of shape {list(latents.shape)}" if isinstance(latents, np.ndarray) else ""
        hint = " (images are encoded with `vae-client encode`)" if got and latents.ndim in (3, 4) else ""
        raise InputError(f"{args.input}: expected one array of latent codes [N,D]{got}{hint}")
    if len(latents) == 0:
        raise InputError(f"{args.input}: holds no latent codes")
    try:  # the whole file, before the first request
        latents = as_wire_latents(latents)
    except (TypeError, ValueError) as error:  # not real numbers, or beyond float32: said by as_wire_latents
        raise InputError(f"{args.input}: {error}") from error
    not_finite = np.flatnonzero(~np.isfinite(latents).all(axis=1))
    if len(not_finite):
        raise InputError(
            f"{args.input}: NaN or Inf in {len(not_finite)} of its {len(latents)} latent codes, the first "
            f"in row {not_finite[0]} (counting from 0); nothing was decoded"
        )
    # Requests of --batch-size rows, as encode sends them: the mean.npy of a whole data set is more
    # than one request may carry (ModelInfo.max_request_rows).
    batch = rows_per_request(client.model_info(), args.batch_size, args.target)
    results: list[DecodeResult] = []
    one_model = OneModel("decoder", args.target)
    for start in range(0, len(latents), batch):
        result = client.decode_result(latents[start : start + batch], output_dtype=args.dtype)
        one_model.check(start, result.decoder_sha256)  # each request may reach another replica
        results.append(result)
    images = np.concatenate([result.images for result in results])
    save_images(images, args.out, args.columns)
    print(f"wrote {args.out}: {len(images)} images")


def _info(client: VaeClient, args: argparse.Namespace) -> None:
    print(json.dumps(client.model_info().to_dict(), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-client", description="Call the vae-serving gRPC service.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_connection_arguments(sub)
        sub.add_argument(
            "--attempts", type=positive_int, default=5, help="tries per call on transient errors (default 5)"
        )
        return sub

    sample = command("sample", "draw images from the prior and write them as a PNG grid or .npy")
    sample.add_argument("-n", "--num-samples", type=int, default=64, help="how many images (default 64)")
    sample.add_argument(
        "--seed",
        type=sample_seed,
        help="the seed, 0 to 2**64-1 (default: the server picks one and says which)",
    )
    sample.add_argument("--temperature", type=float, default=1.0, help="the prior's std, above 0 (default 1)")
    sample.add_argument(
        "--dtype", choices=["float32", "uint8"], default="uint8", help="images on the wire (default uint8)"
    )
    sample.add_argument("--columns", type=int, help="images per row of the grid (default: a square grid)")
    sample.add_argument("--out", type=Path, required=True, help="grid.png or images.npy")
    sample.set_defaults(run=_sample)

    encode = command("encode", "encode images to their posterior mean (and log-variance), written as .npy")
    encode.add_argument(
        "--input",
        type=Path,
        nargs="+",
        action="extend",  # given twice, both lists: the default would keep only the last
        required=True,
        help="image files, .npy arrays, IDX files or folders",
    )
    encode.add_argument("--out", type=Path, required=True, help="the means [N,D] as .npy")
    encode.add_argument("--log-var-out", type=Path, help="also write the log-variances [N,D] here")
    encode.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"images per request (default {DEFAULT_BATCH_SIZE}, or a quarter of the server's most if fewer)",
    )
    encode.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out the files of a PNG folder that are not 28x28 grey images, naming each on stderr",
    )
    encode.set_defaults(run=_encode)

    decode = command("decode", "decode latent codes [N,D] from a .npy file to images")
    decode.add_argument("--input", type=Path, required=True, help="latents.npy, real numbers [N,D]")
    decode.add_argument(
        "--dtype",
        choices=["float32", "uint8"],
        default="float32",
        help="images on the wire (default float32)",
    )
    decode.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"latent codes per request (default {DEFAULT_BATCH_SIZE}, or a quarter of the server's most "
        "if fewer)",
    )
    decode.add_argument("--columns", type=int, help="images per row of the grid (default: a square grid)")
    decode.add_argument("--out", type=Path, required=True, help="grid.png or images.npy")
    decode.set_defaults(run=_decode)

    info = command("info", "print the served model's ModelInfo as JSON")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] != "-h" and not "--help".startswith(argv[0]):
        # argparse would take the flag's value for the command: "invalid choice: 'localhost:50051'".
        command = next((word for word in argv if word in COMMANDS), "COMMAND")
        parser.error(
            f"{argv[0]}: the command comes first, its options after it (vae-client {command} {argv[0]} ...)"
        )
    args = parser.parse_args(argv)
    try:
        with _client(args) as client:
            args.run(client, args)
        sys.stdout.flush()  # here, where a reader gone away (`| head`) is caught, not at exit
    except (VaeClientError, MixedModels) as error:
        print(f"vae-client: {error}", file=sys.stderr)
        # The server refused the input as sent: bad input, as the command's own checks report it.
        refused = isinstance(error, VaeClientError) and error.code == grpc.StatusCode.INVALID_ARGUMENT
        return 2 if refused else 1
    except BrokenPipeError:  # `vae-client info | head -1`: the reader had what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return BROKEN_PIPE
    except (InputError, ValueError, TypeError, OSError) as error:
        print(f"vae-client: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vae-client: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
