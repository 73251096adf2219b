"""The machine's speed at the moment of a run, measured on the core the system under test runs on,
so runs taken in different phases of a shared machine can be told apart. Two figures:

- CPU: a fixed piece of Python work, the kind a gateway does (JSON in and out, dicts, strings), the
  same on every run, with no I/O; the median of several repetitions, in milliseconds.
- Loopback: a 100-byte TCP round trip over 127.0.0.1 to an echo process on the other core, what
  each of the gateway's calls to Postgres, Redis and the upstream is underneath (the system calls,
  the loopback's kernel work, a wake-up on the other core); the median of several repetitions of
  many round trips, in microseconds per round trip. A shared machine's slow phases do not always
  show in the first figure: at 18:08 UTC on 2026-12-07 the CPU reference was as in the fast phase
  while the mock alone served 40 % fewer requests per second.

Lower is a faster machine for both. Run as `python -m bench.calibration [--other-core N]` it prints
the two figures; `reference(core, other_core)` runs it pinned to `core`, in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

REPETITIONS = 7
ROUND_TRIPS = 2_000
_MESSAGE = b"x" * 100
_CHUNK = b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"token"},"finish_reason":null}]}'


@dataclass(frozen=True)
class Reference:
    """The two figures; None where one could not be taken."""

    cpu_ms: float | None
    loopback_us: float | None


def workload(rounds: int = 20_000) -> int:
    """The fixed work: parse a stream chunk, read its text, build and serialize a small record."""
    total = 0
    for i in range(rounds):
        chunk = json.loads(_CHUNK[6:])
        text = chunk["choices"][0]["delta"]["content"]
        record = {"index": i, "text": text, "tokens": len(text.split()), "done": chunk["choices"][0]["finish_reason"]}
        total += len(json.dumps(record))
    return total


def timed_ms(repetitions: int = REPETITIONS) -> float:
    """The median time of `workload()` over `repetitions` runs, in milliseconds."""
    workload(1_000)  # warm
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        workload()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 1)


def loopback_us(other_core: int | None, repetitions: int = REPETITIONS, round_trips: int = ROUND_TRIPS) -> float:
    """The median time of one round trip of `_MESSAGE` to an echo process (forked, and pinned to
    `other_core` when given) over loopback TCP, in microseconds."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pid = os.fork()
        if pid == 0:  # the echo side: no return from here
            try:
                if other_core is not None:
                    os.sched_setaffinity(0, {other_core})
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(65536):
                    conn.sendall(data)
            finally:
                os._exit(0)
        try:
            with socket.create_connection(listener.getsockname()) as conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _round_trips(conn, 200)  # warm
                times = []
                for _ in range(repetitions):
                    started = time.perf_counter()
                    _round_trips(conn, round_trips)
                    times.append(time.perf_counter() - started)
        finally:
            os.waitpid(pid, 0)  # the echo side ends when the connection closes
    return round(statistics.median(times) * 1_000_000 / round_trips, 1)


def _round_trips(conn: socket.socket, count: int) -> None:
    for _ in range(count):
        conn.sendall(_MESSAGE)
        received = 0
        while received < len(_MESSAGE):
            chunk = conn.recv(len(_MESSAGE) - received)
            if not chunk:
                raise ConnectionError("the echo side closed the connection")
            received += len(chunk)


def reference(core: int | None, other_core: int | None) -> Reference:
    """Both figures from a fresh interpreter pinned to `core` (unpinned when taskset is missing or
    `core` is None), the echo side on `other_core`; a figure is None if it could not be taken."""
    command = [sys.executable, "-m", "bench.calibration"]
    if other_core is not None:
        command += ["--other-core", str(other_core)]
    if core is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(core), *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        cpu, loopback = (float(value) for value in done.stdout.split())
    except (subprocess.SubprocessError, OSError, ValueError):
        return Reference(None, None)
    return Reference(cpu, loopback)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.calibration")
    parser.add_argument("--other-core", type=int, default=None, help="the core of the echo process")
    args = parser.parse_args()
    print(timed_ms(), loopback_us(args.other_core))
