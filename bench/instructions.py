"""`python -m bench.instructions`: the gateway's CPU per request as instructions, counted by callgrind.

The bench's timings move by half from one hour to the next on a shared machine; the instructions a
request costs do not (the same build counted 6.162, 6.174 and 6.184 million on 2026-12-07, in a
phase when its CPU time per request moved from 1.5 to 3.7 ms). So a change to the request path is
compared here, build against build, and the bench then shows what it does to the latencies.

The gateway runs under `valgrind --tool=callgrind` with counting off; after the warm-up, counting
goes on (`callgrind_control -i on`) for `--requests` requests sent one after another, then off, and
the total is divided by the requests. Everything else is as in the bench: the production command,
the mock upstream, the bench's database and Redis, full accounting.

What it does not see: the kernel's work (the system calls are counted up to the call), and what
depends on timing. Under callgrind the gateway runs about fifty times slower than the mock, so
a reply's chunks that come one by one at full speed are all there at its first read; space them
(`--mock "itl=30 tokens=20"`) to count a read per chunk.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import processes
from bench.run import RunOptions, gateway_command, gateway_env, provision, start_mock
from bench.stores import DEFAULT_REDIS_URL, ROOT, ensure_services, flush_redis, recreate_database

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/chat_bench_instructions"
MESSAGE = "hello there, how are you today?"
_TOTAL = re.compile(rb"^totals:\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Count:
    instructions: int
    requests: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def available() -> bool:
    """Whether valgrind's callgrind and its control command are on this machine."""
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def total_instructions(dump: bytes) -> int:
    """The instructions a callgrind dump counted: its `totals:` line, the dump's last (its `summary:`
    line counts only the part of the run before the dump's)."""
    found = _TOTAL.search(dump)
    if found is None:
        raise ValueError("no totals line in the callgrind dump")
    return int(found.group(1))


def count(
    *,
    requests: int,
    warmup: int,
    path: str,
    mock: str,
    database_url: str = DEFAULT_DATABASE_URL,
    redis_url: str = DEFAULT_REDIS_URL,
) -> Count:
    """Start the mock and the gateway under callgrind, send `warmup` then `requests` requests to `path`
    one at a time (`mock`: the mock's pacing for each reply, as in its message marker) and count the
    gateway's instructions over the second lot."""
    ensure_services()
    recreate_database(database_url)
    flush_redis(redis_url)
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as scratch:
        work = Path(scratch)
        options = RunOptions(
            scenarios=[], servers=["uvicorn"], quick=True, database_url=database_url, redis_url=redis_url, log_dir=work
        )
        upstream = start_mock(work)
        try:
            env = gateway_env(options, upstream.port)
            (key,) = provision(env, 1)
            port = processes.free_port()
            command = [
                "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={work}/callgrind.%p",
                sys.executable, *gateway_command("uvicorn", port),
            ]  # fmt: skip
            gateway = processes.start(
                "gateway", command, port=port, core=processes.GATEWAY_CORE, env=env, log_dir=work, cwd=ROOT
            )
            try:
                gateway.wait_ready("/health", timeout=600)
                body = json.dumps({"message": f"{MESSAGE} [[mock {mock}]]", "model": "gpt-4o-mini"}).encode()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                try:
                    for _ in range(warmup):
                        _send(connection, path, body, key)
                    time.sleep(1)  # what the warm-up left behind (the status flush, batches) is done
                    _control(gateway.pid, "-i", "on")
                    for _ in range(requests):
                        _send(connection, path, body, key)
                    _control(gateway.pid, "-i", "off")
                finally:
                    connection.close()
                dumped = _dump(gateway.pid, work)
            finally:
                gateway.stop(timeout=60)
        finally:
            upstream.stop()
    return Count(instructions=total_instructions(dumped), requests=requests)


def _send(connection: http.client.HTTPConnection, path: str, body: bytes, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    reply = response.read()
    if response.status != 200 or b"event: error" in reply:
        raise RuntimeError(f"the gateway answered {response.status}: {reply[:300]!r}")


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _dump(pid: int, work: Path) -> bytes:
    """Have callgrind write out what it counted since counting went on; return that dump."""
    before = set(work.glob(f"callgrind.{pid}*"))
    _control(pid, "-d")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in set(work.glob(f"callgrind.{pid}*")) - before:
            dump = path.read_bytes()
            if _TOTAL.search(dump):  # written to its end
                return dump
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests counted (default 200)")
    parser.add_argument("--warmup", type=int, default=60, help="requests sent before counting (default 60)")
    parser.add_argument("--stream", action="store_true", help="POST /chat/stream (SSE) rather than /chat")
    parser.add_argument("--mock", default="ttft=0 itl=0 tokens=20", help="the mock's pacing per reply, in ms")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="dropped and recreated")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    if not available():
        print("valgrind's callgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    path = "/chat/stream" if args.stream else "/chat"
    result = count(
        requests=args.requests,
        warmup=args.warmup,
        path=path,
        mock=args.mock,
        database_url=args.database_url,
        redis_url=args.redis_url,
    )
    print(
        f"{result.per_request / 1e6:.3f} million instructions per request "
        f"(POST {path}, mock {args.mock}, {result.requests} requests at concurrency 1, after {args.warmup})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
