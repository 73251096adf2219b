"""`python -m bench`: run the benchmark scenarios against the mock directly and through the gateway."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import calibration, processes, report
from bench.run import RunOptions, run
from bench.scenarios import SCENARIOS, scenario_names, select
from bench.stores import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, ROOT

RESULTS_DIR = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="scale every count down for a smoke run (< 1 min)")
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help=f"run only this scenario or group (repeatable): {', '.join(scenario_names())}",
    )
    parser.add_argument(
        "--server",
        choices=["daphne", "uvicorn", "both"],
        default="uvicorn",
        help="what serves the gateway: uvicorn (the production command, `make serve`), daphne (`make run`), or both",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="the bench's own database, dropped and recreated (its name must start with chat_bench)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="the bench's own Redis db, flushed at the start",
    )
    parser.add_argument(
        "--litellm-python",
        default=os.environ.get("BENCH_LITELLM_PYTHON", sys.executable),
        help="the Python that runs LiteLLM's proxy for the side-by-side run (a virtualenv of its own: it is not "
        "a dependency of this project); skipped when it cannot import litellm.proxy",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=int(os.environ.get("BENCH_USERS", "1")),
        help="how many users the gateway's requests come from, one key per connection in turn (default 1)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.group:14} {scenario.name:15} {scenario.title} — target: {scenario.target}")
        return 0
    if args.users < 1:
        print("--users must be at least 1", file=sys.stderr)
        return 2
    try:
        scenarios = select(args.scenario, quick=args.quick)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    servers = ["daphne", "uvicorn"] if args.server == "both" else [args.server]
    started = datetime.now(UTC)
    clock = time.monotonic()
    options = RunOptions(
        scenarios=scenarios,
        servers=servers,
        quick=args.quick,
        database_url=args.database_url,
        redis_url=args.redis_url,
        log_dir=args.results_dir / "logs",
        litellm_python=args.litellm_python,
        users=args.users,
    )
    pinned = processes.can_pin()
    core, other_core = (processes.GATEWAY_CORE, processes.MOCK_CORE) if pinned else (None, None)
    reference_before = calibration.reference(core, other_core)  # the machine's speed now (bench/calibration.py)
    systems = run(options)
    reference_after = calibration.reference(core, other_core)
    meta = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_seconds": round(time.monotonic() - clock, 1),
        "quick": args.quick,
        "servers": servers,
        "users": args.users,
        "pinned": processes.can_pin(),
        "cpu_reference_ms": [reference_before.cpu_ms, reference_after.cpu_ms],
        "loopback_reference_us": [reference_before.loopback_us, reference_after.loopback_us],
        **report.machine(),
    }
    json_path, text = report.write(scenarios, systems, meta, args.results_dir)
    print(text)
    print(f"(written to {json_path} and {json_path.with_suffix('.md')}; took {meta['duration_seconds']} s)",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
