"""Per-provider circuit breaker, shared across processes through Redis (in-process without it).

A provider's circuit opens after CIRCUIT_FAILURE_THRESHOLD consecutive failures and stays
open for CIRCUIT_COOLDOWN_SECONDS; then exactly one probe request is let through
(half-open): its success closes the circuit, its failure opens it again. `SharedRedis`,
also used by the status store, is the degrade-to-in-process link to Redis.

A closed circuit is remembered for STATE_CACHE_SECONDS: requests in that window are let
through without asking Redis, and a success resets nothing when no failure was counted.
So a healthy provider costs no Redis command per request, a failure here is seen at once,
and a circuit another process opened is seen within STATE_CACHE_SECONDS. When the remembered
state runs out under load, the requests that find it so at once share one read (and a success
one reset): a burst costs Redis one round trip per STATE_CACHE_SECONDS, not one per request.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from django.conf import settings

from chatservice.redis_bounds import CLIENT_OPTIONS, REDIS_ERRORS, command_slots, redis_deadline

logger = logging.getLogger(__name__)
T = TypeVar("T")
_GAVE_UP = object()  # what a shared call's followers are given when its leader raised

REDIS_RETRY_SECONDS = 30.0  # how long to stay in-process after Redis failed
STATE_CACHE_SECONDS = 0.25  # how long a closed circuit is taken as read
_KEY_TTL_SECONDS = 86_400


def state_namespace() -> str:
    """The key prefix of the router's shared state (tests scope it with ROUTER_STATE_NAMESPACE)."""
    return str(getattr(settings, "ROUTER_STATE_NAMESPACE", "chat"))


class SharedRedis:
    """One redis.asyncio client per event loop for REDIS_URL (read at call time).

    `run` executes an operation on Redis, or the in-process fallback when REDIS_URL is unset
    or Redis failed recently; an outage is logged once, as a warning, until Redis answers again.
    """

    def __init__(self, url: str | None = None, *, retry_seconds: float = REDIS_RETRY_SECONDS) -> None:
        self._url = url
        self._retry_seconds = retry_seconds
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[str, aioredis.Redis, asyncio.Semaphore]
        ] = weakref.WeakKeyDictionary()
        self._down_until = 0.0
        self._outage_logged = False

    @property
    def url(self) -> str:
        return self._url if self._url is not None else str(getattr(settings, "REDIS_URL", "") or "")

    @property
    def degraded(self) -> bool:
        return time.monotonic() < self._down_until

    def client(self) -> aioredis.Redis | None:
        shared = self._client()
        return shared[0] if shared is not None else None

    def _client(self) -> tuple[aioredis.Redis, asyncio.Semaphore] | None:
        """This loop's client and its command slots (chatservice.redis_bounds), None when not in use."""
        url = self.url
        if not url or self.degraded:
            return None
        loop = asyncio.get_running_loop()
        cached = self._clients.get(loop)
        if cached is not None and cached[0] == url:
            return cached[1], cached[2]
        client = aioredis.Redis.from_url(url, decode_responses=True, **CLIENT_OPTIONS)
        slots = command_slots()
        self._clients[loop] = (url, client, slots)
        return client, slots

    async def run(self, remote: Callable[[aioredis.Redis], Awaitable[T]], local: Callable[[], T]) -> T:
        shared = self._client()
        if shared is not None:
            client, slots = shared
            try:
                async with redis_deadline(), slots:
                    result = await remote(client)
            except REDIS_ERRORS as exc:
                self._failed(exc)
            else:
                if self._outage_logged:
                    logger.info("redis is reachable again; router state is shared again")
                    self._outage_logged = False
                return result
        return local()

    def _failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_seconds
        if not self._outage_logged:
            self._outage_logged = True
            logger.warning(
                "redis unreachable (%s: %s); router state (circuits, status) is per process for now",
                type(exc).__name__,
                exc,
            )


class Admission(enum.Enum):
    DENIED = "denied"
    ALLOWED = "allowed"  # circuit closed
    PROBE = "probe"  # the one request let through a half-open circuit


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    state: str  # "closed", "open" or "half_open"
    failures: int
    opened_until: float  # clock time the cooldown ends (0 when closed)
    probe_in_flight: bool

    @property
    def blocks_traffic(self) -> bool:
        return self.state == "open" or (self.state == "half_open" and self.probe_in_flight)


def _snapshot(failures: int, opened_until: float, probe_until: float, now: float) -> CircuitSnapshot:
    if opened_until <= 0:
        return CircuitSnapshot("closed", failures, 0.0, False)
    if now < opened_until:
        return CircuitSnapshot("open", failures, opened_until, False)
    return CircuitSnapshot("half_open", failures, opened_until, probe_until > now)


# KEYS[1] the provider's hash; ARGV: now, probe lease end.
# Returns 0 denied, 1 allowed (failures counted), 2 probe, 3 allowed (no failure counted).
_DENIED, _ALLOWED, _PROBE, _CLEAR = 0, 1, 2, 3
_ALLOW = """
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_until') or '0')
if opened <= 0 then
  if tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') > 0 then return 1 end
  return 3
end
local now = tonumber(ARGV[1])
if now < opened then return 0 end
local probe = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if probe > now then return 0 end
redis.call('HSET', KEYS[1], 'probe_until', ARGV[2])
return 2
"""
# ARGV: now, threshold, cooldown, ttl. Returns 1 when this failure opened the circuit.
_FAILURE = """
local now = tonumber(ARGV[1])
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_until') or '0')
local opens = 0
if (opened > 0 and now >= opened) or (opened <= 0 and failures >= tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[1], 'opened_until', now + tonumber(ARGV[3]), 'probe_until', 0)
  opens = 1
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return opens
"""
_RELEASE_PROBE = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'probe_until', 0) end
return 1
"""


@dataclass
class _LocalCircuit:
    failures: int = 0
    opened_until: float = 0.0
    probe_until: float = 0.0


@dataclass(frozen=True, slots=True)
class _Closed:
    """A closed circuit as last read: whether it had failures counted, and until when to trust it."""

    clear: bool
    until: float


class Circuit:
    """The breaker for every provider; `clock` is wall time so processes agree on it."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        redis: SharedRedis | None = None,
        namespace: str | None = None,
    ) -> None:
        self._clock = clock
        self._redis = redis or SharedRedis()
        self._namespace = namespace
        self._local: dict[str, _LocalCircuit] = {}
        self._closed: dict[str, _Closed] = {}
        self._failures_seen: dict[str, int] = {}  # failures recorded here, per key: a read older than one is not kept
        self._flights: dict[tuple[str, str, int], asyncio.Future[object]] = {}  # shared calls on their way
        self._lock = threading.Lock()

    def _key(self, provider: str) -> str:
        return f"{self._namespace or state_namespace()}:circuit:{provider}"

    def _local_state(self, key: str) -> _LocalCircuit:
        return self._local.setdefault(key, _LocalCircuit())

    @staticmethod
    def _threshold() -> int:
        return max(1, int(settings.CIRCUIT_FAILURE_THRESHOLD))

    @staticmethod
    def _cooldown() -> float:
        return float(settings.CIRCUIT_COOLDOWN_SECONDS)

    @staticmethod
    def _probe_lease() -> float:
        # A probe that never reports back (a crashed process) frees the half-open slot after this.
        return max(float(settings.REQUEST_DEADLINE_SECONDS), float(settings.CIRCUIT_COOLDOWN_SECONDS), 1.0)

    async def allow(self, provider: str) -> Admission:
        """Whether a request may go to `provider` now; claims the half-open probe when it is free."""
        key, now = self._key(provider), self._clock()
        if self._known_closed(key, now) is not None:
            return Admission.ALLOWED
        lease_end = now + self._probe_lease()
        failures_before = self._failures_seen.get(key, 0)
        flight = ("allow", key, failures_before)
        shared = await self._join(flight)
        if shared is not None:
            # A read on its way answered for every request that came meanwhile; a probe it
            # claimed is its caller's alone (the others would be refused: the probe is out).
            return Admission.ALLOWED if shared in (_ALLOWED, _CLEAR) else Admission.DENIED

        async def remote(client: aioredis.Redis) -> int:
            return int(await client.register_script(_ALLOW)(keys=[key], args=[now, lease_end]))

        def local() -> int:
            with self._lock:
                st = self._local_state(key)
                if st.opened_until <= 0:
                    return _ALLOWED if st.failures else _CLEAR
                if now < st.opened_until or st.probe_until > now:
                    return _DENIED
                st.probe_until = lease_end
                return _PROBE

        async def read() -> int:
            verdict = await self._redis.run(remote, local)
            if verdict in (_ALLOWED, _CLEAR):
                self._remember_closed(key, failures_before, clear=verdict == _CLEAR, now=now)
            return verdict

        verdict = await self._lead(flight, read)
        if verdict in (_ALLOWED, _CLEAR):
            return Admission.ALLOWED
        return Admission.DENIED if verdict == _DENIED else Admission.PROBE

    async def _join(self, flight: tuple[str, str, int]) -> object | None:
        """The result of the same call already on its way on this event loop, once it is back;
        None when there is none, or its caller raised (then the caller goes on by itself)."""
        pending = self._flights.get(flight)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            return None
        result = await asyncio.shield(pending)  # a follower that is cancelled leaves the call alone
        return None if result is _GAVE_UP else result

    async def _lead(self, flight: tuple[str, str, int], call: Callable[[], Awaitable[T]]) -> T:
        """Run `call`, letting the callers of the same `flight` that come meanwhile share its result."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._flights[flight] = future
        try:
            result = await call()
        except BaseException:
            future.set_result(_GAVE_UP)
            raise
        finally:
            if self._flights.get(flight) is future:
                del self._flights[flight]
        future.set_result(result)
        return result

    def _remember_closed(self, key: str, failures_before: int, *, clear: bool, now: float) -> None:
        """Keep a closed state read since `failures_before`, unless a failure was recorded meanwhile."""
        if self._failures_seen.get(key, 0) == failures_before:
            self._closed[key] = _Closed(clear=clear, until=now + STATE_CACHE_SECONDS)

    def _known_closed(self, key: str, now: float) -> _Closed | None:
        """The closed state read less than STATE_CACHE_SECONDS ago, if any."""
        closed = self._closed.get(key)
        return closed if closed is not None and now < closed.until else None

    async def record_success(self, provider: str) -> None:
        """The provider answered: close its circuit and forget its failures (nothing to do when
        the circuit was read closed, with no failure counted, less than STATE_CACHE_SECONDS ago)."""
        key, now = self._key(provider), self._clock()
        closed = self._known_closed(key, now)
        if closed is not None and closed.clear:
            return  # closed with no failure counted a moment ago: nothing to reset
        failures_before = self._failures_seen.get(key, 0)
        # Keyed on the failures recorded here: a success after one of them resets it itself.
        flight = ("reset", key, failures_before)
        if await self._join(flight) is not None:
            return  # a reset on its way, sent after every failure this process has seen

        async def remote(client: aioredis.Redis) -> None:
            await client.delete(key)

        def local() -> None:
            with self._lock:
                self._local.pop(key, None)

        async def reset() -> bool:
            await self._redis.run(remote, local)
            self._remember_closed(key, failures_before, clear=True, now=now)
            return True

        await self._lead(flight, reset)

    async def record_failure(self, provider: str) -> None:
        """One more consecutive failure; opens the circuit at the threshold or when a probe failed."""
        key, now = self._key(provider), self._clock()
        threshold, cooldown = self._threshold(), self._cooldown()

        async def remote(client: aioredis.Redis) -> bool:
            args = [now, threshold, cooldown, _KEY_TTL_SECONDS]
            return bool(await client.register_script(_FAILURE)(keys=[key], args=args))

        def local() -> bool:
            with self._lock:
                st = self._local_state(key)
                st.failures += 1
                half_open = st.opened_until > 0 and now >= st.opened_until
                if half_open or (st.opened_until <= 0 and st.failures >= threshold):
                    st.opened_until, st.probe_until = now + cooldown, 0.0
                    return True
                return False

        self._failures_seen[key] = self._failures_seen.get(key, 0) + 1
        self._closed.pop(key, None)
        if await self._redis.run(remote, local):
            logger.warning("circuit opened for %s for %.0f s", provider, cooldown)

    async def release_probe(self, provider: str) -> None:
        """The probe ended without a verdict (the caller went away): let another one through."""
        key = self._key(provider)

        async def remote(client: aioredis.Redis) -> None:
            await client.register_script(_RELEASE_PROBE)(keys=[key], args=[])

        def local() -> None:
            with self._lock:
                if key in self._local:
                    self._local[key].probe_until = 0.0

        await self._redis.run(remote, local)

    async def snapshot(self, provider: str) -> CircuitSnapshot:
        key, now = self._key(provider), self._clock()

        async def remote(client: aioredis.Redis) -> CircuitSnapshot:
            failures, opened, probe = await client.hmget(key, ["failures", "opened_until", "probe_until"])
            return _snapshot(int(failures or 0), float(opened or 0), float(probe or 0), now)

        def local() -> CircuitSnapshot:
            with self._lock:
                st = self._local.get(key) or _LocalCircuit()
                return _snapshot(st.failures, st.opened_until, st.probe_until, now)

        return await self._redis.run(remote, local)

    async def is_open(self, provider: str) -> bool:
        """True while the provider should get no traffic (open, or half-open with its probe out)."""
        return (await self.snapshot(provider)).blocks_traffic

    async def retry_after(self, provider: str) -> float | None:
        """Seconds until the provider's cooldown ends; None when it takes traffic now."""
        snapshot = await self.snapshot(provider)
        if snapshot.state == "open":
            return max(0.0, snapshot.opened_until - self._clock())
        return 1.0 if snapshot.blocks_traffic else None


@functools.cache
def get_circuit() -> Circuit:
    """The process-wide breaker (its state lives in Redis when REDIS_URL is set)."""
    return Circuit()
