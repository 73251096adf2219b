"""The load generator: N requests at concurrency C over raw keep-alive HTTP/1.1 connections.

Each of the C workers holds one connection (opened before the clock starts) and sends its
requests one after another, so C requests are always in flight. Latency runs from writing the
request to reading the last byte of the reply; time to first token from writing the request to
the first token of a stream, whether it arrives as the gateway's `event: token` frame or as an
OpenAI `data:` chunk with content; a stream's tail from its last token to the last byte (for the
gateway, the ledger write that comes before its `event: done`). A streamed reply counts as ok
only when it reached its end (`event: done` or `data: [DONE]`). Raw asyncio streams keep the
client's own cost per request small, since it shares a core with the mock upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

from bench.procfs import ProcessSampler, ProcessUsage
from bench.stats import Distribution, distribution

CONNECT_CONCURRENCY = 64
READ_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class Target:
    """One kind of request: where it goes, its JSON body and headers, and whether the reply streams."""

    url: str
    body: bytes
    stream: bool
    headers: tuple[tuple[str, str], ...] = ()
    # Header sets the connections take in turn (connection i sends set i mod n: one user each);
    # when empty, every connection sends `headers`.
    per_connection: tuple[tuple[tuple[str, str], ...], ...] = ()

    def request_bytes(self, headers: tuple[tuple[str, str], ...] | None = None) -> tuple[str, int, bytes]:
        """(host, port, the whole HTTP/1.1 request) for this target, with `headers` if given."""
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http:// URLs are supported: {self.url}")
        port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {parts.hostname}:{port}",
            "Content-Type: application/json",
            f"Content-Length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in (self.headers if headers is None else headers)),
        ]
        head = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
        return parts.hostname, port, head + self.body


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The outcome of one run; timings in seconds, memory in bytes."""

    requested: int
    sent: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    concurrency: int
    elapsed: float
    rps: float
    latency: Distribution | None
    ttft: Distribution | None
    tokens: int
    process: ProcessUsage | None = None
    tail: Distribution | None = None  # streams: from the last token to the end of the reply


class StreamScanner:
    """Reads an SSE body as it arrives: first-token time, token count, and how the stream ended."""

    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.tokens = 0
        self.done = False
        self.error: str | None = None
        self._named_events = False
        self._pending = b""

    def feed(self, data: bytes, now: float) -> None:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"event:"):
                self._named_events = True
                self._event(line[6:].strip(), now)
            elif line.startswith(b"data:") and not self._named_events:
                self._openai_chunk(line[5:].strip(), now)

    def _token(self, now: float) -> None:
        self.tokens += 1
        self.last_token_at = now
        if self.first_token_at is None:
            self.first_token_at = now

    def _event(self, name: bytes, now: float) -> None:
        if name == b"token":
            self._token(now)
        elif name == b"done":
            self.done = True
        elif name == b"error":
            self.error = self.error or "error event"

    def _openai_chunk(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.error = self.error or "malformed chunk"
            return
        if not isinstance(chunk, dict):
            return
        if chunk.get("error"):
            self.error = self.error or "error chunk"
            return
        choices = chunk.get("choices")
        if choices and isinstance(choices[0], dict) and (choices[0].get("delta") or {}).get("content"):
            self._token(now)


class RequestFailed(Exception):
    """One request did not succeed; the message is its error kind in the report."""


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, int | None, bool, bool]:
    """(status, content length, chunked, server closes) of the next response."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("the server closed the connection")
    try:
        status = int(status_line.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise RequestFailed("malformed status line") from None
    length: int | None = None
    chunked = closes = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            closes = b"close" in value.lower()
    return status, length, chunked, closes or (length is None and not chunked)


async def _read_body(
    reader: asyncio.StreamReader, length: int | None, chunked: bool, scanner: StreamScanner | None
) -> None:
    """Read the body to its end, feeding it to `scanner` (a streamed reply) as it arrives."""
    if chunked:
        while True:
            line = await reader.readline()
            if not line:  # the connection closed before the last chunk: the reply was cut off
                raise asyncio.IncompleteReadError(b"", None)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = await reader.readexactly(size + 2)
            if scanner is not None:
                scanner.feed(data[:-2], time.perf_counter())
    elif length is not None:
        data = await reader.readexactly(length)
        if scanner is not None:
            scanner.feed(data, time.perf_counter())
    else:
        while data := await reader.read(65536):
            if scanner is not None:
                scanner.feed(data, time.perf_counter())


@dataclass
class _Run:
    target: Target
    host: str
    port: int
    requested: int
    timeout: float
    stop_at: float
    next_index: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tails: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    tokens: int = 0

    def take(self) -> bool:
        if self.next_index >= self.requested or time.perf_counter() >= self.stop_at:
            return False
        self.next_index += 1
        return True


class _Connection:
    def __init__(self, run: _Run, request: bytes) -> None:
        self.run = run
        self.request = request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.run.host, self.run.port, limit=READ_LIMIT)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def one(self) -> None:
        """Send one request and read its whole reply; record the timings or the error kind."""
        run = self.run
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        scanner = StreamScanner() if run.target.stream else None
        started = time.perf_counter()
        self.writer.write(self.request)
        status, length, chunked, closes = await _read_head(self.reader)
        await _read_body(self.reader, length, chunked, scanner if status == 200 else None)
        finished = time.perf_counter()
        if closes:
            self.close()
        if status != 200:
            raise RequestFailed(f"HTTP {status}")
        if scanner is not None:
            if scanner.error is not None:
                raise RequestFailed(scanner.error)
            if not scanner.done:
                raise RequestFailed("stream ended early")
            if scanner.first_token_at is not None:
                run.ttfts.append(scanner.first_token_at - started)
            if scanner.last_token_at is not None:
                run.tails.append(finished - scanner.last_token_at)
            run.tokens += scanner.tokens
        run.latencies.append(finished - started)


async def _worker(connection: _Connection) -> None:
    run = connection.run
    while run.take():
        try:
            async with asyncio.timeout(run.timeout):
                await connection.one()
        except RequestFailed as exc:
            run.errors[str(exc)] += 1
        except TimeoutError:
            run.errors["timeout"] += 1
            connection.close()
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            run.errors[type(exc).__name__] += 1
            connection.close()
    connection.close()


async def _connect_all(connections: list[_Connection]) -> None:
    """Open every connection before the clock starts (a failure is retried by the worker)."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(connection: _Connection) -> None:
        async with gate:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(10):
                    await connection.open()

    await asyncio.gather(*(connect(c) for c in connections))


async def run_load(
    target: Target,
    *,
    requests: int,
    concurrency: int,
    request_timeout: float = 60.0,
    max_seconds: float = 600.0,
    pid: int | None = None,
    core: int | None = None,
) -> LoadResult:
    """Send `requests` requests with `concurrency` in flight; sample process `pid`'s memory meanwhile.

    No new request starts after `max_seconds`; each request is bounded by `request_timeout` seconds.
    `core` is the core `pid` is pinned to: how busy it was is reported alongside.
    """
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be at least 1")
    host, port, request = target.request_bytes()
    run = _Run(target, host, port, requests, request_timeout, stop_at=float("inf"))
    count = min(concurrency, requests)
    variants = [target.request_bytes(headers)[2] for headers in target.per_connection] or [request]
    connections = [_Connection(run, variants[i % len(variants)]) for i in range(count)]
    sampler = ProcessSampler(pid, core=core) if pid is not None else None
    if sampler is not None:
        sampler.start()  # before connecting: an open connection is part of what the server holds
    await _connect_all(connections)
    started = time.perf_counter()
    run.stop_at = started + max_seconds
    await asyncio.gather(*(_worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    process = await sampler.stop() if sampler is not None else None
    errors = sum(run.errors.values())
    return LoadResult(
        requested=requests,
        sent=run.next_index,
        ok=len(run.latencies),
        errors=errors,
        error_kinds=dict(run.errors),
        concurrency=len(connections),
        elapsed=elapsed,
        rps=len(run.latencies) / elapsed if elapsed > 0 else 0.0,
        latency=distribution(run.latencies),
        ttft=distribution(run.ttfts),
        tail=distribution(run.tails),
        tokens=run.tokens,
        process=process,
    )
