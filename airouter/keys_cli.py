"""`airouter keys ...`: API keys for the people and programs that share the gateway. The
gateway's admin token opens these commands ($AIROUTER_TOKEN or --token-file).

airouter keys create alice --models 'qwen*' --rpm 60 --tokens-per-day 200000
airouter keys list | revoke NAME | usage [NAME] [--since 2026-12-01]
"""

import argparse
import datetime
import json

from airouter.labels import JSON_HELP, message_json
from airouter.v1 import gateway_pb2_grpc, keys_pb2


def add_keys_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    keys = commands.add_parser("keys", help="API keys with limits (needs the admin token)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser(
        "create", help="make a key; its secret is printed once, as the last line"
    )
    create.add_argument("name", help="who or what the key is for: letters, digits, . _ @ -")
    create.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="model names it may use, shell patterns ('qwen*'); default: all",
    )
    create.add_argument("--rpm", type=int, help="requests a minute")
    create.add_argument("--tpm", type=int, help="prompt and completion tokens a minute")
    create.add_argument("--tokens-per-day", type=int, help="tokens a day (UTC)")
    create.add_argument(
        "--cloud-budget-usd", type=float, help="cloud dollars, all time; then local models only"
    )
    create.add_argument("--expires", type=_date, help="when it stops working: YYYY-MM-DD[THH:MM]")
    listing = actions.add_parser("list", help="every key, without secrets")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    revoke = actions.add_parser("revoke", help="refuse a key from now on (its usage stays)")
    revoke.add_argument("name", help="the key's name, as keys list shows it")
    usage = actions.add_parser("usage", help="requests, tokens and cloud cost per key, day, model")
    usage.add_argument("name", nargs="?", default="", help="one key's (default: every key's)")
    usage.add_argument("--since", type=_day, help="from this day on: YYYY-MM-DD")
    usage.add_argument("--json", action="store_true", help=JSON_HELP)


def run_keys(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> int:
    command = args.keys_command
    if command == "create":
        limits = keys_pb2.KeyLimits(
            models=args.models,
            rpm=args.rpm,
            tpm=args.tpm,
            tokens_per_day=args.tokens_per_day,
            cloud_budget_usd=args.cloud_budget_usd,
        )
        if args.expires is not None:
            limits.expires_at.FromDatetime(args.expires)
        made = stub.CreateKey(keys_pb2.CreateKeyRequest(name=args.name, limits=limits))
        print(f"key {made.key.name} created; its secret is shown this once:")
        print(made.secret)  # the last line, for scripts
        return 0
    if command == "revoke":
        revoked = stub.RevokeKey(keys_pb2.RevokeKeyRequest(name=args.name))
        print(f"key {revoked.key.name} revoked")
        return 0
    if command == "list":
        listed = stub.ListKeys(keys_pb2.ListKeysRequest())
        if args.json:
            print(message_json(listed, indent=2))
            return 0
        print(f"{'NAME':<20} {'HINT':<10} {'STATE':<8} {'CLOUD $':>8}  LIMITS")
        for key in listed.keys:
            state = "revoked" if key.HasField("revoked_at") else "active"
            print(
                f"{key.name:<20} {key.hint + '…':<10} {state:<8} {key.cloud_spent_usd:>8.4f}  "
                f"{_limits_text(key.limits)}"
            )
        return 0
    request = keys_pb2.GetKeyUsageRequest(name=args.name, since_day=args.since or "")
    answer = stub.GetKeyUsage(request)
    if args.json:
        print(message_json(answer, indent=2))
        return 0
    print(f"{'DAY':<11} {'KEY':<20} {'MODEL':<28} {'REQS':>6} {'PROMPT':>9} {'COMPL':>9} {'$':>8}")
    for row in answer.usage:
        print(
            f"{row.day:<11} {row.key:<20} {row.model:<28} {row.requests:>6} "
            f"{row.prompt_tokens:>9} {row.completion_tokens:>9} {row.cloud_cost_usd:>8.4f}"
        )
    return 0


def _limits_text(limits: keys_pb2.KeyLimits) -> str:
    parts = [f"models {','.join(limits.models)}"] if limits.models else []
    for field in ("rpm", "tpm", "tokens_per_day", "cloud_budget_usd"):
        if limits.HasField(field):
            parts.append(f"{field} {getattr(limits, field):g}")
    if limits.HasField("expires_at"):
        parts.append(f"expires {limits.expires_at.ToDatetime().isoformat()}Z")
    return json.dumps(parts)[1:-1].replace('"', "") or "none"


def _date(text: str) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not YYYY-MM-DD[THH:MM]") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _day(text: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not YYYY-MM-DD") from None
