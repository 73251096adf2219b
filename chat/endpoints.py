"""`POST /chat`, `POST /chat/stream` and `POST /chat/batch`: transports over the one pipeline."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from django.conf import settings

from chat.events import Done, Failed
from chat.http_transport import (
    Exchange,
    Receive,
    Scope,
    Send,
    collect,
    disconnect_guard,
    json_errors,
    run_to_end,
    stream_sse,
)
from chat.pipeline import ChatRun, prepare
from chat.schemas import ChatRequest, parse_chat_request
from chatservice.errors import ServiceError
from chatservice.request_ids import request_id_from
from usage.admission import rate_limit_headers

logger = logging.getLogger("chat.endpoints")

STREAMING_DISABLED = ServiceError("streaming_disabled", "Streaming is disabled on this service.", status=400)


class ChatEndpoint:
    """ASGI app for `POST /chat` (JSON, or SSE when `"stream": true`) and `POST /chat/stream` (SSE)."""

    def __init__(self, *, always_stream: bool, transport: str) -> None:
        self.always_stream = always_stream
        self.transport = transport

    @json_errors
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope, receive, send)
        try:
            principal = await exchange.caller("POST")
            chat = parse_chat_request(await exchange.read_body())
            streaming = self.always_stream or chat.stream
            if streaming and not settings.ENABLE_STREAMING:
                raise STREAMING_DISABLED
            transport = "sse" if streaming else self.transport
            prepared = await prepare(
                principal=principal, chat=chat, transport=transport, request_id=exchange.request_id
            )
        except ServiceError as error:
            await exchange.send_error(error)
            return
        except asyncio.CancelledError:
            return
        run = ChatRun(prepared)
        headers = rate_limit_headers(prepared.admission.limit)
        if streaming:
            await stream_sse(exchange, run, headers)
            return
        result = await run_to_end(exchange, run)
        if result is None:
            return
        if isinstance(result, Done):
            exchange.request_id = run.ledger_request_id  # X-Request-ID: the ledger's, as the body's
            await exchange.send_json(200, result.response, headers)
        else:
            await exchange.send_error(result.error, headers)


class BatchEndpoint:
    """ASGI app for `POST /chat/batch`: each item admitted, limited and billed on its own."""

    @json_errors
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope, receive, send)
        try:
            principal = await exchange.caller("POST")
            items = _batch_items(await exchange.read_body())
        except ServiceError as error:
            await exchange.send_error(error)
            return
        except asyncio.CancelledError:
            return
        limiter = asyncio.Semaphore(settings.BATCH_CONCURRENCY)
        runs: list[ChatRun] = []

        async def one(index: int, item: Any) -> dict[str, Any]:
            async with limiter:
                if exchange.disconnected.is_set():
                    return _item(index, ServiceError("cancelled", "The client went away.", status=499))
                try:
                    chat = _batch_chat(item)
                    prepared = await prepare(
                        principal=principal,
                        chat=chat,
                        transport="batch",
                        request_id=request_id_from(None),
                    )
                except ServiceError as error:
                    return _item(index, error)
                run = ChatRun(prepared)
                add_run(run)  # cancelled at once if the client left while the item was admitted
                result = await collect(run)
                await run.wait_settled()
                if isinstance(result, Done):
                    return {"index": index, "status": 200, "response": result.response, "error": None}
                if isinstance(result, Failed):
                    return _item(index, result.error)
                return _item(index, ServiceError("cancelled", "The request was cancelled.", status=499))

        async with disconnect_guard(exchange, runs) as add_run:
            results = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        if not exchange.disconnected.is_set():
            await exchange.send_json(200, {"results": results})


def _item(index: int, error: ServiceError) -> dict[str, Any]:
    return {"index": index, "status": error.status, "response": None, "error": error.as_dict()}


def _batch_items(body: bytes) -> list[Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ServiceError("invalid_json", "The request body is not valid JSON.", status=400) from None
    if not isinstance(data, dict) or set(data) != {"requests"} or not isinstance(data["requests"], list):
        raise ServiceError(
            "invalid_request",
            'The body must be {"requests": [ChatRequest, ...]} with no other fields.',
            status=400,
            details={"fields": {"requests": "must be a list of chat requests"}},
        )
    items = data["requests"]
    if not items:
        raise ServiceError(
            "invalid_request",
            "requests must not be empty.",
            status=400,
            details={"fields": {"requests": "must not be empty"}},
        )
    if len(items) > settings.BATCH_MAX_ITEMS:
        raise ServiceError(
            "invalid_request",
            f"A batch holds at most {settings.BATCH_MAX_ITEMS} requests.",
            status=400,
            details={
                "fields": {"requests": f"at most {settings.BATCH_MAX_ITEMS} items"},
                "limit": settings.BATCH_MAX_ITEMS,
            },
        )
    return items


def _batch_chat(item: Any) -> ChatRequest:
    if not isinstance(item, dict):
        raise ServiceError("invalid_request", "Each batch item must be a JSON object.", status=400)
    chat = parse_chat_request(item)
    if chat.stream:
        raise ServiceError(
            "invalid_request",
            "Batch items cannot stream.",
            status=400,
            details={"fields": {"stream": "must be false in a batch"}},
        )
    return chat
