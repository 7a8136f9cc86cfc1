"""airouter's servers as separate processes, started as a user starts them."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.scratch import scratch_dir

BIN = Path(sys.executable).parent


class ServerProcess:
    """`modelhost serve ...` or `gateway serve ...` on 127.0.0.1:0; the bound port is read
    from its start-up log line."""

    def __init__(
        self, *args: str, listen: str = "127.0.0.1:0", env: dict[str, str] | None = None
    ) -> None:
        extra = ["--listen", listen]
        if args[0] == "gateway" and "--http-listen" not in args:
            extra += ["--http-listen", "127.0.0.1:0"]  # never the fixed default port
        store_given = "--batch-db" in args or "--store" in args
        if args[0] == "gateway" and not store_given:  # never the user's own batches
            extra += ["--batch-db", str(scratch_dir() / "batches.sqlite3")]
        self.process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:], *extra],
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.log: list[dict[str, object]] = []  # every JSON log line, as it arrives
        self.address = f"127.0.0.1:{self._port_from_log(f'{args[0]}_serving')}"
        # Keep reading the log so a chatty server never blocks on a full pipe.
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if line.startswith("{"):
                self.log.append(json.loads(line))

    def _port_from_log(self, event: str) -> int:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if not line.startswith("{"):  # gRPC's own C-core lines
                continue
            record = json.loads(line)
            self.log.append(record)
            if record["event"] == event:
                return int(record["port"])
        raise AssertionError(f"{event} was never logged; exit code {self.process.wait()}")

    def stop(self) -> int:
        """SIGTERM, as systemd or Ctrl-C would send, and the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL: the machine or the process dies without a word."""
        self.process.kill()
        self.process.wait(timeout=60)


def free_port_address() -> str:
    """A loopback address nothing listens on now, for a server that must come back there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"
