"""The coordinator's SQLite store: agents, one final result per job, and an audit trail.

All methods block; the coordinator calls them through `asyncio.to_thread`. One
connection is shared behind a lock, which is enough for the coordinator's write
rate (a row per heartbeat and per result).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    public_key TEXT NOT NULL,
    version TEXT NOT NULL,
    cpu_cores INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    gpus TEXT NOT NULL,
    queues TEXT NOT NULL,
    slots INTEGER NOT NULL,
    state TEXT NOT NULL,
    free_slots INTEGER NOT NULL,
    running_jobs TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    -- pending until an admin approves the agent or it enrolls with a token;
    -- only results of approved agents are recorded.
    approval TEXT NOT NULL DEFAULT 'pending',
    heartbeat_interval_s REAL NOT NULL DEFAULT 10,
    -- JSON ResourceAmounts: what the agent offers in total, and the free part.
    capacity TEXT,
    free TEXT,
    -- JSON: usable_cpus, memory_available_bytes, scratch_free_bytes, driver_version,
    -- cuda_version, as the last registration reported them.
    host TEXT NOT NULL DEFAULT '{}',
    -- live, stale or offline, from the age of last_seen (see fleet_state).
    liveness TEXT NOT NULL DEFAULT 'live'
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    site TEXT NOT NULL,
    status TEXT NOT NULL,
    scores TEXT NOT NULL,
    body BLOB NOT NULL,
    recorded_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS result_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    body BLOB NOT NULL,
    received_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS result_audit_job ON result_audit (job_id);
CREATE TABLE IF NOT EXISTS leases (
    job_id TEXT PRIMARY KEY,
    -- The agent whose claim holds the job; NULL once the job is queued again.
    agent_id TEXT,
    -- held, released (by its agent, to be queued again now) or queued.
    state TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    -- The exact signed job message, published again unchanged.
    message BLOB NOT NULL,
    ttl_s REAL NOT NULL,
    -- Unix time on the coordinator's clock.
    expires_at REAL NOT NULL,
    -- How often the job's lease expired without a renewal.
    expiries INTEGER NOT NULL DEFAULT 0
);
"""


# Registration fields kept together in the `host` column.
HOST_FIELDS = (
    "usable_cpus",
    "memory_available_bytes",
    "scratch_free_bytes",
    "driver_version",
    "cuda_version",
)
LIVE, STALE, OFFLINE = "live", "stale", "offline"
# Heartbeats missed before an agent counts as stale, and as offline.
STALE_AFTER_MISSED = 3
OFFLINE_AFTER_MISSED = 10


def fleet_state(
    state: str, last_seen: datetime, interval_s: float, now: datetime
) -> str:
    """Return "stale" or "offline" from the heartbeats missed, else the reported state.

    An agent that sent its last heartbeat on stop stays "stopped".
    """
    if state == "stopped":
        return state
    missed = (now - last_seen).total_seconds() / interval_s
    if missed > OFFLINE_AFTER_MISSED:
        return OFFLINE
    if missed > STALE_AFTER_MISSED:
        return STALE
    return state


@dataclass(frozen=True)
class StoredLease:
    job_id: str
    agent_id: str | None
    state: str
    routing_key: str
    message: bytes
    ttl_s: float
    expires_at: float
    expiries: int


HELD, RELEASED, QUEUED = "held", "released", "queued"
LEASE_COLUMNS = (
    "job_id, agent_id, state, routing_key, message, ttl_s, expires_at, expiries"
)


def _stored_lease(row: tuple[object, ...]) -> StoredLease:
    return StoredLease(
        job_id=str(row[0]),
        agent_id=None if row[1] is None else str(row[1]),
        state=str(row[2]),
        routing_key=str(row[3]),
        message=bytes(row[4]),  # type: ignore[arg-type]
        ttl_s=float(row[5]),  # type: ignore[arg-type]
        expires_at=float(row[6]),  # type: ignore[arg-type]
        expiries=int(row[7]),  # type: ignore[call-overload]
    )


@dataclass(frozen=True)
class StoredResult:
    job_id: str
    agent_id: str
    site: str
    status: str
    scores: dict[str, float]
    recorded_at: str


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()
        self._db.commit()

    def _add_missing_columns(self) -> None:
        """Bring a database made by an earlier fairu 0.1.0 build up to SCHEMA."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(agents)")}
        added = {
            "approval": "TEXT NOT NULL DEFAULT 'pending'",
            "heartbeat_interval_s": "REAL NOT NULL DEFAULT 10",
            "capacity": "TEXT",
            "free": "TEXT",
            "host": "TEXT NOT NULL DEFAULT '{}'",
            "liveness": "TEXT NOT NULL DEFAULT 'live'",
        }
        for name, definition in added.items():
            if name not in columns:
                self._db.execute(f"ALTER TABLE agents ADD COLUMN {name} {definition}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- agents -----------------------------------------------------------------

    def agent_key(self, agent_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT public_key FROM agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
        return row[0] if row else None

    def upsert_registration(self, fields: dict[str, object]) -> None:
        """Store a registration: `Registration.model_dump(mode="json")`, no token."""
        row = dict(fields)
        row["host"] = {name: row.pop(name, None) for name in HOST_FIELDS}
        row.setdefault("heartbeat_interval_s", 10.0)
        for name in ("gpus", "queues", "running_jobs", "host", "capacity", "free"):
            row[name] = json.dumps(row.get(name))
        with self._lock:
            self._db.execute(
                "INSERT INTO agents (agent_id, site, public_key, version, cpu_cores,"
                " memory_bytes, gpus, queues, slots, state, free_slots, running_jobs,"
                " registered_at, last_seen, heartbeat_interval_s, capacity, free, host,"
                " liveness) VALUES (:agent_id, :site, :public_key,"
                " :version, :cpu_cores, :memory_bytes, :gpus, :queues, :slots, 'serving',"
                " :free_slots, :running_jobs, :at, :at, :heartbeat_interval_s,"
                " :capacity, :free, :host, 'live')"
                " ON CONFLICT (agent_id) DO UPDATE SET site = excluded.site,"
                " version = excluded.version, cpu_cores = excluded.cpu_cores,"
                " memory_bytes = excluded.memory_bytes, gpus = excluded.gpus,"
                " queues = excluded.queues, slots = excluded.slots, state = 'serving',"
                " free_slots = excluded.free_slots, running_jobs = excluded.running_jobs,"
                " registered_at = excluded.registered_at,"
                " last_seen = excluded.last_seen,"
                " heartbeat_interval_s = excluded.heartbeat_interval_s,"
                " capacity = excluded.capacity, free = excluded.free,"
                " host = excluded.host, liveness = 'live'",
                row,
            )
            self._db.commit()

    def update_heartbeat(
        self,
        agent_id: str,
        state: str,
        free_slots: int,
        running_jobs: list[str],
        at: str,
        capacity: dict[str, object] | None = None,
        free: dict[str, object] | None = None,
    ) -> bool:
        """Store a heartbeat; `capacity` and `free` are kept when it carries none.

        The commit does not wait for the disk (synchronous=NORMAL in WAL mode): a
        power loss can only roll `last_seen` back to an earlier heartbeat, which the
        agent's next heartbeat corrects. A process crash loses nothing committed.
        """
        with self._lock:
            self._db.execute("PRAGMA synchronous = NORMAL")
            try:
                cursor = self._db.execute(
                    "UPDATE agents SET state = ?, free_slots = ?, running_jobs = ?,"
                    " last_seen = ?, capacity = COALESCE(?, capacity),"
                    " free = COALESCE(?, free),"
                    " liveness = 'live' WHERE agent_id = ?",
                    (
                        state,
                        free_slots,
                        json.dumps(running_jobs),
                        at,
                        json.dumps(capacity) if capacity is not None else None,
                        json.dumps(free) if free is not None else None,
                        agent_id,
                    ),
                )
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise
            finally:
                # Every other write of the store waits for the disk.
                self._db.execute("PRAGMA synchronous = FULL")
        return cursor.rowcount == 1

    def agents(self, now: datetime | None = None) -> list[dict[str, object]]:
        """Return every agent, with `fleet_state` computed for `now` (default: now)."""
        now = now or datetime.now(UTC)
        with self._lock:
            cursor = self._db.execute("SELECT * FROM agents ORDER BY site, agent_id")
            names = [column[0] for column in cursor.description]
            rows = cursor.fetchall()
        agents = []
        for row in rows:
            agent = dict(zip(names, row, strict=True))
            for name in ("gpus", "queues", "running_jobs", "capacity", "free", "host"):
                value = agent[name]
                agent[name] = json.loads(str(value)) if value is not None else None
            agent["fleet_state"] = fleet_state(
                str(agent["state"]),
                datetime.fromisoformat(str(agent["last_seen"])),
                float(agent["heartbeat_interval_s"]),  # type: ignore[arg-type]
                now,
            )
            agents.append(agent)
        return agents

    def mark_liveness(self, now: datetime | None = None) -> list[tuple[str, str, str]]:
        """Store each agent's liveness for `now`; return the (agent_id, old, new).

        The coordinator calls this every second, so it reads only the columns that
        liveness depends on and commits only when some agent changed.
        """
        now = now or datetime.now(UTC)
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, state, last_seen, heartbeat_interval_s, liveness"
                " FROM agents"
            ).fetchall()
        changes = []
        for agent_id, state, last_seen, interval_s, old in rows:
            current = fleet_state(state, datetime.fromisoformat(last_seen), interval_s, now)
            liveness = current if current in (STALE, OFFLINE) else LIVE
            if liveness != old:
                changes.append((agent_id, old, liveness))
        if not changes:
            return changes
        with self._lock:
            self._db.executemany(
                "UPDATE agents SET liveness = ? WHERE agent_id = ?",
                [(liveness, agent_id) for agent_id, _old, liveness in changes],
            )
            self._db.commit()
        return changes

    def approval(self, agent_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT approval FROM agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
        return row[0] if row else None

    def set_approval(self, agent_id: str, approval: str) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE agents SET approval = ? WHERE agent_id = ?", (approval, agent_id)
            )
            self._db.commit()
        return cursor.rowcount == 1

    def add_enrollment_token(self, site: str) -> str:
        """Make a one-time token for one agent of `site`; only its hash is stored."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._db.execute(
                "INSERT INTO enrollment_tokens (token_sha256, site) VALUES (?, ?)",
                (_token_hash(token), site),
            )
            self._db.commit()
        return token

    def redeem_enrollment_token(self, token: str, site: str, agent_id: str) -> bool:
        """Approve `agent_id` when `token` is unused and was made for its site."""
        # One transaction, so a token is never spent without approving its agent.
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE enrollment_tokens SET used_by = ? WHERE token_sha256 = ?"
                " AND site = ? AND used_by IS NULL",
                (agent_id, _token_hash(token), site),
            )
            if cursor.rowcount == 1:
                self._db.execute(
                    "UPDATE agents SET approval = 'approved' WHERE agent_id = ?"
                    " AND approval = 'pending'",
                    (agent_id,),
                )
        return cursor.rowcount == 1

    # --- results ----------------------------------------------------------------

    def record_result(
        self,
        job_id: str,
        agent_id: str,
        site: str,
        status: str,
        scores: dict[str, float],
        body: bytes,
    ) -> bool:
        """Keep the first final result per job id; return False for a later one."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO results (job_id, agent_id, site, status, scores, body)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, agent_id, site, status, json.dumps(scores), body),
            )
            self._db.commit()
        return cursor.rowcount == 1

    def audit_result(
        self, job_id: str, agent_id: str, status: str, reason: str, body: bytes
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO result_audit (job_id, agent_id, status, reason, body)"
                " VALUES (?, ?, ?, ?, ?)",
                (job_id, agent_id, status, reason, body),
            )
            self._db.commit()

    def audit_reasons(self, job_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT reason FROM result_audit WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [row[0] for row in rows]

    def result(self, job_id: str) -> StoredResult | None:
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, agent_id, site, status, scores, recorded_at FROM results"
                " WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        return StoredResult(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5])

    def audit_count(self, job_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM result_audit WHERE job_id = ?", (job_id,)
            ).fetchone()
        return int(row[0])


    # --- leases (see broker/leases.py) --------------------------------------------

    def claim_lease(
        self,
        job_id: str,
        agent_id: str,
        routing_key: str,
        message: bytes,
        ttl_s: float,
        now: float,
    ) -> None:
        """Store an agent's claim; a newer claim replaces the holder, not the expiries."""
        with self._lock:
            self._db.execute(
                "INSERT INTO leases (job_id, agent_id, state, routing_key, message,"
                " ttl_s, expires_at) VALUES (?, ?, 'held', ?, ?, ?, ?)"
                " ON CONFLICT (job_id) DO UPDATE SET agent_id = excluded.agent_id,"
                " state = 'held', routing_key = excluded.routing_key,"
                " message = excluded.message, ttl_s = excluded.ttl_s,"
                " expires_at = excluded.expires_at",
                (job_id, agent_id, routing_key, message, ttl_s, now + ttl_s),
            )
            self._db.commit()

    def release_lease(
        self, job_id: str, agent_id: str, routing_key: str, message: bytes, now: float
    ) -> str:
        """Mark a held lease released so the sweep queues its job now.

        Returns "released", "not held" when another agent's claim or a re-queue
        superseded it, or "finished" when the job has a result. A release of a
        lease never stored is kept as released, so that the job is not lost.
        """
        with self._lock, self._db:
            if self._db.execute(
                "SELECT 1 FROM results WHERE job_id = ?", (job_id,)
            ).fetchone():
                return "finished"
            cursor = self._db.execute(
                "UPDATE leases SET state = 'released', expires_at = ?"
                " WHERE job_id = ? AND agent_id = ? AND state = 'held'",
                (now, job_id, agent_id),
            )
            if cursor.rowcount == 1:
                return "released"
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO leases (job_id, agent_id, state, routing_key,"
                " message, ttl_s, expires_at) VALUES (?, ?, 'released', ?, ?, 0, ?)",
                (job_id, agent_id, routing_key, message, now),
            )
        return "released" if cursor.rowcount == 1 else "not held"

    def renew_leases(self, agent_id: str, job_ids: list[str], now: float) -> int:
        """Extend the held leases of `agent_id` on `job_ids` by their TTL from `now`."""
        if not job_ids:
            return 0
        marks = ", ".join("?" for _ in job_ids)
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE leases SET expires_at = ? + ttl_s WHERE agent_id = ?"
                f" AND state = 'held' AND job_id IN ({marks})",
                (now, agent_id, *job_ids),
            )
            self._db.commit()
        return cursor.rowcount

    def extend_leases(self, now: float) -> int:
        """Give every held lease at least its TTL from `now`.

        The coordinator calls this when it connects, since it read no heartbeats
        while it was away.
        """
        with self._lock:
            cursor = self._db.execute(
                "UPDATE leases SET expires_at = MAX(expires_at, ? + ttl_s)"
                " WHERE state = 'held'",
                (now,),
            )
            self._db.commit()
        return cursor.rowcount

    def drop_finished_leases(self) -> int:
        # The sweep runs this every second. EXISTS looks each lease up by key, so
        # the cost follows the leases, not the results table, which only grows.
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM leases WHERE EXISTS"
                " (SELECT 1 FROM results WHERE results.job_id = leases.job_id)"
            )
            self._db.commit()
        return cursor.rowcount

    def due_leases(self, now: float) -> list[StoredLease]:
        """Return the leases that expired or were released by `now`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {LEASE_COLUMNS} FROM leases WHERE state IN ('held', 'released')"
                " AND expires_at <= ? ORDER BY expires_at",
                (now,),
            ).fetchall()
        return [_stored_lease(row) for row in rows]

    def lease(self, job_id: str) -> StoredLease | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {LEASE_COLUMNS} FROM leases WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        return _stored_lease(row) if row is not None else None

    def mark_lease_queued(self, lease: StoredLease, expiries: int) -> bool:
        """Record that the job of `lease` was queued again, unless a claim came since."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE leases SET state = 'queued', agent_id = NULL, expiries = ?"
                " WHERE job_id = ? AND state = ? AND expires_at = ?",
                (expiries, lease.job_id, lease.state, lease.expires_at),
            )
            self._db.commit()
        return cursor.rowcount == 1

    def drop_lease(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
            self._db.commit()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
