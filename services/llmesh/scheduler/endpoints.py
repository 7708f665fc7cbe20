"""The workers Envoy may send requests to, served to Envoy by EDS from the scheduler's pool.

The workers cluster's override_host policy only picks among hosts the cluster knows, so the
cluster's membership must follow the pool: the picker names a worker the instant it joins, and a
worker that drains stops getting new requests while its streams finish. The scheduler already has
the membership (the registry watch feeds the pool), so it answers Envoy's endpoint discovery
(state-of-the-world xDS) itself instead of a second control plane or DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator

from envoy.config.core.v3 import address_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ep
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc
from google.protobuf import any_pb2
from grpc import aio

from llmesh.scheduler.pool import WorkerPool

log = logging.getLogger(__name__)

# The EDS service name of the workers cluster in the edge config (llmesh.edge.workers).
WORKERS_CLUSTER = "llmesh_workers"
TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def split_address(address: str) -> tuple[str, int] | None:
    """("10.0.0.5", 50060) from "10.0.0.5:50060" or "[::1]:50060"; None unless the host is an IP
    (Envoy's endpoints are addresses; workers advertise their IP, e.g. a pod IP)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port)


class WorkerEndpoints:
    """The pool's workers as a versioned ClusterLoadAssignment; the version moves on every change."""

    def __init__(self, pool: WorkerPool, poll_s: float = 0.05) -> None:
        self._pool = pool
        self._poll_s = poll_s
        self._snapshot: tuple[tuple[str, bool], ...] = ()
        self.version = 0
        self._changed = asyncio.Condition()
        self._warned: set[str] = set()

    def _current(self) -> tuple[tuple[str, bool], ...]:
        return tuple(sorted((w.address, w.cordoned) for w in self._pool.workers()))

    async def run(self) -> None:
        """Follow the pool (a cheap comparison every `poll_s`) and wake the EDS streams on change."""
        while True:
            current = self._current()
            if current != self._snapshot:
                self._snapshot = current
                self.version += 1
                async with self._changed:
                    self._changed.notify_all()
            await asyncio.sleep(self._poll_s)

    async def wait_past(self, version: int) -> None:
        """Return once the version differs from `version`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != version)

    def assignment(self) -> endpoint_pb2.ClusterLoadAssignment:
        """Every worker, HEALTHY, or DRAINING when cordoned or draining (no new requests)."""
        endpoints = []
        for address, draining in self._snapshot:
            parts = split_address(address)
            if parts is None:
                if address not in self._warned:
                    self._warned.add(address)
                    log.warning("worker address %s is not ip:port; Envoy cannot route to it", address)
                continue
            endpoints.append(
                ep.LbEndpoint(
                    endpoint=ep.Endpoint(
                        address=address_pb2.Address(
                            socket_address=address_pb2.SocketAddress(address=parts[0], port_value=parts[1])
                        )
                    ),
                    health_status=health_check_pb2.DRAINING if draining else health_check_pb2.HEALTHY,
                )
            )
        return endpoint_pb2.ClusterLoadAssignment(
            cluster_name=WORKERS_CLUSTER, endpoints=[ep.LocalityLbEndpoints(lb_endpoints=endpoints)]
        )


class EndpointDiscovery(eds_pb2_grpc.EndpointDiscoveryServiceServicer):
    """State-of-the-world EDS for the workers cluster: the full assignment on connect and on change."""

    def __init__(self, endpoints: WorkerEndpoints) -> None:
        self._endpoints = endpoints

    def _response(self, version: int) -> discovery_pb2.DiscoveryResponse:
        resource = any_pb2.Any()
        resource.Pack(self._endpoints.assignment())
        return discovery_pb2.DiscoveryResponse(
            version_info=str(version), resources=[resource], type_url=TYPE_URL, nonce=str(version)
        )

    async def StreamEndpoints(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        """Push the workers cluster's endpoints to one Envoy for as long as it stays connected."""
        async for first in request_iterator:
            if first.type_url and first.type_url != TYPE_URL:
                log.warning("EDS request for unexpected type %s", first.type_url)
            break
        else:
            return
        reader = asyncio.create_task(self._read_acks(request_iterator))
        try:
            sent = -1
            while True:
                version = self._endpoints.version
                if version != sent:
                    yield self._response(version)
                    sent = version
                await self._endpoints.wait_past(sent)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_acks(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        async for request in request_iterator:
            if request.HasField("error_detail"):
                log.error(
                    "Envoy rejected workers endpoints version %s: %s",
                    request.response_nonce,
                    request.error_detail.message,
                )
