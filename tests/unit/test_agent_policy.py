"""Site policy for jobs, and the agent's review of the host's sandbox."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from fairu.agent.config import PolicySection, RunnerSection
from fairu.agent.policy import check_policy, review_sandbox
from fairu.protocol import ErrorCode, JobSpec, RejectedError, SandboxInfo, utc_now


def make_job(**overrides: object) -> JobSpec:
    now = utc_now()
    fields: dict[str, object] = {
        "job_id": "job-1",
        "competition": "higgs",
        "queue": "cpu",
        "submission_id": "sub-1",
        "image": "localhost/fairu-python:1",
        "command": ["true"],
        "created_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    fields.update(overrides)
    return JobSpec(**fields)  # type: ignore[arg-type]


def sandbox(**overrides: object) -> SandboxInfo:
    fields: dict[str, object] = {
        "runner": "podman",
        "rootless": True,
        "cgroup_version": "v1",
        "memory_limit": False,
        "cpu_limit": False,
        "pids_limit": False,
        "rlimits": True,
        "user_namespaces_blocked": True,
    }
    fields.update(overrides)
    return SandboxInfo(**fields)  # type: ignore[arg-type]


def test_egress_rejected_by_default():
    with pytest.raises(RejectedError) as caught:
        check_policy(make_job(network="egress"), PolicySection())

    assert caught.value.code is ErrorCode.EGRESS_NOT_ALLOWED
    assert "policy.allow_egress" in caught.value.message


def test_egress_accepted_when_allowed():
    check_policy(make_job(network="egress"), PolicySection(allow_egress=True))


def test_sandbox_without_cgroups_warns(caplog):
    caplog.set_level(logging.WARNING, logger="fairu.agent.policy")

    problem = review_sandbox(sandbox(), RunnerSection(), "site-agent")

    assert problem is None
    assert len(caplog.records) == 1
    assert "memory, CPU, pids cgroup limits" in caplog.records[0].getMessage()
    assert "site-agent" in caplog.records[0].getMessage()


def test_sandbox_without_cgroups_stops_agent():
    problem = review_sandbox(
        sandbox(pids_limit=True),
        RunnerSection(require_cgroup_limits=True),
        "site-agent",
    )

    assert problem is not None
    assert "cannot enforce the memory, CPU cgroup limits" in problem
    assert "runner.require_cgroup_limits" in problem


def test_sandbox_with_cgroups_is_quiet(caplog):
    caplog.set_level(logging.WARNING, logger="fairu.agent.policy")
    enforced = sandbox(
        cgroup_version="v2", memory_limit=True, cpu_limit=True, pids_limit=True
    )

    problem = review_sandbox(enforced, RunnerSection(require_cgroup_limits=True), "a")

    assert problem is None
    assert caplog.records == []


def test_sandbox_open_user_namespaces_warn(caplog):
    caplog.set_level(logging.WARNING, logger="fairu.agent.policy")
    open_namespaces = sandbox(
        memory_limit=True,
        cpu_limit=True,
        pids_limit=True,
        user_namespaces_blocked=False,
    )

    review_sandbox(open_namespaces, RunnerSection(), "a")

    assert [r.getMessage() for r in caplog.records] == [
        "agent a: jobs can create user namespaces, in which they can mount file "
        "systems that no limit bounds"
    ]


def test_null_runner_sandbox_accepted():
    null = sandbox(
        runner="null",
        rootless=False,
        cgroup_version=None,
        rlimits=False,
        user_namespaces_blocked=False,
    )

    assert review_sandbox(null, RunnerSection(require_cgroup_limits=True), "a") is None
