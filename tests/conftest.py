"""Fixtures shared by the suites that start real byzps processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_helpers import Processes


@pytest.fixture
def procs() -> Iterator[Processes]:
    """A tracker whose processes (each in its own session) are SIGKILLed, group and all, when
    the test ends, however it ends."""
    tracker = Processes()
    try:
        yield tracker
    finally:
        tracker.kill_all()
