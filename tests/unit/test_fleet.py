"""The coordinator's fleet view and its scheduling decision, without a broker."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from fairu.broker.admin import format_agents, gpus_by_model
from fairu.broker.jobfile import load_job_file
from fairu.broker.scheduling import (
    MAX_REQUEUE_ROUNDS,
    give_up_message,
    offers_for_queue,
    place,
    requeue_delay_s,
    unschedulable_message,
)
from fairu.broker.store import Store, fleet_state
from fairu.protocol.errors import ConfigError
from fairu.protocol.models import GpuInfo, JobSpec, MigDeviceInfo, Resources, utc_now

QUEUE = "fairu.jobs.higgs.gpu"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
GIB = 2**30


def registration(agent_id: str, gpus: list[GpuInfo], capacity_gpus: list[str], **extra):
    fields = {
        "agent_id": agent_id,
        "site": "eu1",
        "version": "0.1.0",
        "public_key": "AAAA",
        "cpu_cores": 16,
        "memory_bytes": 64 * GIB,
        "gpus": [gpu.model_dump(mode="json") for gpu in gpus],
        "queues": [QUEUE],
        "slots": 4,
        "running_jobs": [],
        "free_slots": 4,
        "at": T0.isoformat(),
        "usable_cpus": 16.0,
        "driver_version": "550.54.15",
        "cuda_version": "12.4",
        "heartbeat_interval_s": 10.0,
        "capacity": {
            "cpus": 15.0,
            "memory_bytes": 60 * GIB,
            "gpus": capacity_gpus,
            "slots": 4,
        },
        "free": {
            "cpus": 15.0,
            "memory_bytes": 60 * GIB,
            "gpus": capacity_gpus,
            "slots": 4,
        },
    }
    fields.update(extra)
    return fields


def a100(index: int, uuid: str) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=uuid,
        name="NVIDIA A100-SXM4-40GB",
        memory_total_bytes=40 * GIB,
    )


def job(**resources) -> JobSpec:
    now = utc_now()
    return JobSpec(
        job_id="job-1",
        competition="higgs",
        queue="gpu",
        submission_id="s",
        image="localhost/x:1",
        command=["true"],
        resources=Resources(**resources),
        created_at=now,
        expires_at=now + timedelta(hours=1),
    )


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "fleet.sqlite")
    yield store
    store.close()


@pytest.mark.parametrize(
    "seconds, expected",
    [
        pytest.param(0, "serving", id="fresh"),
        pytest.param(30, "serving", id="three-intervals"),
        pytest.param(31, "stale", id="past-three"),
        pytest.param(100, "stale", id="ten-intervals"),
        pytest.param(101, "offline", id="past-ten"),
    ],
)
def test_fleet_state_by_missed_beats(seconds, expected):
    assert fleet_state("serving", T0, 10.0, T0 + timedelta(seconds=seconds)) == expected


def test_stopped_agent_stays_stopped():
    assert fleet_state("stopped", T0, 10.0, T0 + timedelta(days=1)) == "stopped"


def test_liveness_changes_reported(store):
    store.upsert_registration(registration("eu1-a", [], []))
    assert store.mark_liveness(T0 + timedelta(seconds=5)) == []
    assert store.mark_liveness(T0 + timedelta(seconds=40)) == [
        ("eu1-a", "live", "stale")
    ]
    assert store.mark_liveness(T0 + timedelta(seconds=41)) == []
    assert store.mark_liveness(T0 + timedelta(seconds=200)) == [
        ("eu1-a", "stale", "offline")
    ]
    later = (T0 + timedelta(seconds=201)).isoformat()
    assert store.update_heartbeat("eu1-a", "draining", 4, [], later)
    (agent,) = store.agents(T0 + timedelta(seconds=202))
    assert agent["liveness"] == "live"
    assert agent["fleet_state"] == "draining"
    assert agent["capacity"]["cpus"] == 15.0


def test_failed_heartbeat_keeps_results_durable(store):
    store.upsert_registration(registration("eu1-a", [], []))
    store._db.execute("PRAGMA query_only = 1")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.update_heartbeat("eu1-a", "serving", 4, [], T0.isoformat())
    store._db.execute("PRAGMA query_only = 0")
    # FULL (2): a result commit after the failed heartbeat still waits for the disk.
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)
    assert store.record_result("job-1", "eu1-a", "eu1", "succeeded", {}, b"{}")


def test_old_database_gains_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE agents (agent_id TEXT PRIMARY KEY, site TEXT NOT NULL,"
            " public_key TEXT NOT NULL, version TEXT NOT NULL,"
            " cpu_cores INTEGER NOT NULL,"
            " memory_bytes INTEGER NOT NULL, gpus TEXT NOT NULL, queues TEXT NOT NULL,"
            " slots INTEGER NOT NULL, state TEXT NOT NULL, free_slots INTEGER NOT NULL,"
            " running_jobs TEXT NOT NULL, registered_at TEXT NOT NULL,"
            " last_seen TEXT NOT NULL)"
        )
        db.execute(
            "INSERT INTO agents VALUES ('eu1-old', 'eu1', 'AAAA', '0.1.0', 8, 1024,"
            " '[]',"
            " '[]', 2, 'serving', 2, '[]', ?, ?)",
            (T0.isoformat(), T0.isoformat()),
        )
    store = Store(path)
    try:
        (agent,) = store.agents(T0)
    finally:
        store.close()
    assert agent["approval"] == "pending"
    assert agent["heartbeat_interval_s"] == 10
    assert agent["capacity"] is None
    assert agent["liveness"] == "live"
    assert agent["fleet_state"] == "serving"


def test_place_finds_fitting_agent(store):
    store.upsert_registration(
        registration("eu1-small", [a100(0, "GPU-s0")], ["GPU-s0"])
    )
    store.upsert_registration(
        registration(
            "eu1-big", [a100(0, "GPU-b0"), a100(1, "GPU-b1")], ["GPU-b0", "GPU-b1"]
        )
    )
    for agent_id in ("eu1-small", "eu1-big"):
        store.set_approval(agent_id, "approved")
    offers = offers_for_queue(store.agents(T0), QUEUE)

    placement = place(job(gpus=2).resources, offers)
    assert [offer.agent_id for offer in placement.fitting] == ["eu1-big"]
    assert placement.largest_missing == ()
    message = give_up_message(job(gpus=2), QUEUE, MAX_REQUEUE_ROUNDS, placement)
    assert "agents eu1-big" in message


def test_offline_and_unapproved_agents_do_not_fit(store):
    store.upsert_registration(registration("eu1-gone", [a100(0, "GPU-g0")], ["GPU-g0"]))
    store.upsert_registration(registration("eu1-new", [a100(0, "GPU-n0")], ["GPU-n0"]))
    store.set_approval("eu1-gone", "approved")
    offers = offers_for_queue(store.agents(T0 + timedelta(hours=1)), QUEUE)

    assert [offer.agent_id for offer in offers] == ["eu1-gone"]
    placement = place(job(gpus=1).resources, offers)
    assert placement.fitting == ()
    assert placement.largest.agent_id == "eu1-gone"
    message = unschedulable_message(job(gpus=1), QUEUE, placement)
    assert "(offline)" in message
    assert "short of: it is offline" in message


def test_largest_offer_named_with_shortfall(store):
    reserved_gpu = [a100(0, "GPU-r0"), a100(1, "GPU-r1")]
    store.upsert_registration(registration("eu1-two", reserved_gpu, ["GPU-r0"]))
    store.upsert_registration(registration("eu1-none", [], []))
    for agent_id in ("eu1-two", "eu1-none"):
        store.set_approval(agent_id, "approved")
    offers = offers_for_queue(store.agents(T0), QUEUE)

    request = job(gpus=2, gpu_memory_mb=80 * 1024)
    placement = place(request.resources, offers)
    assert placement.fitting == ()
    assert placement.largest.agent_id == "eu1-two"
    message = unschedulable_message(request, QUEUE, placement)
    assert message.startswith(
        "job job-1 requests cpus=1, memory_mb=1024, gpus=2 (gpu_memory_mb=81920)"
    )
    assert "largest offer seen is agent eu1-two of site eu1 (serving)" in message
    assert "gpus=1 (1 NVIDIA A100-SXM4-40GB)" in message
    assert "gpus 2 > 0 matching >= 81920 MiB" in message


def test_no_agent_for_queue_named():
    placement = place(job().resources, [])
    message = unschedulable_message(job(), QUEUE, placement)
    assert f"no approved agent serving {QUEUE} has registered" in message


def test_requeue_delay_grows_and_caps():
    assert [requeue_delay_s(rounds) for rounds in range(3)] == [5.0, 10.0, 20.0]
    assert requeue_delay_s(20) == 300.0


def test_agents_table_groups_gpus(store):
    mig = GpuInfo(
        index=1,
        uuid="GPU-m1",
        name="NVIDIA A100-SXM4-40GB",
        mig_enabled=True,
        mig_devices=[
            MigDeviceInfo(
                index=0, uuid="MIG-a", name="NVIDIA A100-SXM4-40GB MIG 1g.5gb"
            ),
            MigDeviceInfo(
                index=1, uuid="MIG-b", name="NVIDIA A100-SXM4-40GB MIG 1g.5gb"
            ),
        ],
    )
    offered = ["GPU-t0", "MIG-a", "MIG-b"]
    store.upsert_registration(
        registration(
            "eu1-t",
            [a100(0, "GPU-t0"), mig],
            offered,
            free={"cpus": 3.5, "memory_bytes": 20 * GIB, "gpus": ["MIG-b"], "slots": 1},
        )
    )
    (agent,) = store.agents(T0)
    assert gpus_by_model(agent) == {
        "NVIDIA A100-SXM4-40GB": {"free": 0, "total": 1},
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb": {"free": 1, "total": 2},
    }
    header, row = format_agents([agent]).splitlines()
    assert "CORES FREE/TOTAL" in header
    assert "3.5/15" in row
    assert "20.0/60.0 GiB" in row
    assert "0/1 NVIDIA A100-SXM4-40GB, 1/2 NVIDIA A100-SXM4-40GB MIG 1g.5gb" in row


@pytest.mark.parametrize(
    "queue, gpus, error",
    [
        pytest.param(
            "cpu", 1, "requests gpus = 1 in resource class 'cpu'", id="gpu-in-cpu"
        ),
        pytest.param(
            "gpu-large", 0, "names GPU resource class 'gpu-large'", id="cpu-in-gpu"
        ),
        pytest.param("gpu", 2, None, id="gpu"),
        pytest.param("cpu", 0, None, id="cpu"),
        pytest.param("bigmem", 0, None, id="other-class"),
    ],
)
def test_job_file_resource_class(tmp_path, queue, gpus, error):
    (tmp_path / "job.toml").write_text(
        f'competition = "higgs"\nqueue = "{queue}"\nsubmission_id = "s1"\n'
        f'image = "localhost/x:1"\ncommand = ["true"]\n[resources]\ngpus = {gpus}\n'
    )
    if error is None:
        assert load_job_file(tmp_path / "job.toml").resources.gpus == gpus
    else:
        with pytest.raises(ConfigError, match=error):
            load_job_file(tmp_path / "job.toml")
