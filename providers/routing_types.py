"""The router's inputs and its trace: what to serve, and what happened while serving it."""

from __future__ import annotations

from dataclasses import dataclass, field

from providers.base import ChatMessage, Usage
from providers.catalog import CatalogEntry
from providers.options import RequestOptions


@dataclass(frozen=True, slots=True)
class Selection:
    """The model chosen for a request, and why (`routing_reason` in the response)."""

    entry: CatalogEntry
    reason: str
    explicit: bool  # the client named this model or its provider


@dataclass(frozen=True, slots=True)
class RouteRequest:
    selection: Selection
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float | None
    stop: tuple[str, ...]
    allowed_providers: frozenset[str]
    priority: int  # the plan's priority in the saturated-provider lane (higher first)
    prompt_tokens: int  # counted, to find a larger-context fallback
    request_id: str = ""

    def fits(self, entry: CatalogEntry) -> bool:
        """Whether `entry` takes this request's options as they are (a fallback that would not is skipped).

        max_tokens is not weighed: a fallback's reply is capped at its model's output instead."""
        return RequestOptions(temperature=self.temperature, stop=self.stop).refusal(entry) is None


@dataclass
class RouteTrace:
    """Filled in by the router while it works; the pipeline reads it when it settles."""

    attempts: int = 0  # upstream calls made, retries included
    tried: list[str] = field(default_factory=list)  # providers tried, in order, each once
    served_by: CatalogEntry | None = None  # the model whose output reached the client (or last tried)
    delivered: bool = False  # a delta reached the caller: no more fallback
    # The serving attempt's latest Usage from before its first token (a reasoning model's running
    # total), which the router holds until then: what a stream that ends before it is billed for.
    held_usage: Usage | None = None

    @property
    def fallback_path(self) -> list[str]:
        """Providers tried before the one that answered (all of them when none answered)."""
        if self.delivered and self.tried:
            return self.tried[:-1]
        if self.served_by is not None and self.tried and self.tried[-1] == self.served_by.provider:
            return self.tried[:-1]
        return list(self.tried)
