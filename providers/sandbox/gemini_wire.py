"""The sandbox's gemini wire protocol (being written)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from providers.sandbox.faults import SandboxState


def routes(state: SandboxState, provider: str = "gemini") -> list[BaseRoute]:
    return []
