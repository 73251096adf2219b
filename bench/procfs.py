"""A process's resident memory and CPU time read from /proc, and a sampler that watches them during a run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_bytes(pid: int) -> int | None:
    """The process's resident set size (VmRSS) in bytes, or None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time the process has used, in seconds, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (IndexError, ValueError):
        return None


def core_ticks(core: int) -> tuple[int, int] | None:
    """(busy, total) clock ticks core `core` has spent since boot, from /proc/stat."""
    prefix = f"cpu{core} ".encode()
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(prefix):
                    ticks = [int(v) for v in line.split()[1:]]
                    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
                    return sum(ticks[:8]) - idle, sum(ticks[:8])
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """A process over one run: RSS before, at its peak and after (bytes); its CPU time (seconds)
    and share of one core; and how busy its core was in all (other processes included), if known."""

    rss_before: int
    rss_peak: int
    rss_after: int
    cpu_seconds: float | None
    cpu_share: float | None
    core_busy: float | None
    samples: int


class ProcessSampler:
    """Sample a process's RSS every `interval` seconds between `start()` and `stop()`.

    With `core` (the one it is pinned to), also how busy that core was over the same time.
    """

    def __init__(self, pid: int, *, interval: float = 0.1, core: int | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.core = core
        self._core_start: tuple[int, int] | None = None
        self._before = 0
        self._peak = 0
        self._samples = 0
        self._cpu_start: float | None = None
        self._wall_start = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._before = rss_bytes(self.pid) or 0
        self._peak = self._before
        self._samples = 1
        self._cpu_start = cpu_seconds(self.pid)
        self._core_start = core_ticks(self.core) if self.core is not None else None
        self._wall_start = time.perf_counter()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._sample()

    def _sample(self) -> int:
        rss = rss_bytes(self.pid) or 0
        self._peak = max(self._peak, rss)
        self._samples += 1
        return rss

    async def stop(self) -> ProcessUsage:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        after = self._sample()
        cpu_end = cpu_seconds(self.pid)
        wall = time.perf_counter() - self._wall_start
        used = share = busy = None
        if self._cpu_start is not None and cpu_end is not None and wall > 0:
            used = cpu_end - self._cpu_start
            share = used / wall
        core_end = core_ticks(self.core) if self.core is not None else None
        if self._core_start is not None and core_end is not None and core_end[1] > self._core_start[1]:
            busy = (core_end[0] - self._core_start[0]) / (core_end[1] - self._core_start[1])
        return ProcessUsage(
            rss_before=self._before,
            rss_peak=self._peak,
            rss_after=after,
            cpu_seconds=used,
            cpu_share=share,
            core_busy=busy,
            samples=self._samples,
        )
