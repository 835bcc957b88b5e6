"""A valid job for unit tests of the agent, with fields to override."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fairu.protocol.models import JobSpec, utc_now


def job_spec(**fields: Any) -> JobSpec:
    """Return a job for queue cpu of competition higgs, valid for an hour."""
    now = utc_now()
    values: dict[str, Any] = {
        "job_id": "job-1",
        "competition": "higgs",
        "queue": "cpu",
        "submission_id": "submission-1",
        "image": "none",
        "command": ["true"],
        "created_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    return JobSpec(**{**values, **fields})
