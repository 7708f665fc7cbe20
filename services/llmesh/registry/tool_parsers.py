"""Which tool parser names the catalog accepts (`engine.tool_parser`).

One source of truth: vLLM's own registry (`ToolParserManager`, what the worker's vLLM engine looks
the name up in). Importing vLLM costs ~10 s and ~600 MB (it pulls in torch), so the registry never
imports it: it asks a child Python once per process and keeps the answer. A control-plane install
has no vLLM; then any identifier-like name is accepted here and the worker that loads the model
refuses an unknown one at start-up (llmesh.worker.vllm_engine).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import subprocess
import sys
import threading

from llmesh.common.errors import InvalidRequest

log = logging.getLogger(__name__)

# vLLM's parser names are lower-case words with _ and - ("llama3_json", "granite-20b-fc").
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The only engine that runs vLLM's tool parsers.
PARSER_ENGINE = "vllm"

_MARK = "LLMESH_TOOL_PARSERS="
_PROBE = (
    "import json\n"
    "from llmesh.worker.tool_calls import vllm_tool_parser_names\n"
    f"print({_MARK!r} + json.dumps(vllm_tool_parser_names()))\n"
)
_PROBE_TIMEOUT_S = 300.0

_lock = threading.Lock()
_known: list[tuple[str, ...] | None] = []


def _probe_vllm() -> tuple[str, ...] | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot list vLLM's tool parsers (%s); accepting any identifier-like name", e)
        return None
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            return tuple(json.loads(line.removeprefix(_MARK)))
    log.warning(
        "cannot list vLLM's tool parsers (exit %s: %s); accepting any identifier-like name",
        done.returncode,
        (done.stderr.strip().splitlines() or ["no output"])[-1],
    )
    return None


def vllm_tool_parsers() -> tuple[str, ...] | None:
    """vLLM's tool parser names, sorted; None where vLLM is not installed (or cannot be asked).
    Blocks for the child process on the first call only: call it off the event loop."""
    with _lock:
        if not _known:
            _known.append(_probe_vllm())
        return _known[0]


def check_tool_parser(name: str, engine: str, known: tuple[str, ...] | None, where: str) -> str:
    """`name` if `engine` can use it and it is one of `known` (any identifier-like name when None)."""
    if not name:
        return name
    if engine != PARSER_ENGINE:
        raise InvalidRequest(
            f"{where} {name!r}: engine {engine!r} cannot use a tool parser; only {PARSER_ENGINE!r} runs "
            "vLLM's tool parsers (leave it empty)"
        )
    if known is not None and name not in known:
        raise InvalidRequest(f"{where} {name!r} is not one of vLLM's tool parsers {list(known)}")
    if known is None and not NAME_RE.match(name):
        raise InvalidRequest(
            f"{where} {name!r} is not a tool parser name: 1..64 letters, digits and _ . - "
            "(such as 'hermes' or 'llama3_json')"
        )
    return name
