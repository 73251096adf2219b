"""The production server end to end: `make serve`'s uvicorn command (uvloop, httptools, websockets) as a real process.

The command is read from the Makefile, so this runs what the Dockerfile runs (the deployment-file
tests hold the two equal), on a free loopback port, on the test database and Redis, with every
provider on the sandbox upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
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


def test_an_oversized_websocket_message_is_refused_before_it_is_read(
    production_server: ServerProcess, make_user: Callable[..., tuple[Any, str]]
) -> None:
    """A frame whose header declares more than MAX_REQUEST_BYTES is closed with 1009 at once.

    Under uvicorn's default (16 MiB) the server read and held the whole message before the
    application could refuse it: 20 sockets each sending one 15 MB message took the process
    from 362 to 955 MB. The frame here declares 8 MiB and sends 4 KiB of it: only a server that
    refuses on the header answers before the rest arrives.
    """
    _, key = make_user("premium")
    host, port = production_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_SECONDS) as sock:
        sock.sendall(
            b"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n\r\n"
        )
        received = b""
        while b'{"type":"ready"}' not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        declared = 8 * 1024 * 1024
        header = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", declared) + b"\0\0\0\0"  # a zero mask
        sock.sendall(header + b"a" * 4096)
        frames = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while len(frames) < 4:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                frames += chunk
    assert frames[:1] == b"\x88", frames  # a close frame
    assert struct.unpack("!H", frames[2:4])[0] == 1009
