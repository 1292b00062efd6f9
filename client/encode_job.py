"""`vae-encode-job`: encode a whole data set through the service, resumable and shardable.

    vae-encode-job --target HOST:PORT --input train-images-idx3-ubyte.gz --output encodings/
    vae-encode-job --target HOST:PORT --input digits.npy --output encodings/ --resume
    vae-encode-job --target HOST:PORT --input pngs/ --output out/ --shard-index 3 --num-shards 8
    vae-encode-job merge --output out/

The input is an IDX file (gzipped or raw), a .npy array ([N,28,28] or [N,1,28,28], uint8 0-255 or
float 0-1) or a folder of 28x28 grey PNGs read in name order. A raw uint8 IDX file, or a .npy of
uint8 or float32, is memory-mapped (client/images.py), so that its size is not bounded by memory;
the job stops if such a file is rewritten while it runs. The rows stream over one EncodeStream call
with at most `--max-in-flight` requests unanswered; the answers are written as numbered shards and
committed one by one in the manifest (see client/encodings.py), so that a job killed at any moment
and run again with `--resume` ends with every row exactly once, the same bytes as a run that was
never interrupted. A resume refuses an output written from other input or by another encoder (an
update that keeps the encoder, a new decoder say, leaves the latent space as it was, and is resumed).

`--shard-index I --num-shards N` (I defaults to $JOB_COMPLETION_INDEX, as a Kubernetes Indexed Job
sets it) encodes the I-th of N contiguous row ranges into OUTPUT/part-0000I-of-0000N/;
`client.read_encodings` joins the parts, and `vae-encode-job merge --output OUTPUT` writes one
manifest that lists them.

Transient errors are retried with backoff (a restarted server is reconnected to); INVALID_ARGUMENT
stops the job with the server's message. Exit status: 0 done; 1 the service failed the job, or a
shard could not be written (a full disk, a volume error; at the start too), or a mapped input changed mid-job,
which a run with --resume picks up from the last committed shard (where the input's content is the
same); 2 bad arguments (a TLS file that is not what its flag takes among
them), input or output directory, rows or requests that the service refuses (INVALID_ARGUMENT), or a
model other than the one the output was begun with (a rolling update reached mid-job): running again
cannot help until the input, the options, the output or the model changes; 130 interrupted (Ctrl-C)
and 143 terminated (SIGTERM, as Kubernetes stops a pod), which --resume continues. --skip-bad leaves
out unreadable PNG files as they are read; it does not skip rows that the service refuses.

Requests carry --batch-size rows: by default 256, or fewer where the server takes fewer in one request
(ModelInfo.max_request_rows); a --batch-size given and more than that is refused. The output is the
same whatever the batch size, so a resume may use another.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np
import numpy.typing as npt

from client.cli import (
    DEFAULT_BATCH_SIZE,
    add_connection_arguments,
    positive_int,
    positive_seconds,
    rows_per_request,
    seconds_or_zero,
    tls_from_args,
)
from client.client import (
    EncodeResult,
    ModelInfo,
    RetryPolicy,
    TlsOptions,
    VaeClient,
    VaeClientError,
    refused_stream_request,
)
from client.encodings import (
    FORMAT_VERSION,
    INPUTS_LIST,
    LOCK,
    MANIFEST,
    REJECTED_LIST,
    EncodingsError,
    RowRange,
    concatenate_optional,
    create_directory,
    manifest_bytes,
    merged_manifest,
    part_directory_name,
    read_manifest,
    same_input,
    same_latent_space,
    sha256_bytes,
    shard_bytes,
    shard_file_name,
    split_counts,
    split_rows,
    verify_shards,
    write_atomic,
    write_manifest,
)
from client.images import ImageInput, InputError, read_images

# Where a test may stop the job (see JobSettings.pause_at): inside a shard, once a shard's temporary
# file is durable, once it is renamed, and once the manifest lists it.
PAUSE_POINTS = ("mid-shard", "before-rename", "before-manifest", "after-manifest")
PAUSE_ENV = "VAE_ENCODE_JOB_PAUSE_AT"
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
# Parts a job may be split into: Kubernetes' own bound on an Indexed Job's completions is 100,000.
MAX_SHARDS = 100_000
# A job outlasts a replica's restart: ten tries, between them pauses of up to 10 s, 16 to 33 s in all.
JOB_RETRY = RetryPolicy(max_attempts=10, max_backoff_s=10.0)
# Statuses that the same requests get however often the job runs again: exit 2, which the Kubernetes
# Job does not retry, saying what must change. Not UNIMPLEMENTED, though a target that is no
# VaeService answers it for good: a proxy or an ingress with no route yet (an HTTP 404) answers it for
# a moment too, and the job's index would then fail for good. FAILED_PRECONDITION and OUT_OF_RANGE:
# neither the service nor gRPC's library sends them.
REFUSED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: "the service refuses these rows or requests as sent; running "
    "again cannot help until the input or the options change",
}


class JobError(Exception):
    """The job refuses to run as asked (a resume that would mix outputs, a non-empty directory...)."""


class WriteFailed(Exception):
    """A shard or the manifest could not be written once the job was under way; what was committed
    before it stays, and a retry with --resume goes on from there."""


class InputChanged(Exception):
    """A mapped input was rewritten or replaced mid-job (its inode, size or modification time changed):
    the rows read since may be another file's. What was committed before stays; --resume goes on if
    the content is still the same."""


@contextlib.contextmanager
def sole_writer(directory: Path, log: TextIO) -> Iterator[None]:
    """Hold `directory` for one writer. A second job on the same folder (a Kubernetes Indexed Job may
    run two pods for one index), or a merge, waits for the first to end, and then goes on from what
    it committed, instead of deleting the first one's files under it."""
    with (directory / LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"vae-encode-job: waiting for the other job writing {directory}", file=log, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:  # a volume without locks (some NFS setups): better than no job at all
            # Unlocked, two jobs on one folder share the temporary files' names and may each delete
            # the other's uncommitted shards: keep to one job a folder there.
            print(f"vae-encode-job: cannot lock {directory} ({error}); run one job there at a time", file=log)
        yield


@dataclass(frozen=True)
class JobSettings:
    """Everything one run of the job needs, filled from the command line."""

    target: str
    input: Path
    output: Path
    resume: bool = False
    skip_bad: bool = False
    shard_index: int = 0
    num_shards: int = 1
    batch_size: int | None = None
    """Rows per EncodeStream request; None: DEFAULT_BATCH_SIZE, or a quarter of the server's most."""
    rows_per_shard: int = 8192
    """Rows per output shard: the unit of progress that survives a crash."""
    max_in_flight: int = 4
    answer_timeout_s: float = 120.0
    """The longest wait for an answer before the stream is opened again (a replica that hangs)."""
    retry: RetryPolicy = JOB_RETRY
    timeout_s: float = 30.0
    tls: TlsOptions | None = None
    progress_bar: bool | None = None
    """A progress bar (True), periodic log lines (False), or a bar only on a terminal (None)."""
    log_every_s: float = 10.0
    pause_at: frozenset[tuple[str, int]] = frozenset()
    """(point, shard number) pairs where the job stops and waits for a line on stdin: a test hook."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "rows_per_shard", "max_in_flight", "num_shards"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_shards > MAX_SHARDS:
            raise ValueError(
                f"num-shards must be at most {MAX_SHARDS:,} (each part is a folder that merge reads), "
                f"got {self.num_shards:,}"
            )
        if not self.answer_timeout_s > 0:  # NaN fails too
            raise ValueError(f"answer-timeout must be more than 0 seconds, got {self.answer_timeout_s}")
        split_rows(0, self.num_shards, self.shard_index)  # checks the index


@dataclass(frozen=True)
class JobSummary:
    """What one run did: rows encoded now, rows found done from an earlier run, time and retries."""

    output: Path
    rows: int
    rows_resumed: int
    seconds: float
    retries: int

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        resumed = f" ({self.rows_resumed} done before)" if self.rows_resumed else ""
        return (
            f"encoded {self.rows} rows{resumed} in {self.seconds:.2f} s: {self.rows_per_s:.0f} rows/s, "
            f"{self.retries} retries; output in {self.output}"
        )


def fingerprint(images: npt.NDArray[Any]) -> str:
    """The sha256 of an image batch as it is sent (dtype, shape and bytes)."""
    digest = hashlib.sha256(f"{images.dtype.str}{list(images.shape)}".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


def model_record(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "kind": info.kind,
        "latent_dim": info.latent_dim,
        "encoder_sha256": info.encoder_sha256,
    }


def _list_bytes(lines: Sequence[str]) -> bytes:
    # A file name that is not UTF-8 reaches Python as surrogate escapes (PEP 383): written back as the
    # bytes the file system holds, as os.fsencode does.
    return "".join(f"{line}\n" for line in lines).encode(errors="surrogateescape")


def new_manifest(
    settings: JobSettings, source: ImageInput, rows: RowRange, model: dict[str, Any]
) -> dict[str, Any]:
    input_record: dict[str, Any] = {
        "path": str(settings.input.resolve()),
        "format": source.format,
        "rows": len(source.images),
        "dtype": str(source.images.dtype),
        "sha256": fingerprint(source.images),
        "rejected": len(source.rejected),
    }
    if source.names:
        input_record["names_sha256"] = sha256_bytes(_list_bytes(source.names))
    return {
        "format_version": FORMAT_VERSION,
        "input": input_record,
        "model": model,
        "range": rows.to_dict(),
        "rows": rows.rows,
        "rows_per_shard": settings.rows_per_shard,
        "shards": [],
        "complete": rows.rows == 0,
    }


# What a run killed before it wrote its first manifest may have left (prepare_output's order).
_BEFORE_MANIFEST = frozenset(
    {INPUTS_LIST, REJECTED_LIST} | {f"{name}.tmp" for name in (INPUTS_LIST, REJECTED_LIST, MANIFEST)}
)


def check_resumable(directory: Path, old: dict[str, Any], new: dict[str, Any], target: str) -> None:
    """Refuse, with what differs, to continue an output from other input, model or split."""
    was, now = old["input"], new["input"]
    if not same_input(was, now):
        raise JobError(
            f"refusing to resume {directory}: it holds encodings of {was['path']} ({was['rows']} rows, "
            f"sha256 {was['sha256'][:12]}), but this run reads {now['path']} ({now['rows']} rows, "
            f"sha256 {now['sha256'][:12]}); use a new --output for different input"
        )
    was, now = old["model"], new["model"]
    if not same_latent_space(was, now):  # another version with the same encoder goes on, as mid-job
        raise JobError(
            f"refusing to resume {directory}: it was encoded by model {was['name']} version "
            f"{was['version']} (encoder sha256 {was['encoder_sha256'][:12]}), but {target} serves "
            f"{now['name']} version {now['version']} with another encoder (sha256 "
            f"{now['encoder_sha256'][:12]}); mixing them would give rows from two latent spaces: use a "
            "new --output, or serve the old encoder"
        )
    for key, flag in (("range", "--shard-index/--num-shards"), ("rows_per_shard", "--rows-per-shard")):
        if old[key] != new[key]:
            raise JobError(
                f"refusing to resume {directory}: it was started with other {flag} ({old[key]} there, "
                f"{new[key]} now); resume with the same options"
            )


def holds_unsplit_output(output: Path) -> bool:
    """`output` holds the output of a job that was not split (a merge's manifest lists parts)."""
    return (output / MANIFEST).is_file() and "merged_from" not in read_manifest(output)


def refuse_other_output(output: Path, parts: int) -> None:
    """A split job writes its part beside the other parts of the same split, never into the output of
    an unsplit job, which read_encodings would go on returning (and a merge would overwrite), nor
    beside the parts of a job split another way, which would mix two jobs' rows."""
    if holds_unsplit_output(output):
        raise JobError(
            f"{output} holds the output of a job that was not split; choose another --output for a split job"
        )
    others = sorted(split_counts(output) - {parts})
    if others:
        raise JobError(
            f"{output} holds the parts of a job split in {others[0]} (part-*-of-{others[0]:05d}), and "
            f"this one is split in {parts}; choose another --output, or resume that job with "
            f"--num-shards {others[0]}"
        )


def refuse_a_folder_not_the_jobs(directory: Path, resume: bool) -> None:
    """Refuse an --output that holds files and no manifest. --resume may start over on what a run
    killed before its first manifest left, and nothing else: no other file there is the job's."""
    if (directory / MANIFEST).is_file() or not directory.is_dir():
        return
    present = sorted(path.name for path in directory.iterdir() if path.name != LOCK)
    foreign = [name for name in present if name not in _BEFORE_MANIFEST]
    if foreign or (present and not resume):
        shown = ", ".join((foreign or present)[:3])
        raise JobError(
            f"{directory} is not empty and holds no manifest (it holds {shown}); "
            "choose an empty or new --output"
        )


def prepare_output(
    directory: Path, settings: JobSettings, source: ImageInput, manifest: dict[str, Any]
) -> dict[str, Any]:
    """The manifest to continue from: the one found (on --resume, checked), or `manifest` written new."""
    if (directory / MANIFEST).is_file():
        if not settings.resume:
            raise JobError(
                f"{directory} already holds an encoding job's output; pass --resume to continue it, "
                "or choose another --output"
            )
        found = read_manifest(directory)
        check_resumable(directory, found, manifest, settings.target)
        try:
            verify_shards(directory, found)
        except EncodingsError as error:
            # The job does not write over what it cannot read: the disk may be failing.
            raise JobError(
                f"{error}; --resume cannot continue this output: run the job again with a new --output"
            ) from error
        manifest = found
    else:
        refuse_a_folder_not_the_jobs(directory, settings.resume)
    create_directory(directory)
    # Files of a run killed before it committed them; the manifest does not list them.
    listed = {entry["file"] for entry in manifest["shards"]}
    for stale in directory.iterdir():
        if stale.is_file() and (
            stale.name.endswith(".tmp") or (stale.name.startswith("shard-") and stale.name not in listed)
        ):
            stale.unlink()
    # Each list written where this input has one, and otherwise removed: a run killed before its
    # first manifest may have left the lists of other input, which --resume starts over on. What is
    # already there is not written again, so a resume writes nothing before its first shard.
    for path, lines in (
        (directory / INPUTS_LIST, source.names),
        (directory / REJECTED_LIST, [f"{name}\t{why}" for name, why in source.rejected]),
    ):
        if not lines:
            path.unlink(missing_ok=True)
        elif _differs(path, _list_bytes(lines)):
            write_atomic(path, _list_bytes(lines))
    if _differs(directory / MANIFEST, manifest_bytes(manifest)):
        write_manifest(directory, manifest)
    return manifest


def _differs(path: Path, content: bytes) -> bool:
    """Whether the file at `path` is missing or holds anything but `content`."""
    return not path.is_file() or path.read_bytes() != content


class Progress:
    """Rows done, rows/s and ETA: a bar redrawn in place on a terminal, else a log line now and then."""

    def __init__(self, total: int, done: int, stream: TextIO, bar: bool, log_every_s: float) -> None:
        self.total, self.done, self.stream, self.bar, self.log_every_s = total, done, stream, bar, log_every_s
        self.start_done = done
        self.started = self.last_log = time.monotonic()

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.bar:
            self._draw(now)
        elif now - self.last_log >= self.log_every_s:
            self.last_log = now
            print(f"vae-encode-job: {self._status(now)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar:
            self._draw(time.monotonic())
            print(file=self.stream, flush=True)

    def _status(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "?"
        return f"{self.done}/{self.total} rows, {rate:.0f} rows/s, ETA {eta}"

    def _draw(self, now: float) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (width - filled)
        print(f"\r[{bar}] {self._status(now)}", end="", file=self.stream, flush=True)


class EncodeJob:
    """One run of the job over one row range; `run` returns its summary."""

    def __init__(self, settings: JobSettings, log: TextIO | None = None) -> None:
        self.settings = settings
        self.log = log if log is not None else sys.stderr

    def pause(self, point: str, shard: int) -> None:
        """Stop at a named point when a test asked for it, until a line arrives on stdin."""
        if (point, shard) in self.settings.pause_at:
            print(f"vae-encode-job: paused at {point} {shard}", file=self.log, flush=True)
            sys.stdin.readline()

    def run(self) -> JobSummary:
        settings = self.settings
        started = time.monotonic()
        if settings.output.exists() and not settings.output.is_dir():
            raise JobError(f"--output {settings.output} is a file; expected a folder for the job's shards")
        if settings.tls is not None:  # before the input is read, however long that takes
            settings.tls.check()
        source = read_images(settings.input, skip_bad=settings.skip_bad)
        rows = split_rows(len(source.images), settings.num_shards, settings.shard_index)
        directory = settings.output
        if settings.num_shards > 1:
            refuse_other_output(settings.output, settings.num_shards)
            directory = directory / part_directory_name(settings.shard_index, settings.num_shards)
        for name, reason in source.rejected:
            print(f"vae-encode-job: skipped {name}: {reason}", file=self.log)

        # Refused before the service is asked anything (checked again under the lock, in prepare_output).
        refuse_a_folder_not_the_jobs(directory, settings.resume)
        with VaeClient(
            settings.target, tls=settings.tls, timeout_s=settings.timeout_s, retry=settings.retry
        ) as client:
            info = client.model_info()
            batch_size = rows_per_request(info, self.settings.batch_size, self.settings.target)
            create_directory(directory)
            with sole_writer(directory, self.log):
                manifest = new_manifest(settings, source, rows, model_record(info))
                manifest = prepare_output(directory, settings, source, manifest)
                resumed = sum(entry["stop"] - entry["start"] for entry in manifest["shards"])
                if resumed:
                    resuming_at = rows.start + resumed
                    print(f"vae-encode-job: resuming {directory} at row {resuming_at}", file=self.log)
                bar = settings.progress_bar if settings.progress_bar is not None else self.log.isatty()
                progress = Progress(rows.rows, resumed, self.log, bar, settings.log_every_s)
                if not manifest["complete"]:
                    self._encode(client, source, rows, batch_size, directory, manifest, progress)
                progress.close()
                return JobSummary(
                    directory, rows.rows - resumed, resumed, time.monotonic() - started, client.retries
                )

    def _shard_rows(self, rows: RowRange, shard: int) -> tuple[int, int]:
        """The input rows [start, stop) of output shard number `shard`."""
        start = rows.start + shard * self.settings.rows_per_shard
        return start, min(start + self.settings.rows_per_shard, rows.stop)

    def _plan(self, rows: RowRange, first_shard: int, batch: int) -> list[tuple[int, int, int]]:
        """(shard number, start, stop) of each request of `batch` rows still to send; requests never
        cross shards."""
        plan = []
        per_shard = self.settings.rows_per_shard
        for shard in range(first_shard, -(-rows.rows // per_shard)):  # whole shards, the last maybe short
            shard_start, shard_stop = self._shard_rows(rows, shard)
            plan += [(shard, a, min(a + batch, shard_stop)) for a in range(shard_start, shard_stop, batch)]
        return plan

    def _encode(
        self,
        client: VaeClient,
        source: ImageInput,
        rows: RowRange,
        batch_size: int,
        directory: Path,
        manifest: dict[str, Any],
        progress: Progress,
    ) -> None:
        settings = self.settings
        plan = self._plan(rows, len(manifest["shards"]), batch_size)
        requests = (source.images[start:stop] for _, start, stop in plan)
        means: list[npt.NDArray[np.float32]] = []
        log_vars: list[npt.NDArray[np.float32] | None] = []
        stream = client.encode_stream(
            requests, max_in_flight=settings.max_in_flight, answer_timeout_s=settings.answer_timeout_s
        )
        with contextlib.closing(stream):
            try:
                for (shard, start, stop), result in zip(plan, stream, strict=True):
                    self._check_answer(result, manifest["model"], start, stop)
                    means.append(result.mean)
                    log_vars.append(result.log_var)
                    if len(means) == 1:
                        self.pause("mid-shard", shard)
                    shard_start, shard_stop = self._shard_rows(rows, shard)
                    if stop == shard_stop:
                        self._commit(directory, manifest, source, shard, shard_start, means, log_vars)
                        means, log_vars = [], []
                    progress.update(stop - start)
            except VaeClientError as error:
                named = _naming_the_input_rows(error, plan)
                if named is error:
                    raise
                raise named from error.__cause__

    def _check_answer(self, result: EncodeResult, model: dict[str, Any], start: int, stop: int) -> None:
        """Refuse an answer from another encoder than the output's, or of the wrong shape."""
        # A stream that reconnected, or a round-robin channel during a rolling update, may reach
        # another model: never mix two in one output.
        if result.encoder_sha256 != model["encoder_sha256"]:
            raise JobError(
                f"row {start} was encoded by encoder {str(result.encoder_sha256)[:12]} behind "
                f"{self.settings.target}, not by {model['name']} version {model['version']} (encoder "
                f"{model['encoder_sha256'][:12]}) that this output holds; the shards committed before it "
                "are kept. Resume once every replica serves that model, or start a new --output for the "
                "other one"
            )
        expected = [stop - start, model["latent_dim"]]
        rows = f"rows [{start}, {stop}): the service answered"
        if list(result.mean.shape) != expected:
            raise JobError(f"{rows} means of shape {list(result.mean.shape)}, expected {expected}")
        if model["kind"] == "vae" and result.log_var is None:
            raise JobError(f"{rows} no log-variances, which the VAE {model['name']} has")
        if result.log_var is not None and list(result.log_var.shape) != expected:
            raise JobError(f"{rows} log-variances of shape {list(result.log_var.shape)}, expected {expected}")

    def _commit(
        self,
        directory: Path,
        manifest: dict[str, Any],
        source: ImageInput,
        shard: int,
        start: int,
        means: list[npt.NDArray[np.float32]],
        log_vars: list[npt.NDArray[np.float32] | None],
    ) -> None:
        """Write one shard durably, then list it in the manifest: the step that makes it count."""
        committed = len(manifest["shards"])
        try:  # a mapped input rewritten under the job: these rows may be the new file's
            source.check_unchanged()
        except InputError as error:
            raise InputChanged(
                f"{error}; the shards committed before it ({committed}) were encoded from the input as "
                "it was. Run again with --resume: it goes on where the content is still what it was (a "
                "file only touched or copied over with the same bytes), and refuses it otherwise (then "
                "start a new --output for the new input)"
            ) from error
        mean = np.concatenate(means)
        stop = start + len(mean)
        data = shard_bytes(np.arange(start, stop, dtype=np.int64), mean, concatenate_optional(log_vars))
        name = shard_file_name(shard)
        try:
            write_atomic(directory / name, data, before_rename=lambda: self.pause("before-rename", shard))
            self.pause("before-manifest", shard)
            manifest["shards"].append(
                {"file": name, "start": start, "stop": stop, "sha256": sha256_bytes(data)}
            )
            manifest["complete"] = stop == manifest["range"]["stop"]
            write_manifest(directory, manifest)
        except OSError as error:
            raise WriteFailed(
                f"writing rows [{start}, {stop}) into {directory} failed ({error}); the {committed} shards "
                "committed before them are kept, and --resume goes on from there"
            ) from error
        self.pause("after-manifest", shard)


def parse_pause_at(text: str) -> frozenset[tuple[str, int]]:
    """`after-manifest:1,before-rename:0` as a set of (point, shard) pairs."""
    pairs = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, shard = item.partition(":")
        if point not in PAUSE_POINTS or not shard.isdigit():
            raise ValueError(
                f"{PAUSE_ENV}: {item!r}: expected POINT:SHARD with POINT one of {', '.join(PAUSE_POINTS)}"
            )
        pairs.add((point, int(shard)))
    return frozenset(pairs)


def completion_index(num_shards: int) -> int:
    """The default --shard-index: $JOB_COMPLETION_INDEX, which a Kubernetes Indexed Job gives each pod,
    or 0 outside one. An index that is not one of the --num-shards ranges is refused by its name."""
    text = os.environ.get(COMPLETION_INDEX_ENV, "")
    if not text:
        return 0
    if not text.isdecimal() or int(text) >= max(num_shards, 1):  # --num-shards 0: said by JobSettings
        raise JobError(
            f"{COMPLETION_INDEX_ENV}={text} is not a shard index in [0, {num_shards}) (--num-shards "
            f"{num_shards}): pass --num-shards as the Indexed Job's completions, or --shard-index"
        )
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-encode-job",
        description="Encode a data set through the service into resumable shards. "
        "`vae-encode-job merge --output DIR` joins the parts of a split job.",
    )
    add_connection_arguments(
        parser, timeout_help="deadline of each attempt of a unary call; the stream has --answer-timeout"
    )
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        help="an IDX file (.gz or raw), a .npy array, or a folder of PNGs",
    )
    parser.add_argument("--output", type=Path, required=True, help="the output directory")
    parser.add_argument("--resume", action="store_true", help="continue the job whose output is in --output")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out bad PNGs (listed in rejected.txt) instead of stopping",
    )
    parser.add_argument(
        "--shard-index",
        type=int,
        help="which of --num-shards row ranges to encode (default $JOB_COMPLETION_INDEX or 0)",
    )
    parser.add_argument(
        "--num-shards", type=int, default=1, help="split the input in this many ranges (default 1)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"rows per request (default {DEFAULT_BATCH_SIZE}, or a quarter of the server's most if fewer)",
    )
    parser.add_argument(
        "--rows-per-shard",
        type=int,
        default=JobSettings.rows_per_shard,
        help=f"rows per output shard (default {JobSettings.rows_per_shard})",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=JobSettings.max_in_flight,
        help=f"requests sent and not yet answered (default {JobSettings.max_in_flight})",
    )
    parser.add_argument(
        "--answer-timeout",
        type=positive_seconds,
        default=JobSettings.answer_timeout_s,
        metavar="SECONDS",
        help="the longest wait for an answer before the stream is opened again, on another replica "
        f"if there is one: a server that hangs (default {JobSettings.answer_timeout_s:g})",
    )
    parser.add_argument(
        "--attempts",
        type=positive_int,
        default=JOB_RETRY.max_attempts,
        help=f"tries per call on transient errors (default {JOB_RETRY.max_attempts})",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress_bar",
        action="store_true",
        default=None,
        help="always draw a progress bar",
    )
    progress.add_argument(
        "--no-progress", dest="progress_bar", action="store_false", help="log lines instead of a bar"
    )
    parser.add_argument(
        "--log-every",
        type=seconds_or_zero,
        default=JobSettings.log_every_s,
        metavar="SECONDS",
        help=f"seconds between log lines (default {JobSettings.log_every_s:g})",
    )
    return parser


def _naming_the_input_rows(error: VaeClientError, plan: list[tuple[int, int, int]]) -> VaeClientError:
    """`error` led by the input rows of the request the server refused, where it names one: the
    stream's numbering means nothing to whoever must find the bad row in the input."""
    number = refused_stream_request(error)
    if number is None or number >= len(plan) or error.code != grpc.StatusCode.INVALID_ARGUMENT:
        return error  # a full queue, say, is not these rows' fault
    _, start, stop = plan[number]
    details = f"input rows [{start}, {stop}): {error.details}"
    return VaeClientError(error.rpc, error.code, details, error.attempts)


def merge_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vae-encode-job merge", description="Join the parts of a split job."
    )
    parser.add_argument("--output", type=Path, required=True, help="the --output of the split job")
    args = parser.parse_args(argv)
    try:
        if not args.output.is_dir():
            raise JobError(f"{args.output}: no such folder")
        if holds_unsplit_output(args.output):
            raise JobError(f"{args.output} holds the output of a job that was not split: nothing to merge")
        with sole_writer(args.output, sys.stderr):
            manifest = merged_manifest(args.output)
            write_manifest(args.output, manifest)
    except (JobError, EncodingsError, OSError) as error:
        print(f"vae-encode-job merge: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # the merged manifest is written atomically: all of it, or none
        how, code = _stopped_by(stop)
        print(f"vae-encode-job merge: {how}; run it again", file=sys.stderr)
        return code
    parts = len(manifest["merged_from"])
    print(f"vae-encode-job merge: {args.output}/{MANIFEST} lists {manifest['rows']} rows from {parts} parts")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, as Kubernetes stops a pod: handled as Ctrl-C is, whatever the moment."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _stopped_by(stop: KeyboardInterrupt) -> tuple[str, int]:
    """How a run was stopped, and its exit status: the shell's 128 + the signal's number."""
    return ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)


def main(argv: Sequence[str] | None = None) -> int:
    # As PID 1 in a container, a process with no handler of its own ignores SIGTERM: Kubernetes would
    # wait out the pod's grace period and SIGKILL it, and nothing would say where the job stopped.
    if threading.current_thread() is not threading.main_thread():  # only there can a handler be set
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = JobSettings(
            target=args.target,
            input=args.input,
            output=args.output,
            resume=args.resume,
            skip_bad=args.skip_bad,
            shard_index=completion_index(args.num_shards) if args.shard_index is None else args.shard_index,
            num_shards=args.num_shards,
            batch_size=args.batch_size,
            rows_per_shard=args.rows_per_shard,
            max_in_flight=args.max_in_flight,
            answer_timeout_s=args.answer_timeout,
            retry=replace(JOB_RETRY, max_attempts=args.attempts),
            timeout_s=args.timeout,
            tls=tls_from_args(args),
            progress_bar=args.progress_bar,
            log_every_s=args.log_every,
            pause_at=parse_pause_at(os.environ.get(PAUSE_ENV, "")),
        )
        summary = EncodeJob(settings).run()
    except (VaeClientError, WriteFailed, InputChanged) as error:
        if isinstance(error, VaeClientError) and error.code in REFUSED_CODES:
            print(f"vae-encode-job: {error}; {REFUSED_CODES[error.code]}", file=sys.stderr)
            return 2
        # The other two say so themselves, with what else to check.
        kept = "; the shards committed so far are kept: run again with --resume to continue"
        hint = kept if isinstance(error, VaeClientError) else ""
        print(f"vae-encode-job: stopped: {error}{hint}", file=sys.stderr)
        return 1
    # Bad settings or input (InputError and EncodingsError are ValueErrors), and an unreadable input,
    # an output it may not write; or a disk full or failing as the job starts, which may clear, as it
    # may mid-job: exit 1, retried.
    except (JobError, ValueError, OSError) as error:
        print(f"vae-encode-job: {error}", file=sys.stderr)
        disk_failed = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)
        return 1 if disk_failed else 2
    except KeyboardInterrupt as stop:
        # Whatever the moment, the shards committed so far are whole and listed, and --resume goes on
        # from them (or starts over on what a run stopped before its first manifest left).
        how, code = _stopped_by(stop)
        print(
            f"vae-encode-job: {how}; the shards committed so far are kept: run again with --resume "
            "to continue",
            file=sys.stderr,
        )
        return code
    print(f"vae-encode-job: {summary.line()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
