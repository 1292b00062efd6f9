"""The service's settings: one typed object, filled once in __main__ from flags and VAE_SERVE_* variables.

Precedence: a flag on the command line, then the environment variable VAE_SERVE_<FLAG> (upper case,
dashes as underscores), then the default. Nothing else in the service reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.runtime import Device

ENV_PREFIX = "VAE_SERVE_"
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    """How vae-serve runs; each field is a flag `--field-name` and a variable VAE_SERVE_FIELD_NAME."""

    model_dir: Path = field(metadata={"help": "the model bundle directory written by vae-export"})
    host: str = field(default="0.0.0.0", metadata={"help": "the address the gRPC server binds"})
    port: int = field(default=50051, metadata={"help": "the gRPC port (0 = pick a free one)"})
    metrics_port: int = field(default=9090, metadata={"help": "the /metrics port (0 = pick a free one)"})
    metrics_host: str | None = field(
        default=None, metadata={"help": "the address /metrics binds (default: the same as --host)"}
    )
    device: Device = field(
        default="auto", metadata={"help": "auto (CUDA when onnxruntime offers it), cpu, cuda"}
    )
    intra_op_threads: int = field(
        default=1,
        metadata={
            "help": "onnxruntime threads within one call (0 = one per physical core); the cores are "
            "used by running several calls at once instead (--max-concurrent-batches)"
        },
    )
    inter_op_threads: int = field(default=1, metadata={"help": "onnxruntime threads across graph nodes"})
    max_batch_size: int = field(default=64, metadata={"help": "the most rows in one onnxruntime call"})
    max_concurrent_batches: int = field(
        default=0,
        metadata={"help": "onnxruntime calls each graph may run at once (0 = one per usable core)"},
    )
    max_queue_delay_ms: float = field(
        default=2.0,
        metadata={"help": "how long the oldest waiting rows wait for a fuller batch while another runs"},
    )
    max_queue_size: int = field(
        default=4096, metadata={"help": "the most rows waiting per graph; beyond, RESOURCE_EXHAUSTED"}
    )
    max_samples: int = field(
        default=1024, metadata={"help": "the most images one Sample request may ask for"}
    )
    grace_period_s: float = field(
        default=10.0, metadata={"help": "on SIGTERM, how long in-flight requests get to finish"}
    )
    max_connection_age_s: float = field(
        default=0.0,
        metadata={
            "help": "close connections after this long so clients rebalance across replicas (0 = never)"
        },
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})

    def __post_init__(self) -> None:
        problems = []
        if self.device not in DEVICES:
            problems.append(f"device {self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level {self.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} {getattr(self, name)}: expected 0 to 65535")
        for name in ("max_batch_size", "max_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)}: expected at least 1")
        for name in ("intra_op_threads", "inter_op_threads", "max_concurrent_batches"):
            if getattr(self, name) < 0:
                problems.append(f"{name} {getattr(self, name)}: expected 0 or more")
        for name in ("max_queue_delay_ms", "grace_period_s", "max_connection_age_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} {getattr(self, name)}: expected 0 or more")
        if self.max_queue_size < self.max_batch_size:
            problems.append(
                f"max_queue_size {self.max_queue_size}: expected at least "
                f"max_batch_size ({self.max_batch_size})"
            )
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    @property
    def concurrent_batches(self) -> int:
        """max_concurrent_batches, with 0 resolved to the CPUs this process may use."""
        return self.max_concurrent_batches or usable_cpus()

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Parse flags over VAE_SERVE_* variables over defaults; exits with usage on a bad value."""
        environ = environ if environ is not None else {}
        parser = argparse.ArgumentParser(
            prog="vae-serve",
            description="Serve a model bundle over gRPC (vae.v1.VaeService), health, reflection, metrics.",
        )
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = ENV_PREFIX + f.name.upper()
            kind = _parser_type(f.type)
            default: Any = f.default
            if env in environ:
                try:
                    default = kind(environ[env])
                except ValueError:
                    parser.error(f"{env}={environ[env]!r}: expected a value of type {kind.__name__}")
            options: dict[str, Any] = {
                "type": kind,
                "default": default,
                "help": f"{f.metadata['help']} [{env}]",
            }
            if default is dataclasses.MISSING:
                options["required"] = True
            if f.name == "device":
                options["choices"] = DEVICES
            if f.name == "log_level":
                options["choices"] = LOG_LEVELS
            parser.add_argument(flag, **options)
        args = parser.parse_args(argv)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        try:
            return cls(**values)
        except ValueError as error:
            parser.error(str(error))


def usable_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup v2 quota (a container's CPU
    limit, which the affinity does not show)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def _parser_type(annotation: Any) -> Any:
    text = str(annotation)
    if text == "Path":
        return Path
    if text == "int":
        return int
    if text == "float":
        return float
    return str
