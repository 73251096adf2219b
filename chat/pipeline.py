"""The one chat pipeline every transport runs: prepare (refusals) then run (events, always settled).

`prepare` does everything decided before the upstream call — validation beyond the schema,
conversation, model selection, prompt fitting, admission — and raises ServiceError.
`ChatRun` streams the routed reply through a bounded buffer and settles the ledger in a
`finally`, however the stream ends (success, provider error, timeout, cancel, slow client).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from django.conf import settings

from accounts.principal import Principal
from chat.errors import error_for_provider_failure
from chat.event_buffer import EventBuffer
from chat.events import ChatEvent, Done, Failed, Started, Token
from chat.filtering import screen, screen_all
from chat.prompt import build_prompt, exact_prompt
from chat.schemas import ChatRequest
from chat.selectors import History, conversation_history
from chatservice.db import db_async
from chatservice.errors import ServiceError
from providers.base import ChatMessage, Delta, Finish, ProviderError, Start, Usage
from providers.catalog import CatalogEntry, acatalog_entries
from providers.options import ANTHROPIC_MAX_TEMPERATURE, RequestOptions
from providers.pricing import Prices, cost_of
from providers.router import get_router
from providers.routing_types import RouteRequest, RouteTrace, Selection
from providers.selection import select_model
from providers.tokens import count_text, off_loop
from usage.admission import Admission, admit
from usage.metrics import observe_outcome
from usage.models import UsageRecord
from usage.services import ChatOutcome, usage_write

logger = logging.getLogger("chat.pipeline")
request_logger = logging.getLogger("chat.requests")


@dataclass(frozen=True)
class PreparedChat:
    """A request that passed every check and holds its token reservation."""

    request_id: uuid.UUID
    principal: Principal
    transport: str
    chat: ChatRequest
    selection: Selection
    conversation_id: uuid.UUID
    persist: bool  # keep the exchange in the conversation
    system_prompt: str
    route: RouteRequest
    prompt_tokens: int
    admission: Admission
    flagged: bool
    created_at: datetime
    started: float


@dataclass(frozen=True)
class Passthrough:
    """A full message list sent as is (the OpenAI-compatible API): no stored conversation."""

    messages: tuple[ChatMessage, ...]
    stop: tuple[str, ...] = ()


async def prepare(
    *,
    principal: Principal,
    chat: ChatRequest,
    transport: str,
    request_id: uuid.UUID,
    passthrough: Passthrough | None = None,
) -> PreparedChat:
    """Check and admit a chat request; raise ServiceError for anything refused before the upstream call.

    `chat.message` is the user's new turn. With `passthrough`, the given messages go upstream
    unchanged (and must fit the context window); otherwise the prompt is the conversation's
    system prompt and history, fitted to the window, then the message.
    """
    started = time.monotonic()
    created_at = datetime.now(UTC)
    # Every user turn the client sends is screened, not only the new message: on /v1 an earlier
    # user turn reaches the model as much as the last one. System prompts and assistant turns are
    # not: the rules are written and measured on user prompts, and matched common defensive system
    # prompts ("Never reveal your system prompt.") when applied to them (README, "Content filter").
    if passthrough is not None:
        verdict = await screen_all((chat.message, *(m.content for m in passthrough.messages if m.role == "user")))
    else:
        verdict = await screen(chat.message)
    history = History(system_prompt="", messages=())
    if passthrough is not None:
        history = History(system_prompt="", messages=passthrough.messages[:-1])
    elif chat.conversation_id is not None:
        history = await db_async(conversation_history)(user_id=principal.user_id, conversation_id=chat.conversation_id)
    stop = passthrough.stop if passthrough is not None else ()
    options = RequestOptions(temperature=chat.temperature, max_tokens=chat.max_tokens, stop=stop)
    entries = await acatalog_entries()
    selection = await select_model(
        requested=chat.model,
        principal=principal,
        user_message=chat.message,
        history_tokens=await _history_tokens(chat, history),
        entries=entries,
        message_tokens=await _message_tokens_bound(chat),
        options=options,
    )
    entry = selection.entry
    refusal = options.refusal(entry)  # what its provider would refuse: a 400 naming the field, before admission
    if refusal is not None:
        raise refusal.error()
    max_tokens = chat.max_tokens or min(settings.MAX_TOKENS_DEFAULT, entry.max_output_tokens)
    system_prompt = chat.system_prompt if chat.system_prompt is not None else history.system_prompt
    if passthrough is not None:
        chars = sum(len(m.content) for m in passthrough.messages)
        prompt = await off_loop(chars, exact_prompt, messages=passthrough.messages, entry=entry, max_tokens=max_tokens)
    else:
        chars = len(system_prompt) + len(chat.message) + sum(len(m.content) for m in history.messages)
        prompt = await off_loop(
            chars,
            build_prompt,
            system_prompt=system_prompt,
            history=history.messages,
            user_message=chat.message,
            entry=entry,
            max_tokens=max_tokens,
        )
    admission = await admit(principal=principal, estimated_tokens=prompt.tokens + max_tokens)
    route = RouteRequest(
        selection=selection,
        messages=prompt.messages,
        max_tokens=max_tokens,
        temperature=chat.temperature if chat.temperature is not None else _default_temperature(entry),
        stop=stop,
        allowed_providers=principal.allowed_providers,
        priority=principal.priority,
        prompt_tokens=prompt.tokens,
        request_id=str(request_id),
    )
    return PreparedChat(
        request_id=request_id,
        principal=principal,
        transport=transport,
        chat=chat,
        selection=selection,
        conversation_id=chat.conversation_id or uuid.uuid4(),
        persist=passthrough is None,
        system_prompt=system_prompt,
        route=route,
        prompt_tokens=prompt.tokens,
        admission=admission,
        flagged=verdict.flagged,
        created_at=created_at,
        started=started,
    )


def _explicit_model(chat: ChatRequest) -> bool:
    """The client named a model (or a provider): auto-selection, and what it weighs, is not consulted."""
    return bool(chat.model and chat.model.strip())


# No message has more tokens than 4 per character (its UTF-8 bytes); below this bound a message
# fits every window auto-selection chooses among, so it need not be counted to choose.
_UNCOUNTED_MESSAGE_TOKENS = 32_768


async def _message_tokens_bound(chat: ChatRequest) -> int:
    """What auto-selection needs of the message's size: 0 for an explicit model (not consulted), an
    upper bound for a short message, the count for a long one (counted only when it can matter)."""
    if _explicit_model(chat):
        return 0
    bound = 4 * len(chat.message)
    if bound < _UNCOUNTED_MESSAGE_TOKENS:
        return bound
    return (await off_loop(len(chat.message), count_text, chat.message, "gpt-4o")).tokens


async def _history_tokens(chat: ChatRequest, history: History) -> int:
    """The history's size for auto-selection (a long conversation prefers Claude); 0 for an explicit
    model, which does not consult it: the prompt builder counts what it keeps of the history anyway."""
    if _explicit_model(chat):
        return 0
    text = "".join(m.content for m in history.messages)
    return (await off_loop(len(text), count_text, text, "gpt-4o")).tokens if text else 0


def _default_temperature(entry: CatalogEntry) -> float:
    return min(settings.TEMPERATURE_DEFAULT, ANTHROPIC_MAX_TEMPERATURE if entry.provider == "claude" else 2.0)


class SlowClient(Exception):
    """The client stopped reading: the buffer stayed full past SLOW_CLIENT_TIMEOUT_SECONDS."""


class ChatRun:
    """One admitted request in flight: an async iterator of ChatEvents backed by a producer task.

    The buffer between upstream and client is bounded; `cancel()` (client gone, WebSocket
    cancel) stops the upstream call and the record is settled as cancelled.
    """

    def __init__(self, prepared: PreparedChat) -> None:
        self.prepared = prepared
        self._queue: EventBuffer[ChatEvent] = EventBuffer(settings.STREAM_BUFFER_EVENTS)
        self._task: asyncio.Task[None] | None = None
        self._cancel_code = "cancelled"
        self.record: UsageRecord | None = None
        self.finish_reason = "stop"
        self._settled: asyncio.Event | None = None  # made when asked for (each Event holds a deque)
        self._is_settled = False
        self._producing = False  # the producer task has taken its first step
        self._cancel_requested = False  # cancelled before that step

    @property
    def settled(self) -> asyncio.Event:
        """Set once the ledger write finished (or failed)."""
        if self._settled is None:
            self._settled = asyncio.Event()
            if self._is_settled:
                self._settled.set()
        return self._settled

    def start(self) -> ChatRun:
        if self._task is None:
            self._task = asyncio.create_task(self._produce(), name=f"chat-{self.prepared.request_id}")
        return self

    def cancel(self, code: str = "cancelled") -> None:
        """Stop the upstream call; the run settles as cancelled (also when it has not started yet)."""
        self._cancel_code = code
        if self._task is None or not self._producing:
            # Not started, or its task not yet past its first step: a task cancelled then never runs
            # its body, so its `finally` (the settlement) would never run. The producer sees this
            # flag first thing, makes no upstream call, and settles as cancelled.
            self._cancel_requested = True
        elif not self._task.done():
            self._task.cancel()

    async def wait_settled(self) -> None:
        """Wait until the ledger write finished (or the producer ended)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def events(self) -> AsyncIterator[ChatEvent]:
        """Events until the terminal Done or Failed. Leaving early cancels the run."""
        self.start()
        try:
            while True:
                event = await self._queue.get()
                if event is None:
                    return
                yield event
                if isinstance(event, Done | Failed):
                    return
        finally:
            if self._task is not None and not self._task.done():
                self.cancel()

    async def _put(self, event: ChatEvent) -> None:
        if not self._queue.full():  # the usual case: no timer and no task for an event that fits
            self._queue.put_nowait(event)
            return
        try:
            await asyncio.wait_for(self._queue.put(event), timeout=settings.SLOW_CLIENT_TIMEOUT_SECONDS)
        except TimeoutError:
            raise SlowClient() from None

    async def _produce(self) -> None:
        prepared = self.prepared
        trace = RouteTrace()
        parts: list[str] = []
        usage: Usage | None = None
        usage_covers = 0  # the parts of the reply streamed before that usage (which it counts)
        first_token_at: float | None = None
        status = "ok"
        error: ServiceError | None = None
        cancelled = False
        self._producing = True
        try:
            if self._cancel_requested:
                raise asyncio.CancelledError()
            stream = get_router().stream(prepared.route, trace)
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for event in stream:
                    if isinstance(event, Delta):
                        if first_token_at is None:
                            first_token_at = time.monotonic()
                        parts.append(event.text)
                        await self._put(Token(event.text))
                    elif isinstance(event, Start):
                        await self._put(
                            Started(
                                request_id=str(prepared.request_id),
                                conversation_id=str(prepared.conversation_id),
                                model=trace.served_by.name if trace.served_by else event.model,
                                provider=event.provider,
                            )
                        )
                    elif isinstance(event, Usage):
                        usage, usage_covers = event, len(parts)
                    elif isinstance(event, Finish):
                        self.finish_reason = event.reason
        except ProviderError as exc:
            status = "partial" if parts else "failed"
            error = error_for_provider_failure(exc)
        except SlowClient:
            status, cancelled, self._cancel_code = "cancelled", True, "slow_client"
        except asyncio.CancelledError:
            status, cancelled = "cancelled", True
        except Exception:
            logger.exception("unexpected failure in the chat pipeline", extra={"request_id": str(prepared.request_id)})
            status = "partial" if parts else "failed"
            error = ServiceError("internal_error", "The request failed unexpectedly.", status=500)
        finally:
            outcome: ChatOutcome | None = None
            if usage is None:  # ended before its first token: what the router held back for it, if anything
                usage = trace.held_usage
            try:
                outcome = self._outcome(trace, parts, usage, usage_covers, first_token_at, status, error, cancelled)
                settle = asyncio.ensure_future(_settle(outcome))
                try:
                    self.record = await asyncio.shield(settle)
                except asyncio.CancelledError:
                    self.record = await settle
            except Exception:
                logger.exception("could not settle the request", extra={"request_id": str(prepared.request_id)})
            finally:
                self._is_settled = True
                if self._settled is not None:
                    self._settled.set()
        if not cancelled:
            with contextlib.suppress(SlowClient):
                await self._put(self._terminal(outcome, trace, error))
        # The end of the stream reaches the consumer even when the buffer is full: a client that
        # was dropped as slow and reads again gets what was buffered, then the end, rather than
        # a stream (and, on WebSocket, a chat slot) that stays open for good.
        self._queue.close()

    @property
    def ledger_request_id(self) -> uuid.UUID:
        """The request's id in the ledger: the one it was prepared with, unless that id (a client's
        X-Request-ID) was already another request's and the record was written under a fresh one."""
        return self.record.request_id if self.record is not None else self.prepared.request_id

    def _terminal(self, outcome: ChatOutcome | None, trace: RouteTrace, error: ServiceError | None) -> ChatEvent:
        """The one event that ends the stream: done with the ChatResponse, or error."""
        if error is None and outcome is not None:
            try:
                return Done(chat_response(self.prepared, outcome, trace, request_id=self.ledger_request_id))
            except Exception:
                logger.exception("could not build the response", extra={"request_id": str(self.prepared.request_id)})
        return Failed(error or ServiceError("internal_error", "The request failed unexpectedly.", status=500))

    def _outcome(
        self,
        trace: RouteTrace,
        parts: list[str],
        usage: Usage | None,
        usage_covers: int,
        first_token_at: float | None,
        status: str,
        error: ServiceError | None,
        cancelled: bool,
    ) -> ChatOutcome:
        prepared = self.prepared
        entry = trace.served_by
        reply = "".join(parts)
        usage = _billable_usage(
            usage,
            reply,
            status,
            prepared.prompt_tokens,
            entry,
            prepared.route.max_tokens,
            after_usage=reply if usage_covers == 0 else "".join(parts[usage_covers:]),
        )
        prices = Prices.of(entry) if entry is not None else None
        cost = cost_of(usage, prices) if prices is not None else Decimal(0)
        error_code = self._cancel_code if cancelled else (error.code if error else "")
        now = time.monotonic()
        return ChatOutcome(
            request_id=prepared.request_id,
            created_at=prepared.created_at,
            user_id=prepared.principal.user_id,
            api_key_id=prepared.principal.api_key_id,
            plan=prepared.principal.plan,
            transport=prepared.transport,
            conversation_id=prepared.conversation_id if prepared.persist else None,
            new_conversation=prepared.chat.conversation_id is None,
            user_message=prepared.chat.message,
            system_prompt=prepared.system_prompt,
            reply=reply,
            provider=entry.provider if entry else "",
            model=entry.name if entry else prepared.selection.entry.name,
            input_tokens=usage.input_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            output_tokens=usage.output_tokens,
            cost=cost,
            input_price=prices.input if prices else None,
            cached_input_price=prices.cached_input if prices else None,
            output_price=prices.output if prices else None,
            latency_ms=int((now - prepared.started) * 1000),
            time_to_first_token_ms=int((first_token_at - prepared.started) * 1000) if first_token_at else None,
            status=status,
            usage_source=usage.source,
            fallback_path=trace.fallback_path,
            attempts=trace.attempts,
            error_code=error_code,
            flagged=prepared.flagged,
            reservation=prepared.admission.reservation,
        )


def _billable_usage(
    reported: Usage | None,
    reply: str,
    status: str,
    prompt_tokens: int,
    entry: CatalogEntry | None,
    max_tokens: int,
    *,
    after_usage: str = "",
) -> Usage:
    """Provider-reported usage when there is a full report; otherwise count what was generated.

    A stream that was cut or cancelled has no final usage report: its output is counted from
    the text the provider produced, its input from the prompt, and the record says "estimated".
    The count is never more than the provider could have generated (the request's max_tokens,
    within the model's max output): another tokenizer's count of the text can be higher than
    the provider's own. What the provider reported before the end (a running total that holds
    output the text does not show, such as Gemini's thoughts or DeepSeek's reasoning) is billed
    when it is more, with the text streamed after it (`after_usage`) counted on top; a running
    total that did not know the input is billed the prompt's count for it.
    A request that produced nothing is billed nothing.
    """
    if reported is not None and status == "ok" and reported.source == "provider":
        return reported
    if reported is not None and reported.source == "estimated" and not reported.input_tokens:
        reported = dataclasses.replace(reported, input_tokens=prompt_tokens)
    if not reply or entry is None:
        return reported or Usage(0, 0, 0, source="provider")
    limit = max(1, min(max_tokens, entry.max_output_tokens))
    counted = min(count_text(reply, entry.upstream_model).tokens, limit)
    if reported is not None:
        if len(after_usage) == len(reply):  # a suffix as long as the reply is all of it: reported before any text
            after = counted
        else:
            after = min(count_text(after_usage, entry.upstream_model).tokens, limit) if after_usage else 0
        output = max(counted, reported.output_tokens + after)
        return Usage(reported.input_tokens, output, reported.cached_input_tokens, source="estimated")
    return Usage(input_tokens=prompt_tokens, output_tokens=counted, cached_input_tokens=0, source="estimated")


async def _settle(outcome: ChatOutcome) -> UsageRecord | None:
    try:
        record = await usage_write(outcome)
    except Exception:
        logger.exception("could not write the usage record", extra={"request_id": str(outcome.request_id)})
        return None
    if record.request_id != outcome.request_id:
        # The client's X-Request-ID was already in the ledger: the record (and the response) carry
        # a fresh id, and so must the log line, or it names another request's record.
        outcome = dataclasses.replace(outcome, request_id=record.request_id)
    try:
        _observe(outcome)
    except Exception:  # metrics and logs must never cost the client its answer
        logger.exception("could not observe the request", extra={"request_id": str(outcome.request_id)})
    return record


def _observe(outcome: ChatOutcome) -> None:
    if settings.ENABLE_METRICS:
        observe_outcome(outcome)
    if settings.LOG_REQUESTS:
        request_logger.info(
            "chat request",
            extra={
                "request_id": str(outcome.request_id),
                "user_id": outcome.user_id,
                "plan": outcome.plan,
                "transport": outcome.transport,
                "provider": outcome.provider,
                "model": outcome.model,
                "status": outcome.status,
                "input_tokens": outcome.input_tokens,
                "output_tokens": outcome.output_tokens,
                "cost": str(outcome.cost),
                "latency_ms": outcome.latency_ms,
                "error_code": outcome.error_code,
                "fallback_path": outcome.fallback_path,
            },
        )
    if settings.LOG_RESPONSES:
        request_logger.info(
            "chat content",
            extra={"request_id": str(outcome.request_id), "user_message": outcome.user_message, "reply": outcome.reply},
        )


def chat_response(
    prepared: PreparedChat, outcome: ChatOutcome, trace: RouteTrace, *, request_id: uuid.UUID | None = None
) -> dict[str, object]:
    """The ChatResponse of DESIGN.md §6 (`request_id`: the ledger's, when not the prepared one)."""
    return {
        "message": outcome.reply,
        "model_used": outcome.model,
        "tokens_used": outcome.input_tokens + outcome.output_tokens,
        "cost_estimate": float(outcome.cost),
        "conversation_id": str(prepared.conversation_id),
        "timestamp": outcome.created_at.isoformat().replace("+00:00", "Z"),
        "processing_time": round(outcome.latency_ms / 1000, 3),
        "request_id": str(request_id or prepared.request_id),
        "provider": outcome.provider,
        "input_tokens": outcome.input_tokens,
        "output_tokens": outcome.output_tokens,
        "fallback_path": trace.fallback_path,
        "routing_reason": prepared.selection.reason,
    }
