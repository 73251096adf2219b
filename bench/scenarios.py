"""The benchmark's scenarios, their targets from the issue, and the request each system under test gets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from bench.load import Target
from bench.mock_upstream import MockSpec

MODEL = "gpt-4o-mini"
PROMPT = "Write a short reply for the benchmark. "
INSTANT = MockSpec(ttft=0.0, itl=0.0, tokens=20)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One measured load: `requests` at `concurrency`, each reply paced by `spec`."""

    name: str
    group: str
    title: str
    stream: bool
    spec: MockSpec
    requests: int
    concurrency: int
    target: str
    timeout: float = 30.0
    max_seconds: float = 180.0
    direct: bool = True  # False: only the gateway's side is meaningful (its memory)

    def scaled(self, *, requests: int, concurrency: int | None = None, spec: MockSpec | None = None) -> Scenario:
        return Scenario(
            name=self.name,
            group=self.group,
            title=self.title,
            stream=self.stream,
            spec=spec or self.spec,
            requests=requests,
            concurrency=concurrency or self.concurrency,
            target=self.target,
            timeout=self.timeout,
            max_seconds=self.max_seconds,
            direct=self.direct,
        )


LONG_SPEC = MockSpec(ttft=0.1, itl=0.1, tokens=100)  # 0.1 + 99 * 0.1 = 10 s

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="nonstream-c1",
        group="nonstream",
        title="non-streaming, concurrency 1",
        stream=False,
        spec=INSTANT,
        requests=1000,
        concurrency=1,
        target="added latency p50 <= 2 ms",
        max_seconds=60.0,
    ),
    Scenario(
        name="nonstream-c16",
        group="nonstream",
        title="non-streaming, concurrency 16",
        stream=False,
        spec=INSTANT,
        requests=3000,
        concurrency=16,
        target="-",
        max_seconds=60.0,
    ),
    Scenario(
        name="nonstream-c64",
        group="nonstream",
        title="non-streaming, concurrency 64",
        stream=False,
        spec=INSTANT,
        requests=6000,
        concurrency=64,
        target=">= 600 requests/s",
        max_seconds=60.0,
    ),
    Scenario(
        name="stream-c64",
        group="stream",
        title="streaming 50 tokens x 5 ms, concurrency 64",
        stream=True,
        spec=MockSpec(ttft=0.005, itl=0.005, tokens=50),
        requests=1000,
        concurrency=64,
        target="added TTFT p50 <= 10 ms; >= 1/2 direct streams/s",
        max_seconds=60.0,
    ),
    Scenario(
        name="long-streams",
        group="long-streams",
        title="500 concurrent 10 s streams (100 tokens x 100 ms)",
        stream=True,
        spec=LONG_SPEC,
        requests=500,
        concurrency=500,
        target="all finish within 5% of 10 s; <= 64 KB per open stream",
        timeout=60.0,
        max_seconds=30.0,
    ),
    Scenario(
        name="memory",
        group="memory",
        title="RSS across 50,000 non-streaming requests, concurrency 64",
        stream=False,
        spec=INSTANT,
        requests=50_000,
        concurrency=64,
        target="RSS flat within +-5%",
        max_seconds=240.0,
        direct=False,
    ),
)

QUICK = {
    "nonstream-c1": {"requests": 100},
    "nonstream-c16": {"requests": 200},
    "nonstream-c64": {"requests": 400},
    "stream-c64": {"requests": 128},
    "long-streams": {"requests": 100, "concurrency": 100, "spec": MockSpec(ttft=0.1, itl=0.1, tokens=20)},
    "memory": {"requests": 1000},
}
WARMUP_REQUESTS = 300
QUICK_WARMUP_REQUESTS = 40
MEMORY_WARMUP = {False: 5000, True: 500}  # before the memory scenario when it runs first


def select(names: list[str] | None, *, quick: bool) -> list[Scenario]:
    """The scenarios named (by name or group; all when none), scaled down for `--quick`."""
    chosen = [s for s in SCENARIOS if not names or s.name in names or s.group in names]
    unknown = set(names or ()) - {s.name for s in SCENARIOS} - {s.group for s in SCENARIOS}
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(scenario_names())}")
    if quick:
        chosen = [s.scaled(**QUICK[s.name]) for s in chosen]  # type: ignore[arg-type]
    return chosen


def scenario_names() -> list[str]:
    names: list[str] = []
    for scenario in SCENARIOS:
        for name in (scenario.group, scenario.name):
            if name not in names:
                names.append(name)
    return names


def message(spec: MockSpec) -> str:
    """The user's message: the mock reads its pacing from the marker, through the gateway or not."""
    return PROMPT + spec.marker()


def openai_target(base_url: str, scenario: Scenario, *, api_key: str = "bench") -> Target:
    """A request in OpenAI's format (to the mock directly, or to another OpenAI-compatible proxy)."""
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": message(scenario.spec)}]}
    if scenario.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return Target(
        url=f"{base_url}/v1/chat/completions",
        body=orjson.dumps(body),
        stream=scenario.stream,
        headers=(("Authorization", f"Bearer {api_key}"),),
    )


def gateway_target(base_url: str, scenario: Scenario, *, api_keys: Sequence[str]) -> Target:
    """`POST /chat` (JSON) or `POST /chat/stream` (SSE) on the gateway, the connections taking the
    users' keys in turn."""
    if not api_keys:
        raise ValueError("at least one API key is needed")
    path = "/chat/stream" if scenario.stream else "/chat"
    body = {"model": MODEL, "message": message(scenario.spec)}
    return Target(
        url=f"{base_url}{path}",
        body=orjson.dumps(body),
        stream=scenario.stream,
        headers=(("Authorization", f"Bearer {api_keys[0]}"),),
        per_connection=tuple((("Authorization", f"Bearer {key}"),) for key in api_keys) if len(api_keys) > 1 else (),
    )
