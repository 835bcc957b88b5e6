"""Status events whose confirm fails are logged, since no job waits for them."""

from __future__ import annotations

import asyncio
import logging

from fairu.agent.daemon import _check_status_confirm
from fairu.agent.session import PublishFailed, SessionClosed
from fairu.protocol.models import JobState, StatusEvent, utc_now


def event() -> StatusEvent:
    return StatusEvent(
        job_id="job-1", agent_id="site-0123456789ab", state=JobState.RUNNING, at=utc_now()
    )


async def test_failed_confirm_is_logged(caplog):
    failures = [
        SessionClosed("broker session x: connection closed"),
        PublishFailed("the broker rejected the message (nack)"),
    ]
    for failure in failures:
        confirm = asyncio.get_running_loop().create_future()
        confirm.set_exception(failure)
        with caplog.at_level(logging.WARNING, logger="fairu.agent.daemon"):
            _check_status_confirm(event(), confirm)
        assert f"job job-1 status running not sent: {failure}" in caplog.text


async def test_confirmed_status_logs_nothing(caplog):
    confirm = asyncio.get_running_loop().create_future()
    confirm.set_result(None)
    with caplog.at_level(logging.WARNING, logger="fairu.agent.daemon"):
        _check_status_confirm(event(), confirm)
    assert caplog.text == ""
