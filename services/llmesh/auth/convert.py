"""Domain values to and from AuthService protobuf messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.auth.apikeys import ApiKey
from llmesh.auth.ledger import UsageTotal
from llmesh.auth.principal import ROLE_ADMIN, ROLE_USER, Limits, Principal
from llmesh.auth.users import User
from llmesh.auth.v1 import auth_service_pb2 as pb
from llmesh.common.errors import InvalidRequest

PERIOD_TO_PROTO = {
    "none": pb.BUDGET_PERIOD_NONE,
    "day": pb.BUDGET_PERIOD_DAY,
    "week": pb.BUDGET_PERIOD_WEEK,
    "month": pb.BUDGET_PERIOD_MONTH,
}
PERIOD_FROM_PROTO = {
    pb.BUDGET_PERIOD_UNSPECIFIED: "none",
    pb.BUDGET_PERIOD_NONE: "none",
    pb.BUDGET_PERIOD_DAY: "day",
    pb.BUDGET_PERIOD_WEEK: "week",
    pb.BUDGET_PERIOD_MONTH: "month",
}
ROLE_TO_PROTO = {ROLE_USER: pb.ROLE_USER, ROLE_ADMIN: pb.ROLE_ADMIN}
ROLE_FROM_PROTO = {pb.ROLE_USER: ROLE_USER, pb.ROLE_ADMIN: ROLE_ADMIN}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def limits_to_proto(limits: Limits) -> pb.Limits:
    return pb.Limits(
        requests_per_minute=limits.rpm,
        tokens_per_minute=limits.tpm,
        budget_tokens=limits.budget_tokens,
        budget_period=PERIOD_TO_PROTO.get(limits.budget_period, pb.BUDGET_PERIOD_UNSPECIFIED),
        max_parallel=limits.max_parallel,
    )


def limits_from_proto(limits: pb.Limits) -> Limits:
    if limits.budget_period not in PERIOD_FROM_PROTO:
        raise InvalidRequest(
            f"limits.budget_period {limits.budget_period} is not a BudgetPeriod (NONE, DAY, WEEK or MONTH)"
        )
    return Limits(
        rpm=limits.requests_per_minute,
        tpm=limits.tokens_per_minute,
        budget_tokens=limits.budget_tokens,
        budget_period=PERIOD_FROM_PROTO[limits.budget_period],
        max_parallel=limits.max_parallel,
    )


def user_to_proto(user: User) -> pb.User:
    return pb.User(
        user_id=user.user_id,
        username=user.username,
        role=ROLE_TO_PROTO.get(user.role, pb.ROLE_UNSPECIFIED),
        # -1: unlimited.
        credits=-1 if user.credits is None else user.credits,
        limits=limits_to_proto(user.limits),
        created_at=timestamp(user.created_at),
        disabled=user.disabled,
    )


def key_to_proto(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=key.key_id,
        name=key.name,
        prefix=key.prefix,
        user_id=key.user_id,
        allowed_models=list(key.allowed_models),
        limits=limits_to_proto(key.limits),
        expires_at=timestamp(key.expires_at),
        created_at=timestamp(key.created_at),
        last_used_at=timestamp(key.last_used_at),
        revoked=key.revoked,
    )


def principal_to_proto(principal: Principal) -> pb.Principal:
    return pb.Principal(
        user_id=principal.user_id,
        key_id=principal.key_id,
        role=ROLE_TO_PROTO.get(principal.role, pb.ROLE_UNSPECIFIED),
        allowed_models=list(principal.allowed_models),
        tenant=principal.tenant,
    )


def usage_to_proto(total: UsageTotal) -> pb.UsageRow:
    return pb.UsageRow(
        date=total.day,
        user_id=total.user_id,
        key_id=total.key_id,
        model=total.model,
        requests=total.requests,
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        credits=total.credits,
    )
