# vae-serving: every task a developer or CI runs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Steps in the order written, also under make -j: demo's export must follow the evaluation whose
# figures model.json carries, and each training or test run takes every core anyway.
.NOTPARALLEL:

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(BIN)/pip --disable-pip-version-check
STAMP := $(VENV)/.installed

RUNS := runs
AE_RUN := $(RUNS)/ae
VAE_RUN := $(RUNS)/vae
BUNDLE := $(RUNS)/bundle
EPOCHS ?= 30

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[train,dev]'
	touch $@

setup: $(STAMP) ## create .venv with everything installed (idempotent)

proto: $(STAMP) ## regenerate the Python stubs from proto/ (committed; lint checks drift)
	PATH=$(BIN):$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
		proto/vae/v1/vae.proto

lint: $(STAMP) ## ruff, mypy, and a check that the generated stubs match the proto
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(PY) tools/check_stubs.py

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint deploy-check ## lint, validate the deployment files, then every test
	$(BIN)/pytest

deploy-check: ## validate deploy/ and docker-compose.yml: hadolint, compose config, promtool, kustomize, kubernetes-validate
	bash deploy/check.sh

train: $(VAE_RUN)/checkpoint.pt $(AE_RUN)/checkpoint.pt ## train the VAE and the AE on mnist-5k, unless runs/ has them (EPOCHS=30)

# Order-only on the venv, so reinstalling packages does not retrain; `make clean` does.
$(VAE_RUN)/checkpoint.pt: | $(STAMP)
	$(BIN)/vae-train --model vae --epochs $(EPOCHS) --out $(VAE_RUN)

$(AE_RUN)/checkpoint.pt: | $(STAMP)
	$(BIN)/vae-train --model ae --epochs $(EPOCHS) --out $(AE_RUN)

evaluate: train ## evaluate both runs on the held-out split: runs/evaluation.json and the figures
	$(BIN)/vae-evaluate $(AE_RUN) $(VAE_RUN) --json $(RUNS)/evaluation.json

compare: evaluate ## write the AE-vs-VAE table and figures into docs/ae-vs-vae.md
	$(PY) -m training.report $(RUNS)/evaluation.json --out docs/ae-vs-vae.md

export: $(BUNDLE)/model.json ## export the VAE run to runs/bundle: two ONNX graphs and model.json, parity checked

# And again after each evaluation, whose result model.json carries.
$(BUNDLE)/model.json: $(VAE_RUN)/checkpoint.pt $(wildcard $(VAE_RUN)/metrics.json)
	$(BIN)/vae-export $(VAE_RUN) --out $(BUNDLE)

DEMO_TARGET ?= 127.0.0.1:50051
DEMO_METRICS_PORT ?= 9090

# vae-serve runs in the background; the trap stops it with SIGTERM (a drain) even if a step fails.
demo: train evaluate export ## the main job: train, evaluate, export, serve, call the service
	@set -euo pipefail; \
	$(BIN)/vae-serve --model-dir $(BUNDLE) --host $(firstword $(subst :, ,$(DEMO_TARGET))) \
		--port $(lastword $(subst :, ,$(DEMO_TARGET))) --metrics-port $(DEMO_METRICS_PORT) & server=$$!; \
	trap 'kill -TERM $$server 2>/dev/null || true; wait $$server || true' EXIT; \
	$(BIN)/vae-healthcheck --target $(DEMO_TARGET) --wait 30; \
	$(BIN)/vae-client sample --target $(DEMO_TARGET) -n 64 --seed 1 --out $(RUNS)/grid.png; \
	$(BIN)/vae-client info --target $(DEMO_TARGET); \
	kill -TERM $$server; wait $$server; trap - EXIT; \
	echo "demo: samples in $(RUNS)/grid.png, the evaluation's figures in $(AE_RUN)/figures and $(VAE_RUN)/figures; the service stopped cleanly"

BENCH_VENV := bench/.venv
# The bundle to benchmark: the demo's when there is one, else a quick one (speed does not depend on training).
BENCH_BUNDLE ?= $(if $(wildcard $(BUNDLE)/model.json),$(BUNDLE),$(RUNS)/bench/bundle)

$(VENV)/.bench-installed: $(STAMP)
	$(PIP) install -q -c constraints.txt -e '.[train,dev,bench]'
	touch $@

$(BENCH_VENV)/.installed: bench/requirements.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --disable-pip-version-check -q -r bench/requirements.txt
	touch $@

bench-setup: $(VENV)/.bench-installed $(BENCH_VENV)/.installed ## uvloop in .venv; PyTriton, tritonclient, py-spy in bench/.venv

$(RUNS)/bench/bundle/model.json: | $(STAMP)
	$(BIN)/vae-train --model vae --limit 512 --epochs 1 --no-progress --overwrite --out $(RUNS)/bench/run
	$(BIN)/vae-export $(RUNS)/bench/run --out $(RUNS)/bench/bundle

bench: bench-setup $(BENCH_BUNDLE)/model.json ## the benchmark suite (12-15 min on 2 cores, run it on a quiet machine): docs/BENCHMARKS.md
	$(PY) -m bench.suite --bundle $(BENCH_BUNDLE) --work-dir $(RUNS)/bench --doc docs/BENCHMARKS.md

clean: ## remove runs and caches (keeps .venv)
	rm -rf $(RUNS) .pytest_cache .mypy_cache .ruff_cache

.PHONY: help setup proto lint format test deploy-check train evaluate compare export demo clean bench-setup bench
