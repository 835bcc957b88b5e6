"""Strict reading of what operators, organizers and containers hand the agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fairu.agent.config import load_config
from fairu.agent.scores import parse_scores, read_scores
from fairu.broker.jobfile import load_job_file, parse_duration
from fairu.protocol import ConfigError, ErrorCode, JobError
from fairu.protocol.signing import (
    generate_private_key,
    public_key_text,
    write_private_key,
)


def test_scores_accepts_flat_numbers():
    assert parse_scores(b'{"quantiles_score": 0.69, "n": 100}') == {
        "quantiles_score": 0.69,
        "n": 100.0,
    }


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"score: 1", id="yaml"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'{"a": NaN}', id="nan"),
        pytest.param(b'{"a": Infinity}', id="infinity"),
        pytest.param(b'{"a": 1e999}', id="overflow-float"),
        pytest.param(b'{"a": ' + b"9" * 400 + b"}", id="overflow-int"),
        pytest.param(b'{"a": true}', id="bool"),
        pytest.param(b'{"a": "1.0"}', id="string"),
        pytest.param(b'{"a": {"b": 1}}', id="nested"),
        pytest.param(b'{"bad name": 1}', id="name-space"),
        pytest.param(b'{"' + b"k" * 65 + b'": 1}', id="name-long"),
        pytest.param(json.dumps({f"s{i}": i for i in range(300)}).encode(), id="too-many"),
        pytest.param(b"\xff", id="not-utf8"),
    ],
)
def test_scores_rejects(data):
    with pytest.raises(JobError) as caught:
        parse_scores(data)
    assert caught.value.code is ErrorCode.BAD_SCORES


def test_scores_missing_file(tmp_path):
    with pytest.raises(JobError) as caught:
        read_scores(tmp_path)
    assert caught.value.code is ErrorCode.MISSING_SCORES


def test_scores_symlink_is_not_followed(tmp_path):
    (tmp_path / "scores.json").symlink_to("/etc/hostname")
    with pytest.raises(JobError) as caught:
        read_scores(tmp_path)
    assert caught.value.code is ErrorCode.MISSING_SCORES


def write_config(folder: Path, body: str) -> Path:
    key = public_key_text(generate_private_key().public_key())
    path = folder / "site.toml"
    path.write_text(body.replace("KEY", key))
    return path


VALID = """
[site]
name = "laptop"
[trust]
signing_keys = ["KEY"]
[agent]
state_dir = "state"
[[queues]]
competition = "higgs"
name = "cpu"
"""


def test_config_resolves_relative_paths(tmp_path):
    config = load_config(write_config(tmp_path, VALID))
    assert config.agent.state_dir == tmp_path / "state"
    assert config.queues[0].amqp_name == "fairu.jobs.higgs.cpu"
    assert len(config.trusted_keys()) == 1


@pytest.mark.parametrize(
    "edit, expected",
    [
        pytest.param(("slots", "slotz"), "agent.slotz", id="misspelt-key"),
        pytest.param(('name = "laptop"', 'name = "Lap Top"'), "site.name", id="bad-site-name"),
        pytest.param(('["KEY"]', '["not-a-key"]'), "invalid Ed25519 public key", id="bad-key"),
        pytest.param(("[[queues]]", "[[queue]]"), "queue", id="no-queues"),
        pytest.param(("[site]", "[site"), "not valid TOML", id="bad-toml"),
        pytest.param(('name = "cpu"', 'name = "cpu"\n[[queues]]\ncompetition = "higgs"\nname = "cpu"'),
                     "lists competition 'higgs' name 'cpu' twice", id="duplicate-queue"),
        pytest.param(("[agent]", '[broker]\nurl = "not a url"\n[agent]'), "broker.url",
                     id="bad-broker-url"),
        pytest.param(("[[queues]]", '[runner.podman]\ntmpfs_size = "lots"\n[[queues]]'),
                     "tmpfs_size", id="bad-tmpfs-size"),
        pytest.param(("[[queues]]", "[runner.podman.ulimits]\nbogus = [1, 1]\n[[queues]]"),
                     "unknown ulimit", id="unknown-ulimit"),
        pytest.param(("[[queues]]", "[runner.podman.ulimits]\nnofile = [9, 1]\n[[queues]]"),
                     "soft <= hard", id="ulimit-soft-above-hard"),
        pytest.param(("state_dir", "status_interval_s = -0.5\nstate_dir"),
                     r"agent.status_interval_s: -0.5 is not a number of seconds from 0 "
                     "to 60; set 0 to publish every status event at once",
                     id="negative-status-interval"),
        pytest.param(("state_dir", "status_interval_s = 120\nstate_dir"),
                     r"agent.status_interval_s: 120 is not a number of seconds from 0 "
                     "to 60",
                     id="long-status-interval"),
        pytest.param(("state_dir", "status_interval_s = nan\nstate_dir"),
                     r"agent.status_interval_s: nan is not a number of seconds",
                     id="nan-status-interval"),
    ],
)
def test_config_errors_name_the_value(tmp_path, edit, expected):
    body = VALID.replace("state_dir", "slots = 1\nstate_dir") if edit[0] == "slots" else VALID
    path = write_config(tmp_path, body.replace(*edit))
    with pytest.raises(ConfigError, match=expected):
        load_config(path).trusted_keys()


def test_config_status_interval(tmp_path):
    config = load_config(write_config(tmp_path, VALID))
    assert config.agent.status_interval_s == 0.5
    body = VALID.replace("state_dir", "status_interval_s = 0\nstate_dir")
    config = load_config(write_config(tmp_path, body))
    assert config.agent.status_interval_s == 0


def test_config_error_reads_as_sentence(tmp_path):
    body = VALID.replace("state_dir", "lease_ttl_s = 5\nstate_dir")
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, body))
    message = str(caught.value)
    assert "agent: lease_ttl_s 5 is less than 3 heartbeat intervals" in message
    assert "Value error" not in message


def test_config_model_error_has_no_location(tmp_path):
    body = VALID + '[[queues]]\ncompetition = "higgs"\nname = "cpu"\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, body))
    message = str(caught.value)
    assert message.endswith(": [[queues]] lists competition 'higgs' name 'cpu' twice; "
                            "remove the second entry")
    assert "(root)" not in message


@pytest.mark.parametrize("setting", ["root_key_file", "signing_key_files"])
def test_config_private_key_not_echoed(tmp_path, setting):
    key_file = tmp_path / "root.key"
    write_private_key(key_file, generate_private_key())
    # Past the fixed PKCS#8 prefix, the first line of the PEM body is key material.
    secret_part = key_file.read_text().splitlines()[1][20:40]
    value = '"root.key"' if setting == "root_key_file" else '["root.key"]'
    body = VALID.replace('signing_keys = ["KEY"]', f"{setting} = {value}")
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_config(path).trusted_keys()
    message = str(caught.value)
    assert f"trust.{setting}" in message
    assert "private key" in message
    assert secret_part not in message


def test_config_reads_unpack_limits(tmp_path):
    body = VALID + "[inputs]\nmax_unpacked_members = 50\nmax_compression_ratio = 12.5\n"
    limits = load_config(write_config(tmp_path, body)).inputs.unpack_limits()
    assert limits.max_members == 50
    assert limits.max_ratio == 12.5
    assert limits.max_bytes == 8 * 1024**3


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read site config"):
        load_config(tmp_path / "absent.toml")


def test_job_file_computes_input_digest(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"abc")
    (tmp_path / "job.toml").write_text(
        """
competition = "higgs"
queue = "cpu"
submission_id = "s1"
image = "localhost/fairu-python:1"
command = ["true"]
expires_in = "2h"
[resources]
cpus = 2
[[inputs]]
name = "data"
url = "http://127.0.0.1:8470/data.bin"
file = "data.bin"
mount = "data"
"""
    )
    job = load_job_file(tmp_path / "job.toml")
    assert job.inputs[0].size == 3
    assert job.inputs[0].sha256 == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert job.resources.cpus == 2.0
    assert (job.expires_at - job.created_at).total_seconds() == 7200


def test_job_file_error_names_field(tmp_path):
    (tmp_path / "job.toml").write_text('competition = "higgs"\n')
    with pytest.raises(ConfigError, match="queue"):
        load_job_file(tmp_path / "job.toml")


def test_job_file_inputs_must_be_tables(tmp_path):
    (tmp_path / "job.toml").write_text(
        'competition = "c"\nqueue = "q"\nsubmission_id = "s"\nimage = "i"\n'
        'command = ["true"]\ninputs = ["a"]\n'
    )
    with pytest.raises(ConfigError, match=r"\[\[inputs\]\] table"):
        load_job_file(tmp_path / "job.toml")


@pytest.mark.parametrize("text", ["1 week", "10", "-5m", "", "99999999999999d"])
def test_duration_rejects(text):
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)
