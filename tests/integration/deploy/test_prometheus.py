"""A real Prometheus scrapes a real vae-serve with the project's scrape config, rules and dashboard.

The server is the tiny trained bundle served by `start_server` (what vae-serve runs) on 127.0.0.1;
Prometheus is Debian's binary (`make deploy-check` unpacks it into .cache/prometheus) on 127.0.0.1
port 0, with deploy/prometheus/prometheus.yml where only what Docker provides is rewritten: the `vae`
job's DNS discovery becomes the test server's metrics address. The counters the test drives come
back through Prometheus' HTTP API, the recording rules evaluate, and every Grafana panel query runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import yaml

from service.codec import to_tensor
from service.metrics import ServiceMetrics
from service.servicer import ANSWERED_CODES
from tests.conftest import ServerThread
from vae.v1 import vae_pb2, vae_pb2_grpc

REPO = Path(__file__).resolve().parents[3]
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vae-serving.json"
# Where deploy/check.sh unpacks Debian's prometheus package.
UNPACKED_PROMETHEUS = REPO / ".cache" / "prometheus" / "usr" / "bin" / "prometheus"

# Generous: Prometheus scrapes every second here, but the machine is shared by parallel jobs.
WAIT_S = 60.0
# deploy/check.sh replaces an install by removing it and unpacking the package again: a second or two.
INSTALL_WAIT_S = 20.0
# The server refuses Sample requests above this many images (INVALID_ARGUMENT).
MAX_SAMPLES = 16

T = TypeVar("T")
Labels = tuple[tuple[str, str], ...]


def find_prometheus() -> Path | None:
    """$PROMETHEUS_BIN, the unpacked Debian package, or `prometheus` on PATH."""
    if os.environ.get("PROMETHEUS_BIN"):
        chosen = Path(os.environ["PROMETHEUS_BIN"])
        if not chosen.is_file():
            pytest.fail(f"PROMETHEUS_BIN={chosen}: no such file; expected the prometheus server binary")
        return chosen
    if UNPACKED_PROMETHEUS.is_file():
        return UNPACKED_PROMETHEUS
    found = shutil.which("prometheus")
    return Path(found) if found else None


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    alive: Callable[[], str | None],
    last_seen: Callable[[], object] | None = None,
) -> T:
    """Poll `probe` until it returns a value; fail naming `what` (and `last_seen()`, if given) at the
    deadline or if `alive` says why the process it depends on is gone. (Prometheus has no event to
    wait on: it scrapes and evaluates its rules on a clock.)"""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = probe()
        if value is not None:
            return value
        died = alive()
        if died is not None:
            pytest.fail(f"waiting for {what}: {died}")
        if time.monotonic() > deadline:
            seen = "" if last_seen is None else f"; last seen: {last_seen()!r}"
            pytest.fail(f"waiting for {what}: nothing after {WAIT_S:g} s{seen}")
        time.sleep(0.1)


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on, read from /proc (port 0 was asked: the kernel chose)."""
    try:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    return int(local.rsplit(":", 1)[1], 16)
    except OSError:
        pass  # a descriptor closed while we read, or the process is gone (the caller checks that)
    return None


def is_ready(port: int) -> bool | None:
    """True once Prometheus says it is ready; None while it starts. It listens before its storage,
    configuration and rules are loaded, and until then its API answers 503 Service Unavailable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=10) as response:
            return response.status == 200 or None
    except OSError:  # 503 while starting (an HTTPError), or no answer yet (a URLError)
        return None


def check_runs(binary: Path) -> str | None:
    """None when `binary --version` works; otherwise what went wrong. A package unpacked only in part
    (deploy/check.sh interrupted, or unpacking it right now) leaves a file that cannot run."""
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    if result.returncode != 0:
        return f"exited with {result.returncode}: {result.stderr.strip()[-500:]}"
    return None


@dataclass
class Prometheus:
    """A running Prometheus and a client for its HTTP API."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    def why_dead(self) -> str | None:
        if self.process.poll() is None:
            return None
        return f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}"

    def api(self, path: str, **parameters: str) -> Any:
        """GET /api/v1/PATH: the `data` of a successful answer; fails the test on an error."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(parameters)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            pytest.fail(f"Prometheus refused {path} {parameters}: {error.read().decode()}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        result: list[dict[str, Any]] = self.api("query", query=promql)["result"]
        return result

    def values(self, promql: str) -> dict[Labels, float]:
        """The result of `promql` as {sorted labels without __name__: value}."""
        return {
            tuple(sorted((k, v) for k, v in sample["metric"].items() if k != "__name__")): float(
                sample["value"][1]
            )
            for sample in self.query(promql)
        }


def scrape_config(metrics_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with Docker's parts pointed at this test's processes."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(RULES_DIR / Path(pattern).name) for pattern in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    vae_job = jobs["vae"]
    # Docker's resolver answers for the `vae-metrics` alias in compose; here the one server is static.
    assert [sd["port"] for sd in vae_job.pop("dns_sd_configs")] == [9090]
    vae_job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    # Prometheus scraping itself needs its own port, which is not known before it starts.
    config["scrape_configs"] = [vae_job]
    return config


INSTALL_HINT = "`make deploy-check` unpacks Debian's prometheus package into .cache/prometheus"

# Decided before any fixture trains a model: a developer without Prometheus skips at once; CI never skips.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_prometheus() is None and not os.environ.get("CI"),
        reason=f"no prometheus binary: {INSTALL_HINT}, or `apt-get install prometheus`",
    ),
]


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    found = find_prometheus()
    if found is None:
        pytest.fail(f"no prometheus binary, and CI must run this test: {INSTALL_HINT}")
    # An unpacking in progress (another `make deploy-check`) ends within seconds: wait for it, then
    # name a broken install rather than fail every test with an exec error.
    problem = check_runs(found)
    deadline = time.monotonic() + INSTALL_WAIT_S
    while problem is not None and time.monotonic() < deadline:
        time.sleep(1)
        problem = check_runs(found)
    if problem is not None:
        pytest.fail(
            f"{found} --version: {problem}; a partial install? Remove .cache/prometheus and run "
            "`make deploy-check` again"
        )
    return found


@pytest.fixture(scope="module")
def server(vae_bundle: Path) -> Iterator[ServerThread]:
    """The tiny VAE with a fresh registry (exact counts) that has the process metrics, as in production;
    two inference threads, whatever the machine, so that the rows of each call are known."""
    started = ServerThread(
        vae_bundle, ServiceMetrics.create(process=True), max_samples=MAX_SAMPLES, max_concurrent_batches=2
    )
    yield started
    started.stop(grace_s=0)


@pytest.fixture(scope="module")
def prometheus(
    prometheus_binary: Path, server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(server.server.metrics_port)))
    log = workdir / "prometheus.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                str(prometheus_binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                "--web.listen-address=127.0.0.1:0",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    running = Prometheus(process, log)
    try:
        running.port = wait_for(lambda: listening_port(process.pid), "Prometheus to listen", running.why_dead)
        # Listening is not ready: a query before /-/ready says 200 gets 503 and fails the fixture.
        wait_for(partial(is_ready, running.port), "Prometheus to be ready", running.why_dead)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def drive(target: str, rounds: int) -> None:
    """Per round: one Sample of 4, one Encode of 3 images, one Sample over the limit, one GetModelInfo."""
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        for _ in range(rounds):
            stub.Sample(vae_pb2.SampleRequest(num_samples=4, seed=7), timeout=30)
            stub.Encode(vae_pb2.EncodeRequest(images=to_tensor(images)), timeout=30)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Sample(vae_pb2.SampleRequest(num_samples=MAX_SAMPLES + 1), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30)


def expected_requests(rounds: int, instance: str) -> dict[Labels, float]:
    """vae_requests_total after `rounds` rounds of `drive`, as Prometheus labels it: every other status
    of every RPC at 0, exported so from the start."""

    def key(rpc: str, code: str) -> Labels:
        return tuple(sorted({"code": code, "rpc": rpc, "job": "vae", "instance": instance}.items()))

    rpcs = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].methods_by_name
    return {key(rpc, code.name): 0.0 for rpc in rpcs for code in ANSWERED_CODES} | {
        key("Sample", "OK"): rounds,
        key("Sample", "INVALID_ARGUMENT"): rounds,
        key("Encode", "OK"): rounds,
        key("GetModelInfo", "OK"): rounds,
    }


def requests_seen(prometheus: Prometheus, expected: dict[Labels, float]) -> bool | None:
    return prometheus.values('vae_requests_total{job="vae"}') == expected or None


@dataclass
class Scraped:
    """Prometheus after the test's traffic, and the `instance` label it gives the server."""

    prometheus: Prometheus
    instance: str


@pytest.fixture(scope="module")
def scraped(prometheus: Prometheus, server: ServerThread) -> Scraped:
    """Traffic in two parts, each seen by a scrape, so that rates over both are above zero."""
    instance = f"127.0.0.1:{server.server.metrics_port}"
    wait_for(lambda: prometheus.values('up{job="vae"}') or None, "the first scrape", prometheus.why_dead)
    rounds = 0
    for more in (1, 2):
        drive(server.target, more)
        rounds += more
        expected = expected_requests(rounds, instance)
        wait_for(
            partial(requests_seen, prometheus, expected),
            f"Prometheus to see vae_requests_total after {rounds} round(s)",
            prometheus.why_dead,
        )
    return Scraped(prometheus, instance)


def test_prometheus_scrapes_the_server_as_the_vae_job(scraped: Scraped) -> None:
    up = scraped.prometheus.values('up{job="vae"}')
    assert up == {(("instance", scraped.instance), ("job", "vae")): 1.0}


def test_request_counter_reads_back_through_the_http_api(scraped: Scraped) -> None:
    requests = scraped.prometheus.values('vae_requests_total{job="vae"}')
    assert requests == expected_requests(3, scraped.instance)
    items = scraped.prometheus.values('vae_items_total{job="vae"}')
    by_rpc = {dict(labels)["rpc"]: value for labels, value in items.items()}
    assert by_rpc == {"Sample": 3 * 4, "Encode": 3 * 3, "Decode": 0, "EncodeStream": 0, "SampleStream": 0}


def test_model_info_names_the_bundle_and_the_cpu_provider(scraped: Scraped) -> None:
    (labels,) = scraped.prometheus.values('vae_model_info{job="vae"}')
    info = dict(labels)
    assert info["name"] == "tiny-vae"
    assert info["kind"] == "vae"
    assert info["execution_provider"] == "CPUExecutionProvider"


def test_recording_rules_evaluate_on_real_series(scraped: Scraped) -> None:
    prometheus = scraped.prometheus

    def recorded(promql: str, expected: Callable[[dict[Labels, float]], bool]) -> dict[Labels, float]:
        """The rule's series once they read as `expected`. A rule evaluates on its own clock: its
        latest value may predate the last scrape (a rate of 0 between two scrapes of one count)."""
        last: dict[Labels, float] = {}

        def probe() -> dict[Labels, float] | None:
            nonlocal last
            last = prometheus.values(promql)
            return last if last and expected(last) else None

        return wait_for(probe, f"the rule {promql}", prometheus.why_dead, lambda: last)

    def by(label: str, values: dict[Labels, float]) -> dict[str, float]:
        return {dict(labels)[label]: value for labels, value in values.items()}

    sample_rate = recorded(
        'rpc_code:vae_requests:rate5m{rpc="Sample", code="OK"}', lambda v: min(v.values()) > 0
    )
    assert len(sample_rate) == 1
    # Every request either succeeded or was the caller's fault (INVALID_ARGUMENT): no server error.
    no_errors = {"Sample": 0.0, "Encode": 0.0, "GetModelInfo": 0.0}
    recorded("rpc:vae_request_errors:ratio_rate5m", lambda v: by("rpc", v) == no_errors)
    # Rows per onnxruntime call: one client, one request at a time, so each was cut into a call for
    # each of the two inference threads: Encode's 3 images into 2 and 1, Sample's 4 into 2 and 2.
    rows_per_call = {"encoder": pytest.approx(1.5), "decoder": pytest.approx(2.0)}
    recorded("graph:vae_batch_size:mean_rate5m", lambda v: by("graph", v) == rows_per_call)


# The alerts whose inputs the test controls: its server is up and scraped, no request fails on the
# server's side, none is shed. Left out: the latency alerts, which a slow machine may make pending.
QUIET_ALERTS = ("VaeServerDown", "VaeServerAbsent", "VaeHighErrorRatio", "VaeQueueSaturated")


def loaded_rules(prometheus: Prometheus) -> dict[str, dict[str, Any]]:
    """Every rule Prometheus has loaded, by name, with its health and, for an alert, its state."""
    groups = prometheus.api("rules")["groups"]
    return {rule["name"]: rule for group in groups for rule in group["rules"]}


def test_every_rule_loads_evaluates_and_no_alert_fires(scraped: Scraped) -> None:
    prometheus = scraped.prometheus
    rules = loaded_rules(prometheus)
    declared = yaml.safe_load((RULES_DIR / "vae.yml").read_text())["groups"]
    names = {rule.get("record") or rule["alert"] for group in declared for rule in group["rules"]}
    assert set(rules) == names
    assert {name: rule["health"] for name, rule in rules.items() if rule["health"] != "ok"} == {}
    firing = [
        rule["name"] for rule in rules.values() if rule["type"] == "alerting" and rule["state"] == "firing"
    ]
    assert firing == []
    # Every alert waits a minute or more (`for:`) before it fires, longer than this test runs, so the
    # alerts the test's traffic decides must not even have their condition met: each one's expression
    # selects nothing, and Prometheus' own evaluation reads them inactive, not pending.
    assert set(QUIET_ALERTS) <= {name for name, rule in rules.items() if rule["type"] == "alerting"}
    met = {name: found for name in QUIET_ALERTS if (found := prometheus.query(rules[name]["query"]))}
    assert met == {}
    states: dict[str, str] = {}

    def all_inactive() -> dict[str, str] | None:
        # An evaluation from before the first scrape reads VaeServerAbsent pending: wait for a later one.
        nonlocal states
        states = {
            name: rule["state"] for name, rule in loaded_rules(prometheus).items() if name in QUIET_ALERTS
        }
        return states if set(states.values()) == {"inactive"} else None

    wait_for(
        all_inactive, "the alerts the test controls to read inactive", prometheus.why_dead, lambda: states
    )


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets") or []:
            queries.append((panel["title"], target["expr"]))
    return queries


@pytest.mark.parametrize(
    ("panel", "expr"), dashboard_queries(), ids=[title for title, _ in dashboard_queries()]
)
def test_every_dashboard_query_returns_series(scraped: Scraped, panel: str, expr: str) -> None:
    # Grafana's variables, as it fills them for "All replicas" and a 1 s scrape interval.
    promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
    result = scraped.prometheus.query(promql)
    assert result, f"panel {panel!r}: {promql} returned no series"


HPA_QUEUE_WAIT = REPO / "deploy" / "k8s" / "examples" / "hpa-queue-wait.yaml"


def adapter_metrics_query() -> str:
    """The prometheus-adapter rule quoted in the custom-metric HPA's header comment, its query filled
    in as the adapter fills it for the HPA's pods."""
    quoted = [
        line.removeprefix("#").removeprefix(" ")
        for line in HPA_QUEUE_WAIT.read_text().splitlines()
        if line.startswith("#")
    ]
    start = quoted.index("  rules:")
    end = quoted.index("", start)
    rule = yaml.safe_load("\n".join(quoted[start:end]))["rules"]["custom"][0]
    query: str = rule["metricsQuery"]
    return query.replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", 'namespace="vae-serving"')


def test_the_queue_wait_hpa_reads_an_idle_pod_as_no_wait_not_nan(
    prometheus_binary: Path, tmp_path: Path
) -> None:
    # One pod's rows waited 10 ms or less for half its requests and 50 ms or less for all of them;
    # the other had no request in the window. promtool evaluates the query on those series.
    busy = {"0.01": "0+10x20", "0.05": "0+20x20", "+Inf": "0+20x20"}
    series = [
        {
            "series": f'vae_queue_wait_seconds_bucket{{namespace="vae-serving", pod="{pod}", le="{le}"}}',
            "values": values if pod == "busy" else "7x20",
        }
        for pod in ("busy", "idle")
        for le, values in busy.items()
    ] + [
        {
            "series": f'vae_queue_wait_seconds_count{{namespace="vae-serving", pod="{pod}"}}',
            "values": "0+20x20" if pod == "busy" else "7x20",
        }
        for pod in ("busy", "idle")
    ]
    expected = [
        {"labels": '{pod="busy"}', "value": 0.042},  # 18th of 20 rows: 8/10 of the way from 10 to 50 ms
        {"labels": '{pod="idle"}', "value": 0},
    ]
    test = {
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": adapter_metrics_query(), "eval_time": "4m", "exp_samples": expected}
                ],
            }
        ]
    }
    test_file = tmp_path / "hpa_test.yml"
    test_file.write_text(yaml.safe_dump(test))
    promtool = prometheus_binary.with_name("promtool")
    result = subprocess.run(
        [str(promtool), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def error_ratio_panels() -> list[tuple[str, str]]:
    return [(panel, expr) for panel, expr in dashboard_queries() if "error ratio" in panel]


@pytest.mark.parametrize(("panel", "expr"), error_ratio_panels(), ids=[t for t, _ in error_ratio_panels()])
def test_an_error_ratio_panel_shows_no_value_for_replicas_without_traffic_not_nan(
    prometheus_binary: Path, tmp_path: Path, panel: str, expr: str
) -> None:
    # 0/0 would be NaN: Grafana draws a stat of "NaN" on a quiet service.
    series = [
        {
            "series": f'vae_requests_total{{job="vae", instance="a", rpc="Sample", code="{code}"}}',
            "values": "7x20",
        }
        for code in ("OK", "INTERNAL")
    ]
    promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
    test = {
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [{"expr": promql, "eval_time": "4m", "exp_samples": []}],
            }
        ]
    }
    test_file = tmp_path / "quiet_test.yml"
    test_file.write_text(yaml.safe_dump(test))
    promtool = prometheus_binary.with_name("promtool")
    result = subprocess.run(
        [str(promtool), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"panel {panel!r}: " + result.stdout + result.stderr
