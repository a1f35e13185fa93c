"""Benchmark helpers: lines (e.g. ratios to a baseline) printed after pytest-benchmark's table."""
from __future__ import annotations

import pytest

_SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def bench_summary(request: pytest.FixtureRequest) -> list[str]:
    """Append lines here; they are printed in a "benchmark summary" section at the end of the run."""
    return request.config.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("benchmark summary")
        for line in lines:
            terminalreporter.write_line(line)
