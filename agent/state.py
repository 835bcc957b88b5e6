"""The agent's state folder: identity key, finished-job records, result spool, work dirs.

Layout under `state_dir`:

    identity.key        Ed25519 private key, mode 0600, made on first start
    jobs.sqlite         one row per finished or rejected job id, with its signed result,
                        and one per claimed job that has not ended yet (its lease)
    spool/              results written before publishing and removed once confirmed
    cache/              inputs by sha256 (see `fetch`)
    work/<job>/output   the container's writable folder

Folders other than spool/ are mode 0755 because the rootless container user, which
may differ from the agent's user, must traverse them to reach its bind mounts.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fairu.files import write_atomic
from fairu.protocol.errors import ConfigError
from fairu.protocol.signing import (
    agent_id_for,
    generate_private_key,
    load_private_key,
    write_private_key,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    agent_id: str
    key: Ed25519PrivateKey


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    status: str
    # sha256 of the job message that produced the result, to tell a redelivery of
    # that message from a new message reusing its job id.
    message_sha256: str
    result: bytes
    published: bool = False


@dataclass(frozen=True)
class Claim:
    """A job whose delivery this agent acked and whose lease it holds."""

    job_id: str
    routing_key: str
    # The exact signed job message, so that a release can queue it again unchanged.
    message: bytes


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = root / "spool"
        self.cache = root / "cache"
        self.work = root / "work"
        self._db_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._lock_handle: IO[str] | None = None
        self._batch = _Batch()
        self._committing: asyncio.Task[None] | None = None

    def prepare(self) -> None:
        try:
            for folder in (self.root, self.cache, self.work):
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o755)
            self.spool.mkdir(exist_ok=True)
            self.spool.chmod(0o700)
        except OSError as exc:
            raise ConfigError(
                f"cannot prepare the state folder {self.root}: {exc.strerror}; set "
                "agent.state_dir to a folder this user can write"
            ) from None
        self._db = sqlite3.connect(self.root / "jobs.sqlite", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
            " message_sha256 TEXT NOT NULL, result BLOB NOT NULL,"
            " finished_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "message_sha256" not in columns:
            # Folders from fairu 0.1.0 before this column existed: their records
            # match no message, so a new message with such a job id is rejected as replayed.
            self._db.execute(
                "ALTER TABLE jobs ADD COLUMN message_sha256 TEXT NOT NULL DEFAULT ''"
            )
        if "published" not in columns:
            # Set once the broker confirmed the result, so a redelivery after that
            # needs only an ack.
            self._db.execute("ALTER TABLE jobs ADD COLUMN published INTEGER NOT NULL DEFAULT 0")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS claims (job_id TEXT PRIMARY KEY,"
            " routing_key TEXT NOT NULL, message BLOB NOT NULL,"
            " claimed_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        if "unconfirmed" not in columns:
            # Set while the row is the only durable copy of a result that the broker
            # has not confirmed, so that the next connect publishes it again. Rows
            # from before this column had a spool file for that.
            self._db.execute(
                "ALTER TABLE jobs ADD COLUMN unconfirmed INTEGER NOT NULL DEFAULT 0"
            )
        self._db.commit()

    def close(self) -> None:
        # The lock waits out a group commit still running in its thread.
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- process id ---------------------------------------------------------------

    @property
    def pid_file(self) -> Path:
        return self.root / "agent.pid"

    def lock(self) -> None:
        """Take the folder's lock and write this process's id, or raise ConfigError.

        Two agents on one state folder would remove each other's containers, so the
        lock is an exclusive flock held for the life of the process.
        """
        handle = open(self.pid_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"another agent (process {holder}) is running with state folder "
                f"{self.root}; stop it or give this agent its own agent.state_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        if self._lock_handle is not None:
            self.pid_file.unlink(missing_ok=True)
            self._lock_handle.close()
            self._lock_handle = None

    # --- identity ---------------------------------------------------------------

    def load_identity(self, site: str) -> Identity:
        """Load the identity key, making it on first start; the id derives from the key."""
        path = self.root / "identity.key"
        if not path.exists():
            write_private_key(path, generate_private_key())
            logger.info("made a new agent identity key at %s", path)
        key = load_private_key(path)
        return Identity(agent_id=agent_id_for(site, key.public_key()), key=key)

    # --- finished jobs ----------------------------------------------------------

    def record_finished(
        self,
        job_id: str,
        status: str,
        message_sha256: str,
        result: bytes,
        unconfirmed: bool = False,
    ) -> None:
        self.commit_batch(_Batch(records=[(job_id, status, message_sha256, result, unconfirmed)]))

    def finished(self, job_id: str) -> JobRecord | None:
        with self._db_lock:
            assert self._db is not None
            row = self._db.execute(
                "SELECT job_id, status, message_sha256, result, published FROM jobs"
                " WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        return JobRecord(row[0], row[1], row[2], bytes(row[3]), bool(row[4])) if row else None

    def mark_published(self, job_id: str) -> None:
        self.commit_batch(_Batch(published=[job_id]))

    def unconfirmed(self) -> list[tuple[str, bytes]]:
        """Return (job id, result) of each recorded result the broker never confirmed."""
        with self._db_lock:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT job_id, result FROM jobs WHERE unconfirmed = 1 ORDER BY rowid"
            ).fetchall()
        return [(row[0], bytes(row[1])) for row in rows]

    def commit_batch(self, batch: _Batch) -> None:
        """Write a batch of records and confirmations in one transaction.

        A batch with a record commits with an fsync of the write-ahead log
        (synchronous=FULL), so the record survives a crash or a power loss once this
        returns. A batch of confirmations alone does not wait for the disk: losing
        one only means that its result is published once more after a crash, and the
        coordinator keeps the first copy of each result.
        """
        with self._db_lock:
            assert self._db is not None
            synchronous = "FULL" if batch.records else "NORMAL"
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            with self._db:
                self._db.executemany(
                    "INSERT OR IGNORE INTO jobs"
                    " (job_id, status, message_sha256, result, unconfirmed)"
                    " VALUES (?, ?, ?, ?, ?)",
                    batch.records,
                )
                self._db.executemany(
                    "UPDATE jobs SET published = 1, unconfirmed = 0 WHERE job_id = ?",
                    [(job_id,) for job_id in batch.published],
                )

    # --- group commit -----------------------------------------------------------

    async def record(
        self, job_id: str, status: str, message_sha256: str, result: bytes
    ) -> None:
        """Record a finished job and its unconfirmed result, durably, in a group commit.

        The row stays the result's spool until `confirmed` clears it.
        """
        await self._group_commit(
            lambda batch: batch.records.append((job_id, status, message_sha256, result, True))
        )

    async def confirmed(self, job_id: str) -> None:
        """Mark a recorded job's result as confirmed by the broker, in a group commit."""
        await self._group_commit(lambda batch: batch.published.append(job_id))

    async def _group_commit(self, add: Callable[[_Batch], None]) -> None:
        # The writes that callers add while one batch commits in a thread go into the
        # next batch, so jobs that finish together share one thread hand-off and one
        # fsync instead of one each.
        add(self._batch)
        if self._batch.done is None:
            self._batch.done = asyncio.get_running_loop().create_future()
        done = self._batch.done
        if self._committing is None or self._committing.done():
            self._committing = asyncio.create_task(self._commit_batches())
        await asyncio.shield(done)

    async def _commit_batches(self) -> None:
        while self._batch.records or self._batch.published:
            batch, self._batch = self._batch, _Batch()
            try:
                await asyncio.to_thread(self.commit_batch, batch)
            except Exception as exc:
                logger.error(
                    "state folder %s: commit of %d job records failed: %s",
                    self.root, len(batch.records) + len(batch.published), exc,
                )
                if batch.done is not None and not batch.done.done():
                    batch.done.set_exception(exc)
                continue
            if batch.done is not None and not batch.done.done():
                batch.done.set_result(None)

    # --- claimed jobs -------------------------------------------------------------

    def record_claim(self, job_id: str, routing_key: str, message: bytes) -> None:
        """Store a claim before its lease is published, replacing an older one."""
        with self._db_lock:
            assert self._db is not None
            self._db.execute(
                "INSERT OR REPLACE INTO claims (job_id, routing_key, message)"
                " VALUES (?, ?, ?)",
                (job_id, routing_key, message),
            )
            self._db.commit()

    def claims(self) -> list[Claim]:
        with self._db_lock:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT job_id, routing_key, message FROM claims ORDER BY claimed_at"
            ).fetchall()
        return [Claim(row[0], row[1], bytes(row[2])) for row in rows]

    def drop_claim(self, job_id: str) -> None:
        with self._db_lock:
            assert self._db is not None
            self._db.execute("DELETE FROM claims WHERE job_id = ?", (job_id,))
            self._db.commit()

    # --- result spool -----------------------------------------------------------

    def spool_write(self, name: str, routing_key: str, body: bytes) -> Path:
        """Write a message crash-safely (write, fsync, rename) before it is published."""
        path = self.spool / _spool_name(name)
        record = base64.b64encode(routing_key.encode()) + b"\n" + body
        write_atomic(path, record, mode=0o600)
        return path

    def spooled(self) -> list[tuple[Path, str, bytes]]:
        """Return the spooled messages left by an earlier run, oldest first."""
        entries = []
        for path in sorted(self.spool.glob("*.msg"), key=lambda p: p.stat().st_mtime):
            data = path.read_bytes()
            header, _, body = data.partition(b"\n")
            try:
                routing_key = base64.b64decode(header, validate=True).decode()
            except ValueError:
                logger.error("spooled message %s is corrupt; moved aside", path)
                path.rename(path.with_suffix(".corrupt"))
                continue
            entries.append((path, routing_key, body))
        return entries

    # --- work folders -----------------------------------------------------------

    def work_dir(self, job_id: str) -> Path:
        """Return the path of the job's work/<job>/output folder, made or not."""
        return self.work / _safe_name(job_id) / "output"

    def make_work_dir(self, job_id: str) -> Path:
        """Make an empty work/<job>/output folder; the runner sets its owner."""
        output = self.work_dir(job_id)
        job_dir = output.parent
        if job_dir.exists():
            shutil.rmtree(job_dir)
        output.mkdir(parents=True)
        job_dir.chmod(0o755)
        output.chmod(0o755)
        return output

    def remove_work_dir(self, job_id: str) -> None:
        """Remove the job's folder, however deep the tree that the job left in it.

        shutil.rmtree recurses once per level and raises RecursionError for a tree
        about 1000 levels deep, which a job can make in milliseconds, so `rm -rf`,
        which has no such limit, removes what rmtree cannot.
        """
        job_dir = self.work / _safe_name(job_id)
        try:
            shutil.rmtree(job_dir, ignore_errors=True)
        except RecursionError:
            pass
        if not job_dir.exists():
            return
        result = subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(job_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or job_dir.exists():
            logger.error(
                "job %s: failed to remove its work folder %s: %s",
                job_id,
                job_dir,
                result.stderr.strip() or f"rm exited with {result.returncode}",
            )


@dataclass
class _Batch:
    records: list[tuple[str, str, str, bytes, bool]] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    # Made by the first caller that waits on the batch.
    done: asyncio.Future[None] | None = None


def _safe_name(job_id: str) -> str:
    # Job ids allow ':' and '.', which are fine in file names but ':' is not on
    # every file system, so a digest keeps names portable and unique.
    return hashlib.sha256(job_id.encode()).hexdigest()[:32]


def _spool_name(name: str) -> str:
    return _safe_name(name) + ".msg"
