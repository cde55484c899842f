"""A TCP proxy in front of PostgreSQL, for tests of a database that goes away: closed, it
ends every connection through it and refuses new ones, as a database host gone from the
network would; opened again on the same port, the database is back."""

from __future__ import annotations

import asyncio
import contextlib
import socket


class Gate:
    """A TCP proxy to PostgreSQL on a port of its own that can be closed and opened again:
    the database, as the processes using it see it, goes away and comes back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def open(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        """Ends every connection through it and refuses new ones."""
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()
            await self._server.wait_closed()
            self._server = None
