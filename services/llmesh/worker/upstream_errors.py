"""What an upstream LLM API's HTTP failure means to our caller, as a domain error.

Shared by the adapters that call hosted or remote APIs (openai, anthropic). The rule: blame the
caller only for what the caller sent (400 → InvalidRequest, 404 → NotFound); our own credentials
being refused is our configuration, so the caller sees the dependency as down; 429 tells the
caller when to come back; everything else (5xx, timeouts, refused connections) is the upstream
being down.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping

from llmesh.common.errors import DependencyDown, InvalidRequest, LlmeshError, NotFound, OverCapacity

# Statuses worth another attempt, as long as nothing has been streamed yet.
RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})
DEFAULT_RETRY_AFTER_S = 1.0


def error_for_status(
    status: int, detail: str, *, upstream: str, model: str, retry_after_s: float | None = None
) -> LlmeshError:
    """The domain error for an upstream's HTTP `status`; `detail` is the upstream's own message."""
    said = f"{upstream} answered HTTP {status}: {detail}" if detail else f"{upstream} answered HTTP {status}"
    if status in (401, 403):
        return DependencyDown(
            f"{upstream} refused this worker's credentials for {model!r} (HTTP {status}); the API key "
            "configured for the model (models[].api_key or api_key_env) is missing or wrong. "
            "This is a server configuration problem, not the caller's"
        )
    if status == 404:
        return NotFound(f"{said}; check that {model!r} names a model the upstream serves (upstream_model)")
    if status == 429:
        wait = retry_after_s if retry_after_s is not None else DEFAULT_RETRY_AFTER_S
        return OverCapacity(f"{said}; retry in {wait:g}s", retry_after_s=wait)
    if status in (408, 504):
        return DependencyDown(f"{said}; the upstream timed out, retry later or on another worker")
    if 400 <= status < 500:
        return InvalidRequest(f"the upstream rejected the request for {model!r}: {said}")
    return DependencyDown(f"{said}; retry later or on another worker")


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), if given."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lowered:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        value = lowered.get("retry-after")
        if value is None:
            return None
        if value.strip().replace(".", "", 1).isdigit():
            return max(0.0, float(value))
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (ValueError, TypeError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def error_detail(body: bytes | str, limit: int = 500) -> str:
    """The message inside an error body: OpenAI's and Anthropic's {"error": {"message"}}, vLLM's
    {"message"}, or the text itself, cut to `limit` characters."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:limit]
    if isinstance(parsed, dict):
        inner = parsed.get("error", parsed)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:limit]
        if isinstance(inner, str):
            return inner[:limit]
    return text.strip()[:limit]
