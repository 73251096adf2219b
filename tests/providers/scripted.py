"""A scripted provider for router tests: queue replies and failures, record calls and closes.

Also the shared helpers of the router tests: route requests, drain the router, scope the
Redis keys of one test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis
from django.conf import settings
from django.test import override_settings

from providers.base import ChatMessage, Delta, Event, Finish, ProviderError, ProviderRequest, Start, Usage
from providers.catalog import CatalogEntry
from providers.router import Router
from providers.routing_types import RouteRequest, RouteTrace, Selection

ErrorFactory = Callable[[str], ProviderError]


@dataclass(frozen=True)
class Step:
    """One scripted upstream call: wait, stream `texts`, then maybe fail, or hang forever."""

    texts: tuple[str, ...] = ("Hello", " world")
    start_delay: float = 0.0  # seconds before Start (an upstream slow to begin its answer)
    first_delay: float = 0.0  # seconds before the first event (after Start)
    delay: float = 0.0  # seconds between deltas
    error: ErrorFactory | None = None
    fail_after: int = 0  # deltas streamed before `error` is raised
    hang: bool = False  # never produce a delta (until closed)
    finish: str = "stop"


def reply(*texts: str, first_delay: float = 0.0, delay: float = 0.0) -> Step:
    return Step(texts=texts or ("Hello", " world"), first_delay=first_delay, delay=delay)


def fail(error_type: type[ProviderError], message: str = "scripted failure", *, after: int = 0, **kw: object) -> Step:
    """Raise `error_type(provider, message, **kw)`, after `after` deltas."""

    def make(provider: str) -> ProviderError:
        return error_type(provider, message, **kw)  # type: ignore[arg-type]

    return Step(error=make, fail_after=after)


def hang() -> Step:
    return Step(hang=True)


@dataclass
class ScriptedProvider:
    """Serves the queued steps in order, then `default` for every further call."""

    name: str
    default: Step = field(default_factory=reply)
    steps: deque[Step] = field(default_factory=deque)
    calls: list[ProviderRequest] = field(default_factory=list)
    opened: int = 0
    closed_early: int = 0  # streams closed (aclose / cancel) before they ended
    active: int = 0
    peak_active: int = 0
    models: list[str] = field(default_factory=lambda: ["scripted-model"])
    list_error: ProviderError | None = None

    def push(self, *steps: Step) -> ScriptedProvider:
        self.steps.extend(steps)
        return self

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Event]:
        step = self.steps.popleft() if self.steps else self.default
        self.calls.append(request)
        self.opened += 1
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        ended = False
        try:
            if step.start_delay:
                await asyncio.sleep(step.start_delay)
            yield Start(self.name, request.model)
            if step.hang:
                await asyncio.sleep(3600)
            if step.first_delay:
                await asyncio.sleep(step.first_delay)
            if step.error is not None and step.fail_after == 0:
                ended = True
                raise step.error(self.name)
            for index, text in enumerate(step.texts):
                if index and step.delay:
                    await asyncio.sleep(step.delay)
                yield Delta(text)
                if step.error is not None and index + 1 == step.fail_after:
                    ended = True
                    raise step.error(self.name)
            yield Usage(input_tokens=5, output_tokens=len(step.texts))
            yield Finish(step.finish)
            ended = True
        finally:
            self.active -= 1
            if not ended:
                self.closed_early += 1

    async def list_models(self) -> list[str]:
        if self.list_error is not None:
            raise self.list_error
        return list(self.models)


def route_request(
    entry: CatalogEntry,
    *,
    allowed: frozenset[str] | set[str] = frozenset({"openai", "claude", "deepseek", "gemini"}),
    priority: int = 1,
    text: str = "hello",
    max_tokens: int = 100,
    prompt_tokens: int = 10,
) -> RouteRequest:
    return RouteRequest(
        selection=Selection(entry=entry, reason="requested", explicit=True),
        messages=(ChatMessage("user", text),),
        max_tokens=max_tokens,
        temperature=0.5,
        stop=(),
        allowed_providers=frozenset(allowed),
        priority=priority,
        prompt_tokens=prompt_tokens,
        request_id=uuid.uuid4().hex,
    )


async def collect(router: Router, request: RouteRequest, trace: RouteTrace | None = None) -> list[Event]:
    """Drain the router; on failure the exception propagates (events so far are lost)."""
    return [event async for event in router.stream(request, trace or RouteTrace())]


async def collect_until_error(
    router: Router, request: RouteRequest, trace: RouteTrace
) -> tuple[list[Event], BaseException | None]:
    events: list[Event] = []
    try:
        async for event in router.stream(request, trace):
            events.append(event)
    except Exception as exc:
        return events, exc
    return events, None


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


@contextmanager
def isolated_router_state() -> Iterator[str]:
    """A fresh Redis key namespace for the router's shared state; its keys are deleted afterwards."""
    namespace = f"h4test:{uuid.uuid4().hex[:12]}"
    with override_settings(ROUTER_STATE_NAMESPACE=namespace):
        try:
            yield namespace
        finally:
            if settings.REDIS_URL:
                client = redis.Redis.from_url(settings.REDIS_URL)
                try:
                    keys = list(client.scan_iter(match=f"{namespace}:*", count=500))
                    if keys:
                        client.delete(*keys)
                finally:
                    client.close()


class FakeClock:
    """A clock tests move by hand (wall-clock-like start so ISO times look real)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
