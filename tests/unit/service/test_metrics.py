"""The service's metrics as Prometheus reads them: the names and labels that deploy/ relies on, and the
histogram buckets that its quantiles and alert thresholds are computed from. Read from the registry,
with no server."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Histogram

from service.metrics import ServiceMetrics

RULES = Path(__file__).parents[3] / "deploy" / "prometheus" / "rules" / "vae.yml"
LATENCY_BOUNDS = ["0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5"]
LATENCY_BOUNDS += ["1.0", "2.5", "5.0", "10.0", "+Inf"]


def documented_series() -> dict[str, list[str]]:
    """The series the rules file's header names, each with its labels in order: `vae_batch_size{graph}`."""
    header = RULES.read_text().split("\ngroups:")[0]
    return {name: labels.split(",") for name, labels in re.findall(r"(vae_\w+)\{([\w,]+)\}", header)}


def bucket_counts(registry: CollectorRegistry, metric: str) -> dict[str, float]:
    """Each `le` bound of one labelled histogram, with the observations at or below it."""
    return {
        sample.labels["le"]: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == f"{metric}_bucket"
    }


def test_every_metric_has_the_documented_name_and_labels_in_the_order_the_service_passes_them() -> None:
    """The service fills labels by position (`labels(rpc, code.name)`): a label list declared in
    another order would file each value under another label's name."""
    metrics = ServiceMetrics.create(process=False)
    documented = documented_series()
    collectors = {
        collector.describe()[0].name: collector
        for collector in (
            getattr(metrics, f.name) for f in dataclasses.fields(metrics) if f.name != "registry"
        )
    }
    assert sorted(collectors) == sorted(name.removesuffix("_total") for name in documented)
    for name, labels in documented.items():
        collector = collectors[name.removesuffix("_total")]
        child = collector.labels(*labels)  # each label's value is its own documented name
        (child.observe if isinstance(collector, Histogram) else child.inc)(1)
        sample = f"{name}_count" if isinstance(collector, Histogram) else name
        assert metrics.registry.get_sample_value(sample, dict(zip(labels, labels, strict=True))) == 1, name


def test_batch_sizes_are_counted_in_power_of_two_buckets_from_1_to_2048() -> None:
    metrics = ServiceMetrics.create(process=False)
    for rows in (1, 3, 16, 17, 2048, 4096):
        metrics.batch_size.labels("encoder").observe(rows)
    below = {1: 1, 2: 1, 4: 2, 8: 2, 16: 3, 32: 4, 64: 4, 128: 4, 256: 4, 512: 4, 1024: 4, 2048: 5}
    expected = {f"{float(bound)}": count for bound, count in below.items()} | {"+Inf": 6}
    assert bucket_counts(metrics.registry, "vae_batch_size") == expected


def test_latencies_are_counted_in_buckets_from_half_a_millisecond_to_ten_seconds() -> None:
    metrics = ServiceMetrics.create(process=False)
    metrics.request_duration.labels("Encode").observe(0.25)  # a bound counts in its own bucket
    metrics.queue_wait.labels("encoder").observe(0.0004)
    metrics.inference_duration.labels("encoder").observe(11)
    for metric, first in [
        ("vae_request_duration_seconds", "0.25"),
        ("vae_queue_wait_seconds", "0.0005"),
        ("vae_inference_duration_seconds", "+Inf"),
    ]:
        counts = bucket_counts(metrics.registry, metric)
        assert list(counts) == LATENCY_BOUNDS, metric
        assert counts == {le: float(i >= LATENCY_BOUNDS.index(first)) for i, le in enumerate(counts)}, metric


def test_every_latency_alert_threshold_is_a_bucket_bound() -> None:
    """histogram_quantile interpolates within a bucket: a threshold between two bounds would fire on a
    guess rather than on a count."""
    metrics = ServiceMetrics.create(process=False)
    metrics.request_duration.labels("Encode").observe(1)
    metrics.queue_wait.labels("encoder").observe(1)
    alerts = [
        rule["expr"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    thresholds = [re.search(r":(vae_\w+_seconds):p\d+_5m\S*\s*>\s*([\d.]+)", expr) for expr in alerts]
    found = [(match[1], match[2]) for match in thresholds if match]
    assert sorted(found) == [("vae_queue_wait_seconds", "0.25"), ("vae_request_duration_seconds", "0.5")]
    for metric, threshold in found:
        assert str(float(threshold)) in bucket_counts(metrics.registry, metric), metric
