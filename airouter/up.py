"""`airouter up`: a modelhost and a gateway on this machine, started together, as `ollama
serve` starts one server: the one-machine case in one command. Each runs as its own process
(the same `modelhost serve` and `gateway serve` a multi-machine setup runs), their logs
interleave on stderr, and Ctrl-C or SIGTERM drains and stops both."""

import argparse
import fcntl
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from airouter import add_log_level_flag
from airouter.paths import default_batch_db

# Longer than either server's default shutdown grace (30 s): they drain, then exit.
STOP_WAIT_S = 40.0


def add_up_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = commands.add_parser(
        "up", help="run a modelhost and a gateway here, together (Ctrl-C stops both)"
    )
    up.add_argument("--config", type=Path, help="models.toml (default: the embedded models)")
    up.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda", "metal"),
        help="where the modelhost decodes (default auto)",
    )
    up.add_argument("--listen", default="127.0.0.1:50050", help="the gateway's gRPC address")
    up.add_argument(
        "--http-listen", default="127.0.0.1:8080", help="the OpenAI-compatible HTTP address"
    )
    up.add_argument(
        "--modelhost-listen", default="127.0.0.1:50051", help="the modelhost's gRPC address"
    )
    up.add_argument(
        "--store",
        "--batch-db",
        dest="store",
        metavar="PATH|URL",
        default=None,
        help="the gateway's store of batches, files, responses and keys: an SQLite file "
        "(default: $XDG_STATE_HOME/airouter/batches.sqlite3; another `airouter up` beside "
        "this one needs its own) or postgresql://...",
    )
    add_log_level_flag(up)


def _program(name: str) -> str:
    """The server's executable from this environment (the same venv as `airouter`)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def main(argv: list[str]) -> int:
    """`airouter up ...` on its own, without the rest of the CLI's imports (grpc, the stubs):
    the servers start that much sooner."""
    commands = argparse.ArgumentParser(prog="airouter").add_subparsers(dest="command")
    add_up_command(commands)
    return run_up(commands.choices["up"].parse_args(argv))


def run_up(args: argparse.Namespace) -> int:
    taken = _taken(args)
    if taken:
        print(f"airouter up: {taken}", file=sys.stderr)
        return 1
    host_command = [
        _program("modelhost"),
        "serve",
        "--listen",
        args.modelhost_listen,
        "--log-level",
        args.log_level,
    ]
    if args.config:
        host_command += ["--config", str(args.config)]
    if args.device:
        host_command += ["--device", args.device]
    gateway_command = [
        _program("gateway"),
        "serve",
        "--listen",
        args.listen,
        "--http-listen",
        args.http_listen,
        "--modelhost",
        args.modelhost_listen,
        "--store",
        args.store or str(default_batch_db()),
        "--log-level",
        args.log_level,
    ]
    stopping = False
    processes: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    # Ctrl-C reaches the servers from the terminal too; a SIGTERM (systemd, kill) is passed on.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    processes += [subprocess.Popen(host_command), subprocess.Popen(gateway_command)]
    while all(p.poll() is None for p in processes) and not stopping:
        time.sleep(0.2)
    if not stopping:  # one of them exited by itself: the other has no reason to run
        stop(signal.SIGTERM, None)
    deadline = time.monotonic() + STOP_WAIT_S
    for process in processes:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    codes = [p.returncode for p in processes]
    # A server stopped by the signal exits 0; any other code is the first failure's.
    return next((c for c in codes if c not in (0, -signal.SIGTERM, -signal.SIGINT)), 0)


def _taken(args: argparse.Namespace) -> str | None:
    """What another program (another `airouter up`, most likely) holds of what this one
    needs, and the option that moves it; None when all is free. Checked before either
    server starts, so the answer is one line rather than two servers' failures."""
    for address, option, what in (
        (args.listen, "--listen", "the gateway's gRPC address"),
        (args.http_listen, "--http-listen", "the gateway's HTTP address"),
        (args.modelhost_listen, "--modelhost-listen", "the modelhost's address"),
    ):
        host, _, port = address.rpartition(":")
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.bind((host.strip("[]"), int(port)))
        except OSError:
            return f"{address} ({what}) is taken; pass {option} HOST:PORT to use another"
        except ValueError:
            return f"{option} {address}: use HOST:PORT"
    store = args.store or str(default_batch_db())
    if store.startswith(("postgresql://", "postgres://")):
        return None  # shared by any number of gateways
    database = store.removeprefix("sqlite://")
    lock = Path(f"{database}.lock").expanduser()
    if lock.exists():
        with lock.open("rb") as held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return (
                    f"{database} is in use by another gateway; pass --store PATH to give "
                    "this one its own"
                )
    return None
