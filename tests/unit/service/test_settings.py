"""Settings: flags over VAE_SERVE_* variables over defaults, validated once, and handed on to the
model as the units its parts take."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service import server
from service import settings as settings_module
from service.__main__ import main as serve_main
from service.errors import InvalidInput
from service.metrics import ServiceMetrics
from service.settings import Settings, usable_cpus


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings.from_args(["--model-dir", "bundle"], {})
    assert settings.model_dir == Path("bundle")
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 50051, 9090)
    assert settings.device == "auto"
    assert settings.max_batch_size == 16
    assert settings.inference_nice == 0
    assert settings.pin_inference_threads == "auto"
    assert (settings.metrics_host, settings.intra_op_threads, settings.max_queue_delay_ms) == (None, 1, 2.0)


def test_environment_variables_fill_in_and_flags_win() -> None:
    environ = {
        "VAE_SERVE_MODEL_DIR": "from-env",
        "VAE_SERVE_PORT": "6000",
        "VAE_SERVE_MAX_QUEUE_DELAY_MS": "7.5",
    }
    settings = Settings.from_args(["--port", "7000"], environ)
    assert settings.model_dir == Path("from-env")
    assert settings.port == 7000
    assert settings.max_queue_delay_ms == 7.5


def test_a_flag_overrides_a_variable_even_one_that_does_not_parse() -> None:
    environ = {"VAE_SERVE_PORT": "eighty"}
    assert Settings.from_args(["--model-dir", "bundle", "--port", "0"], environ).port == 0


def test_a_variable_that_is_no_setting_is_named_with_the_setting_it_resembles() -> None:
    environ = {
        "VAE_SERVE_MAX_BATCHSIZE": "8",  # a typo: without a word it would leave batches at 16
        "VAE_SERVE_INTER_OP_THREADS": "2",  # removed: the graphs run their nodes in order
        "VAE_SERVE_PORT": "6000",
        "VAE_SERVED_BY": "someone else",  # not the prefix
    }
    assert settings_module.unknown_variables(environ) == [
        "VAE_SERVE_INTER_OP_THREADS is not a setting of vae-serve; ignored (removed: the graphs run their "
        "nodes in order, so there is no inter-op pool to size)",
        "VAE_SERVE_MAX_BATCHSIZE is not a setting of vae-serve; ignored"
        " (did you mean VAE_SERVE_MAX_BATCH_SIZE?)",
    ]
    assert settings_module.unknown_variables({"VAE_SERVE_ZZZ": "1"}) == [
        "VAE_SERVE_ZZZ is not a setting of vae-serve; ignored"
    ]


def test_a_misspelt_required_variable_is_named_beside_the_refusal_it_causes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logged at start otherwise, the hint would never show where the start fails for want of it."""
    for name in [name for name in os.environ if name.startswith("VAE_SERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VAE_SERVE_MODELDIR", "bundle")
    with pytest.raises(SystemExit) as refused:
        serve_main([])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --model-dir" in err
    assert err.endswith(
        "vae-serve: VAE_SERVE_MODELDIR is not a setting of vae-serve; ignored "
        "(did you mean VAE_SERVE_MODEL_DIR?)\n"
    )
    with pytest.raises(SystemExit) as helped:
        serve_main(["--help"])
    assert helped.value.code == 0 and "is not a setting" not in capsys.readouterr().err


def test_the_graphs_run_their_nodes_in_order_so_there_is_no_inter_op_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args(["--model-dir", "bundle", "--inter-op-threads", "2"], {})
    assert "unrecognized arguments: --inter-op-threads 2" in capsys.readouterr().err


def test_model_dir_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args([], {})
    assert "--model-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--model-dir", ""], {}, "argument --model-dir: invalid path value: ''"),
        ([], {"VAE_SERVE_MODEL_DIR": ""}, "VAE_SERVE_MODEL_DIR='': expected a value of type path"),
    ],
)
def test_an_empty_model_dir_is_refused_not_read_as_the_current_folder(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args(argv, environ)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--device", "tpu"], {}, "invalid choice: 'tpu'"),
        ([], {"VAE_SERVE_PORT": "eighty"}, "VAE_SERVE_PORT='eighty'"),
        (["--max-batch-size", "0"], {}, "--max-batch-size 0: expected at least 1"),
        (["--max-queue-size", "8", "--max-batch-size", "16"], {}, "expected at least --max-batch-size (16)"),
        (["--max-queue-size", "512", "--max-samples", "1024"], {}, "expected at least --max-samples (1024)"),
        (["--host", ""], {}, "--host '': expected an address or name to listen on"),
        (["--host", ".svc"], {}, "--host '.svc': not an address or host name (a label of it is empty"),
        (["--metrics-host", "vae..local"], {}, "--metrics-host 'vae..local': not an address or host name"),
        (["--port", "70000"], {}, "expected 0 to 65535"),
        (["--metrics-port", "65536"], {}, "--metrics-port 65536: expected 0 to 65535"),
        (["--metrics-port", "-1"], {}, "--metrics-port -1: expected 0 to 65535"),
        (["--port", "8080", "--metrics-port", "8080"], {}, "--metrics-port 8080: the gRPC port too (--port)"),
        (
            ["--port", "8080", "--metrics-port", "8080", "--host", "127.0.0.1", "--metrics-host", "::"],
            {},
            "--metrics-port 8080: the gRPC port too (--port); expected another port, or 0 to pick a free one",
        ),
        # A `--tls-cert "$CERT"` whose CERT is unset would otherwise serve plaintext without a word.
        (["--tls-cert", "", "--tls-key", ""], {}, "argument --tls-cert: invalid path value: ''"),
        (["--tls-client-ca", ""], {}, "argument --tls-client-ca: invalid path value: ''"),
        (["--max-samples", "0"], {}, "--max-samples 0: expected at least 1"),
        (["--max-queue-size", "700000"], {}, "expected at most 684000, as a request of that many FLOAT32"),
        (["--inference-nice", "20"], {}, "--inference-nice 20: expected 0 to 19"),
        (["--inference-nice", "-1"], {}, "--inference-nice -1: expected 0 to 19"),
        (["--max-queue-delay-ms", "-1"], {}, "--max-queue-delay-ms -1.0: expected a finite number, 0 or"),
        (["--max-queue-delay-ms", "nan"], {}, "--max-queue-delay-ms nan: expected a finite number"),
        ([], {"VAE_SERVE_GRACE_PERIOD_S": "inf"}, "--grace-period-s inf: expected a finite number"),
        ([], {"VAE_SERVE_PIN_INFERENCE_THREADS": "on"}, "--pin-inference-threads 'on': expected one of"),
        (["--pin-inference-threads", "on"], {}, "invalid choice: 'on'"),
        # Beyond these, onnxruntime hangs on a process out of threads, and gRPC's 32-bit milliseconds
        # overflow or round a connection's age to 0.
        (["--intra-op-threads", "40000"], {}, "--intra-op-threads 40000: expected 0 to 1024"),
        (["--intra-op-threads", "-1"], {}, "--intra-op-threads -1: expected 0 to 1024"),
        (["--max-concurrent-batches", "100000"], {}, "--max-concurrent-batches 100000: expected 0 to 1024"),
        (["--max-connection-age-s", "0.0001"], {}, "expected 0 (never) or 1 to 2147483 seconds"),
        (["--max-connection-age-s", "3000000"], {}, "--max-connection-age-s 3000000.0: expected 0 (never)"),
    ],
)
def test_bad_values_are_refused_with_what_was_expected(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args(["--model-dir", "bundle", *argv], environ)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--max-queue-delay-ms", "7.5", 7.5),
        ("--intra-op-threads", "3", 3),
        ("--metrics-host", "127.0.0.2", "127.0.0.2"),
        ("--metrics-port", "65535", 65535),
        ("--max-samples", "1", 1),
    ],
)
def test_a_flag_and_its_variable_set_the_setting_of_its_name(flag: str, value: str, expected: object) -> None:
    name = flag.removeprefix("--").replace("-", "_")
    assert getattr(Settings.from_args(["--model-dir", "bundle", flag, value], {}), name) == expected
    environ = {"VAE_SERVE_" + name.upper(): value}
    assert getattr(Settings.from_args(["--model-dir", "bundle"], environ), name) == expected


def test_the_model_is_loaded_with_the_queue_delay_in_seconds_and_the_other_settings_as_given(
    vae_bundle: Path,
) -> None:
    """build_model on a real bundle: the batchers, sessions and limits the served model runs with."""
    flags = ["--max-queue-delay-ms", "7.5", "--intra-op-threads", "3", "--max-batch-size", "8"]
    flags += ["--max-queue-size", "2048", "--max-samples", "512", "--max-concurrent-batches", "2"]
    settings = Settings.from_args(["--model-dir", str(vae_bundle), "--device", "cpu", *flags], {})
    model = server.build_model(settings, ServiceMetrics.create())  # not started: no worker to stop
    for batcher in (model.encoder, model.decoder):
        assert batcher._delay == 0.0075, batcher.name
        assert (batcher.max_batch_size, batcher.max_queue_size) == (8, 2048), batcher.name
        workers = (batcher._workers, batcher._worker_nice, batcher._worker_cpus)
        assert workers == (2, settings.worker_nice, settings.worker_cpus), batcher.name
    for graph in (model.runtime.encoder, model.runtime.decoder):
        assert graph.session.get_session_options().intra_op_num_threads == 3
    assert model.execution_provider == "CPUExecutionProvider"
    model.sample_latents(512, seed=1, temperature=1.0)
    with pytest.raises(InvalidInput, match="expected 1 to 512"):
        model.sample_latents(513, seed=1, temperature=1.0)


@pytest.mark.parametrize(("cpus", "nice"), [(1, 0), (2, 7)])
def test_the_models_batchers_run_inference_niced_only_where_the_event_loop_has_a_cpu_of_its_own(
    vae_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cpus: int, nice: int
) -> None:
    """build_model hands the batchers worker_nice, not --inference-nice as given: on one CPU, niced
    inference would get almost no CPU beside the busy event loop. It says so where it drops the flag."""
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: cpus)
    argv = ["--model-dir", str(vae_bundle), "--device", "cpu", "--inference-nice", "7"]
    with caplog.at_level(logging.WARNING, logger="service.server"):
        model = server.build_model(Settings.from_args(argv, {}), ServiceMetrics.create())  # not started
    assert [batcher._worker_nice for batcher in (model.encoder, model.decoder)] == [nice, nice]
    warnings = [record.getMessage() for record in caplog.records if "--inference-nice" in record.getMessage()]
    assert len(warnings) == (0 if nice else 1)
    assert all(
        warning.startswith("--inference-nice 7 not applied: this process may use one CPU")
        for warning in warnings
    )


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", None), ("100000 100000\n", 1), ("150000 100000\n", 2), ("50000 100000\n", 1)],
)
def test_usable_cpus_follow_a_container_cpu_limit(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (cores if expected is None else min(cores, expected))
    assert usable_cpus(tmp_path / "missing") == cores


@pytest.mark.parametrize(("cpus", "expected"), [(1, 0), (2, 19), (8, 19)])
def test_inference_yields_to_the_event_loop_only_where_the_loop_can_have_a_cpu_of_its_own(
    monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int
) -> None:
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: cpus)
    assert Settings.from_args(["--model-dir", "bundle", "--inference-nice", "19"], {}).worker_nice == expected
    assert Settings.from_args(["--model-dir", "bundle"], {}).worker_nice == 0


@pytest.mark.parametrize(
    ("affinity", "quota", "flags", "expected"),
    [
        ({0, 1}, 2, [], (0, 1)),
        ({2, 5}, 2, [], (2, 5)),
        ({0, 1}, 2, ["--pin-inference-threads", "off"], ()),
        ({0, 1}, 2, ["--max-concurrent-batches", "1"], ()),  # a CPU left to other work
        (set(range(8)), 2, [], ()),  # a CPU quota on a bigger machine
        ({3}, 1, [], ()),
    ],
)
def test_inference_threads_are_pinned_only_where_the_process_has_one_cpu_per_thread(
    monkeypatch: pytest.MonkeyPatch,
    affinity: set[int],
    quota: int,
    flags: list[str],
    expected: tuple[int, ...],
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: quota)
    assert Settings.from_args(["--model-dir", "bundle", *flags], {}).worker_cpus == expected


FAKE_CERTIFICATE = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
FAKE_KEY = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"


def test_one_port_on_two_distinct_addresses_is_two_listeners_and_allowed() -> None:
    settings = Settings.from_args(
        ["--model-dir", "bundle", "--host", "10.0.0.1", "--metrics-host", "127.0.0.1"],
        {"VAE_SERVE_PORT": "8080", "VAE_SERVE_METRICS_PORT": "8080"},
    )
    assert (settings.port, settings.metrics_port) == (8080, 8080)


def test_tls_is_off_by_default_and_an_empty_variable_leaves_it_off() -> None:
    environ = {"VAE_SERVE_TLS_CERT": "", "VAE_SERVE_TLS_KEY": "", "VAE_SERVE_TLS_CLIENT_CA": ""}
    settings = Settings.from_args(["--model-dir", "bundle"], environ)
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (None, None, None)
    assert settings.tls_mode == "plaintext"


def test_help_says_metrics_stay_plain_http_and_names_the_tls_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        Settings.from_args(["--help"], {})
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "plain HTTP even with --tls-cert" in help_text
    for variable in ("VAE_SERVE_TLS_CERT", "VAE_SERVE_TLS_KEY", "VAE_SERVE_TLS_CLIENT_CA"):
        assert variable in help_text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--tls-cert", "server.pem"],
            "--tls-cert and --tls-key go together: --tls-cert is given without --tls-key",
        ),
        (
            ["--tls-key", "server.key"],
            "--tls-cert and --tls-key go together: --tls-key is given without --tls-cert",
        ),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
    ],
)
def test_tls_flags_that_need_each_other_are_refused_naming_both(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args(["--model-dir", "bundle", *argv], {})
    assert message in capsys.readouterr().err


def test_a_missing_tls_file_set_by_variable_is_refused_naming_the_flag_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "server.key").write_text(FAKE_KEY)
    environ = {
        "VAE_SERVE_TLS_CERT": str(tmp_path / "missing.pem"),
        "VAE_SERVE_TLS_KEY": str(tmp_path / "server.key"),
    }
    with pytest.raises(SystemExit):
        Settings.from_args(["--model-dir", "bundle"], environ)
    error = capsys.readouterr().err
    assert f"--tls-cert {tmp_path / 'missing.pem'}: cannot read the certificate chain (No such file" in error


@pytest.mark.parametrize(
    ("make", "reason"), [(lambda path: None, "No such file"), (Path.mkdir, "Is a directory")]
)
def test_a_client_ca_that_cannot_be_read_is_refused_naming_the_flag_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], object], reason: str
) -> None:
    (tmp_path / "server.pem").write_text(FAKE_CERTIFICATE)
    (tmp_path / "server.key").write_text(FAKE_KEY)
    make(tmp_path / "ca.pem")
    flags = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")]
    with pytest.raises(SystemExit):
        Settings.from_args(["--model-dir", "bundle", *flags, "--tls-client-ca", str(tmp_path / "ca.pem")], {})
    error = capsys.readouterr().err
    assert f"--tls-client-ca {tmp_path / 'ca.pem'}: cannot read the CA bundle ({reason}" in error


DIRECTORY = None  # a directory where the file should be


def tls_settings(directory: Path, cert: str | None, key: str | None, client_ca: str | None = "") -> Settings:
    """Settings whose TLS files hold these texts (DIRECTORY: a directory in the file's place; a client
    CA of "": not given)."""
    paths: list[Path] = []
    for name, text in (("server.pem", cert), ("server.key", key), ("ca.pem", client_ca)):
        path = directory / name
        if text is DIRECTORY:
            path.mkdir()
        else:
            path.write_text(text)
        paths.append(path)
    cert_path, key_path, ca_path = paths
    return Settings(
        model_dir=directory,
        tls_cert=cert_path,
        tls_key=key_path,
        tls_client_ca=ca_path if client_ca else None,
    )


ENCRYPTED_KEY = FAKE_KEY.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY")


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "message"),
    [
        (
            DIRECTORY,
            FAKE_KEY,
            "",
            "--tls-cert {dir}/server.pem: cannot read the certificate chain (Is a directory)",
        ),
        (
            "hello",
            FAKE_KEY,
            "",
            "--tls-cert {dir}/server.pem: not a PEM certificate chain (no -----BEGIN CERT",
        ),
        (FAKE_CERTIFICATE, FAKE_CERTIFICATE, "", "--tls-key {dir}/server.key: not a PEM private key"),
        (FAKE_CERTIFICATE, ENCRYPTED_KEY, "", "--tls-key {dir}/server.key: the private key is encrypted"),
        (FAKE_CERTIFICATE, FAKE_KEY, FAKE_KEY, "--tls-client-ca {dir}/ca.pem: not a PEM CA bundle"),
        # The markers are there but the blocks are not certificates and keys: OpenSSL says so.
        (FAKE_CERTIFICATE, FAKE_KEY, "", "--tls-key {dir}/server.key: not a readable PEM certificate chain"),
    ],
)
def test_bad_tls_files_are_refused_naming_the_flag_and_file(
    tmp_path: Path, cert: str | None, key: str, client_ca: str, message: str
) -> None:
    with pytest.raises(ValueError, match="invalid settings") as refused:
        tls_settings(tmp_path, cert, key, client_ca)
    assert message.format(dir=tmp_path) in str(refused.value)


def certificate_and_key(valid_from: datetime.datetime, valid_to: datetime.datetime) -> tuple[str, str]:
    """A self-signed P-256 certificate valid between the two dates, and its key, as PEM texts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vae-serving")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


@pytest.mark.parametrize(
    ("valid_from", "valid_to", "message"),
    [
        ((2020, 1, 1), (2020, 2, 1), "the certificate expired on Feb  1 00:00:00 2020 GMT: renew it"),
        ((2099, 1, 1), (2099, 2, 1), "the certificate is not valid before Jan  1 00:00:00 2099 GMT"),
    ],
)
def test_a_server_certificate_outside_its_dates_is_refused_at_start(
    tmp_path: Path, valid_from: tuple[int, int, int], valid_to: tuple[int, int, int], message: str
) -> None:
    """Else the server said SERVING while every handshake failed, which clients retry as UNAVAILABLE."""
    outside, within = tmp_path / "outside", tmp_path / "within"
    outside.mkdir()
    within.mkdir()
    dates = [datetime.datetime(*date, tzinfo=datetime.UTC) for date in (valid_from, valid_to)]
    with pytest.raises(ValueError) as refused:
        tls_settings(outside, *certificate_and_key(*dates))
    assert f"--tls-cert {outside / 'server.pem'}: {message}" in str(refused.value)
    now = datetime.datetime.now(datetime.UTC)
    valid = certificate_and_key(now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    assert tls_settings(within, *valid).tls_mode == "TLS"
