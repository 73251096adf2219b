"""A loopback TCP forwarder to the test Redis, for outages that are real: cut, restored, hung."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings


class RedisProxy:
    """A loopback TCP forwarder to the test Redis that a test can cut and restore (a real outage),
    or make hang: from `hung = True` on, what clients send is swallowed and never answered; from
    `replies_lost = True` on, Redis runs what clients send but its replies never reach them.
    `sent` counts the reads that carried clients' commands (how many times they wrote to Redis)."""

    def __init__(self) -> None:
        self.hung = False
        self.replies_lost = False
        self.sent = 0
        parts = urlsplit(settings.REDIS_URL)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.db = parts.path.lstrip("/") or "0"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, upstream: bool) -> None:
            try:
                while data := await src.read(65536):
                    self.sent += upstream
                    if self.hung if upstream else self.replies_lost:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer, upstream=True), pipe(up_reader, writer, upstream=False))


def busy_once_redis_is_asked(proxy: RedisProxy, seconds: float) -> None:
    """Keep this event loop busy for `seconds` (time.sleep in a callback: other requests' work) from
    the moment the next command reaches Redis through `proxy`: Redis answers at once, and the
    answer waits for the loop."""
    loop = asyncio.get_running_loop()
    before = proxy.sent

    def watch() -> None:
        if proxy.sent > before:
            time.sleep(seconds)
        else:
            loop.call_soon(watch)

    loop.call_soon(watch)


async def socket_timeouts(client: Any) -> tuple[float | None, float | None]:
    """(socket_timeout, socket_connect_timeout) of a pooled connection of a redis.asyncio client."""
    connection = await client.connection_pool.get_connection()
    try:
        return connection.socket_timeout, connection.socket_connect_timeout
    finally:
        await client.connection_pool.release(connection)
