"""State checks of a running container: the wait between them, and their retries."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from podman.errors import APIError

import fairu.runners.podman as podman_runner
from fairu.runners.base import ContainerError, RunSpec
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


class FakeContainer:
    """A container whose inspect fails with `errors`, one per call, then succeeds."""

    id = "0123456789abcdef"

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.status = "running"

    def reload(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.status = "exited"


def api_error(explanation: str) -> APIError:
    response = requests.Response()
    response.status_code = 500
    return APIError("inspect failed", response=response, explanation=explanation)


EXIT_RACE = "read /proc/4242/cgroup: no such process"


@pytest.fixture
def spec(tmp_path: Path) -> RunSpec:
    return RunSpec(
        job_id="job-1", image="localhost/fairu-python:1", command=["true"], env={},
        mounts=[], output_dir=tmp_path, walltime_s=60, labels={},
    )


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podman_runner, "INSPECT_RETRY_S", 0.0)


async def test_inspect_retries_exit_race(runner: PodmanRunner, spec: RunSpec) -> None:
    container = FakeContainer([api_error(EXIT_RACE)])
    await runner._inspect(container, spec, "inspect")  # type: ignore[arg-type]
    assert container.calls == 2
    assert container.status == "exited"


async def test_inspect_raises_other_errors(runner: PodmanRunner, spec: RunSpec) -> None:
    container = FakeContainer([api_error("container state improper")])
    with pytest.raises(ContainerError, match="container state improper"):
        await runner._inspect(container, spec, "inspect")  # type: ignore[arg-type]
    assert container.calls == 1


async def test_inspect_gives_up_on_race(runner: PodmanRunner, spec: RunSpec) -> None:
    container = FakeContainer([api_error(EXIT_RACE)] * podman_runner.INSPECT_ATTEMPTS)
    with pytest.raises(ContainerError, match="no such process"):
        await runner._inspect(container, spec, "inspect")  # type: ignore[arg-type]
    assert container.calls == podman_runner.INSPECT_ATTEMPTS
