"""The production server end to end: `make serve`'s uvicorn command (uvloop, httptools, websockets) as a real process.

The command is read from the Makefile, so this runs what the Dockerfile runs (the deployment-file
tests hold the two equal), on a free loopback port, on the test database and Redis, with every
provider on the sandbox upstream.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatservice import heap
from providers.sandbox.faults import SandboxState
from tests.chat.clients import ws_chat
from tests.sandbox_server import BackgroundServer
from tests.usage.servers import ServerProcess, make_command, running_services
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

VENV_BIN = str(Path(sys.executable).parent)
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 10.0


def production_command(port: int) -> list[str]:
    return make_command("serve", BIN=VENV_BIN, HOST="127.0.0.1", PORT=str(port))


@pytest.fixture
def production_server(
    sandbox_server: BackgroundServer, sandbox: SandboxState, transactional_db: None, tmp_path: Path
) -> Iterator[ServerProcess]:
    """`make serve`'s command on the test database, the test's Redis and namespaces, the sandbox."""
    with running_services(1, sandbox_url=sandbox_server.url, log_dir=tmp_path, command=production_command) as servers:
        yield servers[0]


def test_the_production_command_serves_health_chat_and_websocket_chat(
    production_server: ServerProcess, sandbox: SandboxState, make_user: Callable[..., tuple[Any, str]]
) -> None:
    url = production_server.url
    assert httpx.get(f"{url}/health", timeout=TIMEOUT_SECONDS).status_code == 200
    user, key = make_user("premium")

    response = httpx.post(
        f"{url}/chat",
        json={"message": "Hello over uvicorn [[tokens:3]]", "model": "openai"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=TIMEOUT_SECONDS,
    )
    assert response.status_code == 200, production_server.log_tail()
    assert response.headers["content-type"].startswith("application/json")
    reply = response.json()
    assert (reply["provider"], reply["output_tokens"]) == ("openai", 3)
    assert reply["message"] and reply["request_id"] == response.headers["X-Request-ID"]

    chat = {"message": "Hello over the socket [[tokens:4]]", "model": "openai"}
    received = asyncio.run(asyncio.wait_for(ws_chat(url, key, chat), TIMEOUT_SECONDS))  # `ready` is checked there
    assert received.shape() == ["start", "token+", "done"], received.events
    assert received.last()["output_tokens"] == 4 and received.text() == received.last()["message"]

    transports = Counter(UsageRecord.objects.filter(user=user).values_list("transport", flat=True))
    assert transports == Counter({"rest": 1, "websocket": 1})
    assert len(sandbox.calls()) == 2
    assert production_server.proc.poll() is None, production_server.log_tail()


def test_the_served_application_freezes_its_startup_heap() -> None:
    """Loading the ASGI application (what uvicorn and daphne import) settles the collector:
    the startup heap frozen out of its sight, young objects collected less often."""
    probe = (
        "import gc; before = gc.get_threshold()[0]; import chatservice.asgi; "
        "print(before, gc.get_freeze_count(), gc.get_threshold()[0])"
    )
    env = {"DJANGO_SETTINGS_MODULE": "chatservice.settings", "SECRET_KEY": "s" * 60, "PATH": VENV_BIN}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    before, frozen, young = (int(v) for v in done.stdout.split())
    assert before == 700 and young == heap.YOUNG_THRESHOLD
    assert frozen > 100_000  # what the application loaded, out of every collection's way
