"""One bench run: the mock upstream, each system under test started in turn, every scenario measured on it.

The load generator (this process) and the mock share core 0; each system under test (the gateway
under daphne or uvicorn, LiteLLM's proxy when installed) runs alone on core 1 and is stopped
before the next one starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import processes
from bench.load import LoadResult, Target, run_load
from bench.mock_upstream import MockSpec
from bench.scenarios import (
    INSTANT,
    MEMORY_WARMUP,
    QUICK_WARMUP_REQUESTS,
    WARMUP_REQUESTS,
    Scenario,
    gateway_target,
    openai_target,
)
from bench.stores import ROOT, ensure_services, flush_redis, recreate_database

BIN = Path(sys.executable).parent
SECRET_KEY = "bench-only-secret-key-" + "b" * 40
LITELLM_KEY = "sk-bench"
Log = Callable[[str], None]


@dataclass(frozen=True)
class RunOptions:
    scenarios: list[Scenario]
    servers: list[str]
    quick: bool
    database_url: str
    redis_url: str
    log_dir: Path
    setup_stores: bool = True
    litellm_python: str = sys.executable  # LiteLLM's proxy may live in a virtualenv of its own
    users: int = 1  # the gateway's requests come from this many users, one key per connection in turn


@dataclass
class SystemResult:
    """One system under test: its results per scenario name, or why it could not be measured."""

    name: str
    results: dict[str, LoadResult] = field(default_factory=dict)
    note: str = ""


def stderr_log() -> Log:
    """Progress lines on stderr, each stamped with the seconds since the run started."""
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    return log


def gateway_env(options: RunOptions, mock_port: int) -> dict[str, str]:
    """The gateway's environment: production settings, OpenAI on the mock, full accounting, no logs."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.endswith("_BASE_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="chatservice.settings",
        DATABASE_URL=options.database_url,
        REDIS_URL=options.redis_url,
        DEBUG="false",
        SECRET_KEY=SECRET_KEY,
        ALLOWED_HOSTS="127.0.0.1,localhost",
        SECURE_SSL_REDIRECT="false",
        OPENAI_API_KEY="bench",
        OPENAI_BASE_URL=f"http://127.0.0.1:{mock_port}/v1",
        ENABLE_METRICS="true",
        LOG_REQUESTS="false",
        LOG_RESPONSES="false",
        LOG_LEVEL="WARNING",
        # A failed upstream call must show up as an error here, not as a fallback to the sandbox.
        ENABLE_FALLBACK="false",
        # 500 concurrent streams are the point of one scenario: do not queue them behind the default 64.
        MAX_INFLIGHT_PER_PROVIDER="2048",
        PYTHONUNBUFFERED="1",
    )
    return env


def gateway_command(server: str, port: int) -> list[str]:
    """The gateway on 127.0.0.1:`port`: under uvicorn, `make serve`'s production command; under daphne,
    DESIGN's serve command with a longer accept queue (Twisted's default is 50) and no access log."""
    if server == "daphne":
        endpoint = f"tcp:port={port}:interface=127.0.0.1:backlog=4096"
        return [str(BIN / "daphne"), "-e", endpoint, "-v", "0", "chatservice.asgi:application"]
    if server == "uvicorn":
        return [
            str(BIN / "uvicorn"), "chatservice.asgi:application", "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio", "--lifespan", "off",
            "--no-access-log", "--timeout-keep-alive", "120", "--ws-max-size", "1048576",
        ]  # fmt: skip
    raise ValueError(f"unknown server {server!r}")


def provision(env: dict[str, str], users: int = 1) -> list[str]:
    """Migrate the bench database and return a fresh API key for each of `users` bench users."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.provision", "--users", str(users)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"provisioning the bench database failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout.strip().splitlines()[-users:]


async def measure(
    name: str,
    scenarios: list[Scenario],
    target_for: Callable[[Scenario], Target],
    *,
    pid: int | None,
    quick: bool,
    log: Log,
) -> SystemResult:
    """Warm the system up, then run each scenario against it (the memory scenario on the gateway only)."""
    outcome = SystemResult(name)
    measured = [s for s in scenarios if s.direct or pid is not None]
    if not measured:
        return outcome
    warmup = QUICK_WARMUP_REQUESTS if quick else WARMUP_REQUESTS
    if measured[0].group == "memory":
        warmup = MEMORY_WARMUP[quick]
    await _warm_up(target_for, warmup)
    for scenario in measured:
        log(f"  {name}: {scenario.name} ({scenario.requests} requests at concurrency {scenario.concurrency}) ...")
        result = await run_load(
            target_for(scenario),
            requests=scenario.requests,
            concurrency=scenario.concurrency,
            request_timeout=max(scenario.timeout, 3 * scenario.spec.duration),
            max_seconds=scenario.max_seconds,
            pid=pid,
            core=processes.GATEWAY_CORE if pid is not None and processes.can_pin() else None,
        )
        outcome.results[scenario.name] = result
        log("    " + _one_line(result))
    return outcome


async def _warm_up(target_for: Callable[[Scenario], Target], requests: int) -> None:
    """Unmeasured requests first: imports, pools and caches settle before the clock matters."""
    plain = Scenario("warm-up", "warm-up", "warm-up", False, INSTANT, requests, 16, "-")
    streamed = Scenario("warm-up-stream", "warm-up", "warm-up", True, MockSpec(tokens=10), 64, 16, "-")
    for scenario in (plain, streamed):
        await run_load(
            target_for(scenario), requests=scenario.requests, concurrency=16, request_timeout=30, max_seconds=120
        )


def _one_line(result: LoadResult) -> str:
    latency = f"p50 {result.latency.p50 * 1000:.2f} ms" if result.latency else "no successes"
    ttft = f", ttft p50 {result.ttft.p50 * 1000:.2f} ms" if result.ttft else ""
    errors = f", errors {result.error_kinds}" if result.errors else ""
    return f"{result.ok}/{result.requested} ok, {result.rps:.0f}/s, {latency}{ttft}{errors}"


def litellm_available(python: str = sys.executable) -> bool:
    """Whether `python` can import LiteLLM's proxy (this interpreter is asked directly, another one by running it)."""
    if python == sys.executable:
        return importlib.util.find_spec("litellm") is not None and importlib.util.find_spec("litellm.proxy") is not None
    try:
        check = subprocess.run([python, "-c", "import litellm.proxy.proxy_cli"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return check.returncode == 0


def litellm_config(log_dir: Path, mock_port: int) -> Path:
    config = log_dir / "litellm.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            model_list:
              - model_name: gpt-4o-mini
                litellm_params:
                  model: openai/gpt-4o-mini
                  api_base: http://127.0.0.1:{mock_port}/v1
                  api_key: bench
            general_settings:
              master_key: {LITELLM_KEY}
            litellm_settings:
              num_retries: 0
            """
        )
    )
    return config


def litellm_env() -> dict[str, str]:
    """LiteLLM's proxy's environment: no provider keys, no database, its price list from its package.

    The proxy takes a database from DATABASE_URL or DIRECT_URL (or builds one from DATABASE_HOST and
    the rest), migrates it and writes its spend logs there; the side-by-side run is of the proxy
    without one, whatever the shell running the bench exports (the gateway's own DATABASE_URL, say).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith("_API_KEY") and not k.startswith("DATABASE_") and k != "DIRECT_URL"
    }
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # its price list from its package, not the internet
    return env


def start_mock(log_dir: Path) -> processes.Child:
    """The mock upstream on a free loopback port, pinned to the load generator's core, once it answers."""
    port = processes.free_port()
    mock = processes.start(
        "mock", [sys.executable, "-m", "bench.mock_upstream", "--port", str(port)],
        port=port, core=processes.MOCK_CORE, env=dict(os.environ), log_dir=log_dir, cwd=ROOT,
    )  # fmt: skip
    try:
        mock.wait_ready("/v1/models", timeout=20)
    except BaseException:
        mock.stop()
        raise
    return mock


async def run_all(options: RunOptions, log: Log) -> list[SystemResult]:
    """Everything for one run; the systems in order: direct, the gateway per server, LiteLLM."""
    if processes.pin_self(processes.MOCK_CORE):
        log("pinned: load generator and mock on core 0, the system under test on core 1")
    else:
        log("not pinned: taskset or a second core is missing")
    if options.setup_stores:
        ensure_services()
        recreate_database(options.database_url)
        flush_redis(options.redis_url)
    mock = start_mock(options.log_dir)
    mock_port = mock.port
    systems: list[SystemResult] = []
    try:
        log(f"mock upstream on :{mock_port} (pid {mock.pid})")
        systems.append(
            await measure(
                "direct",
                options.scenarios,
                lambda s: openai_target(mock.url, s),
                pid=None,
                quick=options.quick,
                log=log,
            )
        )
        env = gateway_env(options, mock_port)
        try:
            api_keys = provision(env, options.users)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(str(exc))
            note = f"could not be measured: {str(exc).splitlines()[0]}"
            systems += [SystemResult(f"gateway ({server})", note=note) for server in options.servers]
        else:
            for server in options.servers:
                systems.append(await _measure_gateway(server, options, env, api_keys, log))
        if litellm_available(options.litellm_python):
            systems.append(await _measure_litellm(options, mock_port, log))
        else:
            log(f"LiteLLM's proxy is not importable by {options.litellm_python}: its side-by-side run was skipped")
            systems.append(SystemResult("litellm", note="skipped: LiteLLM's proxy is not installed"))
    finally:
        mock.stop()
    return systems


async def _measure_gateway(
    server: str, options: RunOptions, env: dict[str, str], api_keys: list[str], log: Log
) -> SystemResult:
    name = f"gateway ({server})"
    port = processes.free_port()
    child = processes.start(
        f"gateway-{server}", gateway_command(server, port), port=port, core=processes.GATEWAY_CORE, env=env,
        log_dir=options.log_dir, cwd=ROOT,
    )  # fmt: skip
    try:
        child.wait_ready("/health", timeout=60)
        log(f"{name} on :{port} (pid {child.pid})")
        result = await measure(
            name,
            options.scenarios,
            lambda s: gateway_target(child.url, s, api_keys=api_keys),
            pid=child.pid,
            quick=options.quick,
            log=log,
        )
    except RuntimeError as exc:
        log(f"{name} could not be measured: {exc}")
        return SystemResult(name, note=f"could not be measured: {str(exc).splitlines()[0]}")
    finally:
        child.stop()
    if any(r.errors for r in result.results.values()):
        result.note = f"errors; the log ({child.log_path}) ends with:\n{child.log_tail(12)}"
    return result


async def _measure_litellm(options: RunOptions, mock_port: int, log: Log) -> SystemResult:
    port = processes.free_port()
    config = litellm_config(options.log_dir, mock_port)
    command = [options.litellm_python, "-m", "litellm.proxy.proxy_cli", "--config", str(config), "--port", str(port),
               "--host", "127.0.0.1", "--num_workers", "1"]  # fmt: skip
    child = processes.start("litellm", command, port=port, core=processes.GATEWAY_CORE, env=litellm_env(),
                            log_dir=options.log_dir, cwd=ROOT)  # fmt: skip
    try:
        child.wait_ready("/health/liveliness", timeout=120)
        log(f"litellm on :{port} (pid {child.pid})")
        return await measure(
            "litellm",
            options.scenarios,
            lambda s: openai_target(child.url, s, api_key=LITELLM_KEY),
            pid=child.pid,
            quick=options.quick,
            log=log,
        )
    except RuntimeError as exc:
        return SystemResult("litellm", note=f"could not be measured: {str(exc).splitlines()[0]}")
    finally:
        child.stop()


def run(options: RunOptions, log: Log | None = None) -> list[SystemResult]:
    return asyncio.run(run_all(options, log or stderr_log()))
