"""A TCP proxy that can freeze: it stops forwarding without closing anything, as a closed
laptop lid, a paused VM or a pulled cable look to the other end (no FIN, no RST)."""

import asyncio

from tests.conftest import LoopThread


class FreezingProxy:
    """Forwards 127.0.0.1:<port> to `target` on a loop thread of its own."""

    def __init__(self, target: str) -> None:
        self._target_host, _, port = target.rpartition(":")
        self._target_port = int(port)
        self._loop = LoopThread()
        self._thawed = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._server = self._loop.run(self._start())
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _start(self) -> asyncio.Server:
        self._thawed.set()
        return await asyncio.start_server(self._connect, "127.0.0.1", 0)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self._target_host, self._target_port
        )
        self._writers += [writer, upstream_writer]
        await asyncio.gather(
            self._pump(reader, upstream_writer),
            self._pump(upstream_reader, writer),
            return_exceptions=True,
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._thawed.wait()  # frozen: the bytes are held, the sockets stay open
            writer.write(data)
            await writer.drain()
        writer.close()

    def freeze(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._thawed.clear)

    def close(self) -> None:
        """Closes every connection (the peers see them end) and the listener."""

        async def close() -> None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            pumps = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

        self._loop.run(close())
        self._loop.close()
