"""The bench harness: the mock upstream under the real OpenAI SDK, and the load generator's numbers on tiny runs."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from bench import calibration, instructions
from bench.load import StreamScanner, Target, run_load
from bench.mock_upstream import MockSpec, MockUpstream, parse_spec, reply_text, spec_for
from bench.report import markdown, verdict
from bench.run import SystemResult, litellm_available, litellm_env
from bench.scenarios import SCENARIOS, gateway_target, openai_target, select
from bench.stats import distribution, percentile
from chat.events import Done, Failed, Started, Token, sse_frame
from chatservice.errors import ServiceError
from tests.sandbox_server import BackgroundServer


@pytest.fixture(scope="module")
def mock_server() -> Iterator[tuple[BackgroundServer, MockUpstream]]:
    app = MockUpstream(default=MockSpec(tokens=3))
    server = BackgroundServer(app).start()
    yield server, app
    server.stop()


@pytest.fixture
def mock_url(mock_server: tuple[BackgroundServer, MockUpstream]) -> str:
    return mock_server[0].url


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=10)


# --- the mock upstream ------------------------------------------------------------------------


async def test_mock_answers_a_non_streaming_sdk_request_paced_by_the_header(mock_url: str) -> None:
    async with client(mock_url) as sdk:
        completion = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hello"}],
            extra_headers={"x-mock": "ttft=0,itl=0,tokens=7"},
        )
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == reply_text(7)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 7


async def test_mock_streams_to_the_sdk_with_usage_paced_by_the_message_marker(mock_url: str) -> None:
    spec = MockSpec(ttft=0.03, itl=0.01, tokens=5)
    async with client(mock_url) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi " + spec.marker()}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_text(5)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


async def test_mock_lists_models_and_refuses_unknown_paths(mock_url: str) -> None:
    async with client(mock_url) as sdk:
        models = await sdk.models.list()
        assert "gpt-4o-mini" in [m.id for m in models.data]
        with pytest.raises(openai.NotFoundError):
            await sdk.embeddings.create(model="x", input="y")


def test_spec_parsing_header_in_seconds_marker_in_milliseconds() -> None:
    default = MockSpec(ttft=1.0, itl=1.0, tokens=1)
    assert parse_spec("ttft=0.005,itl=0.002,tokens=50", default, unit=1.0) == MockSpec(0.005, 0.002, 50)
    assert parse_spec("tokens=9 bogus=1 itl=x", default, unit=1.0) == MockSpec(1.0, 1.0, 9)
    body = orjson.dumps({"messages": [{"role": "user", "content": "a [[mock ttft=5 itl=2 tokens=50]]"}]})
    assert spec_for([], body, default) == MockSpec(0.005, 0.002, 50)
    assert spec_for([(b"x-mock", b"tokens=4")], body, default) == MockSpec(1.0, 1.0, 4)
    assert spec_for([], b"{}", default) == default
    assert MockSpec(0.1, 0.1, 100).duration == pytest.approx(10.0)
    assert spec_for([], MockSpec(0.1, 0.02, 3).marker().encode(), default) == MockSpec(0.1, 0.02, 3)


def _paced_clock(monkeypatch: pytest.MonkeyPatch, overshoot: float) -> list[float]:
    """A fake clock for the mock: each of its sleeps ends `overshoot` seconds late, as a busy loop's do."""
    now = [1000.0]
    real_sleep = asyncio.sleep

    async def late_sleep(delay: float) -> None:
        now[0] += max(0.0, delay) + overshoot
        await real_sleep(0)

    monkeypatch.setattr("bench.mock_upstream._clock", lambda: now[0])
    monkeypatch.setattr("bench.mock_upstream._sleep", late_sleep)
    return now


async def _call_mock(app: MockUpstream, request: dict[str, Any], now: list[float]) -> list[float]:
    """Send `request` to the mock's ASGI app; the fake clock's time at each body part it sends."""
    hold = asyncio.Event()
    sent_at: list[float] = []
    messages = [{"type": "http.request", "body": orjson.dumps(request), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await hold.wait()  # no disconnect
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent_at.append(now[0])

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await app(scope, receive, send)
    return sent_at


async def test_mock_paces_tokens_on_a_schedule_so_late_wakeups_do_not_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A "10 s" stream lasts 10 s however late each sleep wakes: token i is due at ttft + i * itl from
    the request, not one itl after the previous token was sent."""
    now = _paced_clock(monkeypatch, overshoot=0.002)
    spec = MockSpec(ttft=0.1, itl=0.1, tokens=100)
    started = now[0]
    request = {"model": "m", "messages": [{"role": "user", "content": spec.marker()}], "stream": True}
    sent_at = await _call_mock(MockUpstream(), request, now)
    tokens_at = sent_at[:100]  # then the finish chunk with [DONE]
    assert tokens_at[0] - started == pytest.approx(0.1 + 0.002)
    assert tokens_at[-1] - started == pytest.approx(spec.duration + 0.002)  # one late wake-up, not 100
    request = {"model": "m", "messages": [{"role": "user", "content": spec.marker()}]}
    started = now[0]
    assert (await _call_mock(MockUpstream(), request, now))[-1] - started == pytest.approx(spec.duration + 0.002)


# --- statistics -------------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    summary = distribution([5.0, 1.0, 3.0])
    assert summary is not None
    assert (summary.count, summary.min, summary.p50, summary.max, summary.mean) == (3, 1.0, 3.0, 5.0, 3.0)
    assert distribution([]) is None
    with pytest.raises(ValueError):
        percentile([], 50)


# --- the load generator on tiny runs -----------------------------------------------------------


async def test_non_streaming_run_counts_every_request_and_samples_memory(mock_url: str) -> None:
    # Enough requests for the run to outlast a few of the kernel's CPU-time ticks (10 ms): 40 took
    # ~15 ms, and the process's CPU time was read as 0 in 2 runs of 8, 5 of 8 with the mock on httptools.
    requests = 200
    scenario = select(["nonstream-c16"], quick=True)[0].scaled(requests=requests, concurrency=4)
    result = await run_load(
        openai_target(mock_url, scenario), requests=requests, concurrency=4, pid=os.getpid(), core=0
    )
    assert (result.requested, result.sent, result.ok, result.errors) == (requests, requests, requests, 0)
    assert result.concurrency == 4
    assert result.latency is not None and result.latency.count == requests
    assert result.latency.min <= result.latency.p50 <= result.latency.p90 <= result.latency.p99 <= result.latency.max
    assert result.rps == pytest.approx(requests / result.elapsed)
    assert result.ttft is None and result.tokens == 0
    usage = result.process
    assert usage is not None and usage.rss_before > 0 and usage.rss_peak >= usage.rss_before and usage.samples >= 2
    assert usage.cpu_seconds is not None and usage.cpu_seconds > 0  # this process did the client's work
    assert usage.core_busy is not None and 0 <= usage.core_busy <= 1


async def test_streaming_run_counts_tokens_and_first_token_times(
    mock_url: str, mock_server: tuple[BackgroundServer, MockUpstream]
) -> None:
    spec = MockSpec(ttft=0.02, itl=0.005, tokens=6)
    scenario = select(["stream-c64"], quick=True)[0].scaled(requests=12, concurrency=3, spec=spec)
    before = mock_server[1].stats.streams_completed
    result = await run_load(openai_target(mock_url, scenario), requests=12, concurrency=3)
    assert (result.ok, result.errors, result.tokens) == (12, 0, 12 * 6)
    # The mock counts a stream once its last chunk is sent, which can be just after the client read it.
    stats = mock_server[1].stats
    for _ in range(200):
        if stats.streams_completed - before >= 12:
            break
        await asyncio.sleep(0.01)
    assert stats.streams_completed - before == 12
    assert result.ttft is not None and result.latency is not None and result.ttft.count == 12
    # Lower bounds only: the mock never answers before its pacing says so.
    assert result.ttft.min >= 0.02 * 0.9
    assert result.latency.min >= spec.duration * 0.9
    assert result.ttft.max <= result.latency.max


async def test_failed_requests_are_counted_by_kind_not_timed(mock_url: str) -> None:
    target = Target(url=f"{mock_url}/nowhere", body=b"{}", stream=False)
    result = await run_load(target, requests=5, concurrency=2)
    assert (result.ok, result.errors, result.error_kinds) == (0, 5, {"HTTP 404": 5})
    assert result.latency is None and result.rps == 0


def _gateway_app(frames: list[bytes], *, gap: float = 0.0, ending: tuple[bytes, ...] = (), pause: float = 0.0) -> Any:
    """A stand-in for `POST /chat/stream`: the gateway's own SSE encoding, sent chunk by chunk
    (`gap` seconds apart), then `pause` seconds (the ledger write), then the `ending` frames."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, frame in enumerate(frames):
            if i and gap:
                await asyncio.sleep(gap)
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await asyncio.sleep(pause)
        for frame in ending:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def _gateway_frames(*, tokens: int, end: str) -> list[bytes]:
    frames = [sse_frame(Started(request_id="r", conversation_id="c", model="gpt-4o-mini", provider="openai"))]
    frames += [sse_frame(Token(f"w{i} ")) for i in range(tokens)]
    if end == "done":
        frames.append(sse_frame(Done({"message": "..."})))
    elif end == "error":
        frames.append(sse_frame(Failed(ServiceError("upstream_timeout", "late", status=504))))
    # Split frames at odd places, as TCP may: the parser must not care.
    joined = b"".join(frames)
    return [joined[i : i + 7] for i in range(0, len(joined), 7)]


@pytest.mark.parametrize(
    ("end", "ok", "kinds"), [("done", 3, {}), ("error", 0, {"error event": 3}), ("none", 0, {"stream ended early": 3})]
)
async def test_gateway_sse_frames_are_parsed_over_http(end: str, ok: int, kinds: dict[str, int]) -> None:
    server = BackgroundServer(_gateway_app(_gateway_frames(tokens=4, end=end))).start()
    try:
        scenario = select(["stream-c64"], quick=True)[0]
        result = await run_load(gateway_target(server.url, scenario, api_keys=["k"]), requests=3, concurrency=2)
    finally:
        server.stop()
    assert (result.ok, result.error_kinds) == (ok, kinds)
    assert result.tokens == 4 * ok
    assert (result.ttft.count if result.ttft else 0) == ok


async def test_a_reply_cut_off_between_chunks_is_one_error_and_its_connection_is_not_reused() -> None:
    """A server that fails mid-stream closes the connection after a whole chunk, without the last one:
    that request is an error, and the next one goes out on a new connection."""
    reached = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal reached
        if scope["type"] != "http":
            return
        reached += 1
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": sse_frame(Token("w0 ")), "more_body": True})
        raise RuntimeError("the server fails mid-stream")

    server = BackgroundServer(app).start()
    try:
        scenario = select(["stream-c64"], quick=True)[0]
        result = await run_load(gateway_target(server.url, scenario, api_keys=["k"]), requests=3, concurrency=1)
    finally:
        server.stop()
    assert (reached, result.ok, result.errors) == (3, 0, 3)
    assert result.error_kinds == {"IncompleteReadError": 3}


async def test_a_streams_tail_runs_from_its_last_token_to_the_end_of_the_reply() -> None:
    """What comes after the last token (the gateway's ledger write, then `done`) is measured on its own."""
    tokens = [sse_frame(Token(f"w{i} ")) for i in range(3)]
    done = sse_frame(Done({"message": "w0 w1 w2 "}))
    server = BackgroundServer(_gateway_app(tokens, gap=0.5, ending=(done,), pause=0.08)).start()
    try:
        scenario = select(["stream-c64"], quick=True)[0]
        result = await run_load(gateway_target(server.url, scenario, api_keys=["k"]), requests=2, concurrency=2)
    finally:
        server.stop()
    assert result.ok == 2 and result.tail is not None and result.latency is not None
    # From the last token: the 0.08 s before `done`, none of the 1 s between the first and the last. (The
    # last token is read a little after it was sent, so the tail can come out a shade under 0.08 s.)
    assert result.tail.count == 2 and result.tail.min >= 0.05 and result.tail.max < result.latency.min - 0.5
    meta = {"started": "now", "cpus": 2, "cpu_model": "x", "python": "3", "servers": ["uvicorn"], "quick": True}
    text = markdown([scenario], [SystemResult("gateway", {scenario.name: result})], {**meta, "pinned": False})
    assert f"- {scenario.name}, gateway: {result.tail.p50 * 1000:.2f} / " in text


async def test_connections_take_the_users_keys_in_turn() -> None:
    """With several users, each connection sends one user's key, so the load is every user's."""
    seen: dict[int, set[str]] = {}  # client port (one a connection): the keys it sent

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        seen.setdefault(scope["client"][1], set()).add(dict(scope["headers"])[b"authorization"].decode())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    server = BackgroundServer(app).start()
    try:
        scenario = select(["nonstream-c1"], quick=True)[0]
        target = gateway_target(server.url, scenario, api_keys=["k1", "k2", "k3"])
        result = await run_load(target, requests=12, concurrency=3)
    finally:
        server.stop()
    assert result.ok == 12
    # The connections share the 12 requests (one may send more than another), but each sends one user's key.
    assert sorted(keys for keys in map(sorted, seen.values())) == [["Bearer k1"], ["Bearer k2"], ["Bearer k3"]]


@pytest.mark.django_db(transaction=True)
def test_provisioning_makes_each_user_a_key_with_no_practical_limits() -> None:
    from accounts.selectors import api_key_authenticate
    from bench.provision import REQUESTS_PER_HOUR, TOKENS_PER_DAY, provision

    keys = provision(users=3)

    principals = [api_key_authenticate(key) for key in keys]
    assert all(p is not None for p in principals) and len(keys) == 3
    assert len({p.user_id for p in principals if p is not None}) == 3
    assert {(p.plan, p.requests_per_hour, p.tokens_per_day) for p in principals if p is not None} == {
        ("enterprise", REQUESTS_PER_HOUR, TOKENS_PER_DAY)
    }
    with pytest.raises(ValueError):
        provision(users=0)


def test_scanner_reads_openai_chunks_and_ignores_role_only_ones() -> None:
    scanner = StreamScanner()
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    token = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    scanner.feed(role, 1.0)
    assert scanner.first_token_at is None
    scanner.feed(token[:10], 2.0)
    scanner.feed(token[10:] + b"data: [DONE]\n\n", 3.0)
    assert (scanner.tokens, scanner.first_token_at, scanner.done, scanner.error) == (1, 3.0, True, None)


# --- verdicts -----------------------------------------------------------------------------------


async def test_verdicts_compare_the_gateway_with_the_direct_run(mock_url: str) -> None:
    c1 = next(s for s in SCENARIOS if s.name == "nonstream-c1").scaled(requests=5)
    direct = await run_load(openai_target(mock_url, c1), requests=5, concurrency=1)
    slow = await run_load(
        openai_target(mock_url, c1.scaled(requests=5, spec=MockSpec(ttft=0.01, tokens=1))), requests=5, concurrency=1
    )
    assert verdict(c1, direct, direct) == "pass"
    assert verdict(c1, slow, direct).startswith("FAIL: added p50")
    assert verdict(c1, None, direct) == "-"


def test_litellm_is_found_in_the_interpreter_given_for_it_and_only_there(tmp_path: Path) -> None:
    package = tmp_path / "site" / "litellm" / "proxy"
    package.mkdir(parents=True)
    for init in (package.parent / "__init__.py", package / "__init__.py", package / "proxy_cli.py"):
        init.write_text("")
    python = tmp_path / "python-with-litellm"  # another interpreter, as a virtualenv of LiteLLM's own would be
    python.write_text(f'#!/bin/sh\nPYTHONPATH={package.parent.parent} exec {sys.executable} "$@"\n')
    python.chmod(0o755)

    assert litellm_available(str(python))
    assert not litellm_available(str(tmp_path / "no-such-python"))


def test_litellm_runs_without_a_database_whatever_the_shell_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM's proxy takes a database from DATABASE_URL (or DATABASE_HOST and the rest), migrates it and
    logs spend to it; the side-by-side run is of the proxy with none, so none may leak in from the shell."""
    monkeypatch.setenv("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/chat")
    monkeypatch.setenv("DIRECT_URL", "postgres://postgres@127.0.0.1:5432/chat")
    monkeypatch.setenv("DATABASE_HOST", "127.0.0.1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    env = litellm_env()
    assert not {"DATABASE_URL", "DIRECT_URL", "DATABASE_HOST", "OPENAI_API_KEY"} & env.keys()
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


def test_the_report_gives_the_machines_speed_before_and_after_the_run() -> None:
    """A fixed piece of work and a loopback round trip, timed pinned to the system's core, tell a slow
    phase of a shared machine."""
    pinned = (os.cpu_count() or 1) >= 2
    taken = calibration.reference(1 if pinned else None, 0 if pinned else None)  # a fresh interpreter
    assert taken.cpu_ms is not None and taken.cpu_ms > 0
    assert taken.loopback_us is not None and taken.loopback_us > 0
    assert calibration.workload(3) == calibration.workload(3) > 0  # the same work every time
    meta = {"started": "now", "cpus": 2, "cpu_model": "x", "python": "3", "servers": ["uvicorn"], "quick": True}
    scenario = select(["nonstream-c1"], quick=True)[0]
    text = markdown(
        [scenario],
        [],
        {
            **meta,
            "pinned": True,
            "cpu_reference_ms": [taken.cpu_ms, None],
            "loopback_reference_us": [None, taken.loopback_us],
        },
    )
    assert f"lower is a faster machine): {taken.cpu_ms:.1f} ms before the run, - after." in text
    assert f"lower is faster): - before the run, {taken.loopback_us:.1f} µs after." in text
    bare = markdown([scenario], [], {**meta, "pinned": True, "cpu_reference_ms": [None, None]})
    assert "CPU reference" not in bare and "Loopback reference" not in bare


# --- the instruction counter ------------------------------------------------------------------


def test_callgrinds_total_is_read_off_its_totals_line() -> None:
    dump = b"version: 1\ncmd: python uvicorn\npart: 1\nevents: Ir\nsummary: 0\n\nfn=(1) main\n16 7\n\n"
    dump += b"totals: 1206392941\n"
    assert instructions.total_instructions(dump) == 1_206_392_941
    with pytest.raises(ValueError):
        instructions.total_instructions(b"version: 1\nsummary: 0\n")  # a dump not yet written to its end


def test_the_gateways_instructions_per_request_are_counted_under_callgrind() -> None:
    """A real run, small: the gateway under callgrind, counting on only for the counted requests."""
    assert instructions.available()
    counted = instructions.count(
        requests=4,
        warmup=3,
        path="/chat",
        mock="tokens=5",
        database_url="postgres://postgres@127.0.0.1:5432/chat_bench_instructions_test",
        redis_url="redis://127.0.0.1:6379/11",
    )
    assert counted.requests == 4
    # A request is millions of instructions of CPython, the SDKs and the drivers: not zero (counting never
    # went on) and not the billions of the gateway's start (counting on from the beginning).
    assert 1e6 < counted.per_request < 1e8
