"""The agent's state folder and the admin's key folder, on a local file system."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from datetime import timedelta

import pytest

from fairu.agent.state import StateDir
from fairu.broker.keys import KeyFolder
from fairu.protocol import ConfigError


@pytest.fixture
def state(tmp_path):
    folder = StateDir(tmp_path / "state")
    folder.prepare()
    yield folder
    folder.close()


def test_spool_roundtrip(state):
    state.spool_write("job-1", "result.job-1", b'{"a": 1}')
    state.spool_write("job-2", "result.job-2", b"\n\nbinary\xff")
    entries = state.spooled()
    assert [(key, body) for _path, key, body in entries] == [
        ("result.job-1", b'{"a": 1}'),
        ("result.job-2", b"\n\nbinary\xff"),
    ]
    assert stat.S_IMODE(entries[0][0].stat().st_mode) == 0o600


def test_corrupt_spool_entry_moved_aside(state):
    (state.spool / "broken.msg").write_bytes(b"!!not-base64!!\nbody")
    assert state.spooled() == []
    assert (state.spool / "broken.corrupt").exists()


def test_identity_is_stable(state):
    first = state.load_identity("site-a")
    second = state.load_identity("site-a")
    assert first.agent_id == second.agent_id
    assert first.agent_id.startswith("site-a-")
    assert stat.S_IMODE((state.root / "identity.key").stat().st_mode) == 0o600


def test_job_record_keeps_first(state):
    state.record_finished("job-1", "succeeded", "aa", b"first")
    state.record_finished("job-1", "failed", "bb", b"second")
    record = state.finished("job-1")
    assert record is not None
    assert record.status == "succeeded"
    assert record.message_sha256 == "aa"
    assert record.result == b"first"


def test_encrypted_root_needs_passphrase(tmp_path):
    KeyFolder(tmp_path / "keys", passphrase=b"correct horse").init_root()
    with pytest.raises(ConfigError, match="passphrase"):
        KeyFolder(tmp_path / "keys").root_key()
    assert KeyFolder(tmp_path / "keys", passphrase=b"correct horse").root_key()


def test_init_root_twice_fails(tmp_path):
    KeyFolder(tmp_path / "keys").init_root()
    with pytest.raises(ConfigError, match="already exists"):
        KeyFolder(tmp_path / "keys").init_root()


def test_revoke_unknown_key_names_fix(tmp_path):
    folder = KeyFolder(tmp_path / "keys")
    folder.init_root()
    with pytest.raises(ConfigError, match="keys list"):
        folder.revoke("ed25519:0000000000000000")


def test_revocation_versions_increase(tmp_path):
    folder = KeyFolder(tmp_path / "keys")
    folder.init_root()
    first = folder.issue(timedelta(days=1), make_current=True)
    second = folder.issue(timedelta(days=1), make_current=False)
    folder.revoke(second.body.key_id)
    folder.revoke(first.body.key_id)
    state = folder.load_state()
    assert state.revocation_version == 2
    assert state.revoked == sorted([first.body.key_id, second.body.key_id])
    assert state.current_signing is None
    with pytest.raises(ConfigError, match="keys issue"):
        folder.current_signing_key()


async def test_recorded_result_is_unconfirmed_until_confirmed(state):
    await asyncio.gather(
        state.record("job-1", "succeeded", "aa", b"one"),
        state.record("job-2", "failed", "bb", b"two"),
    )
    assert state.unconfirmed() == [("job-1", b"one"), ("job-2", b"two")]
    assert state.finished("job-1").published is False

    await state.confirmed("job-1")
    assert state.unconfirmed() == [("job-2", b"two")]
    assert state.finished("job-1").published is True


async def test_group_commit_survives_reopen(tmp_path):
    first = StateDir(tmp_path / "state")
    first.prepare()
    await asyncio.gather(
        *(first.record(f"job-{n}", "succeeded", "aa", b"r") for n in range(50))
    )
    first.close()
    second = StateDir(tmp_path / "state")
    second.prepare()
    try:
        assert len(second.unconfirmed()) == 50
    finally:
        second.close()


async def test_failed_group_commit_fails_its_callers(state):
    state._db.execute("PRAGMA query_only = 1")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await asyncio.gather(
            state.record("job-1", "succeeded", "aa", b"one"),
            state.confirmed("job-0"),
        )
    assert state.finished("job-1") is None
    # The writer keeps serving once the database takes writes again.
    state._db.execute("PRAGMA query_only = 0")
    await state.record("job-2", "succeeded", "aa", b"two")
    assert state.finished("job-2") is not None


def test_folder_from_before_unconfirmed_column(tmp_path):
    root = tmp_path / "state"
    root.mkdir()
    database = sqlite3.connect(root / "jobs.sqlite")
    database.execute(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " message_sha256 TEXT NOT NULL, result BLOB NOT NULL,"
        " finished_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,"
        " published INTEGER NOT NULL DEFAULT 0)"
    )
    database.execute("INSERT INTO jobs (job_id, status, message_sha256, result) VALUES "
                     "('old', 'succeeded', 'aa', x'00')")
    database.commit()
    database.close()
    state = StateDir(root)
    state.prepare()
    try:
        # Its result had a spool file of its own, so the record does not publish it.
        assert state.unconfirmed() == []
        assert state.finished("old") is not None
    finally:
        state.close()
