"""The test commands the service's original description promises, mapped onto the test layout.

`pytest tests/test_router.py -v` and friends name files that only stand for groups of real
test modules (which mirror the apps). When such a file or folder is named on the command
line, it is collected as the modules it stands for; in a plain `pytest` run it is empty, so
nothing runs twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

ALIASES: dict[str, tuple[str, ...]] = {
    "test_providers/test_openai.py": ("providers/test_openai_client.py",),
    "test_providers/test_anthropic.py": ("providers/test_anthropic_client.py",),
    "test_providers/test_gemini.py": ("providers/test_gemini_client.py",),
    "test_providers/test_tokens.py": ("providers/test_tokens.py", "providers/test_pricing.py"),
    "test_router.py": (
        "providers/test_router.py",
        "providers/test_selection.py",
        "providers/test_circuit.py",
        "providers/test_priority.py",
        "providers/test_status.py",
    ),
    "test_rate_limiting.py": (
        "usage/test_limiter.py",
        "usage/test_quotas.py",
        "usage/test_admission.py",
        "usage/test_quota_concurrency.py",
        "usage/test_limits_e2e.py",
    ),
    "test_streaming.py": ("chat/test_streaming.py",),
}


def _requested(config: pytest.Config) -> list[Path]:
    base = Path(config.invocation_params.dir)
    return [(base / str(arg).split("::")[0]).resolve() for arg in config.args]


class AliasFile(pytest.File):
    """An alias file: collects the real test modules it stands for."""

    targets: tuple[Path, ...] = ()

    def collect(self) -> list[pytest.Module]:
        return [pytest.Module.from_parent(self, path=target) for target in self.targets if target.exists()]


def expand(file_path: Path, parent: pytest.Collector) -> AliasFile | None:
    """The real modules behind an alias file, when the alias (or its folder) was asked for."""
    try:
        relative = file_path.resolve().relative_to(TESTS).as_posix()
    except ValueError:
        return None
    targets = ALIASES.get(relative)
    if targets is None:
        return None
    alias_root = TESTS / relative.split("/")[0]
    asked = any(p == file_path.resolve() or p == alias_root for p in _requested(parent.config))
    if not asked:
        return None
    alias = AliasFile.from_parent(parent, path=file_path)
    alias.targets = tuple(TESTS / target for target in targets)
    return alias
