"""The job pipeline: one delivery in, exactly one signed final result out.

verify → parse → check freshness and audience → fetch inputs → run → read scores.
Every step that fails ends the job with a result carrying an `ErrorCode`; an
unexpected exception becomes `internal_error` instead of losing the job.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from fairu.protocol.errors import ErrorCode, JobError, RejectedError
from fairu.protocol.models import (
    MAX_ARTIFACT_BYTES,
    Artifact,
    MAX_LOG_TAIL_CHARS,
    Durations,
    ErrorInfo,
    FinalStatus,
    JobResult,
    JobSpec,
    JobState,
    StatusEvent,
    utc_now,
)
from fairu.protocol.signing import decode_envelope, parse_payload, sign_model
from fairu.protocol.trust import verify_job_envelope
from fairu.protocol.topology import split_job_queue_name
from fairu.runners.base import Mount, Runner, RunnerUnavailable, RunSpec, ContainerError

from .artifacts import read_artifacts
from .config import PolicySection
from .fetch import InputCache
from .policy import check_policy
from .scores import SCORES_FILE, read_scores
from .session import Delivery
from .state import Identity, StateDir
from .trust import TrustStore

logger = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class Publisher(Protocol):
    def publish_status(self, event: StatusEvent) -> None:
        """Publish now or after the site's status interval, without waiting for the
        confirm, which arrives later or is logged."""

    async def publish_result(self, job_id: str, body: bytes, recorded: bool = False) -> None:
        """Publish until the broker confirms, waiting out reconnects.

        `recorded` is true when the job record already contains the result durably,
        so it needs no spool file.
        """


@dataclass(frozen=True)
class Outcome:
    job_id: str
    status: FinalStatus
    # A rejected message goes to the dead-letter exchange instead of being acked.
    dead_letter: bool
    # Seconds from the start of the job to its result; None for a job that never ran.
    duration_s: float | None = None
    # True when the result is the recorded one of a job that already ended here.
    replayed: bool = False


@dataclass(frozen=True)
class PipelineSettings:
    site: str
    max_message_bytes: int
    clock_skew_s: float
    max_artifact_bytes: int = MAX_ARTIFACT_BYTES


class JobPipeline:
    def __init__(
        self,
        settings: PipelineSettings,
        identity: Identity,
        trust: TrustStore,
        policy: PolicySection,
        state: StateDir,
        cache: InputCache,
        runner: Runner,
        publisher: Publisher,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.trust = trust
        self.policy = policy
        self.state = state
        self.cache = cache
        self.runner = runner
        self.publisher = publisher

    # --- entry points -----------------------------------------------------------

    def authenticate(self, delivery: Delivery) -> JobSpec:
        """Verify the signature, then parse the payload; raise `RejectedError`."""
        envelope = decode_envelope(delivery.body, self.settings.max_message_bytes)
        payload = verify_job_envelope(envelope, self.trust.view())
        return parse_payload(payload, JobSpec)

    def admit(self, job: JobSpec, delivery: Delivery) -> None:
        """Check an authenticated job's freshness, audience and the site policy."""
        self._check_fresh(job)
        self._check_audience(job, delivery.queue)
        check_policy(job, self.policy)

    async def reject(
        self,
        delivery: Delivery,
        error: RejectedError,
        job: JobSpec | None,
        record: bool = True,
    ) -> Outcome:
        """Publish a rejection; `record` is false for a rejection that must not
        overwrite what this agent already recorded for the job id."""
        authenticated = job is not None
        if job is not None:
            job_id = job.job_id
        elif len(delivery.body) <= self.settings.max_message_bytes:
            job_id = claimed_job_id(delivery.body)
        else:
            job_id = "unknown"
        logger.warning(
            "job %s from queue %s rejected: %s", job_id, delivery.queue, error
        )
        result = self._result(
            job_id,
            job,
            FinalStatus.REJECTED,
            error=ErrorInfo(code=error.code, message=error.message),
            authenticated=authenticated,
        )
        await self._finish(result, message_digest(delivery.body) if record else None)
        return Outcome(job_id, FinalStatus.REJECTED, dead_letter=True)

    async def fail_internal(self, delivery: Delivery, error: Exception) -> Outcome:
        """End a delivery whose handling failed outside the steps with internal_error."""
        job_id = claimed_job_id(delivery.body)
        result = self._result(
            job_id,
            None,
            FinalStatus.FAILED,
            error=ErrorInfo(
                code=ErrorCode.INTERNAL_ERROR,
                message=f"unexpected {type(error).__name__}: {error}"[:4000],
            ),
            authenticated=False,
        )
        await self._finish(result, None)
        return Outcome(job_id, FinalStatus.FAILED, dead_letter=True)

    async def cancel(self, job: JobSpec, delivery: Delivery, reason: str) -> Outcome:
        """End a job that a cancel request named, before or while it ran."""
        logger.info("job %s cancelled: %s", job.job_id, reason)
        result = self._result(
            job.job_id,
            job,
            FinalStatus.CANCELLED,
            error=ErrorInfo(code=ErrorCode.CANCELLED, message=reason),
        )
        await self._finish(result, message_digest(delivery.body))
        return Outcome(job.job_id, FinalStatus.CANCELLED, dead_letter=False)

    async def replay(self, job_id: str, result: bytes) -> Outcome:
        """Ack a redelivered, already finished job from its record.

        The result is published again only when the broker never confirmed it; a
        confirmed result is already in a durable queue, so the redelivery is just acked.
        """
        record = await asyncio.to_thread(self.state.finished, job_id)
        if record is not None and record.published:
            logger.info("job %s already finished here and its result was published", job_id)
        else:
            logger.info("job %s already finished here; publishing its recorded result", job_id)
            await self.publisher.publish_result(job_id, result, recorded=record is not None)
        status = FinalStatus(record.status) if record else FinalStatus.FAILED
        return Outcome(job_id, status, dead_letter=False, replayed=True)

    async def execute(
        self,
        job: JobSpec,
        delivery: Delivery,
        gpu_devices: Sequence[str] = (),
        gpu_uuids: Sequence[str] = (),
    ) -> Outcome:
        """Run an admitted job on the GPUs it was given (CDI names and their UUIDs)."""
        started = time.monotonic()
        durations = {"fetch_s": 0.0, "run_s": 0.0}
        logger.info(
            "job %s (competition %s, submission %s) starting",
            job.job_id, job.competition, job.submission_id,
        )
        self._status(job, JobState.VERIFIED)
        # True once the steps removed the work folder themselves.
        cleaned = False
        try:
            result, cleaned = await self._run_steps(job, durations, list(gpu_devices))
        except JobError as exc:
            logger.warning("job %s failed: %s", job.job_id, exc)
            result = self._failed(job, exc.code, exc.message)
        except (RunnerUnavailable, ContainerError) as exc:
            code = (
                ErrorCode.RUNTIME_UNAVAILABLE
                if isinstance(exc, RunnerUnavailable)
                else ErrorCode.CONTAINER_FAILED
            )
            logger.error("job %s failed in the runtime: %s", job.job_id, exc)
            result = self._failed(job, code, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("job %s failed with an unexpected error", job.job_id)
            result = self._failed(
                job, ErrorCode.INTERNAL_ERROR, f"unexpected {type(exc).__name__}: {exc}"
            )
        finally:
            if not cleaned:
                await asyncio.to_thread(self.state.remove_work_dir, job.job_id)
        total = time.monotonic() - started
        result = result.model_copy(
            update={
                "durations": Durations(total_s=total, **durations),
                "gpus": list(gpu_uuids),
            }
        )
        await self._finish(result, message_digest(delivery.body))
        logger.info(
            "job %s finished: %s in %.1f s", job.job_id, result.status.value, total
        )
        return Outcome(job.job_id, result.status, dead_letter=False, duration_s=total)

    # --- steps ------------------------------------------------------------------

    def _check_fresh(self, job: JobSpec) -> None:
        now = utc_now()
        skew = timedelta(seconds=self.settings.clock_skew_s)
        if job.expires_at + skew < now:
            raise RejectedError(
                ErrorCode.EXPIRED,
                f"job {job.job_id} expired at {job.expires_at.isoformat()}; submit it again",
            )
        if job.created_at - skew > now:
            raise RejectedError(
                ErrorCode.EXPIRED,
                f"job {job.job_id} is created at {job.created_at.isoformat()}, in the "
                "future; check the clocks of the submitter and this site",
            )

    def _check_audience(self, job: JobSpec, queue: str) -> None:
        try:
            competition, name = split_job_queue_name(queue)
        except ValueError:
            competition, name = "", ""
        if (job.competition, job.queue) != (competition, name):
            raise RejectedError(
                ErrorCode.AUDIENCE_MISMATCH,
                f"job {job.job_id} is for queue {job.queue!r} of competition "
                f"{job.competition!r} but arrived on {queue!r}",
            )

    async def _run_steps(
        self, job: JobSpec, durations: dict[str, float], gpu_devices: list[str]
    ) -> tuple[JobResult, bool]:
        """Fetch, run and read the scores; return the result and whether the work
        folder is already removed."""
        fetch_started = time.monotonic()
        self._status(job, JobState.FETCHING)
        mounts = []
        for spec in job.inputs:
            path = await self.cache.materialize(spec, job.job_id)
            mounts.append(Mount(source=path, target=f"/inputs/{spec.mount}"))
        durations["fetch_s"] = time.monotonic() - fetch_started

        writes_output = bool(job.artifacts) or self.runner.writes_output(job.command)
        if writes_output:
            output = await asyncio.to_thread(self.state.make_work_dir, job.job_id)
        else:
            output = self.state.work_dir(job.job_id)
        self._status(job, JobState.RUNNING)
        outcome = await self.runner.run(
            RunSpec(
                job_id=job.job_id,
                image=job.image,
                command=list(job.command),
                env=dict(job.env),
                mounts=mounts,
                output_dir=output,
                walltime_s=job.resources.walltime_s,
                labels={"fairu.job_id": job.job_id, "fairu.agent_id": self.identity.agent_id},
                cpus=job.resources.cpus,
                memory_mb=job.resources.memory_mb,
                gpu_devices=gpu_devices,
                egress=job.network == "egress",
            )
        )
        durations["run_s"] = outcome.run_s
        log_tail, truncated = _cap_log(outcome.log_tail, outcome.log_truncated)
        logs = {"log_tail": log_tail, "log_truncated": truncated, "exit_code": outcome.exit_code}

        if outcome.output_too_large:
            return (self._failed(
                job,
                ErrorCode.OUTPUT_TOO_LARGE,
                f"{outcome.output_too_large}; the container was stopped",
                status=FinalStatus.OUTPUT_TOO_LARGE,
                **logs,
            ), False)
        if outcome.timed_out:
            return (self._failed(
                job,
                ErrorCode.TIMED_OUT,
                f"the container ran past the walltime of {job.resources.walltime_s} s "
                "and was killed",
                status=FinalStatus.TIMED_OUT,
                **logs,
            ), False)
        if outcome.exit_code != 0:
            return (self._failed(
                job,
                ErrorCode.NONZERO_EXIT,
                f"the container exited with code {outcome.exit_code}"
                f"{_describe_exit(outcome.exit_code)}; see log_tail",
                **logs,
            ), False)
        if not writes_output:
            return self._result(job.job_id, job, FinalStatus.SUCCEEDED, scores={}, **logs), True
        self._status(job, JobState.READING_SCORES)
        # One thread hand-off for both file steps of a finished run.
        outputs = await asyncio.to_thread(self._read_outputs_and_clean, job, output)
        if isinstance(outputs, JobError):
            return self._failed(job, outputs.code, outputs.message, **logs), True
        scores, artifacts = outputs
        return (
            self._result(
                job.job_id, job, FinalStatus.SUCCEEDED, scores=scores, artifacts=artifacts,
                **logs,
            ),
            True,
        )

    def _read_outputs_and_clean(
        self, job: JobSpec, output: Path
    ) -> tuple[dict[str, float], list[Artifact]] | JobError:
        """Read scores.json and the job's artifacts, then remove the work folder.

        A job that names artifacts may write no scores.json, because its results can
        be in those files alone.
        """
        try:
            if job.artifacts and not (output / SCORES_FILE).exists():
                scores: dict[str, float] = {}
            else:
                scores = read_scores(output)
            artifacts = read_artifacts(output, job.artifacts, self.settings.max_artifact_bytes)
            return scores, artifacts
        except JobError as exc:
            return exc
        finally:
            self.state.remove_work_dir(job.job_id)

    # --- results ----------------------------------------------------------------

    def _failed(
        self,
        job: JobSpec,
        code: ErrorCode,
        message: str,
        status: FinalStatus = FinalStatus.FAILED,
        **fields: object,
    ) -> JobResult:
        return self._result(
            job.job_id, job, status, error=ErrorInfo(code=code, message=message), **fields
        )

    def _result(
        self, job_id: str, job: JobSpec | None, status: FinalStatus, **fields: object
    ) -> JobResult:
        context = (
            {"competition": job.competition, "queue": job.queue, "submission_id": job.submission_id}
            if job
            else {}
        )
        return JobResult(
            job_id=job_id,
            agent_id=self.identity.agent_id,
            site=self.settings.site,
            status=status,
            finished_at=utc_now(),
            **context,
            **fields,  # type: ignore[arg-type]
        )

    async def _finish(self, result: JobResult, digest: str | None) -> None:
        """Sign, record under the job message's digest, and publish the result.

        A result for an unauthenticated message is never recorded, because its job
        id is only a claim; `digest` is None for a result that must not be recorded.
        """
        body = sign_model(result, self.identity.key, self.identity.agent_id)
        recorded = result.authenticated and digest is not None
        if recorded:
            assert digest is not None
            # The record is also the result's spool until the broker confirms it.
            await self.state.record(result.job_id, result.status.value, digest, body)
        await self.publisher.publish_result(result.job_id, body, recorded=recorded)

    def _status(self, job: JobSpec, state: JobState) -> None:
        event = StatusEvent(
            job_id=job.job_id, agent_id=self.identity.agent_id, state=state, at=utc_now()
        )
        self.publisher.publish_status(event)


def message_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def claimed_job_id(body: bytes) -> str:
    """Read the job id an unverified message claims, for the rejection report only."""
    try:
        envelope = json.loads(body)
        payload = json.loads(base64.b64decode(envelope["payload"], validate=True))
        job_id = payload["job_id"]
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        return "unknown"
    if isinstance(job_id, str) and _JOB_ID.match(job_id):
        return job_id
    return "unknown"


# The likely cause of each signal that can end a job's process.
_SIGNAL_CAUSES = {
    signal.SIGKILL: "killed, for example by the out-of-memory killer or a hard rlimit",
    signal.SIGXCPU: "CPU time limit (cpus × walltime_s) reached",
    signal.SIGXFSZ: "file size limit reached",
}


def _describe_exit(exit_code: int | None) -> str:
    """Name the signal behind an exit code above 128, the shell's convention."""
    if exit_code is None or not 128 < exit_code < 128 + signal.NSIG:
        return ""
    try:
        number = signal.Signals(exit_code - 128)
    except ValueError:
        return ""
    cause = _SIGNAL_CAUSES.get(number)
    return f" ({number.name}: {cause})" if cause else f" ({number.name})"


def _cap_log(text: str, truncated: bool) -> tuple[str, bool]:
    """Keep the tail that fits a result, saying how much of the runner's log is dropped."""
    if len(text) <= MAX_LOG_TAIL_CHARS:
        return text, truncated
    marker = "[fairu: {} earlier characters of log dropped]\n"
    room = MAX_LOG_TAIL_CHARS - len(marker.format(len(text)))
    return marker.format(len(text) - room) + text[-room:], True
