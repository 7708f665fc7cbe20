# syntax=docker/dockerfile:1
# llmesh control plane: registry, scheduler (endpoint picker + EDS) and auth. No torch, no engine.
#   docker build -f docker/control-plane.Dockerfile -t llmesh/control-plane:dev .
# Pinned base: an exact Python patch release on Debian 12 (override PYTHON_IMAGE with a digest
# where your registry policy wants one: python:3.11.14-slim-bookworm@sha256:...).
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
# Base dependencies only (the control plane never imports an engine), plus the PostgreSQL driver
# for database.url (postgresql+psycopg://...); MySQL users add pymysql.
RUN /opt/llmesh/bin/pip install --no-cache-dir . "psycopg[binary]==3.3.9" \
    && /opt/llmesh/bin/llmesh --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llmesh control plane" \
      org.opencontainers.image.source="llmesh" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 llmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin llmesh
COPY --from=build /opt/llmesh /opt/llmesh
ENV PATH=/opt/llmesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["llmesh"]
CMD ["--help"]
