"""What kubernetes-validate cannot see: the rendered manifests agree with each other and with the server.

    check_k8s.py RENDERED.yaml...

Schemas say a field is well-formed; this says the numbers and names line up: the termination grace
period covers the preStop sleep plus the server's drain, Services and the PodDisruptionBudget select
the Deployment's pods, the HPA scales a Deployment that exists, a GPU Deployment rolls out without
an extra GPU, and every container runs non-root on a read-only root filesystem with a pinned image.
Run by deploy/check.sh with PyYAML from its tools venv.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]


def env_value(container: Manifest, name: str) -> str | None:
    for variable in container.get("env", []):
        if variable["name"] == name:
            return str(variable.get("value"))
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def check_pod(where: str, pod: Manifest, problems: list[str]) -> None:
    security = pod.get("securityContext", {})
    if not security.get("runAsNonRoot"):
        problems.append(f"{where}: the pod does not set securityContext.runAsNonRoot: true")
    for container in pod.get("initContainers", []) + pod["containers"]:
        name = f"{where} container {container['name']}"
        image = container["image"]
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            problems.append(f"{name}: image {image!r} has no pinned tag")
        context = container.get("securityContext", {})
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: expected readOnlyRootFilesystem: true")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: expected allowPrivilegeEscalation: false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{name}: expected capabilities.drop: [ALL]")
        if "resources" not in container or "requests" not in container["resources"]:
            problems.append(f"{name}: expected resource requests")


def check_server(where: str, deployment: Manifest, problems: list[str]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if "grpc" not in server.get(probe, {}):
            problems.append(f"{where}: expected a native gRPC {probe}")
    grace = env_value(server, "VAE_SERVE_GRACE_PERIOD_S")
    if grace is None:
        problems.append(f"{where}: VAE_SERVE_GRACE_PERIOD_S is not set, so the drain time is implicit")
        return
    pre_stop = server.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    needed = pre_stop + float(grace)
    termination = pod.get("terminationGracePeriodSeconds", 30)
    if termination <= needed:
        problems.append(
            f"{where}: terminationGracePeriodSeconds {termination} does not cover the preStop sleep "
            f"({pre_stop} s) plus the server's drain (VAE_SERVE_GRACE_PERIOD_S={grace}): expected more "
            f"than {needed:g}"
        )
    if env_value(server, "VAE_SERVE_MAX_CONNECTION_AGE_S") in (None, "0"):
        problems.append(f"{where}: VAE_SERVE_MAX_CONNECTION_AGE_S is unset, so clients never rebalance")
    strategy = deployment["spec"].get("strategy", {})
    # Kubernetes' default rolling update surges by 25%; Recreate never surges.
    rolling = strategy.get("rollingUpdate", {})
    surge = 0 if strategy.get("type") == "Recreate" else rolling.get("maxSurge", "25%")
    if server.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") and str(surge) not in ("0", "0%"):
        problems.append(
            f"{where}: maxSurge {surge} on GPU replicas: a rollout then needs one GPU more than the "
            "replicas hold, and stalls once every GPU is taken; expected maxSurge 0"
        )


def check_file(path: Path) -> list[str]:
    manifests = [m for m in yaml.safe_load_all(path.read_text()) if m]
    by_kind: dict[str, list[Manifest]] = {}
    for manifest in manifests:
        by_kind.setdefault(manifest["kind"], []).append(manifest)
    problems: list[str] = []
    deployments = by_kind.get("Deployment", [])
    pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deployments}
    for deployment in deployments:
        where = f"{path.name}: Deployment/{deployment['metadata']['name']}"
        if not selects(
            deployment["spec"]["selector"]["matchLabels"], pod_labels[deployment["metadata"]["name"]]
        ):
            problems.append(f"{where}: the selector does not match the pod template's labels")
        check_pod(where, deployment["spec"]["template"]["spec"], problems)
        check_server(where, deployment, problems)
    for job in by_kind.get("Job", []):
        check_pod(f"{path.name}: Job/{job['metadata']['name']}", job["spec"]["template"]["spec"], problems)
    for kind, selector_of in (
        ("Service", lambda m: m["spec"].get("selector", {})),
        ("PodDisruptionBudget", lambda m: m["spec"]["selector"]["matchLabels"]),
    ):
        for manifest in by_kind.get(kind, []):
            if not any(selects(selector_of(manifest), labels) for labels in pod_labels.values()):
                problems.append(
                    f"{path.name}: {kind}/{manifest['metadata']['name']} selects no Deployment's pods"
                )
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        if target["kind"] != "Deployment" or target["name"] not in pod_labels:
            problems.append(
                f"{path.name}: HorizontalPodAutoscaler/{hpa['metadata']['name']} scales a missing {target}"
            )
    return problems


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: check_k8s.py RENDERED.yaml...", file=sys.stderr)
        return 2
    problems = [problem for path in paths for problem in check_file(Path(path))]
    for problem in problems:
        print(f"check_k8s: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_k8s: {len(paths)} rendered files consistent (grace periods, selectors, security)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
