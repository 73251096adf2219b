"""Run the sandbox upstream (or any ASGI app) on a real loopback port in a background thread."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
import traceback
from typing import Any, TextIO

import uvicorn


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port until `stop()`."""

    def __init__(self, app: Any, *, port: int = 0) -> None:
        self.app = app
        if port == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def tasks(self, prefix: str) -> list[asyncio.Task[object]]:
        """The server loop's live tasks whose name starts with `prefix` (for leak checks)."""
        return [t for t in asyncio.all_tasks(self.loop) if t.get_name().startswith(prefix) and not t.done()]

    def dump_stacks(self, out: TextIO = sys.stderr) -> None:
        """Every thread's stack and every task of the server's loop, for a request that stalled."""
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            out.write(f"thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame, limit=25))}")
        loop = self.loop
        if loop is None:
            return
        for task in list(asyncio.all_tasks(loop)):
            out.write(f"task {task.get_name()}:\n")
            for frame in task.get_stack(limit=25):
                out.write(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
        out.flush()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
