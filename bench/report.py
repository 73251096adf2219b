"""The bench's verdicts against the issue's targets, its Markdown table and its JSON record."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load import LoadResult
from bench.run import SystemResult
from bench.scenarios import Scenario

KB = 1024
MB = 1024 * 1024
MAX_ADDED_P50_C1 = 0.002
MIN_RPS_C64 = 600.0
MAX_ADDED_TTFT_P50 = 0.010
MIN_STREAM_RATIO = 0.5
LONG_STREAM_SLACK = 0.05
MAX_BYTES_PER_STREAM = 64 * KB
MAX_MEMORY_DRIFT = 0.05
PINNED = "Pinned: load generator and mock on core 0, system under test on core 1."


@dataclass(frozen=True)
class Row:
    """One scenario on one system, next to the same scenario sent straight to the mock."""

    scenario: Scenario
    system: str
    direct: LoadResult | None
    measured: LoadResult | None
    verdict: str


def _users(count: int) -> str:
    return "one user" if count == 1 else f"{count} users, one key per connection in turn"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _triple(result: LoadResult | None, attribute: str) -> str:
    dist = getattr(result, attribute) if result is not None else None
    return "-" if dist is None else f"{_ms(dist.p50)} / {_ms(dist.p90)} / {_ms(dist.p99)}"


def added(measured: LoadResult | None, direct: LoadResult | None, attribute: str) -> float | None:
    """The system's p50 minus the direct p50 of `attribute` ("latency" or "ttft"), in seconds."""
    a = getattr(measured, attribute) if measured is not None else None
    b = getattr(direct, attribute) if direct is not None else None
    return None if a is None or b is None else a.p50 - b.p50


def bytes_per_stream(result: LoadResult) -> float | None:
    """How much the process grew per concurrent stream (peak RSS over the RSS before the run)."""
    if result.process is None:
        return None
    return (result.process.rss_peak - result.process.rss_before) / max(1, result.concurrency)


def memory_drift(result: LoadResult) -> float | None:
    """RSS after the run relative to before it (0.02 is 2 % growth)."""
    if result.process is None or not result.process.rss_before:
        return None
    return (result.process.rss_after - result.process.rss_before) / result.process.rss_before


def verdict(scenario: Scenario, measured: LoadResult | None, direct: LoadResult | None) -> str:
    """ "pass", "FAIL: why", or "-" where the issue sets no target or nothing was measured."""
    if measured is None:
        return "-"
    problems = [f"{measured.errors} errors"] if measured.errors else []
    if measured.ok + measured.errors < measured.requested:
        problems.append(f"only {measured.sent} of {measured.requested} sent in time")
    if scenario.name == "nonstream-c1":
        extra = added(measured, direct, "latency")
        if extra is None or extra > MAX_ADDED_P50_C1:
            problems.append(f"added p50 {_ms(extra) if extra is not None else '?'} ms > 2 ms")
    elif scenario.name == "nonstream-c64":
        if measured.rps < MIN_RPS_C64:
            problems.append(f"{measured.rps:.0f}/s < 600/s")
    elif scenario.name == "stream-c64":
        extra = added(measured, direct, "ttft")
        if extra is None or extra > MAX_ADDED_TTFT_P50:
            problems.append(f"added TTFT p50 {_ms(extra) if extra is not None else '?'} ms > 10 ms")
        if direct is not None and measured.rps < MIN_STREAM_RATIO * direct.rps:
            problems.append(f"{measured.rps:.0f} streams/s < half of direct {direct.rps:.0f}")
    elif scenario.name == "long-streams":
        limit = scenario.spec.duration * (1 + LONG_STREAM_SLACK)
        if measured.latency is None or measured.latency.max > limit:
            slowest = f"{measured.latency.max:.2f}" if measured.latency else "?"
            problems.append(f"slowest {slowest} s > {limit:.2f} s")
        grown = bytes_per_stream(measured)
        if grown is not None and grown > MAX_BYTES_PER_STREAM:
            problems.append(f"{grown / KB:.0f} KB per stream > 64 KB")
    elif scenario.name == "memory":
        drift = memory_drift(measured)
        if drift is not None and abs(drift) > MAX_MEMORY_DRIFT:
            problems.append(f"RSS moved {drift:+.1%}")
    elif not problems:
        return "-"  # no target for this scenario
    return "FAIL: " + "; ".join(problems) if problems else "pass"


def rows(scenarios: list[Scenario], systems: list[SystemResult]) -> list[Row]:
    direct = next((s for s in systems if s.name == "direct"), SystemResult("direct"))
    others = [s for s in systems if s.name != "direct" and s.results]
    table: list[Row] = []
    for scenario in scenarios:
        base = direct.results.get(scenario.name)
        for system in others or [SystemResult("-")]:
            measured = system.results.get(scenario.name)
            table.append(Row(scenario, system.name, base, measured, verdict(scenario, measured, base)))
    return table


def _memory(row: Row) -> str:
    result = row.measured
    if result is None or result.process is None:
        return "-"
    usage = result.process
    text = f"{usage.rss_before / MB:.1f} → {usage.rss_peak / MB:.1f} → {usage.rss_after / MB:.1f} MB"
    if row.scenario.name == "long-streams":
        grown = bytes_per_stream(result)
        text += f" ({grown / KB:.1f} KB/stream)" if grown is not None else ""
    elif row.scenario.name == "memory":
        drift = memory_drift(result)
        text += f" ({drift:+.1%})" if drift is not None else ""
    if usage.cpu_share is not None:
        text += f"; CPU {usage.cpu_share:.0%}"
        if usage.cpu_seconds is not None and result.ok:
            text += f", {usage.cpu_seconds / result.ok * 1000:.1f} ms/request"
    if usage.core_busy is not None:
        text += f"; its core {usage.core_busy:.0%} busy"
    return text


def _rps(row: Row) -> str:
    direct = f"{row.direct.rps:.0f}" if row.direct else "-"
    measured = f"{row.measured.rps:.0f}" if row.measured else "-"
    return f"{direct} / {measured}"


def _errors(row: Row) -> str:
    return " / ".join(str(r.errors) if r is not None else "-" for r in (row.direct, row.measured))


def markdown(scenarios: list[Scenario], systems: list[SystemResult], meta: dict[str, Any]) -> str:
    """The run as Markdown: what ran where, the table, and notes on anything that went wrong."""
    lines = [
        f"# Bench run {meta['started']}",
        "",
        f"Machine: {meta['cpus']} CPUs, {meta['cpu_model']}; Python {meta['python']}. "
        f"Servers: {', '.join(meta['servers'])}. {'Quick run (counts scaled down). ' if meta['quick'] else ''}"
        f"The gateway's requests come from {_users(meta.get('users', 1))}. "
        f"{PINNED if meta['pinned'] else 'Not pinned.'}"
        f"{_reference(meta.get('cpu_reference_ms'), meta.get('loopback_reference_us'))}",
        "",
        'Latency and TTFT are p50 / p90 / p99 in ms; "added" is the system\'s p50 minus the direct p50; '
        "req/s is direct / system; errors direct / system; memory is the system's RSS before → peak → after, "
        "then its CPU time (share of one core, per request) and how busy its core was with every process on it.",
        "",
        "| scenario | target | system | direct latency | system latency | added p50 | req/s | direct TTFT "
        "| system TTFT | added TTFT p50 | errors | memory | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows(scenarios, systems):
        extra = added(row.measured, row.direct, "latency")
        extra_ttft = added(row.measured, row.direct, "ttft")
        cells = [
            f"{row.scenario.name} ({row.scenario.requests} at c{row.scenario.concurrency})",
            row.scenario.target,
            row.system,
            _triple(row.direct, "latency"),
            _triple(row.measured, "latency"),
            _ms(extra) if extra is not None else "-",
            _rps(row),
            _triple(row.direct, "ttft"),
            _triple(row.measured, "ttft"),
            _ms(extra_ttft) if extra_ttft is not None else "-",
            _errors(row),
            _memory(row),
            row.verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    tails = _tails(rows(scenarios, systems))
    if tails:
        title = "Stream tails, from the last token to the end of the reply (p50 / p90 / max in ms; the gateway"
        lines += ["", f"{title} writes the ledger before its `done`):", "", *tails]
    notes = _notes(systems)
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def _reference(cpu: list[float | None] | None, loopback: list[float | None] | None = None) -> str:
    """The machine's speed before and after the run (bench/calibration.py), when it was taken."""
    text = ""
    if cpu and any(ms is not None for ms in cpu):
        before, after = (f"{ms:.1f} ms" if ms is not None else "-" for ms in cpu)
        text += (
            f" CPU reference (a fixed piece of Python work on the system's core; lower is a faster machine):"
            f" {before} before the run, {after} after."
        )
    if loopback and any(us is not None for us in loopback):
        before, after = (f"{us:.1f} µs" if us is not None else "-" for us in loopback)
        text += (
            f" Loopback reference (a 100-byte TCP round trip from the system's core to an echo on the other;"
            f" lower is faster): {before} before the run, {after} after."
        )
    return text


def _tails(table: list[Row]) -> list[str]:
    lines = []
    for row in table:
        tail = row.measured.tail if row.measured is not None else None
        if tail is None:
            continue
        direct = row.direct.tail if row.direct is not None else None
        against = f"; direct {_ms(direct.p50)} / {_ms(direct.p90)} / {_ms(direct.max)}" if direct else ""
        measured = f"{_ms(tail.p50)} / {_ms(tail.p90)} / {_ms(tail.max)}"
        lines.append(f"- {row.scenario.name}, {row.system}: {measured}{against}")
    return lines


def _notes(systems: list[SystemResult]) -> list[str]:
    notes: list[str] = []
    for system in systems:
        if system.note:
            first, *rest = system.note.splitlines()
            notes.append(f"- {system.name}: {first}")
            if rest:
                notes += ["", "```", *rest, "```", ""]
        for name, result in system.results.items():
            if result.errors:
                notes.append(f"- {system.name}, {name}: errors {result.error_kinds}")
    return notes


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count() or 1, "cpu_model": model, "python": platform.python_version()}


def as_json(scenarios: list[Scenario], systems: list[SystemResult], meta: dict[str, Any]) -> str:
    data = {
        "meta": meta,
        "scenarios": [dataclasses.asdict(s) for s in scenarios],
        "systems": [dataclasses.asdict(s) for s in systems],
        "rows": [
            {
                "scenario": r.scenario.name,
                "system": r.system,
                "added_latency_p50": added(r.measured, r.direct, "latency"),
                "added_ttft_p50": added(r.measured, r.direct, "ttft"),
                "verdict": r.verdict,
            }
            for r in rows(scenarios, systems)
        ],
    }
    return json.dumps(data, indent=2)


def write(
    scenarios: list[Scenario], systems: list[SystemResult], meta: dict[str, Any], results_dir: Path
) -> tuple[Path, str]:
    """Write `bench-<time>.json|.md` and `latest.json|.md` in `results_dir`; return the JSON path and the Markdown."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    text = markdown(scenarios, systems, meta)
    data = as_json(scenarios, systems, meta)
    json_path = results_dir / f"bench-{stamp}.json"
    json_path.write_text(data)
    (results_dir / f"bench-{stamp}.md").write_text(text)
    (results_dir / "latest.json").write_text(data)
    (results_dir / "latest.md").write_text(text)
    return json_path, text
