"""Shared response plumbing for the sandbox's wire protocols: hangs, pacing, drops, accounting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from providers.sandbox.faults import HANG_SECONDS, Faults, SandboxState


class ConnectionCut(Exception):
    """Raised inside a response body to make the server drop the connection mid-response."""


async def hang_until_disconnect(request: Request) -> None:
    """Wait up to HANG_SECONDS, returning early when the client disconnects."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_SECONDS
    while loop.time() < deadline:
        message = await asyncio.wait_for(request.receive(), timeout=deadline - loop.time())
        if message["type"] == "http.disconnect":
            return


def retry_after_headers(faults: Faults, status: int) -> dict[str, str]:
    """Retry-After for throttling and overload answers: 1 s by default on 429, as asked otherwise."""
    if faults.retry_after == "none":
        return {}
    if faults.retry_after is not None:
        return {"retry-after": faults.retry_after}
    if status == 429:
        return {"retry-after": "1"}
    return {}


def cut_response(status: int = 200, media_type: str = "application/json") -> Response:
    """Headers, a few bytes, then the connection is cut (the client sees a transport error)."""

    async def body() -> AsyncIterator[bytes]:
        yield b"{"
        raise ConnectionCut("sandbox: connection cut by [[fail:conn]] or [[drop:0]]")

    return StreamingResponse(body(), status_code=status, media_type=media_type)


def stream_response(
    *,
    state: SandboxState,
    faults: Faults,
    head: list[bytes],
    content: list[bytes],
    tail: list[bytes],
    error_frame: Callable[[], bytes],
    media_type: str = "text/event-stream",
) -> StreamingResponse:
    """Send `head`, the `content` frames (paced, dropped or errored as `faults` says), then `tail`.

    The state counts the stream as open until it ends; a client that goes away early counts
    as aborted (the server cancels the body iterator on disconnect).
    """

    async def body() -> AsyncIterator[bytes]:
        state.stream_opened()
        completed = False
        try:
            for frame in head:
                yield frame
            for index, frame in enumerate(content):
                if faults.drop_after is not None and index == faults.drop_after:
                    raise ConnectionCut(f"sandbox: connection cut after {index} chunks")
                if faults.error_after is not None and index == faults.error_after:
                    yield error_frame()
                    completed = True
                    return
                if faults.slow_ms:
                    await asyncio.sleep(faults.slow_ms / 1000)
                yield frame
            if faults.drop_after is not None and faults.drop_after >= len(content):
                raise ConnectionCut("sandbox: connection cut before the end of the stream")
            for frame in tail:
                yield frame
            completed = True
        finally:
            state.stream_closed(completed=completed)

    return StreamingResponse(body(), media_type=media_type, headers={"cache-control": "no-cache", "x-sandbox": "1"})
