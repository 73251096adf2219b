"""Live model status: rolling latency and error rate per provider+model, shared through Redis.

The router records every upstream attempt (`record_call`); `checkproviders` records probes
(`record_check`). Calls are sent to Redis together, at most FLUSH_SECONDS after they happen
(one pipeline for all of an event loop's calls in that time rather than one round trip per
request); a read in the same process sends its own pending calls first, and a loop that ends
sends what it still holds. `model_status` turns them, the circuit and the catalog into the
seed's LLMStatus: online, degraded, offline or maintenance.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from chatservice.errors import ServiceError, not_found
from providers.catalog import CatalogEntry, acatalog_entries, resolve_model
from providers.circuit import Circuit, SharedRedis, get_circuit, state_namespace

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.1  # how long a recorded call may wait to be sent with others
WINDOW_SECONDS = 300.0  # the last five minutes...
WINDOW_CALLS = 100  # ...or the last hundred calls, whichever is fewer
DEGRADED_ERROR_RATE = 0.2
DEGRADED_MIN_CALLS = 3
DEGRADED_LATENCY_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # wall-clock seconds
    latency: float  # seconds to the first token, or to the failure
    ok: bool

    def encode(self) -> str:
        return f"{self.at:.6f}|{self.latency:.6f}|{int(self.ok)}"

    @classmethod
    def decode(cls, raw: str | bytes) -> Sample:
        at, latency, ok = (raw.decode() if isinstance(raw, bytes) else raw).split("|")
        return cls(float(at), float(latency), ok == "1")


@dataclass(frozen=True, slots=True)
class Check:
    at: float
    ok: bool
    latency: float
    detail: str


@dataclass(frozen=True, slots=True)
class WindowStats:
    calls: int
    errors: int
    response_time_avg: float
    last_call_at: float | None
    last_ok_at: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


def _stats(samples: list[Sample]) -> WindowStats:
    if not samples:
        return WindowStats(0, 0, 0.0, None, None)
    oks = [s.at for s in samples if s.ok]
    return WindowStats(
        calls=len(samples),
        errors=sum(1 for s in samples if not s.ok),
        response_time_avg=sum(s.latency for s in samples) / len(samples),
        last_call_at=max(s.at for s in samples),
        last_ok_at=max(oks) if oks else None,
    )


class StatusStore:
    """Recent calls per provider and catalog model name, and the last probe per provider."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, redis: SharedRedis | None = None, namespace: str | None = None
    ) -> None:
        self._clock = clock
        self._redis = redis or SharedRedis()
        self._namespace = namespace
        self._calls: dict[str, deque[Sample]] = {}
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()
        self._pending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[tuple[str, Sample]]] = (
            weakref.WeakKeyDictionary()
        )
        self._flushes: set[asyncio.Task[None]] = set()  # the timers that send pending calls
        self._sending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[asyncio.Future[None]]] = (
            weakref.WeakKeyDictionary()
        )

    def _calls_key(self, provider: str, model: str) -> str:
        return f"{self._namespace or state_namespace()}:status:calls:{provider}:{model}"

    def _check_key(self, provider: str) -> str:
        return f"{self._namespace or state_namespace()}:status:check:{provider}"

    async def record_call(self, provider: str, model: str, *, ok: bool, latency: float) -> None:
        """One upstream attempt's outcome and latency (seconds); sent within FLUSH_SECONDS."""
        call = (self._calls_key(provider, model), Sample(self._clock(), max(0.0, latency), ok))
        if self._redis.client() is None:  # no Redis, or it is down for now: in process at once
            self._keep([call])
            return
        loop = asyncio.get_running_loop()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            task = loop.create_task(self._send_soon())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        pending.append(call)

    async def _send_soon(self) -> None:
        try:
            await asyncio.sleep(FLUSH_SECONDS)
        finally:  # also when the loop is ending and cancels its tasks: what was recorded is sent
            try:
                await self.flush()
            except Exception:
                logger.exception("could not record provider calls")

    async def flush(self) -> None:
        """Send this event loop's pending calls now (and wait for those already on their way)."""
        loop = asyncio.get_running_loop()
        sending = list(self._sending.get(loop, ()))
        calls = self._pending.pop(loop, None)
        if calls:
            sent = loop.create_future()
            self._sending.setdefault(loop, set()).add(sent)
            try:
                await self._send(calls)
            finally:
                self._sending[loop].discard(sent)
                sent.set_result(None)
        if sending:
            await asyncio.wait(sending)

    async def _send(self, calls: list[tuple[str, Sample]]) -> None:
        by_key: dict[str, list[str]] = {}
        for key, sample in calls:
            by_key.setdefault(key, []).append(sample.encode())

        async def remote(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for key, encoded in by_key.items():
                    pipe.lpush(key, *encoded)  # the last call ends up first, as one LPUSH each would
                    pipe.ltrim(key, 0, WINDOW_CALLS - 1)
                    pipe.expire(key, int(WINDOW_SECONDS * 2))
                await pipe.execute()

        await self._redis.run(remote, lambda: self._keep(calls))

    def _keep(self, calls: list[tuple[str, Sample]]) -> None:
        with self._lock:
            for key, sample in calls:
                self._calls.setdefault(key, deque(maxlen=WINDOW_CALLS)).appendleft(sample)

    async def record_check(self, provider: str, *, ok: bool, latency: float, detail: str = "") -> None:
        """The result of a probe of the provider (`checkproviders`)."""
        key, check = self._check_key(provider), Check(self._clock(), ok, max(0.0, latency), detail[:200])

        async def remote(client: aioredis.Redis) -> None:
            mapping = {"at": check.at, "ok": int(check.ok), "latency": check.latency, "detail": check.detail}
            await client.hset(key, mapping=mapping)  # type: ignore[arg-type]

        def local() -> None:
            with self._lock:
                self._checks[key] = check

        await self._redis.run(remote, local)

    async def window(self, provider: str, model: str) -> WindowStats:
        await self.flush()
        key, since = self._calls_key(provider, model), self._clock() - WINDOW_SECONDS

        async def remote(client: aioredis.Redis) -> list[Sample]:
            return [Sample.decode(raw) for raw in await client.lrange(key, 0, WINDOW_CALLS - 1)]

        def local() -> list[Sample]:
            with self._lock:
                return list(self._calls.get(key, ()))

        samples = await self._redis.run(remote, local)
        return _stats([s for s in samples if s.at >= since])

    async def last_check(self, provider: str) -> Check | None:
        key = self._check_key(provider)

        async def remote(client: aioredis.Redis) -> Check | None:
            raw = await client.hgetall(key)
            if not raw:
                return None
            return Check(float(raw["at"]), raw["ok"] == "1", float(raw["latency"]), str(raw.get("detail", "")))

        def local() -> Check | None:
            with self._lock:
                return self._checks.get(key)

        return await self._redis.run(remote, local)


@functools.cache
def get_status_store() -> StatusStore:
    """The process-wide status store (its data lives in Redis when REDIS_URL is set)."""
    return StatusStore()


def _iso(at: float | None) -> str | None:
    return datetime.fromtimestamp(at, tz=UTC).isoformat() if at is not None else None


async def entry_status(
    entry: CatalogEntry, *, store: StatusStore | None = None, circuit: Circuit | None = None
) -> dict[str, Any]:
    """The LLMStatus of one catalog entry."""
    store, circuit = store or get_status_store(), circuit or get_circuit()
    stats = await store.window(entry.provider, entry.name)
    check = await store.last_check(entry.provider)
    breaker = await circuit.snapshot(entry.provider)
    latest = max((t for t in (stats.last_call_at, check.at if check else None) if t is not None), default=None)
    failed_probe_is_latest = check is not None and not check.ok and check.at >= (stats.last_ok_at or 0.0)
    if entry.maintenance:
        status = "maintenance"
    elif breaker.state != "closed" or failed_probe_is_latest:
        status = "offline"
    elif (stats.calls >= DEGRADED_MIN_CALLS and stats.error_rate >= DEGRADED_ERROR_RATE) or (
        stats.calls and stats.response_time_avg >= DEGRADED_LATENCY_SECONDS
    ):
        status = "degraded"
    else:
        status = "online"
    return {
        "provider": entry.provider,
        "model": entry.name,
        "status": status,
        "response_time_avg": round(stats.response_time_avg, 4),
        "error_rate": round(stats.error_rate, 4),
        "last_check": _iso(latest),
    }


async def model_status(
    model_name: str, *, store: StatusStore | None = None, circuit: Circuit | None = None
) -> dict[str, Any]:
    """The LLMStatus of a model id (or a provider name: its default model); 404 `not_found` if unknown."""
    entries = await acatalog_entries()
    try:
        entry = resolve_model(entries, model_name)
    except ServiceError as exc:
        raise not_found(f"model {model_name!r}") from exc
    return await entry_status(entry, store=store, circuit=circuit)
