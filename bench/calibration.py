"""A fixed piece of Python work, timed on the core the system under test runs on: the machine's speed
at the moment of a run, so runs taken in different phases of a shared machine can be told apart.

The work is the kind a gateway does (JSON in and out, dicts, strings), the same on every run, with
no I/O; its time is the median of several repetitions, in milliseconds: lower is a faster machine.
Run as `python -m bench.calibration` it prints that figure; `reference_ms(core)` runs it pinned.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time

REPETITIONS = 7
_CHUNK = b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"token"},"finish_reason":null}]}'


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


def reference_ms(core: int | None) -> float | None:
    """`timed_ms()` in a fresh interpreter pinned to `core` (unpinned when taskset is missing or
    `core` is None); None if it could not run."""
    command = [sys.executable, "-m", "bench.calibration"]
    if core is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(core), *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    print(timed_ms())
