"""`gateway serve`: the one address clients talk to."""

import argparse
import asyncio
import sys

import structlog

from airouter import grpc_server
from airouter.logs import configure_logging
from gateway.server import DEFAULT_LISTEN, DEFAULT_MODELHOST, start_gateway

_log = structlog.get_logger()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="route requests to modelhosts")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT to listen on")
    serve.add_argument(
        "--modelhost",
        action="append",
        metavar="HOST:PORT",
        help=f"a modelhost to route to; repeat for more (default {DEFAULT_MODELHOST})",
    )
    serve.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS")
    serve.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    configure_logging(args.log_level)
    try:
        asyncio.run(_serve(args.listen, args.modelhost or [DEFAULT_MODELHOST], args.shutdown_grace))
    except OSError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(listen: str, modelhosts: list[str], grace_s: float) -> None:
    gateway = await start_gateway(listen, modelhosts)
    _log.info("gateway_serving", listen=listen, port=gateway.port, modelhosts=modelhosts)
    await grpc_server.serve_until_signalled(
        gateway.server, gateway.health, grace_s, gateway.pool.close
    )


if __name__ == "__main__":
    sys.exit(main())
