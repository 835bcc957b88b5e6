"""Sharded evaluations: split one submission's evaluation into signed shard jobs,
check and pool their predictions, retry failed shards and re-dispatch stragglers.

The coordinator process owns one `Evaluations`. Its HTTP API calls `submit`,
`status`, `list`, `artifact_path` and `cancel`, and the coordinator hands it every
result it records through `on_result`. State lives in SQLite (`EvaluationStore`)
and in a data folder, one subfolder per evaluation:

    <data_dir>/<evaluation_id>/shards/<index>.json   accepted shard predictions
    <data_dir>/<evaluation_id>/predictions.json      the pooled predictions
    <data_dir>/<evaluation_id>/predictions.tar       the same file, for a scoring job
    <data_dir>/<evaluation_id>/scores.json, coverage.png, report.html

Each state change of an evaluation runs under that evaluation's lock, so a result,
a straggler timer and a cancel never interleave.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import random
import re
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel

from fairu.agent.artifacts import artifact_bytes
from fairu.agent.session import AmqpSession, PublishFailed, SessionError
from fairu.files import write_atomic
from fairu.protocol.errors import ConfigError, ErrorCode, JobError, RejectedError
from fairu.protocol.evaluation import (
    MAX_SHARDS,
    PREDICTIONS_ARTIFACT,
    SHARD_PLACEHOLDERS,
    EvaluationRequest,
    EvaluationState,
    EvaluationStatus,
    EvaluationSummary,
    ShardState,
    ShardStatus,
)
from fairu.protocol.models import (
    CancelRequest,
    Envelope,
    FinalStatus,
    InputSpec,
    JobResult,
    JobSpec,
    utc_now,
)
from fairu.protocol.signing import (
    decode_envelope,
    load_public_key_text,
    parse_payload,
)
from fairu.protocol.topology import (
    JOBS_EXCHANGE,
    TRUST_EXCHANGE,
    job_queue_name,
    job_routing_key,
)
from fairu.protocol.trust import TrustView, sign_job, verify_job_envelope, verify_revocation_list

from .evaluation_store import (
    LIVE_ATTEMPT_STATES,
    AttemptRow,
    EvaluationRow,
    EvaluationStore,
    ShardRow,
)
from .keys import KeyFolder, SigningKey
from .store import Store

logger = logging.getLogger(__name__)

# Job ids are at most 128 characters; the longest suffix is ".s99999.a10".
MAX_EVALUATION_ID_CHARS = 128 - len(".s99999.a10")
# The signed request carries mu_true for every set, so it may exceed a job's limit.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
PUBLISH_RETRY_MAX_S = 30.0
SCORES_FILE = "scores.json"
POOLED_TAR = "predictions.tar"
PROGRAM_SCORE_PREFIX = "program."
# Placeholders naming the shard's rectangle; a command without all of them would run
# the same experiments in every shard.
RECTANGLE_PLACEHOLDERS = SHARD_PLACEHOLDERS[:4]
# A word in braces that looks like a placeholder. Shell parameters such as ${name}
# are not matched, so `sh -c` commands keep their own braces.
_UNKNOWN_PLACEHOLDER = re.compile(r"(?<!\$)\{[A-Za-z][A-Za-z0-9_-]*\}")


# --- the split rule -------------------------------------------------------------


@dataclass(frozen=True)
class Rectangle:
    """Sets first_set .. first_set + sets - 1, experiments first_experiment ..
    first_experiment + experiments - 1 of each."""

    first_set: int
    sets: int
    first_experiment: int
    experiments: int

    @property
    def size(self) -> int:
        return self.sets * self.experiments

    def describe(self) -> str:
        return (
            f"sets {self.first_set}..{self.first_set + self.sets - 1}, experiments "
            f"{self.first_experiment}..{self.first_experiment + self.experiments - 1}"
        )


def split_shards(
    num_sets: int, experiments_per_set: int, shard_size: int
) -> list[Rectangle]:
    """Split the num_sets x experiments_per_set grid into disjoint rectangles.

    When shard_size is at least experiments_per_set, a shard covers
    shard_size // experiments_per_set whole sets, and the last shard takes the
    sets left over. Otherwise each set is cut into runs of shard_size experiments,
    the last run of a set taking the rest, and no shard spans two sets. Every
    shard then has at most shard_size experiments, the shards cover the grid
    exactly once, and they come in (set, experiment) order.
    """
    if shard_size >= experiments_per_set:
        step = shard_size // experiments_per_set
        return [
            Rectangle(first, min(step, num_sets - first), 0, experiments_per_set)
            for first in range(0, num_sets, step)
        ]
    return [
        Rectangle(set_index, 1, first, min(shard_size, experiments_per_set - first))
        for set_index in range(num_sets)
        for first in range(0, experiments_per_set, shard_size)
    ]


def count_shards(num_sets: int, experiments_per_set: int, shard_size: int) -> int:
    if shard_size >= experiments_per_set:
        return math.ceil(num_sets / (shard_size // experiments_per_set))
    return num_sets * math.ceil(experiments_per_set / shard_size)


def shard_job_id(evaluation_id: str, index: int, attempt: int) -> str:
    return f"{evaluation_id}.s{index}.a{attempt}"


def scoring_job_id(evaluation_id: str, attempt: int) -> str:
    return f"{evaluation_id}.score.a{attempt}"


def fill_placeholders(
    words: Sequence[str], shard: Rectangle, base_seed: int, attempt: int = 1
) -> list[str]:
    values = {
        "{first_set}": shard.first_set,
        "{sets}": shard.sets,
        "{first_experiment}": shard.first_experiment,
        "{experiments}": shard.experiments,
        "{base_seed}": base_seed,
        "{attempt}": attempt,
    }
    filled = []
    for word in words:
        for placeholder, value in values.items():
            word = word.replace(placeholder, str(value))
        filled.append(word)
    return filled


# --- keys -----------------------------------------------------------------------


class CoordinatorKeys:
    """The coordinator's key folder: a certified job-signing key that signs shard
    jobs and cancel requests, and the root key and revocations that check requests.

    The folder has the layout `fairu-admin keys` writes, without root.key:
    root.pub, state.json, signing/<hex>.key, signing/<hex>.cert.json and, once a
    key was revoked, revocations.json. Files are read again on each use, so a key
    rotated or revoked into the folder takes effect without a restart.
    """

    def __init__(
        self, folder: Path, passphrase: bytes | None = None, clock_skew_s: float = 60.0
    ) -> None:
        self.folder = KeyFolder(folder, passphrase)
        self.clock_skew = timedelta(seconds=clock_skew_s)

    def signing_key(self) -> SigningKey:
        """Return the current signing key; raise `ConfigError` if it expired."""
        signing = self.folder.current_signing_key()
        if signing.body.not_after < utc_now():
            raise ConfigError(
                f"the coordinator's signing key {signing.body.key_id} expired at "
                f"{signing.body.not_after.isoformat()}; issue a new one into "
                f"{self.folder.root} with `fairu-admin keys --keys-dir ... rotate`"
            )
        return signing

    def trust(self) -> TrustView:
        root = self._root_key()
        revoked: frozenset[str] = frozenset()
        path = self.folder.root / "revocations.json"
        if path.exists():
            try:
                envelope = Envelope.model_validate_json(path.read_bytes())
                revoked = frozenset(verify_revocation_list(envelope, root).revoked)
            except (OSError, ValueError, RejectedError) as exc:
                raise ConfigError(f"cannot use the revocation list {path}: {exc}") from None
        return TrustView(root_key=root, revoked=revoked, clock_skew=self.clock_skew)

    def sign(self, model: BaseModel) -> bytes:
        signing = self.signing_key()
        envelope = sign_job(model.model_dump_json().encode(), signing.key, signing.certificate)
        return envelope.model_dump_json(exclude_none=True).encode()

    def check(self) -> None:
        """Raise `ConfigError` unless the folder can sign and check; blocking."""
        self.signing_key()
        self.trust()

    def _root_key(self) -> Ed25519PublicKey:
        path = self.folder.root / "root.pub"
        try:
            return load_public_key_text(path.read_text())
        except OSError as exc:
            raise ConfigError(
                f"cannot read the root public key {path}: {exc.strerror}; copy root.pub "
                "from the admin key folder"
            ) from None


# --- the broker side ------------------------------------------------------------


class _Broker:
    """One AMQP session for shard jobs and cancel requests, opened again after a failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: AmqpSession | None = None
        self._lock = asyncio.Lock()

    async def session(self) -> AmqpSession:
        async with self._lock:
            if self._session is None or not self._session.is_open:
                session = AmqpSession(self.url, name="fairu-coordinator evaluations")
                await session.open()
                self._session = session
            return self._session

    async def publish(self, exchange: str, routing_key: str, body: bytes) -> None:
        """Publish with a confirm; raise `PublishFailed` or `SessionError`."""
        session = await self.session()
        try:
            await session.publish(exchange, routing_key, body, mandatory=True)
        except PublishFailed:
            raise
        except SessionError:
            await self.close()
            raise

    async def queue_exists(self, name: str) -> bool:
        session = await self.session()
        return await session.queue_exists(name)

    async def close(self) -> None:
        async with self._lock:
            if self._session is not None:
                session, self._session = self._session, None
                await session.close()


# --- the service ----------------------------------------------------------------


class Evaluations:
    def __init__(
        self,
        broker_url: str,
        results: Store,
        data_dir: Path,
        keys: CoordinatorKeys,
        *,
        public_base_url: str | None = None,
    ) -> None:
        """`results` is the coordinator's store, whose audit table keeps late shard
        results; the evaluation tables go into the same database file.
        `public_base_url` is the coordinator's HTTP API as agents reach it, which a
        scoring job fetches the pooled predictions from."""
        self.results = results
        self.store = EvaluationStore(results.path)
        self.data_dir = data_dir
        self.keys = keys
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self._broker = _Broker(broker_url)
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Take up unfinished evaluations from the store, as after a restart."""
        await asyncio.to_thread(self.data_dir.mkdir, parents=True, exist_ok=True)
        rows = await asyncio.to_thread(
            self.store.evaluations, (EvaluationState.RUNNING, EvaluationState.SCORING)
        )
        for row in rows:
            logger.info("evaluation %s resumed in state %s", row.evaluation_id, row.state)
            self._spawn(self._resume(row.evaluation_id))

    async def close(self) -> None:
        for task in [*self._timers.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._timers.values(), *self._tasks, return_exceptions=True)
        self._timers.clear()
        await self._broker.close()
        await asyncio.to_thread(self.store.close)

    async def _resume(self, evaluation_id: str) -> None:
        async with self._lock(evaluation_id):
            row, request = await self._load(evaluation_id)
            if row.state == EvaluationState.SCORING:
                await self._resume_scoring(row, request)
                return
            for attempt in await asyncio.to_thread(
                self.store.attempts, evaluation_id, ("publishing",)
            ):
                self._spawn(self._publish_attempt(attempt.job_id, request, attempt.body))
            for shard in await asyncio.to_thread(self.store.shards, evaluation_id):
                if shard.state in (ShardState.QUEUED, ShardState.RETRYING):
                    await self._dispatch(request, shard)
                elif shard.state == ShardState.RUNNING:
                    await self._arm_straggler_timer(request, shard)
            counts = await asyncio.to_thread(self.store.shard_counts, evaluation_id)
            if counts and set(counts) == {ShardState.DONE.value}:
                await self._finish_shards(request)

    # --- the API ------------------------------------------------------------------

    async def submit(self, body: bytes) -> EvaluationStatus:
        """Verify a signed `EvaluationRequest`, store it and publish its shard jobs.

        Raise `RejectedError` for a request that fails a check; its message names
        the value and the fix. Submitting the same body again returns its status.
        """
        request = await asyncio.to_thread(self._verify_request, body)
        shards = split_shards(
            request.num_sets, request.experiments_per_set, request.shard_size
        )
        queue = job_queue_name(request.competition, request.queue)
        try:
            exists = await self._broker.queue_exists(queue)
        except SessionError as exc:
            raise RejectedError(
                ErrorCode.INTERNAL_ERROR,
                f"the broker cannot be reached to check queue {queue}: {exc}; try again",
            ) from None
        if not exists:
            raise RejectedError(
                ErrorCode.BAD_PAYLOAD,
                f"no queue {queue} exists; create it with `fairu-admin queues create "
                f"{request.queue} --competition {request.competition}`",
            )
        inserted = await asyncio.to_thread(
            self.store.insert_evaluation,
            request.evaluation_id,
            request.model_dump_json(),
            body,
            utc_now().isoformat(),
            [(s.first_set, s.sets, s.first_experiment, s.experiments) for s in shards],
        )
        if not inserted:
            existing = await asyncio.to_thread(self.store.evaluation, request.evaluation_id)
            if existing is not None and existing.body == body:
                logger.info("evaluation %s submitted again; unchanged", request.evaluation_id)
                status = await self.status(request.evaluation_id)
                assert status is not None
                return status
            raise RejectedError(
                ErrorCode.REPLAYED,
                f"evaluation {request.evaluation_id} already exists with other content; "
                "give the new request another evaluation_id",
            )
        logger.info(
            "evaluation %s of submission %s accepted: %d x %d experiments in %d shards "
            "on %s",
            request.evaluation_id, request.submission_id, request.num_sets,
            request.experiments_per_set, len(shards), queue,
        )
        async with self._lock(request.evaluation_id):
            for shard in await asyncio.to_thread(self.store.shards, request.evaluation_id):
                await self._dispatch(request, shard)
        status = await self.status(request.evaluation_id)
        assert status is not None
        return status

    async def status(self, evaluation_id: str) -> EvaluationStatus | None:
        row = await asyncio.to_thread(self.store.evaluation, evaluation_id)
        if row is None:
            return None
        shards = await asyncio.to_thread(self.store.shards, evaluation_id)
        summary = self._summary(row, shards)
        return EvaluationStatus(
            **summary.model_dump(),
            shards=[_shard_status(shard) for shard in shards],
            artifacts=row.artifacts,
        )

    async def list(self) -> list[EvaluationSummary]:
        rows = await asyncio.to_thread(self.store.evaluations)
        summaries = []
        for row in rows:
            shards = await asyncio.to_thread(self.store.shards, row.evaluation_id)
            summaries.append(self._summary(row, shards))
        return summaries

    def artifact_path(self, evaluation_id: str, name: str) -> Path | None:
        """Return the file of a result artifact that the evaluation lists, or None.

        Blocking, but it only stats one file. Only names in the evaluation's
        artifact list are served, so no name can reach outside its folder.
        """
        row = self.store.evaluation(evaluation_id)
        if row is None or name not in row.artifacts:
            return None
        path = self.data_dir / evaluation_id / name
        return path if path.is_file() else None

    async def cancel(self, evaluation_id: str) -> EvaluationStatus | None:
        """End a running evaluation and cancel its shard jobs that still run."""
        async with self._lock(evaluation_id):
            changed = await asyncio.to_thread(
                self.store.set_evaluation_state,
                evaluation_id,
                EvaluationState.CANCELLED,
                finished_at=utc_now().isoformat(),
                error="cancelled by an organizer",
            )
            if changed:
                cancelled = await asyncio.to_thread(self.store.cancel_open_shards, evaluation_id)
                logger.info(
                    "evaluation %s cancelled with %d shards not done", evaluation_id, cancelled
                )
                await self._end_live_attempts(evaluation_id, "the evaluation was cancelled")
        return await self.status(evaluation_id)

    # --- results ------------------------------------------------------------------

    async def on_result(self, result: JobResult, body: bytes) -> bool:
        """Apply a recorded result to its shard; return False for a job of no
        evaluation. The coordinator calls it for first results and duplicates alike,
        and a result for an attempt that already ended changes nothing."""
        attempt = await asyncio.to_thread(self.store.attempt, result.job_id)
        if attempt is None:
            return False
        async with self._lock(attempt.evaluation_id):
            row, request = await self._load(attempt.evaluation_id)
            if attempt.shard_index is None:
                await self._on_scoring_result(row, request, attempt, result)
            else:
                await self._on_shard_result(row, request, attempt, result, body)
        return True

    async def _on_shard_result(
        self,
        row: EvaluationRow,
        request: EvaluationRequest,
        attempt: AttemptRow,
        result: JobResult,
        body: bytes,
    ) -> None:
        assert attempt.shard_index is not None
        job_id = result.job_id
        shards = await asyncio.to_thread(self.store.shards, row.evaluation_id)
        shard = shards[attempt.shard_index]
        rectangle = _rectangle(shard)
        late_reason = None
        if shard.state == ShardState.DONE:
            late_reason = f"shard {shard.index} was already done by job {shard.job_id}"
        elif row.state != EvaluationState.RUNNING:
            late_reason = f"evaluation {row.evaluation_id} is already {row.state}"
        if late_reason is not None:
            if await self._finish_attempt(attempt, result, "late", late_reason):
                await asyncio.to_thread(
                    self.results.audit_result, job_id, result.agent_id,
                    result.status.value, late_reason, body,
                )
                logger.info("late result of job %s ignored: %s", job_id, late_reason)
            return

        error = None
        data = b""
        if result.status is FinalStatus.SUCCEEDED:
            try:
                data = await asyncio.to_thread(_checked_predictions, result, shard)
            except JobError as exc:
                error = f"{exc.code}: {exc.message}"
        elif result.error is not None:
            error = f"{result.status.value}, {result.error.code}: {result.error.message}"
        else:
            error = result.status.value
        if error is not None:
            if await self._finish_attempt(attempt, result, "failed", error):
                logger.warning(
                    "shard %d of evaluation %s failed in attempt %d (job %s on agent "
                    "%s): %s",
                    shard.index, row.evaluation_id, attempt.attempt, job_id,
                    result.agent_id, error,
                )
                await self._after_failed_attempt(request, shard, error)
            return

        if not await self._finish_attempt(attempt, result, "accepted", None):
            return
        path = self._folder(row.evaluation_id) / "shards" / f"{shard.index}.json"
        await asyncio.to_thread(_write_file, path, data)
        await asyncio.to_thread(
            self.store.update_shard, row.evaluation_id, shard.index,
            state=ShardState.DONE.value, job_id=job_id, site=result.site,
            agent_id=result.agent_id, duration_s=result.durations.total_s, error=None,
        )
        self._stop_timer(row.evaluation_id, shard.index)
        logger.info(
            "shard %d of evaluation %s done by job %s on agent %s (%s) in %.1f s",
            shard.index, row.evaluation_id, job_id, result.agent_id, rectangle.describe(),
            result.durations.total_s,
        )
        await self._cancel_other_attempts(
            row.evaluation_id, shard.index, job_id,
            f"shard {shard.index} was done first by job {job_id}",
        )
        counts = await asyncio.to_thread(self.store.shard_counts, row.evaluation_id)
        if set(counts) == {ShardState.DONE.value}:
            await self._finish_shards(request)

    async def _after_failed_attempt(
        self, request: EvaluationRequest, shard: ShardRow, error: str
    ) -> None:
        """Retry a shard whose attempt failed, or fail the evaluation at max_attempts."""
        evaluation_id = request.evaluation_id
        live = [
            attempt
            for attempt in await asyncio.to_thread(
                self.store.attempts, evaluation_id, LIVE_ATTEMPT_STATES
            )
            if attempt.shard_index == shard.index
        ]
        if live:
            # Another attempt of this shard still runs (a straggler's second attempt).
            return
        if shard.attempts < request.max_attempts:
            await asyncio.to_thread(
                self.store.update_shard, evaluation_id, shard.index,
                state=ShardState.RETRYING.value, error=error,
            )
            logger.info(
                "retrying shard %d of evaluation %s: attempt %d of %d",
                shard.index, evaluation_id, shard.attempts + 1, request.max_attempts,
            )
            shards = await asyncio.to_thread(self.store.shards, evaluation_id)
            await self._dispatch(request, shards[shard.index])
            return
        await asyncio.to_thread(
            self.store.update_shard, evaluation_id, shard.index,
            state=ShardState.FAILED.value, error=error,
        )
        message = (
            f"shard {shard.index} ({_rectangle(shard).describe()}) failed in all "
            f"{request.max_attempts} attempts; the last error was {error}"
        )
        await self._fail(evaluation_id, message)

    async def _finish_attempt(
        self, attempt: AttemptRow, result: JobResult, state: str, error: str | None
    ) -> bool:
        return await asyncio.to_thread(
            self.store.finish_attempt, attempt.job_id, state,
            agent_id=result.agent_id, site=result.site,
            duration_s=result.durations.total_s, error=error,
        )

    # --- dispatch -----------------------------------------------------------------

    async def _dispatch(self, request: EvaluationRequest, shard: ShardRow) -> None:
        """Sign and publish the next attempt of a shard, and arm its straggler timer."""
        attempt = shard.attempts + 1
        job_id = shard_job_id(request.evaluation_id, shard.index, attempt)
        job = JobSpec(
            job_id=job_id,
            competition=request.competition,
            queue=request.queue,
            submission_id=request.submission_id,
            image=request.image,
            command=fill_placeholders(
                request.command, _rectangle(shard), request.base_seed, attempt
            ),
            env=dict(request.env),
            inputs=list(request.inputs),
            resources=request.resources,
            artifacts=[PREDICTIONS_ARTIFACT],
            created_at=utc_now(),
            expires_at=request.expires_at,
        )
        if not await self._publish_new(request, job, shard.index, attempt):
            return
        shards = await asyncio.to_thread(self.store.shards, request.evaluation_id)
        await self._arm_straggler_timer(request, shards[shard.index])

    async def _publish_new(
        self, request: EvaluationRequest, job: JobSpec, shard_index: int | None, attempt: int
    ) -> bool:
        """Record and publish a new attempt; fail the evaluation when it cannot be signed
        or has expired."""
        if request.expires_at <= utc_now():
            await self._fail(
                request.evaluation_id,
                f"the evaluation expired at {request.expires_at.isoformat()} before "
                f"job {job.job_id} could be published; submit it again with a later "
                "expires_at",
            )
            return False
        try:
            body = await asyncio.to_thread(self.keys.sign, job)
        except ConfigError as exc:
            await self._fail(request.evaluation_id, f"job {job.job_id} cannot be signed: {exc}")
            return False
        await asyncio.to_thread(
            self.store.add_attempt, job.job_id, request.evaluation_id, shard_index,
            attempt, body, time.time(),
        )
        self._spawn(self._publish_attempt(job.job_id, request, body))
        return True

    async def _publish_attempt(
        self, job_id: str, request: EvaluationRequest, body: bytes
    ) -> None:
        """Publish until the broker confirms, waiting out broker outages."""
        routing_key = job_routing_key(request.competition, request.queue)
        failures = 0
        while True:
            try:
                await self._broker.publish(JOBS_EXCHANGE, routing_key, body)
                break
            except PublishFailed as exc:
                if exc.permanent:
                    await self._on_unroutable(request, job_id, str(exc))
                    return
                cause: SessionError = exc
            except SessionError as exc:
                cause = exc
            failures += 1
            delay = min(PUBLISH_RETRY_MAX_S, 2.0 ** (failures - 1)) * random.uniform(0.5, 1.0)
            logger.warning(
                "job %s of evaluation %s not published (%s); retry %d in %.1f s",
                job_id, request.evaluation_id, cause, failures, delay,
            )
            await asyncio.sleep(delay)
        await asyncio.to_thread(self.store.mark_published, job_id)
        logger.info("published job %s of evaluation %s", job_id, request.evaluation_id)

    async def _on_unroutable(
        self, request: EvaluationRequest, job_id: str, reason: str
    ) -> None:
        async with self._lock(request.evaluation_id):
            await asyncio.to_thread(
                self.store.finish_attempt, job_id, "failed", error=reason
            )
            queue = job_queue_name(request.competition, request.queue)
            await self._fail(
                request.evaluation_id,
                f"job {job_id} cannot be published: {reason}; create queue {queue} with "
                f"`fairu-admin queues create {request.queue} --competition "
                f"{request.competition}` and submit the evaluation again",
            )

    # --- stragglers ---------------------------------------------------------------

    async def _arm_straggler_timer(self, request: EvaluationRequest, shard: ShardRow) -> None:
        if request.straggler_after_s is None or shard.job_id is None:
            return
        if shard.attempts >= request.max_attempts:
            return
        attempt = await asyncio.to_thread(self.store.attempt, shard.job_id)
        if attempt is None or attempt.state not in LIVE_ATTEMPT_STATES:
            return
        # Wall clock, because the deadline is stored and must hold across a restart.
        delay = max(0.0, attempt.published_at + request.straggler_after_s - time.time())
        key = (request.evaluation_id, shard.index)
        self._stop_timer(*key)
        task = asyncio.create_task(self._on_straggler(request, shard.index, shard.job_id, delay))
        self._timers[key] = task
        task.add_done_callback(lambda done: self._forget_timer(key, done))

    async def _on_straggler(
        self, request: EvaluationRequest, index: int, job_id: str, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        async with self._lock(request.evaluation_id):
            row = await asyncio.to_thread(self.store.evaluation, request.evaluation_id)
            shards = await asyncio.to_thread(self.store.shards, request.evaluation_id)
            shard = shards[index]
            if row is None or row.state != EvaluationState.RUNNING:
                return
            if shard.state != ShardState.RUNNING or shard.job_id != job_id:
                return
            logger.warning(
                "shard %d of evaluation %s: job %s still runs after %.0f s; publishing "
                "attempt %d of %d for another agent",
                index, request.evaluation_id, job_id, request.straggler_after_s,
                shard.attempts + 1, request.max_attempts,
            )
            await self._dispatch(request, shard)

    def _stop_timer(self, evaluation_id: str, index: int) -> None:
        task = self._timers.pop((evaluation_id, index), None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _forget_timer(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        if self._timers.get(key) is task:
            del self._timers[key]

    # --- cancelling ---------------------------------------------------------------

    async def _cancel_other_attempts(
        self, evaluation_id: str, index: int, winner: str, reason: str
    ) -> None:
        attempts = await asyncio.to_thread(
            self.store.attempts, evaluation_id, LIVE_ATTEMPT_STATES
        )
        for attempt in attempts:
            if attempt.shard_index == index and attempt.job_id != winner:
                await self._send_cancel(attempt.job_id, reason)

    async def _end_live_attempts(self, evaluation_id: str, reason: str) -> None:
        for key in [key for key in self._timers if key[0] == evaluation_id]:
            self._stop_timer(*key)
        attempts = await asyncio.to_thread(
            self.store.attempts, evaluation_id, LIVE_ATTEMPT_STATES
        )
        for attempt in attempts:
            await self._send_cancel(attempt.job_id, reason)

    async def _send_cancel(self, job_id: str, reason: str) -> None:
        """Publish a signed cancel request; a failure only leaves the job running, and
        its result is then ignored as late."""
        request = CancelRequest(job_id=job_id, reason=reason[:1024], at=utc_now())
        try:
            body = await asyncio.to_thread(self.keys.sign, request)
            await self._broker.publish(TRUST_EXCHANGE, "", body)
        except (ConfigError, SessionError) as exc:
            logger.warning("cancel request for job %s not published: %s", job_id, exc)
            return
        logger.info("published a cancel request for job %s: %s", job_id, reason)

    # --- pooling and scoring ------------------------------------------------------

    async def _finish_shards(self, request: EvaluationRequest) -> None:
        """Pool every shard, score with the built-in metric and write the artifacts."""
        evaluation_id = request.evaluation_id
        moved = await asyncio.to_thread(
            self.store.set_evaluation_state, evaluation_id, EvaluationState.SCORING,
            only_from=(EvaluationState.RUNNING,),
        )
        if not moved:
            return
        await self._score_builtin(request)

    async def _score_builtin(self, request: EvaluationRequest) -> None:
        evaluation_id = request.evaluation_id
        shards = await asyncio.to_thread(self.store.shards, evaluation_id)
        try:
            scores, names = await asyncio.to_thread(
                _pool_and_score, self._folder(evaluation_id), request, shards
            )
        except (JobError, OSError) as exc:
            await self._fail(evaluation_id, f"pooling the shard predictions failed: {exc}")
            return
        await asyncio.to_thread(self.store.add_scores, evaluation_id, scores, names)
        logger.info(
            "evaluation %s pooled %d shards: %s", evaluation_id, len(shards),
            ", ".join(f"{name}={scores[name]:.6g}" for name in sorted(scores)[:4]),
        )
        if request.scoring == "program":
            await self._dispatch_scoring(request, 1)
            return
        await self._finish(evaluation_id)

    async def _resume_scoring(self, row: EvaluationRow, request: EvaluationRequest) -> None:
        if POOLED_TAR not in row.artifacts:
            await self._score_builtin(request)
            return
        if request.scoring != "program":
            await self._finish(request.evaluation_id)
            return
        attempts = await asyncio.to_thread(self.store.attempts, request.evaluation_id)
        scoring = [attempt for attempt in attempts if attempt.shard_index is None]
        if not scoring:
            await self._dispatch_scoring(request, 1)
        for attempt in scoring:
            if attempt.state == "publishing":
                self._spawn(self._publish_attempt(attempt.job_id, request, attempt.body))

    async def _dispatch_scoring(self, request: EvaluationRequest, attempt: int) -> None:
        program = request.scoring_program
        assert program is not None and self.public_base_url is not None
        evaluation_id = request.evaluation_id
        tar_path = self._folder(evaluation_id) / POOLED_TAR
        digest, size = await asyncio.to_thread(_digest, tar_path)
        pooled = InputSpec(
            name="pooled-predictions",
            url=f"{self.public_base_url}/api/v1/evaluations/{evaluation_id}/artifacts/"
            f"{POOLED_TAR}",
            sha256=digest,
            size=size,
            mount=program.predictions_mount,
            unpack="tar",
        )
        job = JobSpec(
            job_id=scoring_job_id(evaluation_id, attempt),
            competition=request.competition,
            queue=request.queue,
            submission_id=request.submission_id,
            image=program.image,
            command=list(program.command),
            env=dict(program.env),
            inputs=[*program.inputs, pooled],
            resources=program.resources,
            created_at=utc_now(),
            expires_at=request.expires_at,
        )
        await self._publish_new(request, job, None, attempt)

    async def _on_scoring_result(
        self,
        row: EvaluationRow,
        request: EvaluationRequest,
        attempt: AttemptRow,
        result: JobResult,
    ) -> None:
        if row.state != EvaluationState.SCORING:
            await self._finish_attempt(attempt, result, "late", f"evaluation is {row.state}")
            return
        if result.status is not FinalStatus.SUCCEEDED or not result.scores:
            error = (
                f"{result.error.code}: {result.error.message}"
                if result.error
                else f"{result.status.value} without scores"
            )
            if not await self._finish_attempt(attempt, result, "failed", error):
                return
            logger.warning(
                "scoring job %s of evaluation %s failed: %s",
                result.job_id, row.evaluation_id, error,
            )
            if attempt.attempt < request.max_attempts:
                await self._dispatch_scoring(request, attempt.attempt + 1)
            else:
                await self._fail(
                    row.evaluation_id,
                    f"the scoring program failed in all {request.max_attempts} attempts; "
                    f"the last error was {error}",
                )
            return
        if not await self._finish_attempt(attempt, result, "accepted", None):
            return
        scores = {
            f"{PROGRAM_SCORE_PREFIX}{name}"[:64]: value for name, value in result.scores.items()
        }
        await asyncio.to_thread(self.store.add_scores, row.evaluation_id, scores, [])
        logger.info(
            "scoring job %s of evaluation %s returned %d scores",
            result.job_id, row.evaluation_id, len(scores),
        )
        await self._finish(row.evaluation_id)

    async def _finish(self, evaluation_id: str) -> None:
        await asyncio.to_thread(
            self.store.set_evaluation_state, evaluation_id, EvaluationState.FINISHED,
            finished_at=utc_now().isoformat(),
        )
        logger.info("evaluation %s finished", evaluation_id)

    async def _fail(self, evaluation_id: str, message: str) -> None:
        changed = await asyncio.to_thread(
            self.store.set_evaluation_state, evaluation_id, EvaluationState.FAILED,
            finished_at=utc_now().isoformat(), error=message[:4096],
        )
        if changed:
            logger.error("evaluation %s failed: %s", evaluation_id, message)
            await asyncio.to_thread(self.store.cancel_open_shards, evaluation_id)
            await self._end_live_attempts(evaluation_id, f"the evaluation failed: {message}")

    # --- checks -------------------------------------------------------------------

    def _verify_request(self, body: bytes) -> EvaluationRequest:
        """Verify and parse a signed request; blocking, since it reads the key folder."""
        envelope = decode_envelope(body, MAX_REQUEST_BYTES)
        try:
            trust = self.keys.trust()
        except ConfigError as exc:
            raise RejectedError(
                ErrorCode.INTERNAL_ERROR, f"the coordinator cannot check signatures: {exc}"
            ) from None
        payload = verify_job_envelope(envelope, trust)
        request = parse_payload(payload, EvaluationRequest)
        _check_request(request, trust.clock_skew)
        if request.scoring == "program" and self.public_base_url is None:
            raise RejectedError(
                ErrorCode.BAD_PAYLOAD,
                'scoring = "program" needs the coordinator\'s public URL, which is not '
                "set; start fairu-coordinator with --public-url, or use scoring = "
                '"builtin"',
            )
        return request

    # --- helpers ------------------------------------------------------------------

    def _summary(self, row: EvaluationRow, shards: list[ShardRow]) -> EvaluationSummary:
        done = [shard for shard in shards if shard.state == ShardState.DONE]
        running = [s for s in shards if s.state in (ShardState.RUNNING, ShardState.RETRYING)]
        failed = [shard for shard in shards if shard.state == ShardState.FAILED]
        submitted = datetime.fromisoformat(row.submitted_at)
        eta = None
        if row.state == EvaluationState.RUNNING and done:
            # An estimate: the mean time per finished shard so far, times the rest.
            elapsed = (utc_now() - submitted).total_seconds()
            eta = max(0.0, elapsed / len(done) * (len(shards) - len(done)))
        return EvaluationSummary(
            evaluation_id=row.evaluation_id,
            competition=json.loads(row.request)["competition"],
            submission_id=json.loads(row.request)["submission_id"],
            state=EvaluationState(row.state),
            shards_total=len(shards),
            shards_done=len(done),
            shards_running=len(running),
            shards_failed=len(failed),
            submitted_at=submitted,
            finished_at=datetime.fromisoformat(row.finished_at) if row.finished_at else None,
            eta_s=eta,
            scores=row.scores,
            error=row.error,
        )

    async def _load(self, evaluation_id: str) -> tuple[EvaluationRow, EvaluationRequest]:
        row = await asyncio.to_thread(self.store.evaluation, evaluation_id)
        assert row is not None, evaluation_id
        return row, EvaluationRequest.model_validate_json(row.request)

    def _folder(self, evaluation_id: str) -> Path:
        return self.data_dir / evaluation_id

    def _lock(self, evaluation_id: str) -> asyncio.Lock:
        return self._locks.setdefault(evaluation_id, asyncio.Lock())

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("evaluation task failed", exc_info=task.exception())


def _check_request(request: EvaluationRequest, clock_skew: timedelta) -> None:
    """Check what the model alone cannot: expiry, sizes and consistency."""
    now = utc_now()
    if request.expires_at + clock_skew < now:
        raise RejectedError(
            ErrorCode.EXPIRED,
            f"evaluation {request.evaluation_id} expired at "
            f"{request.expires_at.isoformat()}; sign it again with a later expires_at",
        )
    if request.created_at - clock_skew > now:
        raise RejectedError(
            ErrorCode.EXPIRED,
            f"evaluation {request.evaluation_id} is created at "
            f"{request.created_at.isoformat()}, in the future; check the submitter's clock",
        )
    if len(request.evaluation_id) > MAX_EVALUATION_ID_CHARS:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            f"evaluation_id {request.evaluation_id[:40]!r}... has "
            f"{len(request.evaluation_id)} characters; use at most "
            f"{MAX_EVALUATION_ID_CHARS}, so that shard job ids fit in 128",
        )
    if len(request.mu_true) != request.num_sets:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            f"mu_true has {len(request.mu_true)} values but num_sets is "
            f"{request.num_sets}; give one true mu per set",
        )
    shards = count_shards(request.num_sets, request.experiments_per_set, request.shard_size)
    if shards > MAX_SHARDS:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            f"shard_size {request.shard_size} splits {request.num_sets} x "
            f"{request.experiments_per_set} experiments into {shards} shards; the limit "
            f"is {MAX_SHARDS}, so raise shard_size",
        )
    command = " ".join(request.command)
    missing = [word for word in RECTANGLE_PLACEHOLDERS if word not in command]
    if missing:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            f"the command lacks the placeholders {', '.join(missing)}, so every shard "
            "would run the same experiments; pass them to the ingestion program",
        )
    unknown = sorted(set(_UNKNOWN_PLACEHOLDER.findall(command)) - set(SHARD_PLACEHOLDERS))
    if unknown:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            f"the command contains {', '.join(unknown)}, which is not a placeholder, so "
            f"it would reach every shard unchanged; use one of {', '.join(SHARD_PLACEHOLDERS)}",
        )
    if (request.scoring == "program") != (request.scoring_program is not None):
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            'scoring_program is required with scoring = "program" and allowed only '
            "with it; set both or neither",
        )


def _rectangle(shard: ShardRow) -> Rectangle:
    return Rectangle(shard.first_set, shard.sets, shard.first_experiment, shard.experiments)


def _shard_status(shard: ShardRow) -> ShardStatus:
    return ShardStatus(
        index=shard.index,
        first_set=shard.first_set,
        sets=shard.sets,
        first_experiment=shard.first_experiment,
        experiments=shard.experiments,
        state=ShardState(shard.state),
        attempts=shard.attempts,
        job_id=shard.job_id,
        site=shard.site,
        agent_id=shard.agent_id,
        duration_s=shard.duration_s,
        error=shard.error[:4096] if shard.error else None,
    )


def _checked_predictions(result: JobResult, shard: ShardRow) -> bytes:
    """Return a shard result's predictions bytes once they cover exactly its rectangle."""
    from . import predictions

    found = [a for a in result.artifacts if a.name == PREDICTIONS_ARTIFACT]
    if not found:
        raise JobError(
            ErrorCode.MISSING_ARTIFACT,
            f"the result carries no {PREDICTIONS_ARTIFACT} artifact",
        )
    data = artifact_bytes(found[0])
    try:
        predictions.parse_shard(data, shard)
    except predictions.PredictionsError as exc:
        raise JobError(ErrorCode.BAD_PREDICTIONS, str(exc)) from None
    return data


def _pool_and_score(
    folder: Path, request: EvaluationRequest, shards: list[ShardRow]
) -> tuple[dict[str, float], list[str]]:
    """Pool the accepted shard predictions, score them and write the artifacts."""
    from . import predictions, report, scoring

    parts = [
        predictions.parse_shard((folder / "shards" / f"{s.index}.json").read_bytes(), s)
        for s in shards
    ]
    try:
        pooled = predictions.pool(parts).sorted()
        scores = scoring.pooled_scores(pooled, request.mu_true)
    except (predictions.PredictionsError, scoring.ScoringError) as exc:
        raise JobError(ErrorCode.BAD_PREDICTIONS, str(exc)) from None
    pooled_bytes = predictions.encode_predictions_json(pooled)
    _write_file(folder / PREDICTIONS_ARTIFACT, pooled_bytes)
    _write_file(folder / POOLED_TAR, _tar_one(PREDICTIONS_ARTIFACT, pooled_bytes))
    _write_file(folder / SCORES_FILE, json.dumps(scores, indent=2).encode())
    names = [PREDICTIONS_ARTIFACT, POOLED_TAR, SCORES_FILE]
    names += report.write_report(
        folder, pooled, request.mu_true, scores,
        title=f"Evaluation {request.evaluation_id}",
        details={
            "evaluation": request.evaluation_id,
            "submission": request.submission_id,
            "competition": request.competition,
            "shards": str(len(shards)),
        },
    )
    return scores, names


def _tar_one(name: str, data: bytes) -> bytes:
    """Return a tar archive of one file with fixed metadata, so it is reproducible."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o644)


def _digest(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)
