"""HTTP plumbing for the chat endpoints: bounded body reads, JSON errors, SSE, disconnect watch.

The chat endpoints are small ASGI apps rather than Django views: they read the body with a
size limit before parsing, watch for the client's disconnect while the reply streams (so
the upstream call is cancelled and billed as such), and add no thread hop to the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings

from accounts.authentication import authenticate_headers
from accounts.principal import Principal
from chat.events import Done, Failed, sse_frame
from chat.pipeline import ChatRun
from chatservice.errors import ServiceError
from chatservice.request_ids import request_id_from

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

logger = logging.getLogger("chat.http")

SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


class Flag:
    """`set()` and `is_set()`: an asyncio.Event used only as a flag, without the Event's waiter deque."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass
class Exchange:
    """One HTTP request/response on a chat endpoint."""

    scope: Scope
    receive: Receive
    send: Send
    headers: dict[str, str] = field(init=False)
    request_id: uuid.UUID = field(init=False)
    disconnected: Flag = field(default_factory=Flag)

    def __post_init__(self) -> None:
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.scope.get("headers", [])}
        self.request_id = request_id_from(self.headers.get("x-request-id"))

    async def caller(self, method: str) -> Principal:
        """The authenticated caller of a `method` request; 405 for another method, 401 without a key."""
        if self.scope["method"] != method:
            raise ServiceError("method_not_allowed", f"Use {method}.", status=405, headers={"Allow": method})
        return await authenticate_headers(self.headers)

    async def read_body(self) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed MAX_REQUEST_BYTES."""
        limit = settings.MAX_REQUEST_BYTES
        too_large = ServiceError(
            "request_too_large", f"The request body exceeds {limit} bytes.", status=413, details={"limit": limit}
        )
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                raise asyncio.CancelledError()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _headers(self, content_type: bytes, extra: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type), (b"x-request-id", str(self.request_id).encode())]
        for name, value in (extra or {}).items():
            headers.append((name.lower().encode("latin-1"), str(value).encode("latin-1")))
        return headers

    async def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        payload = orjson.dumps(body)
        response_headers = self._headers(b"application/json", headers)
        response_headers.append((b"content-length", str(len(payload)).encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": response_headers})
        await self.send({"type": "http.response.body", "body": payload})

    async def send_error(self, error: ServiceError, headers: dict[str, str] | None = None) -> None:
        await self.send_json(error.status, error.body(), {**(headers or {}), **error.headers})

    async def start_sse(self, headers: dict[str, str] | None = None) -> None:
        response_headers = [*SSE_HEADERS, (b"x-request-id", str(self.request_id).encode())]
        response_headers += [
            (k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()
        ]
        await self.send({"type": "http.response.start", "status": 200, "headers": response_headers})

    async def send_chunk(self, data: bytes, *, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def watch_disconnect(self, on_disconnect: Callable[[], None]) -> None:
        """Run until the client goes away, then call `on_disconnect` (cancel the upstream call)."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                on_disconnect()
                return


@contextlib.asynccontextmanager
async def disconnect_guard(exchange: Exchange, runs: list[ChatRun]) -> AsyncIterator[Callable[[ChatRun], None]]:
    """While the block runs, a client disconnect cancels every run in `runs`. The block is given
    `add(run)` for a run it starts later (a batch item admitted meanwhile): once the client is
    gone, a run added is cancelled at once, before it starts."""

    def cancel_all() -> None:
        for run in runs:
            run.cancel("cancelled")

    def add(run: ChatRun) -> None:
        runs.append(run)
        if exchange.disconnected.is_set():
            run.cancel("cancelled")

    watcher = asyncio.create_task(exchange.watch_disconnect(cancel_all))
    try:
        yield add
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def stream_sse(exchange: Exchange, run: ChatRun, headers: dict[str, str]) -> None:
    """Send the run as Server-Sent Events; a disconnect cancels it (billed as cancelled)."""
    await exchange.start_sse(headers)
    async with disconnect_guard(exchange, [run]):
        async for event in run.events():
            if exchange.disconnected.is_set():
                break
            await exchange.send_chunk(sse_frame(event))
    if not exchange.disconnected.is_set():
        await exchange.send_chunk(b"", more=False)
    await run.wait_settled()


async def collect(run: ChatRun) -> Done | Failed | None:
    """Drive a run to its end without streaming: the terminal event (None if it was cancelled)."""
    async for event in run.events():
        if isinstance(event, Done | Failed):
            return event
    return None


async def run_to_end(exchange: Exchange, run: ChatRun) -> Done | Failed | None:
    """A non-streaming answer: the run's terminal event once it is settled, None if the client left."""
    async with disconnect_guard(exchange, [run]):
        result = await collect(run)
    await run.wait_settled()
    return None if exchange.disconnected.is_set() else result


def json_errors(handler: Callable[[Any, Scope, Receive, Send], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Wrap an ASGI endpoint so an unexpected exception answers 500 in the JSON error shape
    (when no response has started yet) instead of the server's plain-text page."""

    @functools.wraps(handler)
    async def call(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await handler(self, scope, receive, tracking_send)
        except Exception:
            logger.exception("unexpected error in %s", type(self).__name__)
            if started:
                raise
            error = ServiceError("internal_error", "The request failed unexpectedly.", status=500)
            await Exchange(scope, receive, send).send_error(error)

    return call
