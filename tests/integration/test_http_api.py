"""The coordinator's HTTP API, `fairu-admin evaluate` and the organizer page, on real
evaluations: the real `Evaluations`, broker, agent and rootless podman, with the
page read by a headless Debian chromium.

Each shard job writes fixed predictions with `python3 -c`, so a test needs no input
bundles. The scoring job of the round trip fetches the pooled predictions from the
coordinator's own API, as agents do in production.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fairu.broker.api import MAX_BODY_BYTES
from fairu.broker.coordinator import Coordinator
from fairu.broker.evaluations import CoordinatorKeys, Evaluations
from fairu.broker.store import Store
from fairu.protocol.evaluation import EvaluationRequest, EvaluationState, ScoringProgram
from fairu.protocol.models import Resources
from fairu.protocol.signing import generate_private_key, sign_model

from .evaluation_setup import (
    evaluation_request,
    issue_coordinator_keys,
    start_evaluation_agent,
)

pytestmark = [pytest.mark.broker, pytest.mark.podman]

CHROMIUM = Path("/usr/bin/chromium")
# Flags for a machine without network: nothing is fetched at start or in the
# background, and no sandbox, since the tests run as root.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
NUM_SETS = 2
EXPERIMENTS = 4
# Writes one record per (set, experiment) of the shard, with fixed values.
SHARD_PROGRAM = """
import json, sys
first_set, sets, first_exp, exps = map(int, sys.argv[1:5])
records = [
    dict(set=s, experiment=e, mu_hat=1.0 + 0.01 * e, delta_mu_hat=0.1,
         p16=0.8 + 0.01 * e, p84=1.2 + 0.01 * e)
    for s in range(first_set, first_set + sets)
    for e in range(first_exp, first_exp + exps)
]
json.dump(records, open("/output/predictions.json", "w"))
"""
SHARD_COMMAND = [
    "python3", "-c", SHARD_PROGRAM,
    "{first_set}", "{sets}", "{first_experiment}", "{experiments}",
]
# Counts the pooled records it was given, fetched from the coordinator's API.
SCORING_PROGRAM = """
import json
records = json.load(open("/inputs/pooled_predictions/predictions.json"))
json.dump({"records": float(len(records))}, open("/output/scores.json", "w"))
"""


@dataclass
class ApiSetup:
    coordinator: Coordinator
    keys_dir: Path
    keys: CoordinatorKeys
    url: str
    competition: Any
    agent: Any


def free_port() -> int:
    # The port can be taken again before the coordinator binds it, but only by a
    # process on this machine that binds port numbers it did not choose.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until_serving(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the coordinator at {url} did not serve within {timeout_s} s")
            await asyncio.sleep(0.2)


@pytest.fixture
async def api_setup(
    broker_url: str, tmp_path: Path, coordinator_queues: Any, competition: Any,
    start_agent: Any,
) -> AsyncIterator[ApiSetup]:
    """A coordinator with real evaluations and its HTTP API, and one approved agent."""
    keys, root_key = issue_coordinator_keys(tmp_path / "keys")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = Store(tmp_path / "coordinator.sqlite")
    evaluations = Evaluations(
        broker_url, store, tmp_path / "evaluations", keys, public_base_url=url
    )
    coordinator = Coordinator(
        broker_url, store, queues=coordinator_queues, evaluations=evaluations,
        http=("127.0.0.1", port),
    )
    task = asyncio.create_task(coordinator.run())

    try:
        await wait_until_serving(url)
        token = await asyncio.to_thread(store.add_enrollment_token, "test")
        agent = start_evaluation_agent(start_agent, competition, root_key, token)
        yield ApiSetup(coordinator, tmp_path / "keys", keys, url, competition, agent)
    finally:
        coordinator.stopping.set()
        await asyncio.wait_for(task, 60)
        store.close()


def make_request(setup: ApiSetup, **fields: Any) -> EvaluationRequest:
    values: dict[str, Any] = {
        "command": SHARD_COMMAND,
        "num_sets": NUM_SETS,
        "experiments_per_set": EXPERIMENTS,
        "shard_size": EXPERIMENTS,
        "base_seed": 7,
        "mu_true": [1.0] * NUM_SETS,
    }
    values.update(fields)
    return evaluation_request(setup.competition, **values)


async def poll_until_final(
    http: aiohttp.ClientSession, url: str, timeout_s: float = 240
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        async with http.get(url) as response:
            assert response.status == 200
            status = await response.json()
        if status["state"] in ("finished", "failed", "cancelled"):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} still {status['state']} after {timeout_s} s")
        await asyncio.sleep(0.5)


async def error_of(response: aiohttp.ClientResponse) -> dict[str, str]:
    body = await response.json()
    assert set(body) == {"error"}
    return body["error"]


async def run_admin(*args: str) -> tuple[int, str, str]:
    """Run fairu-admin in a child process, so the coordinator's loop keeps serving."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fairu.broker.admin", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 500)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


# --- the API round trip -------------------------------------------------------------


async def test_api_round_trip(api_setup):
    setup = api_setup
    request = make_request(
        setup,
        scoring="program",
        scoring_program=ScoringProgram(
            image="localhost/fairu-python:1",
            command=["python3", "-c", SCORING_PROGRAM],
            resources=Resources(walltime_s=300),
        ),
    )
    body = setup.keys.sign(request)
    base = f"{setup.url}/api/v1/evaluations"
    async with aiohttp.ClientSession() as http:
        async with http.post(base, data=body) as response:
            assert response.status == 201
            created = await response.json()
        assert created["evaluation_id"] == request.evaluation_id
        assert created["shards_total"] == NUM_SETS

        status = await poll_until_final(http, f"{base}/{request.evaluation_id}")
        assert status["state"] == "finished", status
        assert status["shards_done"] == NUM_SETS
        assert status["scores"]["program.records"] == NUM_SETS * EXPERIMENTS
        assert "quantiles_score" in status["scores"]
        assert {shard["state"] for shard in status["shards"]} == {"done"}
        assert all(shard["agent_id"] for shard in status["shards"])

        async with http.get(base) as response:
            listed = {item["evaluation_id"]: item for item in await response.json()}
        assert listed[request.evaluation_id]["state"] == "finished"

        artifacts = f"{base}/{request.evaluation_id}/artifacts"
        async with http.get(f"{artifacts}/coverage.png") as response:
            assert response.status == 200
            assert response.content_type == "image/png"
            assert (await response.read()).startswith(b"\x89PNG")
        async with http.get(f"{artifacts}/report.html") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            assert response.headers["Content-Security-Policy"].startswith("sandbox")
        async with http.get(f"{artifacts}/predictions.json") as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            assert len(json.loads(await response.read())) == NUM_SETS * EXPERIMENTS
        async with http.get(f"{artifacts}/scores.json.bak") as response:
            assert response.status == 404

        async with http.get(f"{setup.url}/api/v1/agents") as response:
            assert response.status == 200
            fleet = await response.json()
        # Agents of other tests on the broker register here too, unapproved.
        queue = setup.competition.amqp_queue
        ours = [agent for agent in fleet if agent["queues"] == [queue]]
        assert len(ours) == 1
        assert ours[0]["site"] == "test"
        assert ours[0]["approval"] == "approved"
        assert ours[0]["fleet_state"] == "serving"
        assert {shard["agent_id"] for shard in status["shards"]} == {ours[0]["agent_id"]}


async def test_api_rejects_bad_submissions(api_setup):
    setup = api_setup
    base = f"{setup.url}/api/v1/evaluations"
    request = make_request(setup)
    async with aiohttp.ClientSession() as http:
        async with http.post(base, data=b'{"protocol": 1, "key_id": ') as response:
            assert response.status == 400
            assert (await error_of(response))["code"] == "malformed_json"

        # Signed by a key that no certificate of the root vouches for.
        forged = sign_model(request, generate_private_key())
        async with http.post(base, data=forged) as response:
            assert response.status == 403
            error = await error_of(response)
        assert error["code"] in ("unknown_key", "bad_certificate", "bad_signature")

        oversized = io.BytesIO(b"x" * (MAX_BODY_BYTES + 1))
        async with http.post(base, data=oversized) as response:
            assert response.status == 413
            assert (await error_of(response))["code"] == "message_too_large"

        async with http.get(f"{base}/ev-never-submitted") as response:
            assert response.status == 404
            error = await error_of(response)
        assert error["code"] == "unknown_evaluation"
        assert "ev-never-submitted" in error["message"]

        # The same id with other content conflicts; the same body again does not.
        async with http.post(base, data=setup.keys.sign(request)) as response:
            assert response.status == 201
        other = request.model_copy(update={"base_seed": 8})
        async with http.post(base, data=setup.keys.sign(other)) as response:
            assert response.status == 409
            assert (await error_of(response))["code"] == "replayed"

        async with http.post(f"{base}/{request.evaluation_id}/cancel") as response:
            assert response.status == 200
            cancelled = await response.json()
        assert cancelled["state"] == "cancelled"
        assert cancelled["shards_running"] == 0
        assert {shard["state"] for shard in cancelled["shards"]} <= {"done", "cancelled"}
        assert "cancelled" in {shard["state"] for shard in cancelled["shards"]}


# --- the CLI and the page -----------------------------------------------------------


def evaluation_toml(setup: ApiSetup) -> str:
    command = ", ".join(json.dumps(word) for word in SHARD_COMMAND)
    return f"""
competition = "{setup.competition.name}"
queue = "{setup.competition.queue}"
submission_id = "page-submission"
image = "localhost/fairu-python:1"
command = [{command}]
num_sets = {NUM_SETS}
experiments_per_set = {EXPERIMENTS}
shard_size = {EXPERIMENTS}
base_seed = 7
mu_true = [1.0, 1.0]
expires_in = "1h"

[resources]
walltime_s = 300
"""


async def test_cli_evaluate_and_page(api_setup, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found; scripts/setup-host.sh installs chromium")
    from playwright.async_api import async_playwright

    setup = api_setup
    path = tmp_path / "evaluation.toml"
    path.write_text(evaluation_toml(setup))
    code, stdout, stderr = await run_admin(
        "evaluate", str(path), "--coordinator", setup.url, "--keys-dir",
        str(setup.keys_dir), "--evaluation-id", "ev-page-1", "--wait",
    )
    assert code == 0, stderr
    assert "submitted evaluation ev-page-1: 2 shards" in stdout
    assert "ev-page-1 finished: 2/2 shards done, 0 running, 0 failed" in stderr
    assert "quantiles_score" in stdout

    code, show_output, stderr = await run_admin(
        "evaluations", "show", "ev-page-1", "--coordinator", setup.url
    )
    assert code == 0, stderr
    shard_rows = [line.split() for line in show_output.splitlines() if line[:1].isdigit()]
    assert [row[:4] for row in shard_rows] == [["0", "0", "0-3", "done"], ["1", "1", "0-3", "done"]]
    agent_id = shard_rows[0][6]

    profile = Path(tempfile.mkdtemp(prefix="fairu-chromium-"))
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(profile), executable_path=str(CHROMIUM), headless=True,
                args=CHROMIUM_ARGS,
            )
            try:
                page = await context.new_page()
                await page.goto(setup.url + "/")
                row = page.locator('#evaluations tr[data-evaluation-id="ev-page-1"]')
                await row.locator("td.state-finished").wait_for(timeout=30_000)
                row_text = await row.inner_text()
                shards_text = await row.locator("td.shards").inner_text()
                report = row.locator("a", has_text="report.html")
                report_href = await report.get_attribute("href")
                agent_row = page.locator(f'#fleet tr[data-agent-id="{agent_id}"]')
                await agent_row.wait_for(timeout=30_000)
                agent_text = await agent_row.inner_text()
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)

    assert "page-submission" in row_text
    assert "quantiles_score" in row_text
    assert shards_text == "2/2 done, 0 running, 0 failed"
    assert report_href == "/api/v1/evaluations/ev-page-1/artifacts/report.html"
    assert agent_text.split("\t")[:3] == ["test", agent_id, "serving"]
