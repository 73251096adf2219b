"""Real processes for end-to-end tests: N service instances under uvicorn, and a disposable redis-server.

The service processes run `chatservice.asgi:application` under the uvicorn CLI with
DJANGO_SETTINGS_MODULE=tests.settings, by default through `service_application` below, which
applies the test's limiter and router namespaces (instances of one deployment share their keys;
the pytest process sets the router's per test) and exits when the test process is gone; or with
a command of the Makefile's (`make_command`), such as `make serve`'s production command. Every
process is killed by `stop()`, and readiness is a bounded loop on `GET /health`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx
import redis
from django.conf import settings as django_settings

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_SECONDS = 45.0
STOP_TIMEOUT_SECONDS = 5.0
# Settings that tests.settings would otherwise choose per process; the factory applies them.
SHARED_SETTINGS = ("RATE_LIMIT_NAMESPACE", "ROUTER_STATE_NAMESPACE")
# A service process exits when the test process is gone (killed without running its finalizers), or after this.
PARENT_ENV = "CHAT_TEST_PARENT_PID"
MAX_LIFETIME_SECONDS = 900


def _exit_with_parent(parent: int) -> None:
    for _ in range(int(MAX_LIFETIME_SECONDS / 0.5)):
        if os.getppid() != parent:
            break
        time.sleep(0.5)
    os._exit(0)


def service_application() -> Any:
    """uvicorn `--factory` entry: the service's ASGI app with the namespaces the test passed in the environment."""
    import django
    from django.conf import settings

    parent = os.environ.get(PARENT_ENV)
    if parent:
        threading.Thread(target=_exit_with_parent, args=(int(parent),), daemon=True, name="parent-watch").start()
    django.setup()
    for name in SHARED_SETTINGS:
        value = os.environ.get(name)
        if value:
            setattr(settings, name, value)
    from chatservice.asgi import application

    return application


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def database_url(database: Mapping[str, Any]) -> str:
    """A DATABASE_URL for one of Django's DATABASES entries (the test database, here)."""
    user = quote(str(database.get("USER") or ""), safe="")
    password = quote(str(database.get("PASSWORD") or ""), safe="")
    auth = f"{user}:{password}@" if password else f"{user}@"
    host = database.get("HOST") or "127.0.0.1"
    port = database.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{database['NAME']}"


def service_env(
    *,
    database: Mapping[str, Any],
    redis_url: str,
    sandbox_url: str,
    rate_limit_namespace: str,
    router_state_namespace: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a service process that shares the test's database, Redis, namespaces and sandbox."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": database_url(database),
        "REDIS_URL": redis_url,
        "SANDBOX_URL": sandbox_url,
        "RATE_LIMIT_NAMESPACE": rate_limit_namespace,
        "ROUTER_STATE_NAMESPACE": router_state_namespace,
        "CONN_MAX_AGE": "0",
        "LOG_LEVEL": "WARNING",
        PARENT_ENV: str(os.getpid()),
    }
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    """One child process listening on a loopback port; its output goes to `log_path`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log: IO[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Kill the process (SIGTERM, then SIGKILL) and close its log; safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_SECONDS)
        if not self.log.closed:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL now: the process gets no chance to clean up (an outage, not a shutdown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_SECONDS)


class RedisProcess(ServerProcess):
    """A redis-server child process; `url` is its REDIS_URL."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _spawn(
    command: list[str], *, env: Mapping[str, str], log_path: Path, port: int, kind: type[ServerProcess] = ServerProcess
) -> ServerProcess:
    log = log_path.open("wb")
    try:
        proc = subprocess.Popen(command, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    except BaseException:
        log.close()
        raise
    return kind(proc=proc, port=port, log_path=log_path, log=log)


def _wait_ready(server: ServerProcess, probe: Any, deadline: float) -> None:
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.log_path.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if probe(server):
                return
        except (httpx.HTTPError, redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.log_path.name} not ready in {READY_TIMEOUT_SECONDS} s:\n{server.log_tail()}")
        time.sleep(0.1)


def _healthy(server: ServerProcess) -> bool:
    return httpx.get(f"{server.url}/health", timeout=2).status_code == 200


def factory_command(port: int) -> list[str]:
    """The service on 127.0.0.1:`port` under uvicorn, through `service_application`."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tests.usage.servers:service_application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def make_command(target: str, **variables: str) -> list[str]:
    """The command of the Makefile's `target` (its one recipe line, continuations joined) as argv,
    each `$(NAME)` replaced by `variables[NAME]`; a variable not given is an error."""
    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", makefile, re.MULTILINE)
    if recipe is None:
        raise LookupError(f"the Makefile has no recipe for {target!r}")
    lines = recipe.group(1).splitlines()
    if len(lines) != 1:
        raise LookupError(f"the recipe of {target!r} has {len(lines)} lines, not one command")
    return [re.sub(r"\$\((\w+)\)", lambda name: variables[name.group(1)], word) for word in shlex.split(lines[0])]


def start_services(
    count: int,
    *,
    env: Mapping[str, str],
    log_dir: Path,
    command: Callable[[int], list[str]] = factory_command,
) -> list[ServerProcess]:
    """Start `count` service processes at once, `command(port)` each, and wait until each answers
    `GET /health` with 200.

    On any failure every process already started is stopped before the error propagates.
    """
    servers: list[ServerProcess] = []
    try:
        for index in range(count):
            port = free_port()
            servers.append(_spawn(command(port), env=env, log_path=log_dir / f"service-{index}.log", port=port))
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for server in servers:
            _wait_ready(server, _healthy, deadline)
    except BaseException:
        stop_all(servers)
        raise
    return servers


@contextlib.contextmanager
def running_services(
    count: int,
    *,
    sandbox_url: str,
    log_dir: Path,
    redis_url: str | None = None,
    command: Callable[[int], list[str]] = factory_command,
) -> Iterator[list[ServerProcess]]:
    """`count` service processes (`start_services`) on the running test's database, Redis (or `redis_url`)
    and namespaces, with the providers on `sandbox_url`; every one is stopped when the block ends."""
    env = service_env(
        database=django_settings.DATABASES["default"],
        redis_url=redis_url or django_settings.REDIS_URL,
        sandbox_url=sandbox_url,
        rate_limit_namespace=django_settings.RATE_LIMIT_NAMESPACE,
        router_state_namespace=django_settings.ROUTER_STATE_NAMESPACE,
    )
    servers = start_services(count, env=env, log_dir=log_dir, command=command)
    try:
        yield servers
    finally:
        stop_all(servers)


def stop_all(servers: list[ServerProcess]) -> None:
    """Stop every process, even if stopping one of them fails."""
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.stop()
        except BaseException as exc:  # keep going: no process may outlive the test
            errors.append(exc)
    if errors:
        raise errors[0]


def _pings(server: ServerProcess) -> bool:
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    finally:
        client.close()


def start_redis(*, log_dir: Path) -> RedisProcess:
    """A throwaway redis-server on a free loopback port (no persistence) that a test may kill."""
    port = free_port()
    command = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(log_dir),
    ]
    server = _spawn(command, env=os.environ, log_path=log_dir / "redis.log", port=port, kind=RedisProcess)
    assert isinstance(server, RedisProcess)
    try:
        _wait_ready(server, _pings, time.monotonic() + READY_TIMEOUT_SECONDS)
    except BaseException:
        server.stop()
        raise
    return server
