"""The sandbox as the service mounts it at /sandbox (providers without a key): what it keeps stays bounded."""

from __future__ import annotations

import httpx

from providers.sandbox.app import create_sandbox_app
from providers.sandbox.faults import SandboxState


async def test_the_mounted_sandbox_keeps_a_bounded_record_of_what_it_served() -> None:
    """Nothing reads the record of a mounted sandbox (only tests read theirs): it kept every request
    and every distinct `[[fail:CODE*N]]` message for the life of the process, a leak with each chat."""
    app = create_sandbox_app()  # as chatservice.routing mounts it
    state: SandboxState = app.state.sandbox
    headers = {"Authorization": "Bearer sandbox-key"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox") as client:
        for i in range(1500):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i} [[fail:500*1]]"}]}
            response = await client.post("/openai/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 500  # each message fails its first time, as the marker says

    assert len(state.calls()) == 1000  # the latest
    assert len(state._fail_counts) <= 1000


def test_a_sandbox_given_a_state_records_everything() -> None:
    state = SandboxState()
    assert create_sandbox_app(state).state.sandbox is state and state.max_records is None
