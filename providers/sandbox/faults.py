"""Fault markers the sandbox upstream obeys, its deterministic replies, and what it observed.

Markers go in the last user message. Each may be limited to one provider with `@name`:

- `[[fail:CODE]]`   answer with that error: 400, 401, 403, 404, 429, 500, 502, 503, 529,
                    `context` (context length exceeded), `policy` (content refused),
                    `conn` (headers sent, then the connection is cut).
  `[[fail:CODE*N]]` fail only the first N requests that carry this exact message.
- `[[retry-after:S]]` the Retry-After header on a 429/503/529 (`none` omits it; 429 defaults to 1).
- `[[hang]]`        wait (up to 300 s, until the client goes away) before answering.
- `[[slow:MS]]`     wait MS milliseconds before each chunk.
- `[[tokens:N]]`    reply with N tokens (default 12), capped by max_tokens.
- `[[drop:K]]`      stream K chunks, then cut the connection.
- `[[error-after:K]]` stream K chunks, then the provider's own in-stream error event.
- `[[thoughts:N]]`  Gemini: N thinking tokens, reported as `thoughtsTokenCount` from the first chunk on.
                    deepseek-reasoner: N `reasoning_content` chunks (one token each) before the answer,
                    instead of 6; `[[drop:K]]` and `[[slow:MS]]` count them as chunks.

Example: `hello [[fail:503@openai]] [[tokens:3]]` fails on OpenAI and answers 3 tokens elsewhere.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import deque
from dataclasses import dataclass, field

DEFAULT_REPLY_TOKENS = 12
HANG_SECONDS = 300.0

_MARKER = re.compile(r"\[\[([a-z-]+)(?::([^\]@*]+))?(?:\*(\d+))?(?:@([a-z]+))?\]\]")
_WORDS = [
    "sandbox",
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


@dataclass(frozen=True)
class Faults:
    fail: str | None = None
    fail_times: int | None = None  # None: every time
    retry_after: str | None = None  # None: the default for the status; "none": omit
    hang: bool = False
    slow_ms: int = 0
    tokens: int | None = None
    drop_after: int | None = None
    error_after: int | None = None
    thoughts: int = 0


def parse_faults(text: str, provider: str) -> Faults:
    """Read the markers in `text` that apply to `provider`."""
    values: dict[str, object] = {}
    for name, arg, times, only in _MARKER.findall(text):
        if only and only != provider:
            continue
        if name == "fail":
            values["fail"] = arg
            values["fail_times"] = int(times) if times else None
        elif name == "retry-after":
            values["retry_after"] = arg
        elif name == "hang":
            values["hang"] = True
        elif name == "slow":
            values["slow_ms"] = int(arg)
        elif name == "tokens":
            values["tokens"] = int(arg)
        elif name == "drop":
            values["drop_after"] = int(arg)
        elif name == "error-after":
            values["error_after"] = int(arg)
        elif name == "thoughts":
            values["thoughts"] = int(arg)
    return Faults(**values)  # type: ignore[arg-type]


def reply_tokens(prompt: str, count: int) -> list[str]:
    """A deterministic reply of `count` tokens (one word with its leading space each)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    words = [_WORDS[(seed + i * 7) % len(_WORDS)] for i in range(count)]
    return [w if i == 0 else f" {w}" for i, w in enumerate(words)]


def count_prompt_tokens(texts: list[str]) -> int:
    """The sandbox's own input-token count: about four characters a token, plus 3 per message."""
    return sum(max(1, len(t) // 4) + 3 for t in texts)


@dataclass
class RequestLog:
    provider: str
    path: str
    model: str
    stream: bool
    status: int
    api_key: str = ""
    headers: tuple[str, ...] = ()  # the request's header names, lower case, as they arrived


@dataclass
class SandboxState:
    """What the sandbox saw; shared with the tests that run it (thread-safe).

    `max_records` bounds what is kept (the latest requests, the latest `[[fail:CODE*N]]` counts):
    a sandbox mounted in the service is never read and would otherwise grow with every request.
    """

    max_records: int | None = None
    requests: deque[RequestLog] = field(init=False)
    active_streams: int = 0
    completed_streams: int = 0
    aborted_streams: int = 0  # the client went away before the stream ended
    _fail_counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.requests = deque(maxlen=self.max_records)

    def log(self, entry: RequestLog) -> None:
        with self._lock:
            self.requests.append(entry)

    def should_fail(self, faults: Faults, provider: str, message: str) -> bool:
        """Whether this request fails, counting down `[[fail:CODE*N]]` per provider and message."""
        if faults.fail is None:
            return False
        if faults.fail_times is None:
            return True
        key = f"{provider}\x00{message}"
        with self._lock:
            seen = self._fail_counts.get(key, 0)
            self._fail_counts[key] = seen + 1
            if self.max_records is not None and len(self._fail_counts) > self.max_records:
                del self._fail_counts[next(iter(self._fail_counts))]  # the oldest message
        return seen < faults.fail_times

    def stream_opened(self) -> None:
        with self._lock:
            self.active_streams += 1

    def stream_closed(self, *, completed: bool) -> None:
        with self._lock:
            self.active_streams -= 1
            if completed:
                self.completed_streams += 1
            else:
                self.aborted_streams += 1

    def calls(self, provider: str | None = None) -> list[RequestLog]:
        with self._lock:
            return [r for r in self.requests if provider is None or r.provider == provider]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._fail_counts.clear()
            self.active_streams = 0
            self.completed_streams = 0
            self.aborted_streams = 0
