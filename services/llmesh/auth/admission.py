"""Admission and settlement: the allow-list, the reservation, and exactly-once usage recording.

`admit` reserves a request's worst case on its key's and user's counters; `record` writes the
ledger row (once per request id, credits charged in the same transaction) and settles the
reservation to the real usage. A reservation nobody settles is recorded by `sweep` after the
timeout, charging the prompt part only (what a worker that crashed before reporting used).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from llmesh.auth.apikeys import model_allowed
from llmesh.auth.ledger import OUTCOMES, Ledger, UsageRecord, check_request_id
from llmesh.auth.limiter import BudgetUnseeded, Limiter, Reservation, Scope
from llmesh.auth.principal import Principal
from llmesh.auth.request_body import Demand
from llmesh.auth.schema import ID_LEN
from llmesh.common.errors import DependencyDown, Forbidden, InvalidRequest

log = logging.getLogger(__name__)

MAX_TOKENS_PER_REQUEST = 10_000_000


@dataclass(frozen=True)
class Usage:
    """What a finished request reports."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str
    worker_id: str = ""
    # Used only when no reservation names them (a request admitted by no Check).
    user_id: str = ""
    key_id: str = ""
    model: str = ""


class Admission:
    """Reserve before, settle after."""

    def __init__(
        self, limiter: Limiter, ledger: Ledger, *, credits_per_token: float, reservation_timeout_s: float
    ) -> None:
        self._limiter = limiter
        self._ledger = ledger
        self._rate = credits_per_token
        self._timeout = reservation_timeout_s

    @property
    def limiter(self) -> Limiter:
        return self._limiter

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def cost(self, tokens: int) -> int:
        """Credits for `tokens` tokens (rounded up: a partial credit is a credit)."""
        return math.ceil(tokens * self._rate)

    @staticmethod
    def check_model(principal: Principal, model: str) -> None:
        """Forbidden when the key's allow-list does not cover `model`."""
        if model_allowed(principal.allowed_models, model):
            return
        if not model:
            raise Forbidden("this API key is limited to certain models; name one in the request's `model`")
        raise Forbidden(
            f"this API key may not use model {model!r}; it allows {list(principal.allowed_models)}"
        )

    async def admit(self, principal: Principal, request_id: str, demand: Demand) -> Reservation:
        """Check the allow-list and reserve the worst case; LimitExceeded when a limit is reached."""
        self.check_model(principal, demand.model)
        tokens = min(demand.tokens, MAX_TOKENS_PER_REQUEST)
        scopes = []
        if principal.key_id and principal.key_limits.any():
            scopes.append(Scope("k:" + principal.key_id, principal.key_limits))
        if principal.user_limits.any():
            scopes.append(Scope("u:" + principal.user_id, principal.user_limits))
        limited = principal.credits is not None
        reservation = Reservation(
            request_id=request_id,
            scopes=tuple(scopes),
            tokens=tokens,
            prompt_tokens=min(demand.prompt_tokens, tokens),
            user_id=principal.user_id,
            key_id=principal.key_id,
            model=demand.model,
            credits_account=principal.user_id if limited else "",
            credits_balance=principal.credits or 0,
            credits_cost=self.cost(tokens) if limited else 0,
        )
        for _ in range(len(scopes) + 1):
            try:
                return await self._limiter.reserve(reservation, timeout_s=self._timeout)
            except BudgetUnseeded as missing:
                await self._seed(missing)
        raise DependencyDown("budget counters could not be seeded from the ledger; retry")

    async def _seed(self, missing: BudgetUnseeded) -> None:
        """Start a budget counter from the ledger: a restart or a lost Redis must not reset budgets."""
        kind, _, ident = missing.scope.name.partition(":")
        spent = await asyncio.to_thread(
            self._ledger.spent,
            key_id=ident if kind == "k" else "",
            user_id=ident if kind == "u" else "",
            since_day=missing.since_day,
        )
        await self._limiter.seed_budget(missing.scope.name, missing.period_id, spent)
        log.info("budget counter seeded from the ledger", extra={"scope": missing.scope.name, "spent": spent})

    async def record(self, usage: Usage) -> tuple[bool, int]:
        """Write the ledger row and settle; (False, 0) when this request id was already recorded."""
        check_request_id(usage.request_id)
        if usage.outcome not in OUTCOMES:
            raise InvalidRequest(f"outcome {usage.outcome!r} is not one of {list(OUTCOMES)}")
        if max(usage.prompt_tokens, usage.completion_tokens) > MAX_TOKENS_PER_REQUEST:
            raise InvalidRequest(f"token counts above {MAX_TOKENS_PER_REQUEST} are not plausible")
        reservation = await self._limiter.get(usage.request_id)
        user_id = reservation.user_id if reservation else usage.user_id
        key_id = reservation.key_id if reservation else usage.key_id
        model = (reservation.model if reservation else "") or usage.model
        if not user_id:
            existing = await asyncio.to_thread(self._ledger.get, usage.request_id)
            if existing is not None:
                return False, 0
            raise InvalidRequest(
                f"request id {usage.request_id} has no reservation (not admitted by Check, or settled "
                "long ago); pass principal.user_id to record it anyway"
            )
        if len(user_id) > ID_LEN or len(key_id) > ID_LEN:
            raise InvalidRequest("principal.user_id and principal.key_id are ids of at most 32 characters")
        tokens = usage.prompt_tokens + usage.completion_tokens
        limited = reservation.credits_account != "" if reservation else True
        credits = self.cost(tokens) if limited else 0
        record = UsageRecord(
            request_id=usage.request_id,
            user_id=user_id,
            key_id=key_id,
            model=model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            credits=credits,
            outcome=usage.outcome,
            worker_id=usage.worker_id,
        )
        recorded = await asyncio.to_thread(self._ledger.record, record)
        if not recorded:
            # A repeat. If the first call died between the ledger and the limiter, finish its job
            # with the recorded numbers (settle is a no-op when the reservation is gone).
            first = await asyncio.to_thread(self._ledger.get, usage.request_id)
            if first is not None:
                await self._limiter.settle(
                    usage.request_id, first.prompt_tokens + first.completion_tokens, first.credits
                )
            return False, 0
        settled = await self._limiter.settle(usage.request_id, tokens, credits)
        if settled is None and credits:
            await self._limiter.add_credits(user_id, -credits)
        return True, credits

    async def sweep(self, now: float | None = None) -> int:
        """Record every overdue reservation (prompt part charged, outcome 'expired')."""
        count = 0
        for request_id in await self._limiter.overdue(time.time() if now is None else now):
            reservation = await self._limiter.get(request_id)
            if reservation is None:
                continue
            recorded, _ = await self.record(
                Usage(
                    request_id=request_id,
                    prompt_tokens=reservation.prompt_tokens,
                    completion_tokens=0,
                    outcome="expired",
                )
            )
            count += int(recorded)
            log.warning(
                "reservation expired unsettled; charged its prompt estimate",
                extra={"request_id": request_id, "prompt_tokens": reservation.prompt_tokens},
            )
        return count
