"""The sandbox upstream: one ASGI app speaking OpenAI, DeepSeek, Anthropic and Gemini wire formats.

Mounted at /sandbox in the service (for providers without a key) and run on its own port
in tests; the real SDK clients talk to it over HTTP.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount

from providers.sandbox import anthropic_wire, gemini_wire, openai_wire
from providers.sandbox.faults import SandboxState

# What a sandbox built without a state (the one the service mounts) keeps of what it served.
MOUNTED_MAX_RECORDS = 1000


def create_sandbox_app(state: SandboxState | None = None) -> Starlette:
    """Build the sandbox; `state` records what it saw (a fresh, bounded one when omitted)."""
    state = state or SandboxState(max_records=MOUNTED_MAX_RECORDS)
    app = Starlette(
        routes=[
            Mount("/openai", routes=openai_wire.routes(state, provider="openai")),
            Mount("/deepseek", routes=openai_wire.routes(state, provider="deepseek")),
            Mount("/anthropic", routes=anthropic_wire.routes(state)),
            Mount("/gemini", routes=gemini_wire.routes(state)),
        ]
    )
    app.state.sandbox = state
    return app
