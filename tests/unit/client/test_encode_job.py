"""The encode job's bookkeeping without a server: request plans, resume checks, output preparation,
and the flags that reach the client and its stream."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from client import encode_job
from client.cli import rows_per_request
from client.client import EncodeResult, TlsOptions, VaeClientError
from client.encode_job import (
    JOB_RETRY,
    EncodeJob,
    JobError,
    JobSettings,
    Progress,
    build_parser,
    completion_index,
    main,
    merge_main,
    new_manifest,
    parse_pause_at,
    prepare_output,
)
from client.encodings import (
    LOCK,
    MANIFEST,
    read_encodings,
    read_manifest,
    sha256_bytes,
    shard_bytes,
    split_rows,
    write_manifest,
)
from client.images import ImageInput, read_images
from tests.conftest import free_port
from tests.unit.client.conftest import TlsFiles

INVALID = grpc.StatusCode.INVALID_ARGUMENT

MODEL = {"name": "vae", "version": "1", "kind": "vae", "latent_dim": 2, "encoder_sha256": "ab" * 32}


def settings(tmp_path: Path, **changes: Any) -> JobSettings:
    return JobSettings(target="127.0.0.1:1", input=tmp_path / "x.npy", output=tmp_path / "out", **changes)


def source(seed: int = 0, rows: int = 10) -> ImageInput:
    images = np.random.default_rng(seed).integers(0, 256, size=(rows, 1, 28, 28), dtype=np.uint8)
    return ImageInput(images, "npy")


def manifest_for(job: JobSettings, input_: ImageInput, model: dict[str, Any] = MODEL) -> dict[str, Any]:
    rows = split_rows(len(input_.images), job.num_shards, job.shard_index)
    return new_manifest(job, input_, rows, model)


def finished_output(job: JobSettings, input_: ImageInput, shards: int = 1) -> dict[str, Any]:
    """An output whose first `shards` shards of 5 rows (rows 0-4, 5-9...) are committed, as a killed job
    leaves it."""
    manifest = manifest_for(job, input_)
    prepare_output(job.output, job, input_, manifest)
    for number in range(shards):
        start, zeros = 5 * number, np.zeros((5, 2), np.float32)
        data = shard_bytes(np.arange(start, start + 5), zeros, zeros)
        name = f"shard-{number:05d}.npz"
        (job.output / name).write_bytes(data)
        manifest["shards"].append(
            {"file": name, "start": start, "stop": start + 5, "sha256": sha256_bytes(data)}
        )
    write_manifest(job.output, manifest)
    return manifest


def test_requests_never_cross_a_shard_and_a_resume_skips_committed_shards(tmp_path: Path) -> None:
    job = EncodeJob(settings(tmp_path, rows_per_shard=5))
    rows = split_rows(23, 2, 1)  # rows 11-22
    plan = job._plan(rows, first_shard=0, batch=3)
    assert plan == [(0, 11, 14), (0, 14, 16), (1, 16, 19), (1, 19, 21), (2, 21, 23)]
    assert job._plan(rows, first_shard=2, batch=3) == [(2, 21, 23)]


def test_a_new_job_writes_an_empty_manifest_first(tmp_path: Path) -> None:
    job = settings(tmp_path)
    prepare_output(job.output, job, source(), manifest_for(job, source()))
    manifest = read_manifest(job.output)
    assert manifest["shards"] == [] and manifest["complete"] is False
    assert manifest["model"] == MODEL and manifest["rows"] == 10


def test_an_existing_output_is_not_touched_without_resume(tmp_path: Path) -> None:
    job = settings(tmp_path, rows_per_shard=5)
    finished_output(job, source())
    with pytest.raises(JobError, match="already holds an encoding job's output; pass --resume"):
        prepare_output(job.output, job, source(), manifest_for(job, source()))


def test_a_non_empty_directory_without_manifest_is_refused(tmp_path: Path) -> None:
    job = settings(tmp_path)
    job.output.mkdir()
    (job.output / "precious.txt").write_text("mine")
    with pytest.raises(JobError, match="not empty"):
        prepare_output(job.output, job, source(), manifest_for(job, source()))


def test_a_resume_into_a_directory_without_manifest_deletes_nothing_it_did_not_write(tmp_path: Path) -> None:
    job = settings(tmp_path, resume=True)
    job.output.mkdir()
    (job.output / "notes.tmp").write_text("mine")
    (job.output / "shard-plan.txt").write_text("mine too")
    with pytest.raises(JobError, match=r"holds no manifest \(it holds notes.tmp, shard-plan.txt\)"):
        prepare_output(job.output, job, source(), manifest_for(job, source()))
    assert sorted(p.name for p in job.output.iterdir()) == ["notes.tmp", "shard-plan.txt"]


def test_a_resume_starts_over_on_what_a_run_killed_before_its_manifest_left(tmp_path: Path) -> None:
    job = settings(tmp_path, resume=True)
    job.output.mkdir()
    (job.output / "rejected.txt.tmp").write_text("half written")
    prepare_output(job.output, job, source(), manifest_for(job, source()))
    assert sorted(p.name for p in job.output.iterdir()) == [MANIFEST]


def test_a_resume_that_starts_over_drops_the_lists_of_the_input_a_killed_run_read(tmp_path: Path) -> None:
    """A run killed between its lists and its first manifest, then resumed on a .npy, which has none."""
    job = settings(tmp_path, resume=True)
    job.output.mkdir()
    (job.output / "inputs.txt").write_text("a.png\nb.png\n")
    (job.output / "rejected.txt").write_text("c.png\tnot a PNG\n")
    prepare_output(job.output, job, source(), manifest_for(job, source()))
    assert sorted(p.name for p in job.output.iterdir()) == [MANIFEST]


def test_what_a_run_killed_before_its_manifest_left_is_not_touched_without_resume(tmp_path: Path) -> None:
    job = settings(tmp_path)
    job.output.mkdir()
    (job.output / "rejected.txt.tmp").write_text("half written")
    with pytest.raises(JobError, match=r"not empty and holds no manifest \(it holds rejected.txt.tmp\)"):
        prepare_output(job.output, job, source(), manifest_for(job, source()))
    assert [p.name for p in job.output.iterdir()] == ["rejected.txt.tmp"]


def test_a_resume_continues_from_the_committed_shards_and_drops_uncommitted_files(tmp_path: Path) -> None:
    job = settings(tmp_path, rows_per_shard=5, resume=True)
    committed = finished_output(job, source())
    (job.output / "shard-00001.npz").write_bytes(b"renamed but never listed")
    (job.output / "shard-00002.npz.tmp").write_bytes(b"half written")
    manifest = prepare_output(job.output, job, source(), manifest_for(job, source()))
    assert manifest == committed
    assert sorted(p.name for p in job.output.iterdir()) == [MANIFEST, "shard-00000.npz"]


def test_a_resume_writes_nothing_before_its_first_shard_where_its_files_are_already_there(
    tmp_path: Path,
) -> None:
    """So that a resume on a disk still full fails where the job writes its shards (exit 1, retried)."""
    job = settings(tmp_path, rows_per_shard=5, resume=True)
    pngs = replace(source(), names=tuple(f"{i}.png" for i in range(10)), rejected=(("x.png", "bad"),))
    finished_output(job, pngs)
    for path in job.output.iterdir():
        os.utime(path, ns=(0, 0))
    prepare_output(job.output, job, pngs, manifest_for(job, pngs))
    files = sorted((path.name, path.stat().st_mtime_ns) for path in job.output.iterdir())
    assert files == [("inputs.txt", 0), (MANIFEST, 0), ("rejected.txt", 0), ("shard-00000.npz", 0)]


def test_a_resume_with_another_encoder_is_refused_saying_so(tmp_path: Path) -> None:
    job = settings(tmp_path, rows_per_shard=5, resume=True)
    finished_output(job, source())
    newer = manifest_for(job, source(), {**MODEL, "version": "2", "encoder_sha256": "ef" * 32})
    with pytest.raises(JobError) as error:
        prepare_output(job.output, job, source(), newer)
    assert "encoded by model vae version 1 (encoder sha256 abababababab)" in str(error.value)
    assert "serves vae version 2 with another encoder (sha256 efefefefefef)" in str(error.value)


def test_a_resume_after_an_update_that_keeps_the_encoder_goes_on(tmp_path: Path) -> None:
    """A new version with a new decoder encodes as the old one did: the job would take its answers
    mid-run, and a resume takes them too, keeping the record of the model the output began with."""
    job = settings(tmp_path, rows_per_shard=5, resume=True)
    committed = finished_output(job, source())
    newer = manifest_for(job, source(), {**MODEL, "name": "vae-convT", "version": "2"})
    assert prepare_output(job.output, job, source(), newer) == committed


def test_a_resume_with_other_input_is_refused(tmp_path: Path) -> None:
    job = settings(tmp_path, rows_per_shard=5, resume=True)
    finished_output(job, source(seed=0))
    with pytest.raises(JobError, match=r"holds encodings of .* but this run reads"):
        prepare_output(job.output, job, source(seed=1), manifest_for(job, source(seed=1)))


def test_a_resume_with_another_split_is_refused(tmp_path: Path) -> None:
    job = settings(tmp_path, rows_per_shard=5, resume=True)
    finished_output(job, source())
    other = settings(tmp_path, rows_per_shard=4, resume=True)
    with pytest.raises(JobError, match="--rows-per-shard"):
        prepare_output(other.output, other, source(), manifest_for(other, source()))


def test_a_split_job_refuses_an_output_that_holds_the_parts_of_another_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Else its parts would lie beside the others, and a merged manifest of those would still be read."""
    images = tmp_path / "x.npy"
    np.save(images, source().images)
    output = tmp_path / "out"
    (output / "part-00000-of-00003").mkdir(parents=True)
    argv = ["--target", "127.0.0.1:1", "--input", str(images), "--output", str(output), "--no-progress"]
    assert main([*argv, "--num-shards", "2", "--shard-index", "0"]) == 2
    assert (
        "holds the parts of a job split in 3 (part-*-of-00003), and this one is split in 2; choose another "
        "--output, or resume that job with --num-shards 3"
    ) in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["part-00000-of-00003"]


@pytest.mark.parametrize("corrupt", [0, 1], ids=["the first", "the last"])
def test_a_resume_refuses_a_committed_shard_that_is_corrupt_saying_what_to_do_and_writes_nothing(
    tmp_path: Path, corrupt: int
) -> None:
    """Whichever of the committed shards it is: every one of them is checked, not only the first."""
    job = settings(tmp_path, rows_per_shard=5, resume=True)
    finished_output(job, source(rows=15), shards=2)
    (job.output / f"shard-{corrupt:05d}.npz").write_bytes(b"garbage")
    before = {path.name: path.read_bytes() for path in job.output.iterdir()}
    with pytest.raises(
        JobError,
        match=rf"shard-{corrupt:05d}.npz: sha256 differs from the manifest's: the file is corrupt; --resume "
        r"cannot continue this output: run the job again with a new --output$",
    ):
        prepare_output(job.output, job, source(rows=15), manifest_for(job, source(rows=15)))
    assert {path.name: path.read_bytes() for path in job.output.iterdir()} == before


def test_the_manifest_records_input_model_and_range(tmp_path: Path) -> None:
    job = settings(tmp_path, num_shards=3, shard_index=2)
    manifest = manifest_for(job, source(rows=10))
    assert manifest["range"] == {"part": 2, "parts": 3, "start": 6, "stop": 10}
    assert manifest["input"]["rows"] == 10 and len(manifest["input"]["sha256"]) == 64
    assert json.loads(json.dumps(manifest)) == manifest


def test_pause_points_parse_and_unknown_ones_are_refused() -> None:
    assert parse_pause_at("after-manifest:1, before-rename:0") == {
        ("after-manifest", 1),
        ("before-rename", 0),
    }
    with pytest.raises(ValueError, match="expected POINT:SHARD"):
        parse_pause_at("after-lunch:1")


def test_settings_refuse_a_shard_index_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shard index"):
        settings(tmp_path, num_shards=2, shard_index=2)


def test_the_shard_index_defaults_to_the_kubernetes_completion_index(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args(["--input", "x.npy", "--output", "out"]).shard_index is None
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert completion_index(num_shards=4) == 3
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert completion_index(num_shards=4) == 0


@pytest.mark.parametrize("value", ["1", "3", "x"])  # 1: the first index past --num-shards 1
def test_a_completion_index_that_is_no_shard_index_is_refused_by_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """An Indexed Job of 4 completions whose command forgot --num-shards."""
    monkeypatch.setenv("JOB_COMPLETION_INDEX", value)
    argv = ["--target", f"127.0.0.1:{free_port()}", "--input", str(tmp_path / "x.npy")]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert (
        f"JOB_COMPLETION_INDEX={value} is not a shard index in [0, 1) (--num-shards 1): pass --num-shards"
        in capsys.readouterr().err
    )
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")  # --shard-index, when given, is what counts
    assert main([*argv, "--output", str(tmp_path / "out"), "--shard-index", "3"]) == 2
    assert "the shard index must be in [0, 1), got 3" in capsys.readouterr().err


def test_progress_draws_a_bar_on_a_terminal_and_logs_lines_otherwise() -> None:
    bar = io.StringIO()
    progress = Progress(total=100, done=20, stream=bar, bar=True, log_every_s=10)
    progress.update(30)
    progress.close()
    assert bar.getvalue().startswith("\r[###############---------------] 50/100 rows, ")
    assert "ETA" in bar.getvalue() and bar.getvalue().endswith("\n")
    lines = io.StringIO()
    progress = Progress(total=100, done=0, stream=lines, bar=False, log_every_s=0)
    progress.update(40)
    progress.close()
    assert lines.getvalue().startswith("vae-encode-job: 40/100 rows, ") and "\r" not in lines.getvalue()


def test_a_service_that_stays_unreachable_exits_1_so_that_kubernetes_retries_the_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 (bad input or arguments) fails a Kubernetes index for good; an outage must not."""
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    argv = ["--target", f"127.0.0.1:{free_port()}", "--input", str(tmp_path / "x.npy")]
    assert (
        main([*argv, "--output", str(tmp_path / "out"), "--attempts", "1", "--timeout", "2", "--no-progress"])
        == 1
    )
    assert capsys.readouterr().err.endswith(
        "; the shards committed so far are kept: run again with --resume to continue\n"
    )


def test_the_job_runs_from_a_thread_other_than_the_main_one_where_no_signal_handler_can_be_set(
    tmp_path: Path,
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    argv = ["--target", f"127.0.0.1:{free_port()}", "--input", str(tmp_path / "x.npy")]
    argv += ["--output", str(tmp_path / "out"), "--attempts", "1", "--no-progress"]
    with ThreadPoolExecutor(max_workers=1) as thread:
        assert thread.submit(main, argv).result(timeout=60) == 1  # unreachable: exit 1, not a ValueError


def test_a_target_that_serves_no_vae_service_exits_1_for_a_retry_naming_the_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """UNIMPLEMENTED is retried, not exit 2: an ingress with no route yet answers it for a moment."""
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    other = grpc.server(ThreadPoolExecutor(max_workers=1))  # serves no service at all
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        argv = ["--target", f"127.0.0.1:{port}", "--input", str(tmp_path / "x.npy")]
        assert main([*argv, "--output", str(tmp_path / "out"), "--no-progress"]) == 1
    finally:
        other.stop(grace=None)
    assert "GetModelInfo failed with UNIMPLEMENTED" in capsys.readouterr().err


class WrongWidth:
    """A client whose service answers one column short."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.retries = 0

    def __enter__(self) -> WrongWidth:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def model_info(self) -> Any:
        return type("Info", (), {**MODEL, "max_request_rows": 0})()

    def encode_stream(self, requests: Any, **options: Any) -> Any:
        for images in requests:
            yield EncodeResult(np.zeros((len(images), 1), np.float32), None, str(MODEL["encoder_sha256"]))


class ShortMeans(WrongWidth):
    """A client whose service answers means one row short, and log-variances of every row."""

    def encode_stream(self, requests: Any, **options: Any) -> Any:
        for images in requests:
            log_var = np.zeros((len(images), 2), np.float32)
            yield EncodeResult(log_var[1:], log_var, str(MODEL["encoder_sha256"]))


@pytest.mark.parametrize(
    ("client", "shape"),
    [(WrongWidth, r"\[4, 1\]"), (ShortMeans, r"\[3, 2\]")],
    ids=["a column short", "a row short"],
)
def test_answers_of_the_wrong_shape_stop_the_job_before_a_shard_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: type, shape: str
) -> None:
    """A row short, no answer could be told to be its row's, and the shard would leave a row out."""
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    monkeypatch.setattr(encode_job, "VaeClient", client)
    settings = JobSettings(target="t", input=tmp_path / "x.npy", output=tmp_path / "out", progress_bar=False)
    with pytest.raises(
        JobError, match=rf"rows \[0, 4\): the service answered means of shape {shape}, expected "
    ):
        EncodeJob(settings, log=io.StringIO()).run()
    assert not list((tmp_path / "out").glob("shard-*"))
    assert read_manifest(tmp_path / "out")["shards"] == []


class OtherEncoder(WrongWidth):
    """A client reaching a replica that serves another encoder: answers of the right shape, from it."""

    def encode_stream(self, requests: Any, **options: Any) -> Any:
        for images in requests:
            zeros = np.zeros((len(images), 2), np.float32)
            yield EncodeResult(zeros, zeros, "ef" * 32)


def test_answers_from_another_encoder_stop_the_job_before_a_shard_is_written_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that reconnects mid-job, during a rolling update, may reach the new encoder: its rows
    would lie in another latent space than the output's."""
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    monkeypatch.setattr(encode_job, "VaeClient", OtherEncoder)
    settings = JobSettings(target="t", input=tmp_path / "x.npy", output=tmp_path / "out", progress_bar=False)
    with pytest.raises(JobError) as refused:
        EncodeJob(settings, log=io.StringIO()).run()
    assert str(refused.value).startswith(
        "row 0 was encoded by encoder efefefefefef behind t, not by vae version 1 (encoder abababababab) "
        "that this output holds; the shards committed before it are kept."
    )
    assert not list((tmp_path / "out").glob("shard-*"))
    assert read_manifest(tmp_path / "out")["shards"] == []


class ShortLogVar(WrongWidth):
    """A client whose service answers log-variances one row short."""

    def encode_stream(self, requests: Any, **options: Any) -> Any:
        for images in requests:
            mean = np.zeros((len(images), 2), np.float32)
            yield EncodeResult(mean, mean[1:], str(MODEL["encoder_sha256"]))


class NoLogVar(WrongWidth):
    """A client whose VAE's service answers no log-variances."""

    def encode_stream(self, requests: Any, **options: Any) -> Any:
        for images in requests:
            yield EncodeResult(np.zeros((len(images), 2), np.float32), None, str(MODEL["encoder_sha256"]))


@pytest.mark.parametrize(
    ("client", "message"),
    [
        (ShortLogVar, r"rows \[0, 4\): the service answered log-variances of shape \[3, 2\], expected"),
        (NoLogVar, r"rows \[0, 4\): the service answered no log-variances, which the VAE vae has"),
    ],
)
def test_a_vaes_answers_without_log_variances_of_the_means_shape_stop_the_job_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: type, message: str
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    monkeypatch.setattr(encode_job, "VaeClient", client)
    settings = JobSettings(target="t", input=tmp_path / "x.npy", output=tmp_path / "out", progress_bar=False)
    with pytest.raises(JobError, match=message):
        EncodeJob(settings, log=io.StringIO()).run()
    assert not list((tmp_path / "out").glob("shard-*"))


def test_a_full_queue_is_not_blamed_on_the_rows_of_the_request_it_refused() -> None:
    plan = [(0, 0, 16), (0, 16, 32)]
    refused = "the stream's request 1 (counting from 0): images: contains NaN or Inf"
    bad = encode_job._naming_the_input_rows(VaeClientError("EncodeStream", INVALID, refused), plan)
    assert bad.details == f"input rows [16, 32): {refused}"
    full = "the stream's request 1 (counting from 0): the encoder queue is full (60 of 64 rows waiting)"
    busy = VaeClientError("EncodeStream", grpc.StatusCode.RESOURCE_EXHAUSTED, full, attempts=10)
    assert encode_job._naming_the_input_rows(busy, plan) is busy


class Recorder(WrongWidth):
    """A client whose service answers every row, keeping what the job built it with and streamed with."""

    def __init__(self, target: str, **options: Any) -> None:
        super().__init__()
        self.options = options

    def encode_stream(self, requests: Any, **options: Any) -> Any:
        self.options = {**self.options, **options}
        for images in requests:
            zeros = np.zeros((len(images), 2), np.float32)
            yield EncodeResult(zeros, zeros, str(MODEL["encoder_sha256"]))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            [],
            {
                "tls": None,
                "timeout_s": 30.0,
                "retry": JOB_RETRY,
                "max_in_flight": 4,
                "answer_timeout_s": 120.0,
            },
        ),
        (
            [
                *("--timeout", "7.5", "--attempts", "3", "--max-in-flight", "2", "--answer-timeout", "0.25"),
                *("--ca-cert", "ca.pem", "--server-name", "vae.internal"),
            ],
            {
                "tls": TlsOptions(root_certificates=Path("ca.pem"), server_name_override="vae.internal"),
                "timeout_s": 7.5,
                "retry": replace(JOB_RETRY, max_attempts=3),  # the job's long backoff kept
                "max_in_flight": 2,
                "answer_timeout_s": 0.25,
            },
        ),
    ],
)
def test_connection_and_stream_flags_reach_the_client_and_its_stream_in_seconds(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tls_files: TlsFiles,
    flags: list[str],
    expected: dict[str, Any],
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    monkeypatch.chdir(tls_files.ca.parent)  # where ca.pem is: the job checks the TLS files first
    made: list[Recorder] = []

    def make(target: str, **options: Any) -> Recorder:
        made.append(Recorder(target, **options))
        return made[-1]

    monkeypatch.setattr(encode_job, "VaeClient", make)
    argv = ["--target", "vae.example:50051", "--input", str(tmp_path / "x.npy"), "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "out"), *flags]) == 0
    (client,) = made
    assert client.options == expected
    assert read_manifest(tmp_path / "out")["complete"] is True


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan])
def test_settings_refuse_an_answer_timeout_that_is_not_more_than_0(tmp_path: Path, seconds: float) -> None:
    """As the flag does: 0 would reopen the stream before any answer could come."""
    with pytest.raises(ValueError, match=r"answer-timeout must be more than 0 seconds"):
        settings(tmp_path, answer_timeout_s=seconds)


def test_a_split_into_more_parts_than_a_kubernetes_indexed_job_may_have_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each part is a folder, which merge and read_encodings look for one by one."""
    argv = [
        "--target",
        "vae.example:50051",
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--num-shards", "100001", "--shard-index", "5"]) == 2
    assert capsys.readouterr().err == (
        "vae-encode-job: num-shards must be at most 100,000 (each part is a folder that merge reads), "
        "got 100,001\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("flag", ["--rows-per-shard", "--max-in-flight"])
def test_a_count_flag_of_less_than_1_exits_2_naming_it_before_the_output_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """Shards of no rows would never end the job, and no request in flight would never start it."""
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    monkeypatch.setattr(encode_job, "VaeClient", Recorder)  # a service that would answer
    argv = ["--target", "vae.example:50051", "--input", str(tmp_path / "x.npy")]
    assert main([*argv, "--output", str(tmp_path / "out"), "--no-progress", flag, value]) == 2
    assert capsys.readouterr().err == f"vae-encode-job: {flag[2:]} must be at least 1, got {value}\n"
    assert not (tmp_path / "out").exists()


def test_a_part_with_no_rows_ends_complete_and_the_parts_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rows split three ways leave part 0 empty; unfinished, it would keep the merge from ever running."""
    np.save(tmp_path / "x.npy", np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28))
    monkeypatch.setattr(encode_job, "VaeClient", Recorder)
    for index in range(3):
        job = JobSettings(
            target="t",
            input=tmp_path / "x.npy",
            output=tmp_path / "out",
            shard_index=index,
            num_shards=3,
            progress_bar=False,
        )
        EncodeJob(job, log=io.StringIO()).run()
    empty = read_manifest(tmp_path / "out" / "part-00000-of-00003")
    assert (empty["rows"], empty["shards"], empty["complete"]) == (0, [], True)
    assert merge_main(["--output", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(read_encodings(tmp_path / "out").input_rows, [0, 1])


@pytest.mark.parametrize(
    ("stop", "status", "said"),
    [(KeyboardInterrupt, 130, "interrupted"), (encode_job.Terminated, 143, "terminated (SIGTERM)")],
)
def test_a_merge_stopped_by_ctrl_c_or_sigterm_exits_as_the_job_does_and_leaves_the_parts_as_they_were(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stop: type[KeyboardInterrupt],
    status: int,
    said: str,
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    monkeypatch.setattr(encode_job, "VaeClient", Recorder)
    for index in range(2):
        job = settings(tmp_path, shard_index=index, num_shards=2, progress_bar=False)
        EncodeJob(job, log=io.StringIO()).run()

    def parts() -> list[Path]:  # the merge's lock file aside, which every run of it leaves
        return sorted(path for path in (tmp_path / "out").rglob("*") if path.name != LOCK)

    before = parts()

    def stopped(output: Path) -> dict[str, Any]:
        raise stop

    monkeypatch.setattr(encode_job, "merged_manifest", stopped)
    assert merge_main(["--output", str(tmp_path / "out")]) == status
    assert capsys.readouterr().err == f"vae-encode-job merge: {said}; run it again\n"
    assert parts() == before


def test_a_resumed_run_counts_and_rates_only_the_rows_it_encoded_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.save(tmp_path / "x.npy", source().images)
    job = settings(tmp_path, rows_per_shard=5, resume=True, progress_bar=False)
    finished_output(job, read_images(job.input))  # rows 0-4 of 10 done before
    monkeypatch.setattr(encode_job, "VaeClient", Recorder)
    summary = EncodeJob(job, log=io.StringIO()).run()
    assert (summary.rows, summary.rows_resumed) == (5, 5)
    assert (
        replace(summary, seconds=0.5)
        .line()
        .startswith("encoded 5 rows (5 done before) in 0.50 s: 10 rows/s,")
    )


def test_progress_rates_only_the_rows_done_since_this_run_began(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(encode_job, "time", SimpleNamespace(monotonic=lambda: now[0]))
    lines = io.StringIO()
    progress = Progress(total=100, done=60, stream=lines, bar=False, log_every_s=0)
    now[0] = 102.0
    progress.update(20)
    assert lines.getvalue() == "vae-encode-job: 80/100 rows, 10 rows/s, ETA 2 s\n"


def test_a_job_stopped_before_a_shard_takes_its_name_leaves_no_shard_under_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader, or a resume, sees a shard only once it is whole: a crash here leaves a .tmp file."""
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    monkeypatch.setattr(encode_job, "VaeClient", Recorder)

    def crash(self: EncodeJob, point: str, shard: int) -> None:
        if point == "before-rename":
            raise KeyboardInterrupt

    monkeypatch.setattr(EncodeJob, "pause", crash)
    job = JobSettings(target="t", input=tmp_path / "x.npy", output=tmp_path / "out", progress_bar=False)
    with pytest.raises(KeyboardInterrupt):
        EncodeJob(job, log=io.StringIO()).run()
    assert sorted(p.name for p in job.output.iterdir()) == [".lock", MANIFEST, "shard-00000.npz.tmp"]
    assert read_manifest(job.output)["shards"] == []


def numbered(rows: int) -> np.ndarray:
    """`rows` images, each told apart by its first two pixels: its row number, and 200 less it."""
    images = np.zeros((rows, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(rows)
    images[:, 0, 1] = 200 - np.arange(rows)
    return images


class Echo(WrongWidth):
    """A client whose service answers each row with its own first two pixels as the mean, and with
    -mean - 1 as the log-variance: a row stored with another row's answer, or a mean stored as a
    log-variance, shows."""

    def encode_stream(self, requests: Any, **options: Any) -> Any:
        for images in requests:
            mean = images.reshape(len(images), -1)[:, :2].astype(np.float32)
            yield EncodeResult(mean, -mean - 1, str(MODEL["encoder_sha256"]))


def test_each_row_keeps_its_own_mean_and_log_var_across_requests_shards_and_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """23 rows in shards of 5 sent 3 rows a request (a full shard in two requests, of 3 and 2 rows), the
    job killed once shard 1 is committed and then resumed: every row's answers lie in its own place."""
    np.save(tmp_path / "x.npy", numbered(23))
    monkeypatch.setattr(encode_job, "VaeClient", Echo)
    job = JobSettings(
        target="t",
        input=tmp_path / "x.npy",
        output=tmp_path / "out",
        batch_size=3,
        rows_per_shard=5,
        progress_bar=False,
    )

    def killed(self: EncodeJob, point: str, shard: int) -> None:
        if (point, shard) == ("after-manifest", 1):
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(EncodeJob, "pause", killed)
        with pytest.raises(KeyboardInterrupt):
            EncodeJob(job, log=io.StringIO()).run()
    assert [entry["stop"] for entry in read_manifest(job.output)["shards"]] == [5, 10]
    summary = EncodeJob(replace(job, resume=True), log=io.StringIO()).run()
    assert (summary.rows, summary.rows_resumed) == (13, 10)
    index, mean, log_var = read_encodings(job.output)
    expected = np.stack([np.arange(23), 200 - np.arange(23)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(index, np.arange(23))
    np.testing.assert_array_equal(mean, expected)
    assert log_var is not None
    np.testing.assert_array_equal(log_var, -expected - 1)


def test_a_disk_full_as_the_job_starts_exits_1_for_a_retry_as_it_does_mid_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    monkeypatch.setattr(encode_job, "VaeClient", Recorder)

    def disk_full(directory: Path, manifest: dict[str, Any]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(encode_job, "write_manifest", disk_full)  # the job's first write
    argv = ["--target", "127.0.0.1:1", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 1
    assert "No space left on device" in capsys.readouterr().err


class Limited(Recorder):
    """A client whose service takes at most 3 rows in one request; it keeps each request's rows."""

    def __init__(self, target: str, **options: Any) -> None:
        super().__init__(target, **options)
        self.sizes: list[int] = []

    def model_info(self) -> Any:
        return type("Info", (), {**MODEL, "max_request_rows": 12})()

    def encode_stream(self, requests: Any, **options: Any) -> Any:
        for images in requests:
            self.sizes.append(len(images))
            zeros = np.zeros((len(images), 2), np.float32)
            yield EncodeResult(zeros, zeros, str(MODEL["encoder_sha256"]))


def test_without_batch_size_requests_carry_256_rows_or_a_quarter_of_the_servers_most_a_given_one_its_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default adapts to a server that takes fewer rows in a request: a quarter of them, the share
    of its queue a stream may hold, so that other clients' rows waiting do not refuse every request;
    a --batch-size given on the command line is refused only beyond the most, naming it."""
    np.save(tmp_path / "x.npy", np.zeros((10, 28, 28), np.uint8))
    made: list[Limited] = []

    def make(target: str, **options: Any) -> Limited:
        made.append(Limited(target, **options))
        return made[-1]

    monkeypatch.setattr(encode_job, "VaeClient", make)
    argv = ["--target", "vae.example:50051", "--input", str(tmp_path / "x.npy"), "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "default")]) == 0
    assert made[-1].sizes == [3, 3, 3, 1]
    assert main([*argv, "--output", str(tmp_path / "given"), "--batch-size", "13"]) == 2
    assert (
        "--batch-size 13 is more than vae.example:50051 takes in one request (12 rows); pass --batch-size "
        "12 or less, or leave it out (3 by default)\n"
    ) in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "given"), "--batch-size", "2"]) == 0
    assert made[-1].sizes == [2] * 5
    monkeypatch.setattr(encode_job, "VaeClient", Recorder)  # a server that does not say: 256
    assert rows_per_request(Recorder("t").model_info(), None, "t") == 256


def test_an_output_that_is_a_file_is_refused_as_not_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    np.save(tmp_path / "samples.npy", np.zeros((4, 28, 28), np.uint8))
    argv = ["--target", "127.0.0.1:1", "--input", str(tmp_path / "x.npy"), "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "samples.npy")]) == 2
    assert capsys.readouterr().err == (
        f"vae-encode-job: --output {tmp_path / 'samples.npy'} is a file; expected a folder for the job's "
        "shards\n"
    )


def test_a_folder_that_is_not_the_jobs_is_refused_before_the_service_is_asked_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 at once, not exit 1 after the retries against a service that is down (127.0.0.1:1)."""
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("mine")
    argv = ["--target", "127.0.0.1:1", "--input", str(tmp_path / "x.npy"), "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert "not empty and holds no manifest (it holds precious.txt)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--ca-cert", "ca", "--client-cert", "client_key", "--client-key", "client_cert"],
            r"client certificate \S*client.key \(--client-cert\): not a PEM certificate",
        ),
        (["--ca-cert", "ca_key"], r"CA certificate \S*ca.key \(--ca-cert\): not a PEM certificate"),
        (
            ["--client-cert", "client_cert"],
            r"client certificate \S*client.pem \(--client-cert\) is given without its private key "
            r"\(--client-key\)",
        ),
        (
            ["--client-cert", "client_cert", "--client-key", "other_key"],
            r"client key \S*other.key \(--client-key\): not the private key of the client certificate",
        ),
    ],
)
def test_tls_files_that_are_not_what_their_flags_take_exit_2_at_once_naming_them(
    tmp_path: Path,
    tls_files: TlsFiles,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    expected: str,
) -> None:
    """Not retried as an unreachable service, exit 1, which Kubernetes would run again to no end."""
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
    files = [str(getattr(tls_files, flag)) if flag[0] != "-" else flag for flag in flags]
    argv = ["--target", f"127.0.0.1:{free_port()}", "--server-name", "localhost", *files]
    started = time.monotonic()
    assert main([*argv, "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "out")]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert re.match(rf"vae-encode-job: {expected}", err) and "attempts" not in err, err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_exits_130_with_one_line_that_says_resume_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(self: EncodeJob) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(EncodeJob, "run", interrupted)
    argv = ["--target", "127.0.0.1:1", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "out")]
    try:
        code = main(argv)
    except KeyboardInterrupt:  # else it would stop the whole test session
        pytest.fail("Ctrl-C escaped vae-encode-job's main: a traceback")
    assert code == 130
    assert capsys.readouterr().err == (
        "vae-encode-job: interrupted; the shards committed so far are kept: run again with --resume to "
        "continue\n"
    )
