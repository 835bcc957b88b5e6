"""`fairu-agent start` checks the settings that name files and addresses first.

Each broken config must exit with status 2 and one line naming the setting before
the agent makes its state folder or contacts the broker, so the broker URL is a
loopback port that nothing listens on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fairu.protocol.signing import generate_private_key, public_key_text, write_private_key


def closed_port() -> int:
    # A port bound and closed again has no listener.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(folder: Path, trust: str, agent_extra: str) -> Path:
    path = folder / "site.toml"
    path.write_text(
        f"""
[site]
name = "start-checks"
[broker]
url = "amqp://guest:guest@127.0.0.1:{closed_port()}/%2F"
[trust]
{trust}
[agent]
state_dir = "state"
{agent_extra}
[[queues]]
competition = "higgs"
name = "cpu"
[runner]
kind = "null"
"""
    )
    return path


def run_agent(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fairu.agent.cli", "start", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def signing_keys_line() -> str:
    return f'signing_keys = ["{public_key_text(generate_private_key().public_key())}"]'


@pytest.mark.parametrize(
    ("agent_extra", "expected"),
    [
        pytest.param(
            'enrollment_token_file = "absent.token"',
            "cannot read agent.enrollment_token_file",
            id="missing-token-file",
        ),
        pytest.param(
            'health_listen = "localhost"',
            "invalid agent.health_listen 'localhost'",
            id="health-listen-without-port",
        ),
    ],
)
def test_agent_setting_checked_first(tmp_path, agent_extra, expected):
    result = run_agent(write_config(tmp_path, signing_keys_line(), agent_extra))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


def test_private_key_file_checked_first(tmp_path):
    write_private_key(tmp_path / "root.key", generate_private_key())
    result = run_agent(write_config(tmp_path, 'root_key_file = "root.key"', ""))
    assert result.returncode == 2
    assert "trust.root_key_file" in result.stderr
    assert "got a PEM private key" in result.stderr
    assert not (tmp_path / "state").exists()
