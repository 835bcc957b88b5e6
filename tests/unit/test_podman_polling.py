"""The wait between two state checks of a running container."""

from __future__ import annotations

import time

import pytest

from fairu.runners.podman import FIRST_POLL_S, PodmanRunner, PodmanSettings


@pytest.fixture
def runner() -> PodmanRunner:
    # No request is made: the client connects on its first API call.
    return PodmanRunner(PodmanSettings(socket_url="unix:///nonexistent/podman.sock"))


def test_first_check_comes_soon(runner: PodmanRunner) -> None:
    assert runner._poll_delay(time.monotonic()) == pytest.approx(FIRST_POLL_S, abs=1e-3)


def test_wait_grows_with_run_time(runner: PodmanRunner) -> None:
    delay = runner._poll_delay(time.monotonic() - 1.0)
    assert delay == pytest.approx(0.2, abs=0.01)


def test_wait_capped_by_poll_interval(runner: PodmanRunner) -> None:
    assert runner._poll_delay(time.monotonic() - 600.0) == 0.5


def test_short_poll_interval_wins() -> None:
    fast = PodmanRunner(
        PodmanSettings(socket_url="unix:///nonexistent/podman.sock", poll_interval_s=0.01)
    )
    assert fast._poll_delay(time.monotonic()) == 0.01
