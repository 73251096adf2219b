"""Child processes of a bench run: started pinned to a core, logged to a file, awaited, stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MOCK_CORE = 0
GATEWAY_CORE = 1


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_pin() -> bool:
    """Pinning needs taskset and two cores at least."""
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pin_self(core: int) -> bool:
    """Pin this process (the load generator) to `core`; False when the machine cannot."""
    if not can_pin() or not hasattr(os, "sched_setaffinity"):
        return False
    os.sched_setaffinity(0, {core})
    return True


@dataclass
class Child:
    """A started server: its process (the pid is the server itself: taskset execs it) and its log."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, path: str, *, timeout: float = 30.0) -> None:
        """Poll GET `path` until it answers 200; raise with the log's tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:300]!r}"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} was not ready at {path} within {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def stop(self, *, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit within `timeout` seconds."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def start(
    name: str, command: list[str], *, port: int, core: int | None, env: dict[str, str], log_dir: Path, cwd: Path
) -> Child:
    """Start `command` in `cwd` (pinned to `core` when the machine allows), its output in `log_dir/name.log`."""
    if core is not None and can_pin():
        command = ["taskset", "-c", str(core), *command]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL, cwd=cwd
        )
    return Child(name=name, process=process, port=port, log_path=log_path)
