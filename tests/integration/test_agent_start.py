"""`fairu-agent start` refuses to serve with a clear message when it cannot."""

from __future__ import annotations

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
