"""Coordinator keys, agents and evaluation requests shared by the evaluation tests."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from fairu.broker.evaluations import CoordinatorKeys
from fairu.broker.keys import KeyFolder
from fairu.protocol.evaluation import EvaluationRequest
from fairu.protocol.models import Resources, utc_now


def issue_coordinator_keys(folder: Path) -> tuple[CoordinatorKeys, str]:
    """Make a root key and a current two-hour coordinator key in `folder`.

    Returns the coordinator's keys and the root public key that agents trust.
    """
    keys = KeyFolder(folder)
    keys.init_root()
    keys.issue(timedelta(hours=2), make_current=True)
    return CoordinatorKeys(folder), (folder / "root.pub").read_text().strip()


def start_evaluation_agent(
    start_agent: Any, competition: Any, root_key: str, token: str, **options: Any
) -> Any:
    """Start an agent that trusts `root_key` and enrolls with `token`."""
    return start_agent(
        competition,
        trust=f'root_key = "{root_key}"',
        agent_extra=f'enrollment_token = "{token}"',
        **options,
    )


def evaluation_request(competition: Any, **fields: Any) -> EvaluationRequest:
    """Build a request of the sample submission for `competition`, valid for an hour.

    `fields` sets the command, the grid, the seed and mu_true, and may replace any
    other field.
    """
    now = utc_now()
    values: dict[str, Any] = {
        "evaluation_id": f"ev-{uuid.uuid4().hex[:10]}",
        "competition": competition.name,
        "queue": competition.queue,
        "submission_id": "sample-submission",
        "image": "localhost/fairu-python:1",
        "resources": Resources(walltime_s=300),
        "created_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    values.update(fields)
    return EvaluationRequest(**values)
