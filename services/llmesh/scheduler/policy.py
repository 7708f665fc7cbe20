"""Routing policies: given the workers that can take a lease now, which one gets it.

A policy only ranks; the pool has already filtered candidates (serving the model, live, not
cordoned or ejected, not excluded, with free capacity), so any choice is a valid one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from llmesh.common.errors import InvalidRequest, NotImplementedYet
from llmesh.scheduler.v1 import scheduler_service_pb2 as scheduler_pb2

RoutingPolicy = scheduler_pb2.RoutingPolicy

DEFAULT_POLICY = scheduler_pb2.ROUTING_POLICY_LEAST_OUTSTANDING_TOKENS


class Candidate(Protocol):
    """What a policy may look at on a worker."""

    @property
    def worker_id(self) -> str: ...
    @property
    def outstanding_tokens(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def waiting_requests(self) -> int: ...


class Policy(Protocol):
    """Chooses one worker among non-empty `candidates` for a lease on `model`."""

    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate: ...


class LeastOutstandingTokens:
    """Fewest outstanding tokens (prompt + max output of live leases); ties go to fewer leases,
    then to less engine-reported queueing, then by id so the choice is deterministic."""

    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate:
        return min(
            candidates, key=lambda w: (w.outstanding_tokens, w.active, w.waiting_requests, w.worker_id)
        )


class RoundRobin:
    """Each model's leases go to its workers in turn (by id), skipping those without capacity."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        last = self._last.get(model)
        chosen = next((w for w in ordered if last is None or w.worker_id > last), ordered[0])
        self._last[model] = chosen.worker_id
        return chosen


def make_policy(kind: int) -> Policy:
    """The policy implementing `kind`; UNIMPLEMENTED for contract policies not built yet."""
    if kind == scheduler_pb2.ROUTING_POLICY_LEAST_OUTSTANDING_TOKENS:
        return LeastOutstandingTokens()
    if kind == scheduler_pb2.ROUTING_POLICY_ROUND_ROBIN:
        return RoundRobin()
    if kind == scheduler_pb2.ROUTING_POLICY_UNSPECIFIED or kind not in RoutingPolicy.values():
        raise InvalidRequest(
            f"routing policy {kind} is not a policy; use one of {implemented_policy_names()}"
        )
    raise NotImplementedYet(
        f"routing policy {RoutingPolicy.Name(kind)} is not implemented yet; "  # type: ignore[arg-type]
        f"use one of {implemented_policy_names()}"
    )


def implemented_policy_names() -> list[str]:
    """Names of the policies `make_policy` builds."""
    return [
        RoutingPolicy.Name(scheduler_pb2.ROUTING_POLICY_LEAST_OUTSTANDING_TOKENS),
        RoutingPolicy.Name(scheduler_pb2.ROUTING_POLICY_ROUND_ROBIN),
    ]
