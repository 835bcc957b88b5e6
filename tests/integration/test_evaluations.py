"""Sharded evaluations through the real broker, real agents and rootless podman.

The coordinator runs in the test's event loop with its own copies of the records
and heartbeat queues, so no other test run on the broker takes its results. The
pooled predictions reach a scoring job over HTTP, from a server that serves
`Evaluations.artifact_path` as the coordinator's API does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fairu.broker.coordinator import Coordinator, CoordinatorQueues
from fairu.broker.evaluations import CoordinatorKeys, Evaluations
from fairu.broker.store import Store
from fairu.protocol.evaluation import EvaluationRequest, EvaluationState, ScoringProgram
from fairu.protocol.models import InputSpec, Resources

from .conftest import serve_app
from .evaluation_setup import (
    evaluation_request,
    issue_coordinator_keys,
    start_evaluation_agent,
)

pytestmark = [pytest.mark.broker, pytest.mark.podman]

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "higgsml-demo"
# A 4 x 7 grid of the example's default data keeps each run small on 2 cores.
NUM_SETS = 4
EXPERIMENTS = 7
INGESTION = [
    "python3", "/inputs/ingestion_program/ingestion.py",
    "--input", "/inputs/input_data", "--submission", "/inputs/sample_submission",
    "--output", "/output", "--first-set", "{first_set}", "--sets", "{sets}",
    "--first-experiment", "{first_experiment}", "--experiments", "{experiments}",
    "--base-seed", "{base_seed}",
]


def _load(name: str, relative: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_DIR / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Setup:
    coordinator: Coordinator
    evaluations: Evaluations
    keys: CoordinatorKeys
    root_key: str
    inputs: dict[str, InputSpec]
    competition: Any

    def sign(self, request: EvaluationRequest) -> bytes:
        return self.keys.sign(request)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    builder = _load("evaluation_build_bundles", "build_bundles.py")
    return builder.build_bundles(str(tmp_path_factory.mktemp("bundles")))


@pytest.fixture
async def setup(
    broker_url: str,
    tmp_path: Path,
    coordinator_queues: CoordinatorQueues,
    competition: Any,
    artifact_server: Any,
    bundles: list[dict[str, Any]],
) -> AsyncIterator[Any]:
    """Return a function that starts a coordinator with evaluations on tmp_path's
    database; calling it again after the first one stopped is a restart."""
    keys, root_key = issue_coordinator_keys(tmp_path / "keys")
    inputs = {}
    for bundle in bundles:
        path = Path(bundle["path"])
        (artifact_server.root / path.name).write_bytes(path.read_bytes())
        inputs[bundle["name"]] = InputSpec(
            name=bundle["name"].replace("_", "-"),
            url=artifact_server.url(path.name),
            sha256=bundle["sha256"],
            size=bundle["size"],
            mount=bundle["name"],
            unpack="tar",
        )

    holder: dict[str, Evaluations] = {}

    async def serve_artifact(request: web.Request) -> web.StreamResponse:
        path = holder["current"].artifact_path(
            request.match_info["evaluation_id"], request.match_info["name"]
        )
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/api/v1/evaluations/{evaluation_id}/artifacts/{name}", serve_artifact)
    runner, port = await serve_app(app)

    running: list[tuple[Coordinator, asyncio.Task[None], Store]] = []

    async def start() -> Setup:
        store = Store(tmp_path / "coordinator.sqlite")
        evaluations = Evaluations(
            broker_url, store, tmp_path / "evaluations", keys,
            public_base_url=f"http://127.0.0.1:{port}",
        )
        holder["current"] = evaluations
        coordinator = Coordinator(
            broker_url, store, queues=coordinator_queues, evaluations=evaluations
        )
        task = asyncio.create_task(coordinator.run())
        running.append((coordinator, task, store))
        return Setup(coordinator, evaluations, keys, root_key, inputs, competition)

    async def stop() -> None:
        coordinator, task, store = running.pop()
        coordinator.stopping.set()
        await asyncio.wait_for(task, 60)
        store.close()

    start.stop = stop  # type: ignore[attr-defined]
    yield start
    while running:
        await stop()
    await runner.cleanup()


def start_agents(setup: Setup, start_agent: Any, count: int, **options: Any) -> list[Any]:
    agents = []
    for _ in range(count):
        token = setup.coordinator.store.add_enrollment_token("test")
        agents.append(
            start_evaluation_agent(
                start_agent, setup.competition, setup.root_key, token, **options
            )
        )
    return agents


def make_request(setup: Setup, **fields: Any) -> EvaluationRequest:
    values: dict[str, Any] = {
        "command": INGESTION,
        "inputs": [
            setup.inputs[name]
            for name in ("ingestion_program", "input_data", "sample_submission")
        ],
        "num_sets": NUM_SETS,
        "experiments_per_set": EXPERIMENTS,
        "shard_size": NUM_SETS * EXPERIMENTS,
        "base_seed": _make_data().DEFAULT_SETTINGS["base_seed"],
        "mu_true": _default_mu_true(),
    }
    values.update(fields)
    return evaluation_request(setup.competition, **values)


def straggling_request(setup: Setup, straggler_after_s: float) -> EvaluationRequest:
    """Build a request of two shards whose shard 0 first sleeps long enough, on its
    first attempt, to become a straggler."""
    command = ["/bin/sh", "-c",
               'if [ {first_set} = 0 ] && [ {attempt} = 1 ]; then sleep 120; fi; exec "$@"',
               "sh", *INGESTION]
    return make_request(
        setup, shard_size=EXPERIMENTS * 2, command=command,
        straggler_after_s=straggler_after_s,
    )


def scoring_program(setup: Setup) -> ScoringProgram:
    return ScoringProgram(
        image="localhost/fairu-python:1",
        command=[
            "python3", "/inputs/scoring_program/score.py",
            "--predictions", "/inputs/pooled_predictions/predictions.json",
            "--reference", "/inputs/reference_data", "--output", "/output",
        ],
        inputs=[setup.inputs["scoring_program"], setup.inputs["reference_data"]],
        resources=Resources(walltime_s=300),
    )


def _make_data() -> Any:
    return _load("evaluation_make_data", "make_data.py")


def _default_mu_true() -> list[float]:
    make_data = _make_data()
    ingestion = _load("evaluation_ingestion", "ingestion_program/ingestion.py")
    return [ingestion.true_mu(make_data.DEFAULT_SETTINGS, i) for i in range(NUM_SETS)]


def direct_scores(
    tmp_path: Path, sets: int = NUM_SETS, experiments: int = EXPERIMENTS
) -> dict[str, float]:
    """Score the unsharded grid of the first `sets` sets and `experiments`
    experiments in this process with the example's programs."""
    make_data = _make_data()
    ingestion = _load("evaluation_ingestion", "ingestion_program/ingestion.py")
    scoring = _load("evaluation_score", "scoring_program/score.py")
    input_dir, reference_dir = make_data.make_data(str(tmp_path / "direct-data"))
    ingestion.run_ingestion(
        input_dir, str(EXAMPLE_DIR / "sample_submission"), str(tmp_path / "direct"),
        sets=sets, experiments=experiments,
    )
    return scoring.run_scoring(
        str(tmp_path / "direct"), reference_dir, str(tmp_path / "direct-scores")
    )


async def wait_for_end(
    evaluations: Evaluations, evaluation_id: str, timeout_s: float = 400
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await evaluations.status(evaluation_id)
        assert status is not None
        if status.state in (
            EvaluationState.FINISHED, EvaluationState.FAILED, EvaluationState.CANCELLED
        ):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"evaluation {evaluation_id} still {status} after {timeout_s} s")
        await asyncio.sleep(0.5)


# --- determinism --------------------------------------------------------------------


async def test_scores_same_for_any_sharding(setup, start_agent, tmp_path):
    service = await setup()
    start_agents(service, start_agent, 3)
    expected = direct_scores(tmp_path)
    runs = {}
    for label, shard_size in (("one shard", NUM_SETS * EXPERIMENTS), ("eight shards", 4)):
        request = make_request(
            service, shard_size=shard_size, scoring="program",
            scoring_program=scoring_program(service),
        )
        await service.evaluations.submit(service.sign(request))
        runs[label] = await wait_for_end(service.evaluations, request.evaluation_id)

    one, eight = runs["one shard"], runs["eight shards"]
    assert one.state is EvaluationState.FINISHED, one
    assert eight.state is EvaluationState.FINISHED, eight
    assert one.shards_total == 1
    assert eight.shards_total == 8
    assert len({shard.agent_id for shard in eight.shards}) > 1
    assert one.scores == eight.scores
    assert one.scores["program.quantiles_score"] == pytest.approx(
        expected["quantiles_score"], rel=1e-12
    )
    assert one.scores["program.coverage"] == expected["coverage"]
    builtin = {k: v for k, v in one.scores.items() if not k.startswith("program.")}
    assert builtin["quantiles_score"] == pytest.approx(expected["quantiles_score"], rel=1e-9)
    for name in ("predictions.json", "coverage.png", "report.html"):
        assert name in eight.artifacts
        assert service.evaluations.artifact_path(request.evaluation_id, name) is not None


async def test_seven_shards_match_one_shard(setup, start_agent, tmp_path):
    # The split rule never lets a shard span two sets, so 7 shards need a grid whose
    # set count or runs per set give 7: here one set of 7 experiments.
    service = await setup()
    start_agents(service, start_agent, 3)
    expected = direct_scores(tmp_path, sets=1, experiments=EXPERIMENTS)
    runs = {}
    for shards, shard_size in ((1, EXPERIMENTS), (7, 1)):
        request = make_request(
            service, num_sets=1, mu_true=_default_mu_true()[:1], shard_size=shard_size
        )
        await service.evaluations.submit(service.sign(request))
        runs[shards] = await wait_for_end(service.evaluations, request.evaluation_id)

    assert runs[1].state is EvaluationState.FINISHED, runs[1]
    assert runs[7].state is EvaluationState.FINISHED, runs[7]
    assert runs[1].shards_total == 1
    assert runs[7].shards_total == 7
    assert len({shard.agent_id for shard in runs[7].shards}) > 1
    assert runs[1].scores == runs[7].scores
    assert runs[7].scores["quantiles_score"] == expected["quantiles_score"]
    assert runs[7].scores["coverage"] == expected["coverage"]


# --- retries ------------------------------------------------------------------------


def _fail_first_attempt(command: list[str], condition: str) -> list[str]:
    """Wrap a command so the shards matching `condition` exit 3 on their first attempt."""
    return ["/bin/sh", "-c", f'if {condition} && [ {{attempt}} = 1 ]; then exit 3; fi; exec "$@"',
            "sh", *command]


async def test_failing_shard_retried(setup, start_agent):
    service = await setup()
    start_agents(service, start_agent, 1)
    request = make_request(
        service, shard_size=EXPERIMENTS,
        command=_fail_first_attempt(INGESTION, "[ {first_set} = 2 ]"),
    )

    await service.evaluations.submit(service.sign(request))
    status = await wait_for_end(service.evaluations, request.evaluation_id)

    assert status.state is EvaluationState.FINISHED, status
    attempts = [shard.attempts for shard in status.shards]
    assert attempts == [1, 1, 2, 1]
    assert status.shards[2].job_id == f"{request.evaluation_id}.s2.a2"


async def test_shard_fails_after_max_attempts(setup, start_agent):
    service = await setup()
    start_agents(service, start_agent, 1)
    request = make_request(
        service, shard_size=EXPERIMENTS, max_attempts=2,
        command=["/bin/sh", "-c", 'if [ {first_set} = 1 ]; then exit 3; fi; exec "$@"',
                 "sh", *INGESTION],
    )

    await service.evaluations.submit(service.sign(request))
    status = await wait_for_end(service.evaluations, request.evaluation_id)

    assert status.state is EvaluationState.FAILED
    assert status.error is not None
    assert "shard 1" in status.error
    assert "all 2 attempts" in status.error
    assert "nonzero_exit" in status.error
    assert status.shards[1].attempts == 2


# --- completeness -------------------------------------------------------------------

# Writes the shard's records with fixed values; on the first attempt shard 0 leaves
# one out, shard 1 adds an experiment outside its rectangle and shard 2 repeats one.
CRAFTED = """
import json, sys
first_set, sets, first_exp, exps, attempt = map(int, sys.argv[1:6])
cells = [(s, e) for s in range(first_set, first_set + sets)
         for e in range(first_exp, first_exp + exps)]
if attempt == 1 and first_set == 0:
    cells = cells[:-1]
if attempt == 1 and first_set == 1:
    cells.append((first_set, first_exp + exps))
if attempt == 1 and first_set == 2:
    cells.append(cells[0])
records = [dict(set=s, experiment=e, mu_hat=1.0, delta_mu_hat=0.1, p16=0.9, p84=1.1)
           for s, e in cells]
json.dump(records, open("/output/predictions.json", "w"))
"""


async def test_incomplete_shard_rejected_and_retried(setup, start_agent):
    service = await setup()
    start_agents(service, start_agent, 1)
    request = make_request(
        service, shard_size=EXPERIMENTS - 1, experiments_per_set=EXPERIMENTS - 1,
        command=["python3", "-c", CRAFTED, "{first_set}", "{sets}", "{first_experiment}",
                 "{experiments}", "{attempt}"],
        inputs=[],
    )

    await service.evaluations.submit(service.sign(request))
    status = await wait_for_end(service.evaluations, request.evaluation_id)

    assert status.state is EvaluationState.FINISHED, status
    assert [shard.attempts for shard in status.shards] == [2, 2, 2, 1]
    attempts = await asyncio.to_thread(
        service.evaluations.store.attempts, request.evaluation_id
    )
    errors = {a.shard_index: a.error for a in attempts if a.state == "failed"}
    assert set(errors) == {0, 1, 2}
    assert all(error for error in errors.values())
    assert "quantiles_score" in status.scores


# --- stragglers ---------------------------------------------------------------------


async def test_straggler_redispatched_late_result_ignored(setup, start_agent):
    service = await setup()
    start_agents(service, start_agent, 2)
    request = straggling_request(service, straggler_after_s=20)

    await service.evaluations.submit(service.sign(request))
    status = await wait_for_end(service.evaluations, request.evaluation_id)

    assert status.state is EvaluationState.FINISHED, status
    first = status.shards[0]
    assert first.job_id == f"{request.evaluation_id}.s0.a2"
    assert first.attempts == 2
    straggler = f"{request.evaluation_id}.s0.a1"
    deadline = time.monotonic() + 120
    while True:
        attempt = await asyncio.to_thread(service.evaluations.store.attempt, straggler)
        if attempt is not None and attempt.state == "late":
            break
        assert time.monotonic() < deadline, f"straggler {straggler} never reported"
        await asyncio.sleep(0.5)
    reasons = await asyncio.to_thread(service.coordinator.store.audit_reasons, straggler)
    assert any("already done by job" in reason for reason in reasons)
    assert status.shards[1].attempts == 1


# --- restart ------------------------------------------------------------------------


async def test_evaluation_survives_coordinator_restart(setup, start_agent):
    service = await setup()
    start_agents(service, start_agent, 2)
    request = straggling_request(service, straggler_after_s=25)
    await service.evaluations.submit(service.sign(request))
    await setup.stop()

    restarted = await setup()
    status = await wait_for_end(restarted.evaluations, request.evaluation_id)

    assert status.state is EvaluationState.FINISHED, status
    assert status.shards[0].job_id == f"{request.evaluation_id}.s0.a2"


# --- bad input ----------------------------------------------------------------------


async def test_submit_rejects_bad_requests(setup):
    service = await setup()
    good = make_request(service)
    wrong_mu = good.model_copy(update={"mu_true": [1.0]})
    no_placeholders = good.model_copy(update={"command": ["python3", "run.py"]})

    from fairu.protocol.errors import RejectedError
    from fairu.protocol.signing import generate_private_key, sign_model

    with pytest.raises(RejectedError, match="mu_true has 1 values but num_sets is 4"):
        await service.evaluations.submit(service.sign(wrong_mu))
    with pytest.raises(RejectedError, match="lacks the placeholders"):
        await service.evaluations.submit(service.sign(no_placeholders))
    with pytest.raises(RejectedError) as caught:
        await service.evaluations.submit(sign_model(good, generate_private_key()))
    assert caught.value.code == "unknown_key"
    missing_queue = good.model_copy(update={"queue": "nosuchqueue"})
    with pytest.raises(RejectedError, match="fairu-admin queues create nosuchqueue"):
        await service.evaluations.submit(service.sign(missing_queue))
    assert await service.evaluations.status(good.evaluation_id) is None
