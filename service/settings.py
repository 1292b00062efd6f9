"""The service's settings: one typed object, filled once in __main__ from flags and VAE_SERVE_* variables.

Precedence: a flag on the command line, then the environment variable VAE_SERVE_<FLAG> (upper case,
dashes as underscores), then the default. Nothing else in the service reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service import tls_files
from service.runtime import Device

ENV_PREFIX = "VAE_SERVE_"
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")
PINNING = ("auto", "off")
# A request may carry max_queue_size rows; gRPC's messages stop at 2 GiB, 684,000 FLOAT32 images.
MAX_QUEUE_SIZE = 684_000
# More threads than any machine has cores only exhaust the process's threads (onnxruntime then hangs).
MAX_THREADS = 1024
# gRPC counts a connection's age in milliseconds, in 32 bits: at most about 24.8 days.
MAX_CONNECTION_AGE_S = (2**31 - 1) // 1000
# Hosts that listen on every address: a port bound on one of them is bound on the others too.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
TlsMode = Literal["plaintext", "TLS", "mutual TLS"]


@dataclass(frozen=True)
class Settings:
    """How vae-serve runs; each field is a flag `--field-name` and a variable VAE_SERVE_FIELD_NAME."""

    model_dir: Path = field(metadata={"help": "the model bundle directory written by vae-export"})
    host: str = field(
        default="0.0.0.0",
        metadata={"help": "the address the gRPC server binds; 0.0.0.0 or :: is every address, IPv4 and IPv6"},
    )
    port: int = field(default=50051, metadata={"help": "the gRPC port (0 = pick a free one)"})
    metrics_port: int = field(
        default=9090,
        metadata={"help": "the /metrics port, plain HTTP even with --tls-cert (0 = pick a free one)"},
    )
    metrics_host: str | None = field(
        default=None, metadata={"help": "the address /metrics binds (default: the same as --host)"}
    )
    device: Device = field(
        default="auto",
        metadata={"help": "auto (CUDA when onnxruntime offers it), cpu, cuda", "choices": DEVICES},
    )
    intra_op_threads: int = field(
        default=1,
        metadata={
            "help": "onnxruntime threads within one call (0 = one per physical core); the cores are "
            "used by running several calls at once instead (--max-concurrent-batches)"
        },
    )
    max_batch_size: int = field(
        default=16, metadata={"help": "the most rows in one onnxruntime call (memory grows with it)"}
    )
    max_concurrent_batches: int = field(
        default=0,
        metadata={"help": "onnxruntime calls each graph may run at once (0 = one per usable core)"},
    )
    inference_nice: int = field(
        default=0,
        metadata={
            "help": "how much lower the inference threads' CPU priority is than the event loop's "
            "(Linux nice, 0-19), so that requests are taken in and answered while inference runs; "
            "the container images set 19. Off by default and on one CPU: beside other busy "
            "processes that share its CPUs, niced inference would get almost none"
        },
    )
    pin_inference_threads: str = field(
        default="auto",
        metadata={
            "help": "auto: pin each inference thread of a graph to a CPU of its own, where the process "
            "may use exactly one CPU per thread (taskset, docker --cpuset-cpus, a Kubernetes exclusive "
            "cpuset); off: the kernel places them",
            "choices": PINNING,
        },
    )
    max_queue_delay_ms: float = field(
        default=2.0,
        metadata={"help": "how long the oldest waiting rows wait for a fuller batch while another runs"},
    )
    max_queue_size: int = field(
        default=4096,
        metadata={
            "help": "the most rows waiting per graph; beyond, RESOURCE_EXHAUSTED. Also the most rows one "
            "Encode or Decode request may carry: at least --max-samples and --max-batch-size"
        },
    )
    max_samples: int = field(
        default=1024,
        metadata={"help": "the most images one Sample request may ask for (at most --max-queue-size)"},
    )
    grace_period_s: float = field(
        default=10.0, metadata={"help": "on SIGTERM, how long in-flight requests get to finish"}
    )
    max_connection_age_s: float = field(
        default=0.0,
        metadata={
            "help": "close connections after this long so clients rebalance across replicas; calls in "
            "flight finish first (0 = never)"
        },
    )
    log_level: str = field(
        default="info", metadata={"help": "debug, info, warning or error", "choices": LOG_LEVELS}
    )
    tls_cert: Path | None = field(
        default=None,
        metadata={
            "help": "PEM certificate chain: serve gRPC over TLS (needs --tls-key; /metrics stays plain HTTP)"
        },
    )
    tls_key: Path | None = field(
        default=None, metadata={"help": "PEM private key of --tls-cert, unencrypted"}
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata={
            "help": "PEM CA bundle: clients must show a certificate it signed (mutual TLS; needs --tls-cert)"
        },
    )

    def __post_init__(self) -> None:
        problems = _tls_problems(self.tls_cert, self.tls_key, self.tls_client_ca)
        for f in dataclasses.fields(self):  # a value given as a VAE_SERVE_* variable, or in code
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(
                    f"{_setting(f.name)} {getattr(self, f.name)!r}: expected one of {', '.join(choices)}"
                )
        if not self.host:
            problems.append(
                f"{_setting('host')} '': expected an address or name to listen on (0.0.0.0, ::, 127.0.0.1...)"
            )
        for name in ("host", "metrics_host"):
            if getattr(self, name) and (problem := _host_problem(getattr(self, name))):
                problems.append(f"{_setting(name)} {getattr(self, name)!r}: {problem}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{_setting(name)} {getattr(self, name)}: expected 0 to 65535")
        metrics_host = self.metrics_host or self.host
        same_address = metrics_host == self.host or bool({metrics_host, self.host} & WILDCARD_HOSTS)
        if self.port and self.port == self.metrics_port and same_address:  # else "address already in use"
            problems.append(
                f"{_setting('metrics_port')} {self.metrics_port}: the gRPC port too ({_setting('port')}); "
                "expected another port, or 0 to pick a free one"
            )
        for name in ("max_batch_size", "max_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{_setting(name)} {getattr(self, name)}: expected at least 1")
        for name in ("intra_op_threads", "max_concurrent_batches"):
            if not 0 <= getattr(self, name) <= MAX_THREADS:
                problems.append(f"{_setting(name)} {getattr(self, name)}: expected 0 to {MAX_THREADS}")
        if not 0 <= self.inference_nice <= 19:
            problems.append(f"{_setting('inference_nice')} {self.inference_nice}: expected 0 to 19")
        for name in ("max_queue_delay_ms", "grace_period_s"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails both
                problems.append(
                    f"{_setting(name)} {getattr(self, name)}: expected a finite number, 0 or more"
                )
        age = self.max_connection_age_s
        if not (age == 0 or 1 <= age <= MAX_CONNECTION_AGE_S):  # NaN fails it too
            problems.append(
                f"{_setting('max_connection_age_s')} {age}: "
                f"expected 0 (never) or 1 to {MAX_CONNECTION_AGE_S} seconds"
            )
        if self.max_queue_size > MAX_QUEUE_SIZE:
            problems.append(
                f"{_setting('max_queue_size')} {self.max_queue_size}: expected at most {MAX_QUEUE_SIZE}, "
                "as a request of that many FLOAT32 images is gRPC's largest message (2 GiB)"
            )
        for name in ("max_batch_size", "max_samples"):  # a batch, and the largest Sample, must fit
            if self.max_queue_size < getattr(self, name):
                problems.append(
                    f"{_setting('max_queue_size')} {self.max_queue_size}: "
                    f"expected at least {_setting(name)} ({getattr(self, name)})"
                )
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    @property
    def tls_mode(self) -> TlsMode:
        """How the gRPC port is secured: plaintext, TLS, or mutual TLS (clients show certificates)."""
        if self.tls_cert is None:
            return "plaintext"
        return "TLS" if self.tls_client_ca is None else "mutual TLS"

    @property
    def concurrent_batches(self) -> int:
        """max_concurrent_batches, with 0 resolved to the CPUs this process may use."""
        return self.max_concurrent_batches or usable_cpus()

    @property
    def worker_nice(self) -> int:
        """inference_nice where the event loop can have a CPU of its own; 0 on one CPU, where a busy
        loop (refusing requests, say) would otherwise starve the inference that would drain them."""
        return self.inference_nice if usable_cpus() > 1 else 0

    @property
    def worker_cpus(self) -> tuple[int, ...]:
        """The CPU each inference thread of a graph is pinned to, or () to leave them to the kernel.

        Pinned only where the process may use exactly one CPU per thread. Where it may use more (a CPU
        quota on a bigger machine, fewer threads than CPUs), a pinned thread could not move off a
        CPU that other work is using.
        """
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        one_cpu_per_thread = len(cpus) > 1 and self.concurrent_batches == usable_cpus() == len(cpus)
        return cpus if self.pin_inference_threads == "auto" and one_cpu_per_thread else ()

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
            flag = _setting(f.name)
            env = ENV_PREFIX + f.name.upper()
            kind = _parser_type(f.type)
            default: Any = f.default
            if env in environ:
                try:
                    default = kind(environ[env])
                except ValueError:  # an error only if no flag overrides it
                    default = _BadVariable(
                        f"{env}={environ[env]!r}: expected a value of type {kind.__name__}"
                    )
            hidden = default in (None, "", dataclasses.MISSING) or isinstance(default, _BadVariable)
            shown = "" if hidden else f"; default {default}"
            options: dict[str, Any] = {
                # An empty optional path turns its setting off as a variable, which a manifest may have
                # to write; as a flag it is a `--tls-cert "$CERT"` whose CERT is unset: refused.
                "type": path if kind is _optional_path else kind,
                "default": default,
                "help": f"{f.metadata['help']} [{env}{shown}]".replace("%", "%%"),
            }
            if default is dataclasses.MISSING:
                options["required"] = True
            if "choices" in f.metadata:
                options["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **options)
        args = parser.parse_args(argv)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        unparsed = [value.message for value in values.values() if isinstance(value, _BadVariable)]
        if unparsed:
            parser.error("; ".join(unparsed))
        try:
            return cls(**values)
        except ValueError as error:
            parser.error(str(error))


def _setting(name: str) -> str:
    """A setting by its flag, which is also how --help names its VAE_SERVE_* variable."""
    return "--" + name.replace("_", "-")


# Settings that are gone, and why, for a deployment that still sets them.
REMOVED_SETTINGS = {
    "INTER_OP_THREADS": "removed: the graphs run their nodes in order, so there is no inter-op pool to size",
}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What to say of each VAE_SERVE_* variable that is no setting (a typo, or a removed setting),
    which would otherwise be ignored without a word; with the closest setting's name where one is."""
    settings = [f.name.upper() for f in dataclasses.fields(Settings)]
    said = []
    for name in sorted(environ):
        setting = name.removeprefix(ENV_PREFIX)
        if setting == name or setting in settings:
            continue
        if setting in REMOVED_SETTINGS:
            hint = f" ({REMOVED_SETTINGS[setting]})"
        else:
            close = difflib.get_close_matches(setting, settings, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        said.append(f"{name} is not a setting of vae-serve; ignored{hint}")
    return said


@dataclass(frozen=True)
class _BadVariable:
    """A VAE_SERVE_* value of the wrong type, in place of the default its flag may still override."""

    message: str


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


def _host_problem(host: str) -> str | None:
    """Why `host` is no address or host name, or None; said here, as the resolver raises UnicodeError
    (a traceback, not a refusal) for a name such as ".svc" (a template whose variable was empty)."""
    try:
        host.strip("[]").encode("idna")
    except UnicodeError:
        return "not an address or host name (a label of it is empty or over 63 characters)"
    return None


def _tls_problems(cert: Path | None, key: Path | None, client_ca: Path | None) -> list[str]:
    """What is wrong with the TLS files, each naming its flag and file; read here so that a bad file
    fails at start with its name, not later as grpc's "Failed to bind" or a handshake error."""
    if (cert is None) != (key is None):
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        return [f"--tls-cert and --tls-key go together: {given} is given without {missing}"]
    if cert is None or key is None:
        if client_ca is not None:
            return ["--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)"]
        return []
    named = [
        (f"--tls-cert {cert}", tls_files.certificate_problem(cert, "certificate chain")),
        (f"--tls-key {key}", tls_files.key_problem(key)),
    ]
    if client_ca is not None:
        named.append(
            (f"--tls-client-ca {client_ca}", tls_files.certificate_problem(client_ca, "CA bundle", ca=True))
        )
    problems = [f"{name}: {problem}" for name, problem in named if problem]
    if problems:
        return problems
    # The markers are there; OpenSSL now checks that the blocks decode and that the key fits the cert.
    pair = tls_files.pair_problem(cert, key)
    if pair == tls_files.KEY_MISMATCH:
        problems.append(f"--tls-key {key}: not the private key of the certificate in --tls-cert {cert}")
    elif pair:
        problems.append(f"--tls-cert {cert} and --tls-key {key}: {pair}")
    elif validity := tls_files.validity_problem(cert):
        problems.append(f"--tls-cert {cert}: {validity}")
    if client_ca is not None and (ca := tls_files.ca_problem(client_ca, "CA bundle")):
        problems.append(f"--tls-client-ca {client_ca}: {ca}")
    return problems


def _optional_path(text: str) -> Path | None:
    # Empty means not given, so a manifest can write VAE_SERVE_TLS_CERT: "" to turn TLS off.
    return Path(text) if text else None


def path(text: str) -> Path:
    """A path given: an empty one would be read as the current folder."""
    if not text:
        raise ValueError("an empty path")
    return Path(text)


def _parser_type(annotation: Any) -> Any:
    text = str(annotation)
    if text == "Path":
        return path
    if text == "Path | None":
        return _optional_path
    if text == "int":
        return int
    if text == "float":
        return float
    return str
