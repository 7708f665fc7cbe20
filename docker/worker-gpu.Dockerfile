# syntax=docker/dockerfile:1
# llmesh GPU worker: ModelService inference + WorkerService on vLLM (CUDA). The CUDA runtime comes
# with PyPI's torch/vLLM wheels; the node supplies the driver (NVIDIA container toolkit).
#   docker build -f docker/worker-gpu.Dockerfile -t llmesh/worker-gpu:dev .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/llmesh
COPY pyproject.toml README.md ./
COPY services services
COPY gen gen
COPY envoy/llmesh envoy/llmesh
COPY bench/llmesh bench/llmesh
RUN /opt/llmesh/bin/pip install --no-cache-dir ".[gpu]" \
    && /opt/llmesh/bin/python -c "import vllm"
COPY --chmod=0755 docker/worker_entrypoint.py /opt/llmesh/bin/llmesh-worker

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llmesh GPU worker (vLLM)" \
      org.opencontainers.image.source="llmesh" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 llmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin llmesh
COPY --from=build /opt/llmesh /opt/llmesh
ENV PATH=/opt/llmesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    HF_HUB_OFFLINE=1
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["llmesh-worker"]
