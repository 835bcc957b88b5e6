"""SQLite tables of sharded evaluations: one row per evaluation, shard and attempt.

The tables live in the coordinator's database file, on a connection of their own.
All methods block, so `Evaluations` calls them through `asyncio.to_thread`. An
attempt is one published shard job (or scoring job): its row is written with the
signed job before the publish, so a restarted coordinator publishes the exact same
bytes again and agents dedupe the job as a redelivery.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    evaluation_id TEXT PRIMARY KEY,
    -- The EvaluationRequest as JSON, and the signed envelope it came in.
    request TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    submitted_at TEXT NOT NULL,
    finished_at TEXT,
    -- JSON object: built-in scores, then the scoring program's as "program.<name>".
    scores TEXT NOT NULL DEFAULT '{}',
    artifacts TEXT NOT NULL DEFAULT '[]',
    error TEXT
);
CREATE TABLE IF NOT EXISTS evaluation_shards (
    evaluation_id TEXT NOT NULL,
    shard_index INTEGER NOT NULL,
    first_set INTEGER NOT NULL,
    sets INTEGER NOT NULL,
    first_experiment INTEGER NOT NULL,
    experiments INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,
    site TEXT,
    agent_id TEXT,
    duration_s REAL,
    error TEXT,
    PRIMARY KEY (evaluation_id, shard_index)
);
CREATE TABLE IF NOT EXISTS evaluation_attempts (
    job_id TEXT PRIMARY KEY,
    evaluation_id TEXT NOT NULL,
    -- NULL for the final scoring job of an evaluation.
    shard_index INTEGER,
    attempt INTEGER NOT NULL,
    -- publishing, published, accepted, failed, late or cancelled.
    state TEXT NOT NULL,
    body BLOB NOT NULL,
    -- Wall-clock Unix time, because straggler deadlines must survive a restart.
    published_at REAL NOT NULL,
    agent_id TEXT,
    site TEXT,
    duration_s REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS evaluation_attempts_shard
    ON evaluation_attempts (evaluation_id, shard_index);
"""

# Attempt states in which the job may still run and report.
LIVE_ATTEMPT_STATES = ("publishing", "published")


@dataclass(frozen=True)
class EvaluationRow:
    evaluation_id: str
    request: str
    body: bytes
    state: str
    submitted_at: str
    finished_at: str | None
    scores: dict[str, float]
    artifacts: list[str]
    error: str | None


@dataclass(frozen=True)
class ShardRow:
    evaluation_id: str
    index: int
    first_set: int
    sets: int
    first_experiment: int
    experiments: int
    state: str
    attempts: int
    job_id: str | None
    site: str | None
    agent_id: str | None
    duration_s: float | None
    error: str | None


@dataclass(frozen=True)
class AttemptRow:
    job_id: str
    evaluation_id: str
    shard_index: int | None
    attempt: int
    state: str
    body: bytes
    published_at: float
    agent_id: str | None
    site: str | None
    duration_s: float | None
    error: str | None


class EvaluationStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # The coordinator's Store writes the same file on its own connection.
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- evaluations ------------------------------------------------------------

    def insert_evaluation(
        self,
        evaluation_id: str,
        request: str,
        body: bytes,
        submitted_at: str,
        shards: list[tuple[int, int, int, int]],
    ) -> bool:
        """Insert an evaluation and its queued shards in one transaction; return
        False when the evaluation id exists."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO evaluations (evaluation_id, request, body, state,"
                " submitted_at) VALUES (?, ?, ?, 'running', ?)",
                (evaluation_id, request, body, submitted_at),
            )
            if cursor.rowcount != 1:
                return False
            self._db.executemany(
                "INSERT INTO evaluation_shards (evaluation_id, shard_index, first_set,"
                " sets, first_experiment, experiments, state) VALUES (?, ?, ?, ?, ?, ?,"
                " 'queued')",
                [(evaluation_id, index, *shard) for index, shard in enumerate(shards)],
            )
        return True

    def evaluation(self, evaluation_id: str) -> EvaluationRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT evaluation_id, request, body, state, submitted_at, finished_at,"
                " scores, artifacts, error FROM evaluations WHERE evaluation_id = ?",
                (evaluation_id,),
            ).fetchone()
        return _evaluation(row) if row else None

    def evaluations(self, states: tuple[str, ...] | None = None) -> list[EvaluationRow]:
        query = (
            "SELECT evaluation_id, request, body, state, submitted_at, finished_at,"
            " scores, artifacts, error FROM evaluations"
        )
        parameters: tuple[str, ...] = ()
        if states is not None:
            query += f" WHERE state IN ({', '.join('?' for _ in states)})"
            parameters = states
        with self._lock:
            rows = self._db.execute(query + " ORDER BY submitted_at", parameters).fetchall()
        return [_evaluation(row) for row in rows]

    def set_evaluation_state(
        self,
        evaluation_id: str,
        state: str,
        *,
        finished_at: str | None = None,
        error: str | None = None,
        only_from: tuple[str, ...] = ("running", "scoring"),
    ) -> bool:
        """Move an evaluation to `state` unless it already left `only_from`."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE evaluations SET state = ?, finished_at = COALESCE(?, finished_at),"
                " error = COALESCE(?, error) WHERE evaluation_id = ? AND state IN"
                f" ({', '.join('?' for _ in only_from)})",
                (state, finished_at, error, evaluation_id, *only_from),
            )
        return cursor.rowcount == 1

    def add_scores(
        self, evaluation_id: str, scores: dict[str, float], artifacts: list[str]
    ) -> None:
        with self._lock, self._db:
            row = self._db.execute(
                "SELECT scores, artifacts FROM evaluations WHERE evaluation_id = ?",
                (evaluation_id,),
            ).fetchone()
            merged = {**json.loads(row[0]), **scores}
            names = list(dict.fromkeys([*json.loads(row[1]), *artifacts]))
            self._db.execute(
                "UPDATE evaluations SET scores = ?, artifacts = ? WHERE evaluation_id = ?",
                (json.dumps(merged), json.dumps(names), evaluation_id),
            )

    # --- shards -----------------------------------------------------------------

    def shards(self, evaluation_id: str) -> list[ShardRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT evaluation_id, shard_index, first_set, sets, first_experiment,"
                " experiments, state, attempts, job_id, site, agent_id, duration_s, error"
                " FROM evaluation_shards WHERE evaluation_id = ? ORDER BY shard_index",
                (evaluation_id,),
            ).fetchall()
        return [ShardRow(*row) for row in rows]

    def shard_counts(self, evaluation_id: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM evaluation_shards WHERE evaluation_id = ?"
                " GROUP BY state",
                (evaluation_id,),
            ).fetchall()
        return {state: count for state, count in rows}

    def cancel_open_shards(self, evaluation_id: str) -> int:
        """Mark every shard that is neither done nor failed as cancelled; return how
        many changed."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE evaluation_shards SET state = 'cancelled' WHERE evaluation_id = ?"
                " AND state NOT IN ('done', 'failed')",
                (evaluation_id,),
            )
        return cursor.rowcount

    def update_shard(self, evaluation_id: str, index: int, **fields: object) -> None:
        names = ", ".join(f"{name} = ?" for name in fields)
        with self._lock, self._db:
            self._db.execute(
                f"UPDATE evaluation_shards SET {names} WHERE evaluation_id = ?"
                " AND shard_index = ?",
                (*fields.values(), evaluation_id, index),
            )

    # --- attempts ---------------------------------------------------------------

    def add_attempt(
        self,
        job_id: str,
        evaluation_id: str,
        shard_index: int | None,
        attempt: int,
        body: bytes,
        published_at: float,
    ) -> None:
        """Insert an attempt in state publishing; a shard's row counts it and names it."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO evaluation_attempts (job_id, evaluation_id, shard_index,"
                " attempt, state, body, published_at) VALUES (?, ?, ?, ?, 'publishing',"
                " ?, ?)",
                (job_id, evaluation_id, shard_index, attempt, body, published_at),
            )
            if shard_index is not None:
                self._db.execute(
                    "UPDATE evaluation_shards SET attempts = ?, job_id = ?, state ="
                    " 'running' WHERE evaluation_id = ? AND shard_index = ?",
                    (attempt, job_id, evaluation_id, shard_index),
                )

    def attempt(self, job_id: str) -> AttemptRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, evaluation_id, shard_index, attempt, state, body,"
                " published_at, agent_id, site, duration_s, error FROM"
                " evaluation_attempts WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        return AttemptRow(*row) if row else None

    def attempts(
        self, evaluation_id: str, states: tuple[str, ...] | None = None
    ) -> list[AttemptRow]:
        query = (
            "SELECT job_id, evaluation_id, shard_index, attempt, state, body,"
            " published_at, agent_id, site, duration_s, error FROM evaluation_attempts"
            " WHERE evaluation_id = ?"
        )
        parameters: tuple[object, ...] = (evaluation_id,)
        if states is not None:
            query += f" AND state IN ({', '.join('?' for _ in states)})"
            parameters += states
        with self._lock:
            rows = self._db.execute(query + " ORDER BY published_at", parameters).fetchall()
        return [AttemptRow(*row) for row in rows]

    def finish_attempt(
        self,
        job_id: str,
        state: str,
        *,
        agent_id: str | None = None,
        site: str | None = None,
        duration_s: float | None = None,
        error: str | None = None,
    ) -> bool:
        """Give a live attempt its final state; return False when it already had one."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE evaluation_attempts SET state = ?, agent_id = ?, site = ?,"
                " duration_s = ?, error = ? WHERE job_id = ? AND state IN (?, ?)",
                (state, agent_id, site, duration_s, error, job_id, *LIVE_ATTEMPT_STATES),
            )
        return cursor.rowcount == 1

    def mark_published(self, job_id: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE evaluation_attempts SET state = 'published' WHERE job_id = ?"
                " AND state = 'publishing'",
                (job_id,),
            )


def _evaluation(row: tuple[object, ...]) -> EvaluationRow:
    return EvaluationRow(
        evaluation_id=str(row[0]),
        request=str(row[1]),
        body=bytes(row[2]),  # type: ignore[arg-type]
        state=str(row[3]),
        submitted_at=str(row[4]),
        finished_at=None if row[5] is None else str(row[5]),
        scores=json.loads(str(row[6])),
        artifacts=json.loads(str(row[7])),
        error=None if row[8] is None else str(row[8]),
    )
