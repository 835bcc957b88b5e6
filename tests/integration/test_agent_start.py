"""`fairu-agent start` refuses to serve with a clear message when it cannot, and
reports how its host confines jobs when it can."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker


def run_agent(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fairu.agent.cli", "start", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(folder: Path, signing_key, broker_url: str, queue: str, socket: str) -> Path:
    path = folder / "site.toml"
    path.write_text(
        f"""
[site]
name = "start-test"
[broker]
url = "{broker_url}"
[trust]
signing_keys = ["{signing_key.public_text}"]
[agent]
state_dir = "state"
[[queues]]
competition = "absent"
name = "{queue}"
[runner.podman]
socket = "{socket}"
"""
    )
    return path


def test_missing_queue_exits_with_fix(tmp_path, signing_key, broker_url, podman_socket):
    result = run_agent(write_config(tmp_path, signing_key, broker_url, "nope", podman_socket))
    assert result.returncode == 1
    assert "queue fairu.jobs.absent.nope does not exist" in result.stderr
    assert "fairu-admin queues create nope --competition absent" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_credentials_exit(tmp_path, signing_key, podman_socket):
    url = "amqp://guest:wrong-password@127.0.0.1:5672/%2F"
    result = run_agent(write_config(tmp_path, signing_key, url, "cpu", podman_socket))
    assert result.returncode == 1
    assert "rejected the credentials" in result.stderr
    assert "wrong-password" not in result.stderr + result.stdout
    assert "reconnect attempt" not in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_vhost_exits(tmp_path, signing_key, podman_socket):
    url = "amqp://guest:guest@127.0.0.1:5672/fairu-no-such-vhost"
    result = run_agent(write_config(tmp_path, signing_key, url, "cpu", podman_socket))
    assert result.returncode == 1
    assert "the virtual host does not exist" in result.stderr
    assert "reconnect attempt" not in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_podman_exits(tmp_path, signing_key, broker_url):
    socket = f"unix://{tmp_path}/no-such.sock"
    result = run_agent(write_config(tmp_path, signing_key, broker_url, "cpu", socket))
    assert result.returncode == 1
    assert "no-such.sock" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_config_exits_2(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('[site]\nname = "Bad Name"\n')
    result = run_agent(path)
    assert result.returncode == 2
    assert "site.name" in result.stderr
    assert "Traceback" not in result.stderr


def host_enforces_cgroup_limits(podman_socket: str) -> bool:
    import podman

    with podman.PodmanClient(base_url=podman_socket, timeout=30) as client:
        host = client.info()["host"]
    if not host["security"]["rootless"]:
        return True
    controllers = set(host.get("cgroupControllers") or ())
    return host["cgroupVersion"] == "v2" and {"memory", "cpu", "pids"} <= controllers


def test_required_cgroup_limits_exit(tmp_path, signing_key, broker_url, podman_socket):
    path = write_config(tmp_path, signing_key, broker_url, "cpu", podman_socket)
    path.write_text(
        path.read_text().replace(
            "[runner.podman]", "[runner]\nrequire_cgroup_limits = true\n[runner.podman]"
        )
    )

    result = run_agent(path)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    if host_enforces_cgroup_limits(podman_socket):
        # Past the sandbox check, the agent stops at the missing queue.
        assert "queue fairu.jobs.absent.cpu does not exist" in result.stderr
    else:
        assert "cannot enforce the memory, CPU, pids cgroup limits" in result.stderr
        assert "runner.require_cgroup_limits" in result.stderr


@pytest.mark.podman
async def test_registration_reports_sandbox(
    amqp, competition, start_agent, podman_socket
):
    from fairu.protocol.errors import RejectedError
    from fairu.protocol.models import Registration
    from fairu.protocol.signing import open_unverified
    from fairu.protocol.topology import EVENTS_EXCHANGE

    registrations: list[Registration] = []
    queue = await amqp.declare_queue(
        "", durable=False, exclusive=True, auto_delete=True
    )
    await amqp.bind(queue, EVENTS_EXCHANGE, "agent.registration.#")

    def on_registration(delivery) -> None:
        amqp.ack(delivery.delivery_tag)
        try:
            registration = open_unverified(delivery.body, Registration)
        except RejectedError:
            # Other test runs on this broker may register in a newer format.
            return
        if competition.amqp_queue in registration.queues:
            registrations.append(registration)

    await amqp.consume(queue, on_registration)
    agent = start_agent(competition)
    for _ in range(100):
        if registrations:
            break
        await asyncio.sleep(0.1)

    assert registrations, "no registration from the agent within 10 s"
    sandbox = registrations[0].sandbox
    assert sandbox is not None
    assert sandbox.runner == "podman"
    assert sandbox.rlimits is True
    assert sandbox.user_namespaces_blocked is True
    if host_enforces_cgroup_limits(podman_socket):
        assert sandbox.cgroup_limits_enforced
    else:
        assert not sandbox.cgroup_limits_enforced
        assert "does not enforce the memory, CPU, pids cgroup limits" in agent.log()
