"""Encode rows/s of `vae-encode-job` over the service against onnxruntime in-process (the ceiling).

    nice -n 10 .venv/bin/python -m bench.encode_job_rate --bundle runs/bench/bundle --rows 10000

Both sides encode the same images: `--rows` seeded random uint8 images (the encoder's cost does not
depend on the pixels). The service runs as its own process (`python -m service` with its default
settings, in its container image's environment, on 127.0.0.1 at a free port; bench.servers starts
and stops it). The job runs in this process exactly as `vae-encode-job` does (read the input,
stream it, write shards and manifest). The ceiling calls encoder.onnx in this process with the
service's session options (one intra-op thread) and with onnxruntime's defaults (a thread per
core), in batches of `--batch-size`, converting uint8 to float as the service does; the ceiling is
the faster of the two (bench/ceiling.py measures more layouts). After one warm-up pass each, the
sides run `--repeats` times in turn and the medians are reported, with every run.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from bench import servers
from client.encode_job import EncodeJob, JobSettings
from service.bundle import ModelBundle
from service.runtime import GraphSession, ThreadSettings

ROOT = Path(__file__).resolve().parent.parent


def images(rows: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=(rows, 1, 28, 28), dtype=np.uint8)


class Ceiling:
    """encoder.onnx called in-process, batch by batch, uint8 -> float32 included, as the service does.

    `service_options` builds the session exactly as the service does (service.runtime.GraphSession:
    no spinning, the same thread counts); otherwise onnxruntime's defaults.
    """

    def __init__(
        self, bundle: Path, batch: npt.NDArray[np.uint8], batch_size: int, *, service_options: bool
    ) -> None:
        if service_options:
            graph = GraphSession(ModelBundle.load(bundle), "encoder", "cpu", ThreadSettings())
            self.session = graph.session
        else:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(
                str(bundle / "encoder.onnx"), options, providers=["CPUExecutionProvider"]
            )
        self.batch, self.batch_size = batch, batch_size

    def rows_per_s(self) -> float:
        started = time.perf_counter()
        for start in range(0, len(self.batch), self.batch_size):
            chunk = self.batch[start : start + self.batch_size].astype(np.float32) / np.float32(255)
            self.session.run(None, {"images": chunk})
        return len(self.batch) / (time.perf_counter() - started)


def service_command(bundle: Path, port: int) -> list[str]:
    return [
        *(sys.executable, "-m", "service", "--model-dir", str(bundle), "--host", "127.0.0.1"),
        *("--port", str(port), "--metrics-port", "0", "--log-level", "warning"),
    ]


def job_summary(target: str, data: Path, output: Path, batch_size: int) -> dict[str, Any]:
    settings = JobSettings(
        target=target, input=data, output=output, batch_size=batch_size, progress_bar=False
    )
    summary = EncodeJob(settings, log=io.StringIO()).run()
    return {
        "rows": summary.rows,
        "seconds": summary.seconds,
        "rows_per_s": summary.rows_per_s,
        "retries": summary.retries,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "runs" / "bench" / "bundle")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per request and per ceiling call")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each side; the median is reported"
    )
    args = parser.parse_args(argv)

    batch = images(args.rows)
    ceiling = Ceiling(args.bundle, batch, args.batch_size, service_options=True)
    default = Ceiling(args.bundle, batch, args.batch_size, service_options=False)
    ceiling.rows_per_s()  # warm-up
    default.rows_per_s()
    jobs: list[dict[str, Any]] = []
    ceilings: list[float] = []
    defaults: list[float] = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        data = scratch / "images.npy"
        np.save(data, batch)
        port = servers.free_port()
        # Stopped, its process group with it, however the run ends; started as its container runs it.
        logs = ROOT / "runs" / "bench" / "logs"  # not in `scratch`, which goes with a failed run
        server = servers.start(
            "encode-job-service", service_command(args.bundle, port), port, logs, timeout_s=120
        )
        target = server.target
        try:
            job_summary(target, data, scratch / "warm-up", args.batch_size)
            # Interleaved, so that a burst of load from elsewhere on the machine hits both sides alike.
            for repeat in range(args.repeats):
                jobs.append(job_summary(target, data, scratch / f"run-{repeat}", args.batch_size))
                ceilings.append(ceiling.rows_per_s())
                defaults.append(default.rows_per_s())
        finally:
            server.stop()
    job_rate = float(np.median([job["rows_per_s"] for job in jobs]))
    service_options_rate = float(np.median(ceilings))
    default_options_rate = float(np.median(defaults))
    ceiling_rate = max(service_options_rate, default_options_rate)
    result = {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "job_over_service_rows_per_s": job_rate,
        "onnxruntime_service_options_rows_per_s": service_options_rate,
        "onnxruntime_default_options_rows_per_s": default_options_rate,
        "ceiling_rows_per_s": ceiling_rate,
        "job_share_of_ceiling": job_rate / ceiling_rate,
        "repeats": {
            "job": jobs,
            "onnxruntime_rows_per_s": ceilings,
            "onnxruntime_default_options_rows_per_s": defaults,
        },
        "service_start_to_serving_s": server.cold_start_s,
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "load_average_1m": os.getloadavg()[0],
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
