"""The shared limiter: counters in Redis, each reserve and settle one Lua script (atomic).

Keys live under one prefix with a hash tag, so on Redis Cluster they share a slot and the
scripts stay legal. The reservation itself is kept in Redis too, so any replica can settle it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmesh.auth.limiter import (
    BudgetUnseeded,
    Limiter,
    LimitExceeded,
    Reservation,
    period_of,
    period_start_day,
    prepared,
)
from llmesh.common.errors import DependencyDown, OverCapacity

DEFAULT_PREFIX = "llmesh:{auth}:"
# Period budget counters outlive the longest period (a month); a lost one is re-seeded from the ledger.
BUDGET_TTL_S = 40 * 86400

# ARGV[1]: key prefix, ARGV[2]: the prepared reservation (JSON), ARGV[3]: now (seconds),
# ARGV[4]: the user's credits in SQL (seeds the live balance), ARGV[5]: budget counter TTL.
RESERVE = """
local pre = ARGV[1]
local r = cjson.decode(ARGV[2])
local now = tonumber(ARGV[3])
local res = pre .. 'res:' .. r.request_id
if redis.call('EXISTS', res) == 1 then return {'dup'} end
local second = now - r.minute * 60
for _, s in ipairs(r.scopes) do
  local l = s.limits
  if l.rpm > 0 then
    local k = pre .. 'rpm:' .. s.name
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - 60)
    if redis.call('ZCARD', k) >= l.rpm then
      local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
      return {'refused', 'rpm', s.name, tostring(tonumber(oldest[2]) + 60 - now)}
    end
  end
  if l.tpm > 0 then
    local cur = tonumber(redis.call('GET', pre .. 'tpm:' .. s.name .. ':' .. r.minute) or '0')
    local prev = tonumber(redis.call('GET', pre .. 'tpm:' .. s.name .. ':' .. (r.minute - 1)) or '0')
    if prev * (1 - second / 60) + cur + r.tokens > l.tpm then
      return {'refused', 'tpm', s.name, tostring(60 - second)}
    end
  end
  if l.budget_tokens > 0 then
    local used = redis.call('GET', pre .. 'bud:' .. s.name .. ':' .. r.periods[s.name])
    if not used then return {'unseeded', s.name, r.periods[s.name]} end
    if tonumber(used) + r.tokens > l.budget_tokens then
      return {'refused', 'budget', s.name, ''}
    end
  end
  if l.max_parallel > 0 then
    if tonumber(redis.call('GET', pre .. 'par:' .. s.name) or '0') >= l.max_parallel then
      return {'refused', 'parallel', s.name, '1'}
    end
  end
end
if r.credits_account ~= '' then
  local k = pre .. 'cred:' .. r.credits_account
  redis.call('SET', k, ARGV[4], 'NX')
  if tonumber(redis.call('GET', k)) < r.credits_cost then
    return {'refused', 'credits', 'u:' .. r.credits_account, ''}
  end
  redis.call('DECRBY', k, r.credits_cost)
end
for _, s in ipairs(r.scopes) do
  local l = s.limits
  if l.rpm > 0 then
    local k = pre .. 'rpm:' .. s.name
    redis.call('ZADD', k, now, r.request_id)
    redis.call('EXPIRE', k, 61)
  end
  if l.tpm > 0 then
    local k = pre .. 'tpm:' .. s.name .. ':' .. r.minute
    redis.call('INCRBY', k, r.tokens)
    redis.call('EXPIRE', k, 180)
  end
  if l.budget_tokens > 0 then
    local k = pre .. 'bud:' .. s.name .. ':' .. r.periods[s.name]
    redis.call('INCRBY', k, r.tokens)
    if r.periods[s.name] ~= 'all' then redis.call('EXPIRE', k, tonumber(ARGV[5])) end
  end
  if l.max_parallel > 0 then
    redis.call('INCR', pre .. 'par:' .. s.name)
  end
end
redis.call('SET', res, ARGV[2])
redis.call('ZADD', pre .. 'deadlines', r.deadline, r.request_id)
return {'ok'}
"""

# ARGV[1]: prefix, ARGV[2]: request id, ARGV[3]: real tokens, ARGV[4]: real credits.
SETTLE = """
local pre = ARGV[1]
local res = pre .. 'res:' .. ARGV[2]
local body = redis.call('GET', res)
if not body then return false end
local r = cjson.decode(body)
local delta = tonumber(ARGV[3]) - r.tokens
local function adjust(k, d)
  if redis.call('EXISTS', k) == 1 then
    if tonumber(redis.call('INCRBY', k, d)) < 0 then redis.call('SET', k, 0, 'KEEPTTL') end
  end
end
for _, s in ipairs(r.scopes) do
  local l = s.limits
  if l.tpm > 0 then adjust(pre .. 'tpm:' .. s.name .. ':' .. r.minute, delta) end
  if l.budget_tokens > 0 then adjust(pre .. 'bud:' .. s.name .. ':' .. r.periods[s.name], delta) end
  if l.max_parallel > 0 then adjust(pre .. 'par:' .. s.name, -1) end
end
if r.credits_account ~= '' then
  local k = pre .. 'cred:' .. r.credits_account
  if redis.call('EXISTS', k) == 1 then redis.call('INCRBY', k, r.credits_cost - tonumber(ARGV[4])) end
end
redis.call('DEL', res)
redis.call('ZREM', pre .. 'deadlines', ARGV[2])
return body
"""

ADD_CREDITS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return false
"""


class RedisLimiter(Limiter):
    """Counters shared by every AuthService replica through one Redis."""

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX, clock: Any = time.time
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._clock = clock
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)
        self._add_credits = client.register_script(ADD_CREDITS)
        self.description = f"Redis limiter at {_shown(client)} (limits shared by every replica)"

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> RedisLimiter:
        return cls(aioredis.Redis.from_url(url), prefix=prefix)

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as e:
            raise DependencyDown(f"cannot reach Redis at {_shown(self._redis)}: {e}") from None

    async def reserve(self, reservation: Reservation, *, timeout_s: float) -> Reservation:
        now = self._clock()
        r = prepared(reservation, now, timeout_s)
        body = json.dumps(r.to_json())
        try:
            out = await self._reserve(
                args=[self._prefix, body, repr(now), str(r.credits_balance), str(BUDGET_TTL_S)]
            )
        except (RedisError, OSError) as e:
            raise DependencyDown(f"Redis limiter unavailable: {e}") from None
        status = _s(out[0])
        if status == "ok":
            return r
        if status == "unseeded":
            unseeded = next(s for s in r.scopes if s.name == _s(out[1]))
            raise BudgetUnseeded(unseeded, _s(out[2]), period_start_day(unseeded.limits.budget_period, now))
        if status == "dup":
            raise OverCapacity(f"request id {r.request_id} already holds a reservation")
        limit, scope, retry = _s(out[1]), _s(out[2]), _s(out[3])
        if limit == "budget":
            lim = next(s.limits for s in r.scopes if s.name == scope)
            retry_s = period_of(lim.budget_period, now)[1]
        elif limit == "credits":
            retry_s = 3600.0
        else:
            retry_s = float(retry)
        raise LimitExceeded(limit, scope, retry_s)

    async def seed_budget(self, scope: str, period_id: str, tokens: int) -> None:
        key = f"{self._prefix}bud:{scope}:{period_id}"
        try:
            if period_id == "all":
                await self._redis.set(key, tokens, nx=True)
            else:
                await self._redis.set(key, tokens, nx=True, ex=BUDGET_TTL_S)
        except (RedisError, OSError) as e:
            raise DependencyDown(f"Redis limiter unavailable: {e}") from None

    async def settle(self, request_id: str, tokens: int, credits: int) -> Reservation | None:
        try:
            body = await self._settle(args=[self._prefix, request_id, str(tokens), str(credits)])
        except (RedisError, OSError) as e:
            raise DependencyDown(f"Redis limiter unavailable: {e}") from None
        return None if body is None else Reservation.from_json(json.loads(body))

    async def get(self, request_id: str) -> Reservation | None:
        try:
            body = await self._redis.get(self._prefix + "res:" + request_id)
        except (RedisError, OSError) as e:
            raise DependencyDown(f"Redis limiter unavailable: {e}") from None
        return None if body is None else Reservation.from_json(json.loads(body))

    async def overdue(self, now: float, limit: int = 100) -> list[str]:
        try:
            ids = await self._redis.zrangebyscore(self._prefix + "deadlines", "-inf", now, start=0, num=limit)
        except (RedisError, OSError) as e:
            raise DependencyDown(f"Redis limiter unavailable: {e}") from None
        return [_s(i) for i in ids]

    async def add_credits(self, user_id: str, delta: int) -> None:
        try:
            await self._add_credits(keys=[self._prefix + "cred:" + user_id], args=[str(delta)])
        except (RedisError, OSError) as e:
            raise DependencyDown(f"Redis limiter unavailable: {e}") from None

    async def close(self) -> None:
        await self._redis.aclose()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shown(client: aioredis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
