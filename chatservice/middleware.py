"""Middleware: a request id on every request and response (sync and async alike)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from chatservice.request_ids import request_id_from


class RequestIdMiddleware:
    """Sets `request.request_id` (a UUID) and answers with `X-Request-ID`."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self._async:
            return self.__acall__(request)
        request.request_id = request_id_from(request.headers.get("X-Request-ID"))  # type: ignore[attr-defined]
        response: HttpResponseBase = self.get_response(request)
        response["X-Request-ID"] = str(request.request_id)  # type: ignore[attr-defined]
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        request.request_id = request_id_from(request.headers.get("X-Request-ID"))  # type: ignore[attr-defined]
        response: HttpResponseBase = await self.get_response(request)
        response["X-Request-ID"] = str(request.request_id)  # type: ignore[attr-defined]
        return response
