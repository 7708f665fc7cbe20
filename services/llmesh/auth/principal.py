"""Who is calling, and the limits that apply to them: the values every auth module passes around."""

from __future__ import annotations

from dataclasses import dataclass

ROLE_ADMIN = "admin"
ROLE_USER = "user"
ROLES = (ROLE_ADMIN, ROLE_USER)
PERIODS = ("none", "day", "week", "month")


@dataclass(frozen=True)
class Limits:
    """Limits at one level (a user or a key); 0 means none at this level."""

    rpm: int = 0
    tpm: int = 0
    budget_tokens: int = 0
    budget_period: str = "none"
    max_parallel: int = 0

    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.budget_tokens or self.max_parallel)


NO_LIMITS = Limits()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user, through a JWT or one of their API keys."""

    user_id: str
    username: str
    role: str
    tenant: str
    key_id: str = ""
    # Model name globs the key allows; empty allows every model.
    allowed_models: tuple[str, ...] = ()
    user_limits: Limits = NO_LIMITS
    key_limits: Limits = NO_LIMITS
    # Credits the user has in the database (None: unlimited); live balance is in the limiter.
    credits: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN
