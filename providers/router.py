"""The router: a provider-like stream that retries, times out, falls back and trips circuits.

`Router.stream(request, trace)` serves `request.selection.entry`, retrying retryable errors
with exponential backoff (or the upstream's Retry-After) and falling back along
FALLBACK_ORDER, all under one deadline. It yields `Start` only once the serving attempt
produced its first Delta (or a Finish with no text), so a caller never sees a Start from a
provider that then failed; after that, an upstream failure is re-raised as is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from providers.base import (
    AllProvidersFailed,
    ContextLengthExceeded,
    DeadlineExceeded,
    Delta,
    Event,
    Finish,
    ModelNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderRequest,
    ProviderSaturated,
    ProviderTimeout,
    ProviderUnavailable,
    RetryableError,
    Start,
    Usage,
)
from providers.catalog import CatalogEntry, acatalog_entries, provider_default
from providers.circuit import Admission, Circuit, get_circuit
from providers.errors import from_transport
from providers.priority import PriorityLane
from providers.registry import registry
from providers.routing_types import RouteRequest, RouteTrace
from providers.status import StatusStore, get_status_store

logger = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_SECONDS = 5.0
_CLOSE_TIMEOUT_SECONDS = 5.0
_MAX_TRAILING_EVENTS = 16


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """The router's settings, read from Django's settings once and again after any setting changes
    (`setting_changed`: override_settings, pytest-django's `settings`; never while serving)."""

    enable_fallback: bool
    fallback_order: tuple[str, ...]
    max_attempts: int
    retry_delay: float
    first_token_timeout: float
    idle_timeout: float
    deadline: float
    max_wait: float

    @classmethod
    def current(cls) -> RouterSettings:
        global _router_settings
        if _router_settings is None:
            _router_settings = cls._read()
        return _router_settings

    @classmethod
    def _read(cls) -> RouterSettings:
        order = settings.FALLBACK_ORDER
        if isinstance(order, str):
            order = order.split(",")
        return cls(
            enable_fallback=bool(settings.ENABLE_FALLBACK),
            fallback_order=tuple(p.strip() for p in order if p.strip()),
            max_attempts=max(1, int(settings.MAX_RETRY_ATTEMPTS)),
            retry_delay=max(0.0, float(settings.RETRY_DELAY_SECONDS)),
            first_token_timeout=float(settings.FIRST_TOKEN_TIMEOUT_SECONDS),
            idle_timeout=float(settings.STREAM_IDLE_TIMEOUT_SECONDS),
            deadline=float(settings.REQUEST_DEADLINE_SECONDS),
            max_wait=float(settings.PRIORITY_MAX_WAIT_SECONDS),
        )


_router_settings: RouterSettings | None = None


@receiver(setting_changed)
def _forget_router_settings(**_: object) -> None:
    global _router_settings
    _router_settings = None


@dataclass
class _Plan:
    """One request's routing state: its settings, deadline and what has been visited."""

    request: RouteRequest
    trace: RouteTrace
    cfg: RouterSettings
    deadline: float
    visited_providers: set[str]
    visited_models: set[str]


def _is_fallback_worthy(exc: ProviderError) -> bool:
    """Errors after which another provider may succeed (final ones end the request)."""
    return isinstance(exc, RetryableError | AllProvidersFailed | ProviderSaturated | ModelNotFound)


def _as_provider_error(provider: str, exc: Exception) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    mapped = from_transport(provider, exc)
    if mapped is not None:
        return mapped
    logger.exception("unexpected error from the %s client", provider)
    return ProviderUnavailable(provider, f"unexpected client error ({type(exc).__name__})")


class Router:
    """Routes a request across providers; `clock` and `sleep` are swappable for tests."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        circuit: Circuit | None = None,
        status: StatusStore | None = None,
        lane: PriorityLane | None = None,
        catalog: Callable[[], Awaitable[tuple[CatalogEntry, ...]]] = acatalog_entries,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.circuit = circuit or get_circuit()
        self.status = status or get_status_store()
        self.lane = lane or PriorityLane()
        self._catalog = catalog

    def stream(self, request: RouteRequest, trace: RouteTrace) -> AsyncIterator[Event]:
        """Serve `request`, yielding Start, Deltas, Usage and Finish as one provider would."""
        return self._route(request, trace)

    # --- across providers -----------------------------------------------------------------

    async def _route(self, request: RouteRequest, trace: RouteTrace) -> AsyncGenerator[Event, None]:
        cfg = RouterSettings.current()
        plan = _Plan(request, trace, cfg, self._clock() + cfg.deadline, set(), set())
        entry = request.selection.entry
        while True:
            plan.visited_providers.add(entry.provider)
            plan.visited_models.add(entry.name)
            try:
                async with aclosing(self._serve(entry, plan)) as events:
                    async for event in events:
                        yield event
                return
            except ProviderError as exc:
                if trace.delivered or not cfg.enable_fallback:
                    raise
                if isinstance(exc, ContextLengthExceeded):
                    bigger = await self._larger_context(await self._catalog(), plan, entry)
                    if bigger is None:
                        raise
                    entry = bigger
                    continue
                if not _is_fallback_worthy(exc):
                    raise
                last_error = exc
            self._check_deadline(plan, "before falling back")
            following = await self._next_provider(await self._catalog(), plan)
            if following is None:
                raise await self._exhausted(plan, last_error)
            logger.info("falling back to %s after: %s", following.name, last_error)
            entry = following

    async def _healthy(self, entry: CatalogEntry) -> bool:
        return entry.enabled and not entry.maintenance and not await self.circuit.is_open(entry.provider)

    async def _next_provider(self, entries: tuple[CatalogEntry, ...], plan: _Plan) -> CatalogEntry | None:
        """The next FALLBACK_ORDER provider not yet visited, allowed by the plan, taking the options, healthy."""
        for name in plan.cfg.fallback_order:
            if name in plan.visited_providers or name not in plan.request.allowed_providers:
                continue
            entry = provider_default(entries, name)
            if entry is not None and plan.request.fits(entry) and await self._healthy(entry):
                return entry
        return None

    async def _can_fall_back(self, plan: _Plan) -> bool:
        """Whether a failure now would go on to another provider (fallback on, one left to try)."""
        return plan.cfg.enable_fallback and await self._next_provider(await self._catalog(), plan) is not None

    async def _larger_context(
        self, entries: tuple[CatalogEntry, ...], plan: _Plan, failed: CatalogEntry
    ) -> CatalogEntry | None:
        """An allowed, healthy model whose window holds the prompt and the reply (same provider first)."""
        request = plan.request
        fits = [
            e
            for e in entries
            if e.provider in request.allowed_providers
            and request.fits(e)
            and e.name not in plan.visited_models
            and e.context_window > failed.context_window
            and e.context_window >= request.prompt_tokens + min(request.max_tokens, e.max_output_tokens)
        ]
        fits.sort(key=lambda e: (e.provider != failed.provider, e.context_window, e.input_price))
        for entry in fits:
            if await self._healthy(entry):
                return entry
        return None

    async def _exhausted(self, plan: _Plan, last_error: ProviderError) -> AllProvidersFailed:
        waits = []
        for provider in sorted(plan.request.allowed_providers):
            wait = await self.circuit.retry_after(provider)
            if wait is not None:
                waits.append(wait)
        retry_after = min(waits) if waits else (last_error.retry_after or DEFAULT_RETRY_AFTER_SECONDS)
        tried = ", ".join(plan.trace.tried) or "none"
        return AllProvidersFailed(
            last_error.provider,
            f"No provider could serve the request (tried: {tried}; last error: {last_error.message})",
            retry_after=float(max(1, math.ceil(retry_after))),
        )

    def _check_deadline(self, plan: _Plan, when: str) -> None:
        if self._clock() >= plan.deadline:
            raise DeadlineExceeded(
                plan.trace.tried[-1] if plan.trace.tried else plan.request.selection.entry.provider,
                f"request deadline of {plan.cfg.deadline:g} s passed {when}",
            )

    # --- one provider: retries --------------------------------------------------------------

    async def _serve(self, entry: CatalogEntry, plan: _Plan) -> AsyncGenerator[Event, None]:
        cfg = plan.cfg
        last_error: RetryableError | None = None
        for attempt in range(1, cfg.max_attempts + 1):
            self._check_deadline(plan, f"before attempt {attempt} on {entry.provider}")
            admission = await self.circuit.allow(entry.provider)
            if admission is Admission.DENIED:
                if last_error is not None:  # our own failures opened it: report what they were
                    raise last_error
                wait = await self.circuit.retry_after(entry.provider)
                raise AllProvidersFailed(entry.provider, "circuit open", retry_after=wait)
            try:
                async with aclosing(self._attempt(entry, plan, admission)) as events:
                    async for event in events:
                        yield event
                return
            except RetryableError as exc:
                if plan.trace.delivered or attempt == cfg.max_attempts:
                    raise
                last_error = exc
                backoff = cfg.retry_delay * 2 ** (attempt - 1)
                wait = exc.retry_after if exc.retry_after is not None else backoff
                if wait >= plan.deadline - self._clock():
                    logger.info("%s: a %.1f s wait does not fit the deadline; moving on", entry.provider, wait)
                    raise
                if wait > backoff and await self._can_fall_back(plan):
                    # Honouring Retry-After means not calling this provider sooner; it does not mean
                    # keeping the user waiting while another provider could answer now.
                    logger.info("%s asks for %.1f s; falling back rather than waiting", entry.provider, wait)
                    raise
                logger.info("%s attempt %d failed (%s); retrying in %.2f s", entry.provider, attempt, exc, wait)
                await self._sleep(wait)

    # --- one upstream call ------------------------------------------------------------------

    async def _attempt(self, entry: CatalogEntry, plan: _Plan, admission: Admission) -> AsyncGenerator[Event, None]:
        """Take a priority-lane slot for the whole upstream stream, then relay it."""
        request, trace = plan.request, plan.trace
        relayed = False
        try:
            async with self.lane.slot(
                entry.provider,
                priority=request.priority,
                max_wait=min(plan.cfg.max_wait, max(0.0, plan.deadline - self._clock())),
            ):
                relayed = True
                trace.attempts += 1
                if entry.provider not in trace.tried:
                    trace.tried.append(entry.provider)
                trace.served_by = entry
                async with aclosing(self._relay(entry, plan, admission)) as events:
                    async for event in events:
                        yield event
        except ProviderSaturated:
            self._check_deadline(plan, f"while waiting for a {entry.provider} slot")
            raise
        finally:
            if not relayed and admission is Admission.PROBE:
                await self.circuit.release_probe(entry.provider)

    async def _relay(self, entry: CatalogEntry, plan: _Plan, admission: Admission) -> AsyncGenerator[Event, None]:
        """Pass one upstream stream through: hold Start until the first Delta, time out silences.

        Any event but Start counts as the upstream's first sign of life (a running Usage during a
        reasoning phase included); only a Delta or the Finish commits the stream to this provider.
        """
        request, cfg = plan.request, plan.cfg
        provider_request = ProviderRequest(
            model=entry.upstream_model,
            messages=request.messages,
            max_tokens=max(1, min(request.max_tokens, entry.max_output_tokens)),
            temperature=request.temperature,
            stop=request.stop,
            request_id=request.request_id,
        )
        started = self._clock()
        first_at: float | None = None
        verdict_given = False
        stream: AsyncIterator[Event] | None = None
        watch = _SilenceWatch()
        plan.trace.held_usage = None  # this attempt's, not an earlier one's
        try:
            try:
                stream = registry.get(entry.provider).stream(provider_request)
                committed = False
                while True:
                    if first_at is None:  # what is left of the first-token timeout, counted from the call
                        limit = max(0.0, started + cfg.first_token_timeout - self._clock())
                    else:
                        limit = cfg.idle_timeout
                    event = await self._next_event(stream, entry, plan, limit, first_at is None, watch)
                    if event is None:
                        raise ProviderUnavailable(entry.provider, "the stream ended without a finish")
                    if isinstance(event, Start) or (isinstance(event, Delta) and not event.text):
                        continue
                    if first_at is None:
                        first_at = self._clock()
                    if not committed and isinstance(event, Usage):
                        # A running total (reasoning, thoughts) is a sign of life, not a first token: it
                        # waits for one, the latest in place of the others, and on the trace, so a
                        # stream that fails or is cancelled before its first token is billed for it.
                        plan.trace.held_usage = event
                        continue
                    if not committed:
                        committed = True
                        if isinstance(event, Delta):
                            plan.trace.delivered = True
                        yield Start(entry.provider, entry.name)
                        if plan.trace.held_usage is not None:
                            yield plan.trace.held_usage
                    if isinstance(event, Finish):
                        verdict_given = True
                        await self.circuit.record_success(entry.provider)
                        await self.status.record_call(entry.provider, entry.name, ok=True, latency=first_at - started)
                        for trailing in await self._drain(stream, entry, plan, watch):
                            yield trailing
                        yield event
                        return
                    yield event
            except ProviderError:
                raise
            except Exception as exc:
                raise _as_provider_error(entry.provider, exc) from exc
        except ProviderError as exc:
            latency = (first_at if first_at is not None else self._clock()) - started
            verdict_given = await self._record_error(entry, exc, latency)
            raise
        finally:
            watch.close()
            if stream is not None:
                await self._close(stream, entry.provider)
            if not verdict_given and admission is Admission.PROBE:
                await self.circuit.release_probe(entry.provider)

    async def _next_event(
        self,
        stream: AsyncIterator[Event],
        entry: CatalogEntry,
        plan: _Plan,
        limit: float,
        first: bool,
        watch: _SilenceWatch,
    ) -> Event | None:
        """The next upstream event, None at the end; ProviderTimeout / DeadlineExceeded on silence."""
        remaining = plan.deadline - self._clock()
        watch.arm(max(0.0, min(limit, remaining)))
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not watch.expired():
                raise
            if remaining <= limit:
                raise DeadlineExceeded(
                    entry.provider, f"request deadline of {plan.cfg.deadline:g} s passed while streaming"
                ) from None
            if first:
                raise ProviderTimeout(
                    entry.provider, f"no first token within {plan.cfg.first_token_timeout:g} s"
                ) from None
            raise ProviderTimeout(entry.provider, f"the stream went silent within {limit:g} s") from None
        finally:
            watch.disarm()

    async def _drain(
        self, stream: AsyncIterator[Event], entry: CatalogEntry, plan: _Plan, watch: _SilenceWatch
    ) -> list[Usage]:
        """Read the stream to its end after the Finish, so the upstream response completes cleanly
        (its connection goes back to the pool); a Usage that came after the Finish is kept."""
        trailing: list[Usage] = []
        for _ in range(_MAX_TRAILING_EVENTS):
            try:
                event = await self._next_event(stream, entry, plan, min(plan.cfg.idle_timeout, 5.0), False, watch)
            except ProviderError as exc:
                logger.info("%s: error after the finish ignored: %s", entry.provider, exc)
                break
            if event is None:
                break
            if isinstance(event, Usage):
                trailing.append(event)
        return trailing

    async def _record_error(self, entry: CatalogEntry, exc: ProviderError, latency: float) -> bool:
        """Report a failed attempt to the circuit and the live status; True if the circuit got a verdict.

        Transient and auth failures count against the provider; a bad request, a refusal or a
        missing model means the provider answered; a deadline says nothing about it.
        """
        if isinstance(exc, RetryableError | ProviderAuthError):
            await self.circuit.record_failure(entry.provider)
            await self.status.record_call(entry.provider, entry.name, ok=False, latency=latency)
            return True
        if isinstance(exc, DeadlineExceeded):
            await self.status.record_call(entry.provider, entry.name, ok=False, latency=latency)
            return False
        await self.circuit.record_success(entry.provider)
        await self.status.record_call(
            entry.provider, entry.name, ok=not isinstance(exc, ModelNotFound), latency=latency
        )
        return True

    @staticmethod
    async def _close(stream: AsyncIterator[Event], provider: str) -> None:
        """Close the upstream generator (and with it the HTTP response)."""
        aclose = getattr(stream, "aclose", None)
        if aclose is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                await aclose()
        except Exception:
            logger.warning("closing the %s stream failed", provider, exc_info=True)


class _SilenceWatch:
    """How long an upstream stream may stay silent: one timer per stream, not one per event.

    `arm(budget)` before waiting for the next event, `disarm()` once it came (the time the
    consumer then takes is not the upstream's silence). An `asyncio.timeout` per event cost
    ~5 µs (a timer created and cancelled each time); here an event moves a deadline, and the
    timer, when it fires, looks at the deadline: later (events came) it waits again, passed it
    cancels the task, as `asyncio.timeout` would, and `expired()` tells that cancellation from
    any other (whose pending count it leaves as it found it).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._cancelling = self._task.cancelling() if self._task is not None else 0
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    def arm(self, budget: float) -> None:
        self._deadline = deadline = self._loop.time() + budget
        if self._handle is not None and self._handle.when() > deadline:  # a shorter limit than before
            self._handle.cancel()
            self._handle = None
        if self._handle is None:
            self._handle = self._loop.call_at(deadline, self._check)

    def disarm(self) -> None:
        self._deadline = None

    def expired(self) -> bool:
        """True once for a cancellation this watch made (the caller then raises its timeout)."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        # Ours alone, unless the task was also cancelled from outside meanwhile: then that wins.
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None or self._task is None:
            return  # not waiting for an event now: the next arm() sets a timer again
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._check)
            return
        self._fired = True
        self._task.cancel()


@functools.cache
def get_router() -> Router:
    """The process-wide router."""
    return Router()
