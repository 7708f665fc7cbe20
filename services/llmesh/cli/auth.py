"""`llmesh auth`: operator commands on AuthService's database (users, API keys, usage).

They work on the database directly (migrating it first), so they also work before the stack
runs, e.g. to hand out the first keys. Secrets are printed once, to stdout, and stored only as
hashes.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from datetime import timedelta
from pathlib import Path

from llmesh.auth import migrate
from llmesh.auth.apikeys import ApiKeyStore, load_or_create_secret
from llmesh.auth.db import make_engine
from llmesh.auth.ledger import Ledger
from llmesh.auth.principal import PERIODS, ROLE_ADMIN, ROLE_USER, Limits
from llmesh.auth.users import UserStore
from llmesh.common.config import LlmeshConfig
from llmesh.common.errors import LlmeshError

_BUDGET = re.compile(r"^(\d+)(?:/(\w+))?$")


def parse_budget(text: str) -> tuple[int, str]:
    """'50000/month' -> (50000, 'month'); a bare number is a lifetime budget."""
    match = _BUDGET.match(text.strip())
    if match is None or (match.group(2) or "none") not in PERIODS:
        raise argparse.ArgumentTypeError(
            f"budget {text!r} must be N or N/PERIOD with PERIOD one of {', '.join(p for p in PERIODS if p != 'none')}"
        )
    return int(match.group(1)), match.group(2) or "none"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path(".llmesh"), help="SQLite file location")
    sub = parser.add_subparsers(dest="auth_command", required=True, metavar="ACTION")

    key = sub.add_parser("create-key", help="create an API key for a user; the key is printed once")
    key.add_argument("--user", required=True, help="username of the key's owner")
    key.add_argument("--name", default="", help="a name to recognise the key by")
    key.add_argument(
        "--models", action="append", default=[], help="allowed model glob (repeatable), e.g. 'tiny-*'"
    )
    key.add_argument("--rpm", type=int, default=0, help="requests per minute (0: none)")
    key.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: none)")
    key.add_argument("--budget", type=parse_budget, help="token budget, e.g. 50000/month (day, week, month)")
    key.add_argument(
        "--max-parallel",
        "--parallel",
        dest="max_parallel",
        type=int,
        default=0,
        help="requests in flight at once (0: none)",
    )
    key.add_argument("--ttl-days", type=float, default=0, help="expire after this many days (0: never)")

    user = sub.add_parser(
        "create-user", help="create a user; the password is generated and printed unless given"
    )
    user.add_argument("username")
    user.add_argument("--admin", action="store_true", help="role admin (default: user)")
    user.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    user.add_argument(
        "--credits", type=int, help="token credits (default: auth.default_credits; -1 unlimited)"
    )

    usage = sub.add_parser("usage", help="usage totals by day, user, key and model")
    usage.add_argument("--user", default="", help="username")
    usage.add_argument("--key-id", default="", help="API key id")
    usage.add_argument("--model", default="")
    usage.add_argument("--since", default="", help="first day, YYYY-MM-DD")
    usage.add_argument("--until", default="", help="last day, YYYY-MM-DD")
    usage.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def auth_main(args: argparse.Namespace, cfg: LlmeshConfig) -> int:
    from llmesh.cli.serve import database_url

    url = database_url(cfg, args.data_dir)
    try:
        migrate.upgrade(url)
        engine = make_engine(url)
        try:
            users = UserStore(engine)
            if args.auth_command == "create-key":
                return _create_key(
                    args, users, ApiKeyStore(engine, load_or_create_secret(engine, cfg.auth.key_secret))
                )
            if args.auth_command == "create-user":
                return _create_user(args, cfg, users)
            return _usage(args, users, Ledger(engine))
        finally:
            engine.dispose()
    except LlmeshError as error:
        print(f"llmesh auth: {error.message}", file=sys.stderr)
        return 1


def _create_key(args: argparse.Namespace, users: UserStore, keys: ApiKeyStore) -> int:
    owner = users.get_by_name(args.user)
    if owner is None:
        print(
            f"llmesh auth: no user {args.user!r}; create it with `llmesh auth create-user`", file=sys.stderr
        )
        return 1
    budget, period = args.budget or (0, "none")
    limits = Limits(
        rpm=args.rpm, tpm=args.tpm, budget_tokens=budget, budget_period=period, max_parallel=args.max_parallel
    )
    key, secret = keys.create(
        owner.user_id,
        name=args.name,
        allowed_models=tuple(args.models),
        limits=limits,
        ttl=timedelta(days=args.ttl_days) if args.ttl_days else None,
    )
    print(secret)
    print(
        f"key id {key.key_id} for {owner.username}; models {list(key.allowed_models) or 'all'}; "
        "the key is shown only now",
        file=sys.stderr,
    )
    return 0


def _create_user(args: argparse.Namespace, cfg: LlmeshConfig, users: UserStore) -> int:
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else secrets.token_urlsafe(18)
    credits = cfg.auth.default_credits if args.credits is None else args.credits
    user = users.create(
        args.username,
        password,
        role=ROLE_ADMIN if args.admin else ROLE_USER,
        credits=None if credits < 0 else credits,
        limits=Limits(
            rpm=cfg.auth.default_rpm, tpm=cfg.auth.default_tpm, max_parallel=cfg.auth.default_max_parallel
        ),
    )
    print(f"user {user.username} ({user.role}) id {user.user_id}")
    if not args.password_stdin:
        print(f"password: {password}  (shown only now)")
    return 0


def _usage(args: argparse.Namespace, users: UserStore, ledger: Ledger) -> int:
    user_id = ""
    if args.user:
        found = users.get_by_name(args.user)
        if found is None:
            print(f"llmesh auth: no user {args.user!r}", file=sys.stderr)
            return 1
        user_id = found.user_id
    rows = ledger.totals(
        user_id=user_id, key_id=args.key_id, model=args.model, start=args.since, end=args.until
    )
    if args.json:
        for r in rows:
            print(json.dumps(r.__dict__))
        return 0
    names = {u.user_id: u.username for u in users.list(limit=100_000)}
    header = ("day", "user", "key", "model", "requests", "prompt", "completion", "credits")
    table = [header] + [
        (
            r.day,
            names.get(r.user_id, r.user_id),
            r.key_id[:8] or "-",
            r.model,
            str(r.requests),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            str(r.credits),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
