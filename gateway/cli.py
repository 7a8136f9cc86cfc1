"""`gateway serve`: the one address clients talk to."""

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog

from airouter import add_common_flags, add_log_level_flag, grpc_server
from airouter.config_files import ConfigError
from airouter.logs import configure_logging
from airouter.security import SecurityError, add_security_flags, security_flags
from airouter.tracing import add_tracing_flag, tracing_for
from gateway.config import (
    DEFAULT_LISTEN,
    DEFAULT_MODELHOST,
    STORE_ENV,
    GatewayConfig,
    load_gateway_config,
)
from gateway.database import StoreLocked, StoreUnavailable
from gateway.schema import SchemaTooNew
from gateway.server import RunningGateway, start_gateway

_log = structlog.get_logger()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    add_common_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="route requests to modelhosts")
    serve.add_argument("--config", type=Path, help="gateway.toml; reread on SIGHUP")
    serve.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})")
    serve.add_argument(
        "--modelhost",
        action="append",
        metavar="HOST:PORT",
        help=f"a modelhost to route to; repeat for more (default {DEFAULT_MODELHOST})",
    )
    serve.add_argument(
        "--http-listen",
        help="HOST:PORT of the OpenAI-compatible HTTP edge (default 127.0.0.1:8080)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        metavar="SECONDS",
        help="how long accepted requests may take to finish at shutdown (default 30)",
    )
    serve.add_argument(
        "--store",
        "--batch-db",
        dest="store",
        metavar="PATH|URL",
        help="where batches, files, stored responses, keys and usage live: an SQLite file, "
        "one gateway's alone (a path or sqlite:///path; default "
        "$XDG_STATE_HOME/airouter/batches.sqlite3), or postgresql://user@host/db, shared by "
        f"any number of gateways; else ${STORE_ENV}, else gateway.toml's store",
    )
    add_security_flags(serve)
    serve.add_argument("--modelhost-ca", type=Path, help="CA of the modelhosts' certificates")
    add_tracing_flag(serve)
    add_log_level_flag(serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    configure_logging(args.log_level)
    with tracing_for("airouter-gateway", args.otlp_endpoint):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    flags = {
        "listen": args.listen,
        "modelhosts": args.modelhost,
        "http_listen": args.http_listen,
        "shutdown_grace_s": args.shutdown_grace,
        "modelhost_ca": args.modelhost_ca,
        # The store's URL may carry a password: from a Secret through the environment.
        "store": args.store or os.environ.get(STORE_ENV) or None,
        **security_flags(args),
    }
    try:
        config = load_gateway_config(args.config, **flags)
        grpc_server.run(_serve(config, args.config, flags))
    except (ConfigError, SecurityError, StoreLocked, StoreUnavailable, SchemaTooNew) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: GatewayConfig, path: Path | None, flags: dict[str, object]) -> None:
    gateway = await start_gateway(config)
    _log.info(
        "gateway_serving",
        listen=config.listen,
        port=gateway.port,
        http_port=gateway.http.port if gateway.http else None,
        modelhosts=config.modelhosts,
        tls=config.tls_cert is not None,
    )
    reloads: set[asyncio.Task[None]] = set()  # referenced until done, or the loop may drop them

    def reload() -> None:
        task = asyncio.create_task(_reload(gateway, path, flags))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    await grpc_server.serve_until_signalled(
        gateway.server,
        gateway.health,
        config.shutdown_grace_s,
        gateway.close,
        on_draining=gateway.drain,
    )


async def _reload(gateway: RunningGateway, path: Path | None, flags: dict[str, object]) -> None:
    """SIGHUP: reads the config again and adds or retires hosts; streams are not dropped."""
    try:
        config = load_gateway_config(path, **flags)
    except ConfigError as exc:
        _log.error("reload_failed", error=str(exc), keeping=gateway.pool.entries)
        return
    await gateway.pool.reconcile(config.modelhosts)
    _log.info(
        "reloaded", modelhosts=config.modelhosts, hosts=[h.address for h in gateway.pool.hosts]
    )


if __name__ == "__main__":
    sys.exit(main())
