"""A fast OpenAI-compatible upstream for the benchmark: chat completions (JSON and SSE) and models.

A raw ASGI app (no framework) so that it is never the bottleneck. Each request chooses its own
latency, either with a header (seconds) or, since the gateway forwards the user's message, with a
marker in the message text (milliseconds):

    x-mock: ttft=0.005,itl=0.005,tokens=50
    "message": "hello [[mock ttft=5 itl=5 tokens=50]]"

`ttft` is the wait before the first token, `itl` the wait between tokens, `tokens` how many
content chunks the reply has; a reply takes `ttft + (tokens - 1) * itl`. A header wins over a
marker; a request with neither gets the app's default.

Run it alone with `python -m bench.mock_upstream --port 9100`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

DEFAULT_MODEL = "gpt-4o-mini"
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini")
MAX_TOKENS = 100_000
MAX_DELAY_SECONDS = 600.0
_WORDS = ("lorem ", "ipsum ", "dolor ", "sit ", "amet ", "consectetur ", "adipiscing ", "elit ")
_MARKER = re.compile(rb"\[\[mock ([^\]]*)\]\]")
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"
_clock = time.monotonic  # the event loop's clock (a test replaces it, and `_sleep`, with fakes)
_sleep = asyncio.sleep


@dataclass(frozen=True, slots=True)
class MockSpec:
    """How one reply is paced: seconds to the first token, seconds between tokens, token count."""

    ttft: float = 0.0
    itl: float = 0.0
    tokens: int = 16

    @property
    def duration(self) -> float:
        """Seconds from the request to the last token."""
        return self.ttft + max(0, self.tokens - 1) * self.itl

    def header(self) -> str:
        """This spec as an `x-mock` header value (seconds)."""
        return f"ttft={self.ttft:g},itl={self.itl:g},tokens={self.tokens}"

    def marker(self) -> str:
        """This spec as a message marker (milliseconds)."""
        return f"[[mock ttft={self.ttft * 1000:g} itl={self.itl * 1000:g} tokens={self.tokens}]]"


def parse_spec(text: str, default: MockSpec, *, unit: float) -> MockSpec:
    """`ttft=..,itl=..,tokens=..` (comma or space separated, any subset) over `default`.

    `unit` scales the two delays to seconds (1 for the header, 0.001 for the marker). Unknown
    keys and unparsable values are ignored; values are clamped to sane bounds.
    """
    spec = default
    for part in text.replace(",", " ").split():
        key, _, value = part.partition("=")
        try:
            if key == "tokens":
                spec = replace(spec, tokens=max(0, min(MAX_TOKENS, int(value))))
            elif key == "ttft":
                spec = replace(spec, ttft=_delay(value, unit))
            elif key == "itl":
                spec = replace(spec, itl=_delay(value, unit))
        except ValueError:
            continue
    return spec


def _delay(value: str, unit: float) -> float:
    return max(0.0, min(MAX_DELAY_SECONDS, float(value) * unit))


def spec_for(headers: list[tuple[bytes, bytes]], body: bytes, default: MockSpec) -> MockSpec:
    """The request's pacing: the `x-mock` header, else the last `[[mock ...]]` marker, else `default`."""
    for name, value in headers:
        if name == b"x-mock":
            return parse_spec(value.decode("latin-1"), default, unit=1.0)
    markers = _MARKER.findall(body)
    if markers:
        return parse_spec(markers[-1].decode("latin-1"), default, unit=0.001)
    return default


def reply_text(tokens: int) -> str:
    """The deterministic reply of `tokens` tokens (one word each)."""
    return "".join(_WORDS[i % len(_WORDS)] for i in range(tokens))


def _prompt_tokens(request: dict[str, Any]) -> int:
    messages = request.get("messages")
    chars = 0
    if isinstance(messages, list):
        chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
    return max(1, chars // 4)


@dataclass
class MockStats:
    """What the mock served (the harness test reads it)."""

    requests: int = 0
    streams_open: int = 0
    streams_max_open: int = 0
    streams_completed: int = 0


class MockUpstream:
    """The ASGI app: `POST /v1/chat/completions`, `GET /v1/models` (also without the `/v1` prefix)."""

    def __init__(self, *, default: MockSpec | None = None) -> None:
        self.default = default or MockSpec()
        self.stats = MockStats()
        self._created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"].removeprefix("/v1")
        method = scope["method"]
        if path == "/chat/completions" and method == "POST":
            await self._chat(scope, receive, send)
        elif path == "/models" and method == "GET":
            await _json(send, 200, self._models())
        else:
            await _json(send, 404, _error(f"Unknown path {scope['path']}", "invalid_request_error"))

    def _models(self) -> bytes:
        data = [{"id": m, "object": "model", "created": self._created, "owned_by": "bench"} for m in MODELS]
        return orjson.dumps({"object": "list", "data": data})

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = _clock()  # the pacing counts from here: token i is due at ttft + i * itl
        self.stats.requests += 1
        body = await _read_body(receive)
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            await _json(send, 400, _error("The body is not valid JSON.", "invalid_request_error"))
            return
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            await _json(send, 400, _error("'messages' is required.", "invalid_request_error"))
            return
        spec = spec_for(scope.get("headers", []), body, self.default)
        model = str(request.get("model") or DEFAULT_MODEL)
        usage = {
            "prompt_tokens": _prompt_tokens(request),
            "completion_tokens": spec.tokens,
            "total_tokens": _prompt_tokens(request) + spec.tokens,
        }
        if request.get("stream"):
            options = request.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            await self._stream(receive, send, spec, model, usage if include_usage else None, arrived)
        else:
            await _sleep_until(arrived + spec.duration)
            await _json(send, 200, self._completion(model, spec, usage))

    def _completion(self, model: str, spec: MockSpec, usage: dict[str, int]) -> bytes:
        return orjson.dumps(
            {
                "id": f"chatcmpl-bench{self.stats.requests}",
                "object": "chat.completion",
                "created": self._created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply_text(spec.tokens), "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
                "system_fingerprint": "fp_bench",
            }
        )

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        spec: MockSpec,
        model: str,
        usage: dict[str, int] | None,
        arrived: float,
    ) -> None:
        stats = self.stats
        stats.streams_open += 1
        stats.streams_max_open = max(stats.streams_max_open, stats.streams_open)
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        frame = _ChunkFramer(f"chatcmpl-bench{stats.requests}", self._created, model)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            for index in range(spec.tokens):
                # Each token against the schedule, not a delay after the previous one: a late wake-up
                # (a busy loop's) must not push every later token back, or a "10 s" stream drifts longer.
                await _sleep_until(arrived + spec.ttft + index * spec.itl)
                if gone.is_set():
                    return
                chunk = frame.delta({"content": _WORDS[index % len(_WORDS)]})
                if index == 0:
                    chunk = frame.delta({"role": "assistant", "content": ""}) + chunk
                await _more(send, chunk)
            tail = frame.finish()
            if usage is not None:
                tail += frame.usage(usage)
            await send({"type": "http.response.body", "body": tail + _DONE, "more_body": False})
            stats.streams_completed += 1
        finally:
            stats.streams_open -= 1
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


class _ChunkFramer:
    """`data: {chat.completion.chunk}` frames for one stream (the envelope is encoded once)."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self._head = orjson.dumps(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_bench",
            }
        )[:-1]

    def _frame(self, rest: dict[str, Any]) -> bytes:
        return b"data: " + self._head + b"," + orjson.dumps(rest)[1:] + b"\n\n"

    def delta(self, delta: dict[str, str]) -> bytes:
        return self._frame({"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]})

    def finish(self) -> bytes:
        return self._frame({"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})

    def usage(self, usage: dict[str, int]) -> bytes:
        return self._frame({"choices": [], "usage": usage})


async def _sleep_until(due: float) -> None:
    await _sleep(max(0.0, due - _clock()))


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _more(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _json(send: Send, status: int, payload: bytes) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _error(message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: list[str] | None = None) -> None:
    """Serve the mock with uvicorn (uvloop and httptools when installed)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.mock_upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttft", type=float, default=0.0, help="default seconds to the first token")
    parser.add_argument("--itl", type=float, default=0.0, help="default seconds between tokens")
    parser.add_argument("--tokens", type=int, default=16, help="default tokens per reply")
    args = parser.parse_args(argv)
    app = MockUpstream(default=MockSpec(ttft=args.ttft, itl=args.itl, tokens=args.tokens))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
        timeout_keep_alive=120,
    )


if __name__ == "__main__":
    main()
