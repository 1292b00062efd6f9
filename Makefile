# vae-serving: every task a developer or CI runs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

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

test: lint ## lint, then every test
	$(BIN)/pytest

train: $(STAMP) ## train the AE and the VAE on mnist-5k (EPOCHS=30)
	$(BIN)/vae-train --model vae --epochs $(EPOCHS) --out $(VAE_RUN)
	$(BIN)/vae-train --model ae --epochs $(EPOCHS) --out $(AE_RUN)

evaluate: $(STAMP) ## evaluate both runs: JSON, figures, and the side-by-side comparison
	$(BIN)/vae-evaluate $(AE_RUN) $(VAE_RUN) --json $(RUNS)/evaluation.json

compare: train evaluate ## train both models and write docs/ae-vs-vae.md from the evaluation
	$(PY) -m training.report $(RUNS)/evaluation.json --out docs/ae-vs-vae.md

demo: train evaluate ## the main job: train, evaluate, export, serve, call the service

clean: ## remove runs and caches (keeps .venv)
	rm -rf $(RUNS) .pytest_cache .mypy_cache .ruff_cache

.PHONY: help setup proto lint format test train evaluate compare demo clean
