"""vae-encode-job against the real server: input formats, kill -9 and resume, a server restart,
a model change, split jobs, bad input.

The job stops at an exact point when VAE_ENCODE_JOB_PAUSE_AT names it and says so on stderr; the
tests kill it there with SIGKILL, so no test guesses timing. 600 rows in shards of 128 (five
shards) and requests of 32 rows: every shard takes several requests.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from client import VaeClient, read_encodings
from client.encode_job import PAUSE_ENV, EncodeJob, JobError, JobSettings, JobSummary, main
from client.encodings import EncodingsError, read_manifest, write_atomic
from client.images import ImageInput, InputError, read_images
from tests.conftest import ServerThread, sigint_not_ignored

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
JOB_OPTIONS = {"rows_per_shard": 128, "batch_size": 32, "max_in_flight": 4}
CLI_OPTIONS = ["--rows-per-shard", "128", "--batch-size", "32", "--max-in-flight", "4", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, digits: np.ndarray) -> dict[str, Path]:
    """The same 600 images in every input format the job reads."""
    folder = tmp_path_factory.mktemp("inputs")
    flat = digits[:, 0]
    header = bytes([0, 0, 0x08, 3]) + np.array(flat.shape, dtype=">u4").tobytes()
    (folder / "images-idx3-ubyte").write_bytes(header + flat.tobytes())
    (folder / "images-idx3-ubyte.gz").write_bytes(gzip.compress(header + flat.tobytes()))
    np.save(folder / "uint8-n-28-28.npy", flat)
    np.save(folder / "uint8-n-1-28-28.npy", digits)
    np.save(folder / "float-0-1.npy", digits.astype(np.float32) / 255)
    pngs = folder / "pngs"
    pngs.mkdir()
    for i, digit in enumerate(flat):
        Image.fromarray(digit).save(pngs / f"{i:04d}.png")
    return {
        "idx": folder / "images-idx3-ubyte",
        "idx.gz": folder / "images-idx3-ubyte.gz",
        "npy": folder / "uint8-n-28-28.npy",
        "npy-4d": folder / "uint8-n-1-28-28.npy",
        "npy-float": folder / "float-0-1.npy",
        "pngs": pngs,
    }


def run_job(target: str, input_: Path, output: Path, **changes: Any) -> JobSummary:
    """The job in this process, as `vae-encode-job` runs it, with the test's small shards."""
    settings = JobSettings(target=target, input=input_, output=output, **{**JOB_OPTIONS, **changes})
    return EncodeJob(settings, log=io.StringIO()).run()


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def uninterrupted(
    vae_server: ServerThread, inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The output of one run that nothing interrupted: what every other run must reproduce."""
    output = tmp_path_factory.mktemp("uninterrupted") / "out"
    summary = run_job(vae_server.target, inputs["npy"], output)
    assert (summary.rows, summary.retries) == (600, 0)
    return output


class PausedJob:
    """The job in a subprocess that stops where VAE_ENCODE_JOB_PAUSE_AT says; stopped when the test ends."""

    def __init__(self, target: str, input_: Path, output: Path, pause_at: str, *extra: str) -> None:
        command = [sys.executable, "-m", "client.encode_job", "--target", target, "--input", str(input_)]
        command += ["--output", str(output), *CLI_OPTIONS, *extra]
        with sigint_not_ignored():
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, PAUSE_ENV: pause_at},
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        self.log: list[str] = []
        self.resumed = False

    def wait_for_pause(self) -> str:
        """Block until the job says it paused; its line, e.g. 'paused at before-rename 2'."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if "paused at" in line:
                return line.strip()
        raise AssertionError(
            f"the job ended (code {self.process.wait()}) without pausing:\n{''.join(self.log)}"
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL

    def resume(self) -> None:
        """Let the paused job continue (it reads one line from stdin at its pause)."""
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        self.resumed = True

    def carry_on(self) -> tuple[int, str]:
        """Let the paused job continue, unless it was already, and wait for it to end: its exit code
        and the rest of its log."""
        assert self.process.stderr is not None
        if not self.resumed:
            self.resume()
        rest = self.process.stderr.read()
        return self.process.wait(timeout=120), "".join(self.log) + rest

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def paused_job() -> Iterator[Callable[..., PausedJob]]:
    started: list[PausedJob] = []

    def start(*args: str | Path) -> PausedJob:
        job = PausedJob(*(str(a) for a in args))  # type: ignore[arg-type]
        started.append(job)
        return job

    yield start
    for job in started:
        job.close()


@pytest.mark.parametrize(
    ("name", "kind"), [("idx", "idx"), ("idx.gz", "idx"), ("npy", "npy"), ("npy-4d", "npy"), ("pngs", "png")]
)
def test_each_input_format_gives_the_same_encodings(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    name: str,
    kind: str,
) -> None:
    summary = run_job(vae_server.target, inputs[name], tmp_path / "out")
    assert summary.rows == 600
    got, expected = read_encodings(tmp_path / "out"), read_encodings(uninterrupted)
    np.testing.assert_array_equal(got.input_rows, np.arange(600))
    np.testing.assert_array_equal(got.mean, expected.mean)
    assert got.log_var is not None and expected.log_var is not None
    np.testing.assert_array_equal(got.log_var, expected.log_var)
    assert read_manifest(tmp_path / "out")["input"]["format"] == kind


def test_float_images_in_0_1_encode_exactly_like_their_uint8_originals(
    vae_server: ServerThread, inputs: dict[str, Path], uninterrupted: Path, tmp_path: Path
) -> None:
    """The service reads a byte k as k/255, the float its twin holds."""
    run_job(vae_server.target, inputs["npy-float"], tmp_path / "out")
    np.testing.assert_array_equal(read_encodings(tmp_path / "out").mean, read_encodings(uninterrupted).mean)


def test_the_output_is_shards_and_a_manifest_and_a_rerun_is_refused(
    vae_server: ServerThread, inputs: dict[str, Path], uninterrupted: Path
) -> None:
    shards = [f"shard-0000{i}.npz" for i in range(5)]
    assert sorted(files(uninterrupted)) == [".lock", "manifest.json", *shards]
    manifest = json.loads((uninterrupted / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 600
    assert manifest["model"]["name"] == "tiny-vae"
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [
        (0, 128),
        (128, 256),
        (256, 384),
        (384, 512),
        (512, 600),
    ]
    with pytest.raises(JobError, match="pass --resume"):
        run_job(vae_server.target, inputs["npy"], uninterrupted)
    done = run_job(vae_server.target, inputs["npy"], uninterrupted, resume=True)
    assert (done.rows, done.rows_resumed) == (0, 600)


@pytest.mark.parametrize(
    "point",
    [
        "mid-shard:0",
        "mid-shard:2",
        "before-rename:1",
        "before-manifest:3",
        "after-manifest:2",
        "after-manifest:4",
    ],
)
def test_a_job_killed_at_any_point_resumes_to_the_bytes_of_an_uninterrupted_run(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
    point: str,
) -> None:
    output = tmp_path / "out"
    job = paused_job(vae_server.target, inputs["npy"], output, point)
    assert job.wait_for_pause() == f"vae-encode-job: paused at {point.replace(':', ' ')}"
    job.kill()
    if point != "after-manifest:4":
        with pytest.raises(EncodingsError, match="unfinished job"):
            read_encodings(output)
    summary = run_job(vae_server.target, inputs["npy"], output, resume=True)
    assert summary.rows + summary.rows_resumed == 600
    assert files(output) == files(uninterrupted)


def test_a_mapped_input_rewritten_mid_job_stops_it_before_the_next_shard(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
    digits: np.ndarray,
) -> None:
    """The job reads a .npy through a memory map: rows read after the rewrite would be the new file's."""
    input_ = tmp_path / "digits.npy"
    np.save(input_, digits)
    job = paused_job(vae_server.target, input_, tmp_path / "out", "mid-shard:1")
    job.wait_for_pause()
    np.save(input_, 255 - digits)  # in place: same inode, same size
    code, log = job.carry_on()
    assert code == 1
    assert f"{input_}: changed while it was being read" in log
    assert "the shards committed before it (1) were encoded from the input as it was" in log
    assert len(read_manifest(tmp_path / "out")["shards"]) == 1
    with pytest.raises(JobError, match="use a new --output for different input"):  # as the stop said
        run_job(vae_server.target, input_, tmp_path / "out", resume=True)


def test_a_mapped_input_only_touched_mid_job_stops_it_and_resume_finishes_the_same_bytes(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
) -> None:
    """Its size and time are all the job can watch without reading it again; the resume reads it."""
    input_ = tmp_path / "digits.npy"
    shutil.copy(inputs["npy"], input_)
    job = paused_job(vae_server.target, input_, tmp_path / "out", "mid-shard:1")
    job.wait_for_pause()
    os.utime(input_, ns=(0, 0))
    code, log = job.carry_on()
    assert code == 1
    assert "Run again with --resume: it goes on where the content is still what it was" in log
    summary = run_job(vae_server.target, input_, tmp_path / "out", resume=True)
    assert (summary.rows_resumed, summary.rows) == (128, 472)
    shards = {name: data for name, data in files(tmp_path / "out").items() if name.startswith("shard-")}
    assert shards == {name: data for name, data in files(uninterrupted).items() if name.startswith("shard-")}


def test_a_job_killed_twice_still_ends_with_every_row_once(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
) -> None:
    output = tmp_path / "out"
    first = paused_job(vae_server.target, inputs["pngs"], output, "after-manifest:0")
    first.wait_for_pause()
    first.kill()
    second = paused_job(vae_server.target, inputs["pngs"], output, "before-rename:3", "--resume")
    second.wait_for_pause()
    second.kill()
    assert run_job(vae_server.target, inputs["pngs"], output, resume=True).rows_resumed == 384
    got = read_encodings(output)
    np.testing.assert_array_equal(got.input_rows, np.arange(600))
    np.testing.assert_array_equal(got.mean, read_encodings(uninterrupted).mean)


def restart_mid_job(
    job_started: Callable[..., PausedJob], first: Path, then: Path, input_: Path, output: Path
) -> tuple[int, str]:
    """Run a job against a server of bundle `first`, stopped once shard 1 is committed; while the
    job goes on against the dead port (its stream broken), a server of `then` comes back on it.
    The job's exit code and log."""
    server = ServerThread(first)
    port = server.server.port  # the kernel's choice; the second server takes it over
    try:
        job = job_started(f"127.0.0.1:{port}", input_, output, "after-manifest:1")
        job.wait_for_pause()
        server.stop(grace_s=0)
        # Resumed before the second server is up: the job may even end before carry_on is called
        # (a write to its stdin then would raise BrokenPipeError).
        job.resume()
        server = ServerThread(then, port=port)
        return job.carry_on()
    finally:
        server.stop(grace_s=0)


def test_a_server_restarted_mid_job_is_reconnected_to(
    vae_bundle: Path,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
) -> None:
    code, log = restart_mid_job(paused_job, vae_bundle, vae_bundle, inputs["npy"], tmp_path / "out")
    assert code == 0, log
    summary = log.strip().splitlines()[-1]
    assert "encoded 600 rows" in summary and " 0 retries" not in summary
    assert files(tmp_path / "out") == files(uninterrupted)


def test_a_server_back_with_another_encoder_stops_the_job_before_it_mixes_the_two(
    vae_bundle: Path,
    ae_bundle: Path,
    inputs: dict[str, Path],
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
) -> None:
    code, log = restart_mid_job(paused_job, vae_bundle, ae_bundle, inputs["npy"], tmp_path / "out")
    assert code == 2, log
    assert "was encoded by encoder" in log and "the shards committed before it are kept" in log
    # Shards 0 and 1 came from the first server; nothing the other encoder answered was committed.
    shards = read_manifest(tmp_path / "out")["shards"]
    assert [entry["file"] for entry in shards] == ["shard-00000.npz", "shard-00001.npz"]


def test_a_resume_after_an_update_of_the_decoder_alone_finishes_the_same_bytes(
    vae_server: ServerThread,
    int8_vae_bundle: Path,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
    start_server_thread: Callable[..., ServerThread],
) -> None:
    """A new version that keeps the encoder (here its decoder is int8) gives the same encodings: the
    job takes its answers mid-run, and so does a resume."""
    output = tmp_path / "out"
    job = paused_job(vae_server.target, inputs["npy"], output, "after-manifest:1")
    job.wait_for_pause()
    job.kill()
    server = start_server_thread(int8_vae_bundle)
    with VaeClient(vae_server.target) as old, VaeClient(server.target) as new:
        before, after = old.model_info(), new.model_info()
    assert before.version != after.version and before.encoder_sha256 == after.encoder_sha256
    summary = run_job(server.target, inputs["npy"], output, resume=True)
    assert (summary.rows, summary.rows_resumed) == (600 - 2 * 128, 2 * 128)
    assert files(output) == files(uninterrupted)


def test_a_resume_against_another_encoder_is_refused_saying_so(
    vae_server: ServerThread,
    ae_bundle: Path,
    inputs: dict[str, Path],
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
    start_server_thread: Callable[..., ServerThread],
) -> None:
    output = tmp_path / "out"
    job = paused_job(vae_server.target, inputs["npy"], output, "after-manifest:1")
    job.wait_for_pause()
    job.kill()
    before = files(output)
    server = start_server_thread(ae_bundle)
    with pytest.raises(JobError) as error:
        run_job(server.target, inputs["npy"], output, resume=True)
    assert "serves tiny-ae version" in str(error.value) and "with another encoder" in str(error.value)
    assert files(output) == before


def test_a_png_folder_with_a_file_name_that_is_not_utf8_is_encoded_and_listed_by_its_bytes(
    vae_server: ServerThread, digits: np.ndarray, tmp_path: Path
) -> None:
    """Latin-1 'café.png', as unzipped from an old archive: Python holds the name in surrogate escapes."""
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    names = [b"a.png", b"caf\xe9.png", b"z.png"]
    for digit, name in zip(digits, names, strict=False):
        Image.fromarray(digit[0]).save(pngs / os.fsdecode(name))
    run_job(vae_server.target, pngs, tmp_path / "out")
    assert (tmp_path / "out" / "inputs.txt").read_bytes() == b"".join(name + b"\n" for name in names)
    with VaeClient(vae_server.target) as client:
        expected = client.encode(digits[:3]).mean
    np.testing.assert_array_equal(read_encodings(tmp_path / "out").mean, expected)


def test_a_resume_with_different_input_is_refused(
    vae_server: ServerThread, inputs: dict[str, Path], uninterrupted: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    shutil.copytree(uninterrupted, output)
    other = tmp_path / "other.npy"
    np.save(other, np.load(inputs["npy"])[::-1])
    with pytest.raises(JobError, match="use a new --output for different input"):
        run_job(vae_server.target, other, output, resume=True)


def test_a_batch_size_larger_than_a_request_may_carry_is_refused_before_any_request(
    vae_server: ServerThread, inputs: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(
        InputError, match=r"--batch-size 5000 is more than .* takes in one request \(4096 rows\)"
    ):
        run_job(vae_server.target, inputs["npy"], tmp_path / "out", batch_size=5000)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_holds_other_files_is_refused_and_left_as_it_was(
    vae_server: ServerThread, inputs: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match=r"not empty and holds no manifest \(it holds notes.txt\)"):
        run_job(vae_server.target, inputs["npy"], tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]  # no lock file left behind


def test_without_batch_size_a_server_that_takes_fewer_rows_gets_requests_it_takes_and_a_resume_may_differ(
    vae_bundle: Path,
    start_server_thread: Callable[..., ServerThread],
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
) -> None:
    """The default 256 rows a request becomes a quarter of the server's most (25 of 100 here); a
    job begun with --batch-size 32 resumes with it to the bytes of a run that nothing interrupted."""
    server = start_server_thread(vae_bundle, max_queue_size=100, max_samples=100)
    argv = ["--target", server.target, "--input", str(inputs["npy"]), "--rows-per-shard", "128"]
    assert main([*argv, "--output", str(tmp_path / "whole"), "--no-progress"]) == 0
    assert files(tmp_path / "whole") == files(uninterrupted)  # made with --batch-size 32
    output = tmp_path / "resumed"
    job = paused_job(server.target, inputs["npy"], output, "after-manifest:1")  # --batch-size 32
    job.wait_for_pause()
    job.kill()
    assert main([*argv, "--output", str(output), "--no-progress", "--resume"]) == 0
    assert files(output) == files(uninterrupted)


@pytest.mark.parametrize(
    ("sent", "code", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_ctrl_c_or_sigterm_mid_job_exits_with_one_line_and_resume_finishes_the_same_bytes(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
    sent: signal.Signals,
    code: int,
    said: str,
) -> None:
    """Stopped inside a shard, with requests in flight on the stream: no traceback. SIGTERM is how
    Kubernetes stops a pod; as PID 1 the job would ignore it without a handler of its own."""
    output = tmp_path / "out"
    job = paused_job(vae_server.target, inputs["npy"], output, "mid-shard:2")
    job.wait_for_pause()
    job.process.send_signal(sent)
    assert job.process.wait(timeout=30) == code
    assert job.process.stderr is not None
    assert job.process.stderr.read() == (
        f"vae-encode-job: {said}; the shards committed so far are kept: run again with --resume to continue\n"
    )
    summary = run_job(vae_server.target, inputs["npy"], output, resume=True)
    assert (summary.rows_resumed, summary.rows) == (256, 344)
    assert files(output) == files(uninterrupted)


def test_split_runs_merged_equal_one_run(
    vae_server: ServerThread, inputs: dict[str, Path], uninterrupted: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    for index in (2, 0, 1):  # in any order, as Kubernetes may run them
        run_job(vae_server.target, inputs["npy"], output, shard_index=index, num_shards=3)
    assert sorted(p.name for p in output.iterdir()) == [f"part-0000{i}-of-00003" for i in range(3)]
    assert read_manifest(output / "part-00001-of-00003")["range"] == {
        "part": 1,
        "parts": 3,
        "start": 200,
        "stop": 400,
    }
    expected = read_encodings(uninterrupted)
    for _ in range(2):  # joined by the reader, then through the manifest `merge` writes
        got = read_encodings(output)
        np.testing.assert_array_equal(got.input_rows, expected.input_rows)
        np.testing.assert_array_equal(got.mean, expected.mean)
        np.testing.assert_array_equal(got.log_var, expected.log_var)
        assert main(["merge", "--output", str(output)]) == 0


def test_an_indexed_jobs_pod_encodes_the_part_its_completion_index_names(
    vae_server: ServerThread, inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")  # as Kubernetes sets it in the second pod
    output = tmp_path / "out"
    argv = ["--target", vae_server.target, "--input", str(inputs["npy"]), "--output", str(output)]
    assert main([*argv, "--num-shards", "3"]) == 0
    assert [p.name for p in output.iterdir()] == ["part-00001-of-00003"]


def test_a_split_job_refuses_the_output_of_an_unsplit_one_and_merge_leaves_it_alone(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Else read_encodings would go on returning the unsplit job's rows, and merge would replace them."""
    output = tmp_path / "out"
    shutil.copytree(uninterrupted, output)
    with pytest.raises(JobError, match="holds the output of a job that was not split"):
        run_job(vae_server.target, inputs["npy-4d"], output, shard_index=0, num_shards=2)
    assert main(["merge", "--output", str(output)]) == 2
    assert "was not split: nothing to merge" in capsys.readouterr().err
    assert files(output) == files(uninterrupted)


def test_a_second_job_on_the_same_output_waits_for_the_first_and_goes_on_from_it(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    paused_job: Callable[..., PausedJob],
) -> None:
    """As when Kubernetes runs two pods for one index: the second must not delete the first one's
    files under it, nor fail the index; once the first ends, it finds the work done."""
    output = tmp_path / "out"
    first = paused_job(vae_server.target, inputs["npy"], output, "before-rename:2")
    first.wait_for_pause()
    second: list[JobSummary] = []
    waiting = threading.Thread(
        target=lambda: second.append(run_job(vae_server.target, inputs["npy"], output, resume=True))
    )
    waiting.start()
    waiting.join(timeout=2)
    assert waiting.is_alive()  # it waits on the lock while the first job is paused mid-write
    code, log = first.carry_on()
    assert code == 0, log
    waiting.join(timeout=60)
    assert (second[0].rows, second[0].rows_resumed) == (0, 600)
    assert files(output) == files(uninterrupted)


def encoded_rows(server: ServerThread) -> float:
    value = server.server.metrics.registry.get_sample_value("vae_items_total", {"rpc": "EncodeStream"})
    return value or 0.0


def test_a_bad_png_stops_the_job_before_anything_is_sent_unless_skipped(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pngs = tmp_path / "pngs"
    shutil.copytree(inputs["pngs"], pngs)
    Image.new("L", (32, 32)).save(pngs / "0100-big.png")
    (pngs / "0200-empty.png").write_bytes(b"")
    sent = encoded_rows(vae_server)
    command = ["--target", vae_server.target, "--input", str(pngs), *CLI_OPTIONS]
    assert main([*command, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "0100-big.png" in err and "0200-empty.png" in err and "--skip-bad" in err
    assert not (tmp_path / "out").exists()
    assert encoded_rows(vae_server) == sent

    assert main([*command, "--output", str(tmp_path / "out"), "--skip-bad"]) == 0
    rejected = (tmp_path / "out" / "rejected.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in rejected] == ["0100-big.png", "0200-empty.png"]
    np.testing.assert_array_equal(read_encodings(tmp_path / "out").mean, read_encodings(uninterrupted).mean)
    assert (tmp_path / "out" / "inputs.txt").read_text().splitlines()[:2] == ["0000.png", "0001.png"]


def test_a_corrupt_idx_file_is_refused_by_name(
    vae_server: ServerThread, inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken-idx3-ubyte"
    broken.write_bytes(inputs["idx"].read_bytes()[:-100])
    assert (
        main(["--target", vae_server.target, "--input", str(broken), "--output", str(tmp_path / "out")]) == 2
    )
    assert f"{broken}: truncated" in capsys.readouterr().err


def test_a_shard_that_cannot_be_written_mid_job_exits_1_and_resume_finishes_the_same_bytes(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    uninterrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exit 1, not 2: a Kubernetes index retries it (a full disk freed, a volume back) instead of failing."""
    real_write = write_atomic
    writes: list[str] = []

    def disk_full_at_the_third_shard(path: Path, data: bytes, **options: Any) -> None:
        writes.append(path.name)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, data, **options)

    output = tmp_path / "out"
    command = [
        "--target",
        vae_server.target,
        "--input",
        str(inputs["npy"]),
        "--output",
        str(output),
        *CLI_OPTIONS,
    ]
    monkeypatch.setattr("client.encode_job.write_atomic", disk_full_at_the_third_shard)
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the 2 shards committed before them are kept" in err
    monkeypatch.undo()
    assert main([*command, "--resume"]) == 0
    assert files(output) == files(uninterrupted)


@pytest.mark.parametrize("flags", [[], ["--skip-bad"]])
def test_a_row_the_service_refuses_exits_2_with_its_message_keeping_the_shards_before_it(
    vae_server: ServerThread,
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
) -> None:
    """Exit 2, not 1: the service would refuse the same row again, so a Kubernetes index fails at once
    instead of retrying it. --skip-bad leaves out unreadable PNG files as they are read; it does not
    skip a row that the service refuses."""

    def with_nan_at_row_300(path: Path, **options: Any) -> ImageInput:
        # The reader refuses NaN itself: this stands for a row that passed it and not the service.
        source = read_images(path, **options)
        images = source.images.astype(np.float32) / 255
        images[300, 0, 14, 14] = np.nan
        return dataclasses.replace(source, images=images)

    monkeypatch.setattr("client.encode_job.read_images", with_nan_at_row_300)
    output = tmp_path / "out"
    argv = ["--target", vae_server.target, "--input", str(inputs["npy"]), "--output", str(output)]
    assert main([*argv, *CLI_OPTIONS, *flags]) == 2
    err = capsys.readouterr().err
    assert "EncodeStream failed with INVALID_ARGUMENT: input rows [288, 320): " in err
    assert "contains NaN or Inf" in err and "running again cannot help" in err and "Traceback" not in err
    # Rows [288, 320) were refused; the answers before them came, and filled shards 0 and 1.
    assert [entry["stop"] for entry in read_manifest(output)["shards"]] == [128, 256]


def test_an_output_that_cannot_be_written_stops_the_job_with_the_reason(
    vae_server: ServerThread, inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    output = tmp_path / "a-file" / "out"  # under a file: no directory can be made there
    assert main(["--target", vae_server.target, "--input", str(inputs["idx"]), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae-encode-job: ") and "Not a directory" in err and "Traceback" not in err


def test_progress_is_logged_and_a_summary_printed(
    vae_server: ServerThread, inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = [
        "--target",
        vae_server.target,
        "--input",
        str(inputs["idx.gz"]),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main([*command, *CLI_OPTIONS, "--log-every", "0"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert any("/600 rows" in line and "rows/s" in line and "ETA" in line for line in lines[:-1])
    summary = lines[-1]
    assert summary.startswith("vae-encode-job: encoded 600 rows in ") and "rows/s, 0 retries" in summary


def test_an_ae_model_gives_codes_without_log_var(
    ae_bundle: Path, inputs: dict[str, Path], tmp_path: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    server = start_server_thread(ae_bundle)
    run_job(server.target, inputs["npy"], tmp_path / "out")
    rows, mean, log_var = read_encodings(tmp_path / "out")
    assert len(rows) == 600 and mean.shape == (600, 2) and log_var is None
    assert read_manifest(tmp_path / "out")["model"]["kind"] == "ae"
