"""Admission and GPU assignment, with GPUs from the probe through a pynvml stand-in."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from datetime import UTC, datetime, timedelta

import pynvml
import pytest

from fairu.agent.admission import Admission, Verdict, build_offer, cdi_device_name
from fairu.agent.config import ResourcesSection
from fairu.agent.probe import probe_capacity
from fairu.protocol.models import JobSpec, Resources

GIB = 2**30


@pytest.fixture
def four_gpus(fake_nvml, fake_gpu, fake_mig_device):
    """Two A100 40GB, one H100 80GB, and one A100 in MIG mode with two MIG devices."""
    return fake_nvml(
        [
            fake_gpu("GPU-a0"),
            fake_gpu("GPU-a1"),
            fake_gpu(
                "GPU-h2",
                name="NVIDIA H100 80GB HBM3",
                memory_total=80 * GIB,
                compute_capability=(9, 0),
            ),
            fake_gpu(
                "GPU-m3",
                mig_mode=(pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE),
                mig_devices={
                    0: fake_mig_device("MIG-m3-0", memory_total=5 * GIB),
                    1: fake_mig_device(
                        "MIG-m3-1",
                        name="NVIDIA A100-SXM4-40GB MIG 3g.20gb",
                        memory_total=20 * GIB,
                    ),
                },
            ),
        ]
    )


def make_admission(nvml, slots=8, **reserve) -> Admission:
    capacity = probe_capacity(None, nvml)
    capacity = type(capacity)(
        cpu_cores=16,
        usable_cpus=16.0,
        memory_bytes=64 * GIB,
        memory_available_bytes=60 * GIB,
        gpus=capacity.gpus,
    )
    return Admission(build_offer(capacity, slots, ResourcesSection(**reserve)))


def test_offer_units_and_reservations(four_gpus, caplog):
    with caplog.at_level(logging.INFO, logger="fairu.agent.admission"):
        admission = make_admission(
            four_gpus,
            reserve_cpus=2,
            reserve_memory_mb=4096,
            reserve_gpus=[1, "MIG-m3-0", "GPU-zz"],
        )
    offer = admission.offer
    assert offer.cpus == 14.0
    assert offer.memory_bytes == 60 * GIB
    assert [unit.uuid for unit in offer.units] == ["GPU-a0", "GPU-h2", "MIG-m3-1"]
    assert "'GPU-zz', which matches no GPU" in caplog.text


def test_mig_reserved_by_indices(four_gpus):
    admission = make_admission(four_gpus, reserve_gpus=["3:1", "0"])
    assert [unit.uuid for unit in admission.offer.units] == [
        "GPU-a1",
        "GPU-h2",
        "MIG-m3-0",
    ]


@pytest.mark.parametrize(
    "request_fields, missing",
    [
        pytest.param({"cpus": 32.0}, "cpus 32 > 16", id="cpus"),
        pytest.param(
            {"memory_mb": 128 * 1024}, "memory_mb 131072 > 65536", id="memory"
        ),
        pytest.param({"gpus": 6}, "gpus 6 > 5 available", id="gpu-count"),
        pytest.param(
            {"gpus": 2, "gpu_model": "H100"},
            "gpus 2 > 1 matching model 'H100'",
            id="model",
        ),
        pytest.param(
            {"gpus": 1, "gpu_memory_mb": 100 * 1024},
            "gpus 1 > 0 matching >= 102400 MiB",
            id="gpu-memory",
        ),
    ],
)
def test_never_fits_names_shortfall(four_gpus, request_fields, missing):
    admission = make_admission(four_gpus)
    decision = admission.decide("job-1", Resources(**request_fields))
    assert decision.verdict is Verdict.NEVER
    assert decision.grant is None
    assert missing in decision.missing
    assert admission.running == 0


def test_smallest_matching_units_given(four_gpus):
    admission = make_admission(four_gpus)
    small = admission.decide("small", Resources(gpus=1))
    assert [unit.uuid for unit in small.grant.units] == ["MIG-m3-0"]
    large = admission.decide("large", Resources(gpus=1, gpu_memory_mb=60 * 1024))
    assert [unit.uuid for unit in large.grant.units] == ["GPU-h2"]
    model = admission.decide("model", Resources(gpus=2, gpu_model="a100-sxm4-40gb"))
    assert [unit.uuid for unit in model.grant.units] == ["MIG-m3-1", "GPU-a0"]
    assert [unit.uuid for unit in admission.free_units()] == ["GPU-a1"]


def test_busy_until_released(four_gpus):
    admission = make_admission(four_gpus)
    first = admission.decide("first", Resources(gpus=1, gpu_model="H100"))
    assert first.verdict is Verdict.START

    second = admission.decide("second", Resources(gpus=1, gpu_model="H100"))
    assert second.verdict is Verdict.BUSY
    assert second.missing == ("gpus 1 > 0 matching model 'H100'",)

    admission.release("first")
    third = admission.decide("third", Resources(gpus=1, gpu_model="H100"))
    assert third.verdict is Verdict.START
    assert [unit.uuid for unit in third.grant.units] == ["GPU-h2"]


def test_slots_cap_concurrent_jobs(four_gpus):
    admission = make_admission(four_gpus, slots=2)
    assert admission.decide("a", Resources()).verdict is Verdict.START
    assert admission.decide("b", Resources()).verdict is Verdict.START
    third = admission.decide("c", Resources())
    assert third.verdict is Verdict.BUSY
    assert third.missing == ("slots 1 > 0 free of 2",)


def test_fractional_cpus_add_up(fake_nvml):
    admission = make_admission(fake_nvml([]), slots=200)
    for index in range(160):
        decision = admission.decide(f"job-{index}", Resources(cpus=0.1, memory_mb=1))
        assert decision.verdict is Verdict.START, (index, decision.missing)
    assert admission.decide("one-more", Resources(cpus=0.1, memory_mb=1)).verdict is (
        Verdict.BUSY
    )


def test_startable_follows_free_gpus(four_gpus):
    admission = make_admission(four_gpus, slots=8)
    assert admission.startable(needs_gpu=False) == 8
    assert admission.startable(needs_gpu=True) == 5
    admission.decide("big", Resources(gpus=4))
    assert admission.startable(needs_gpu=True) == 1
    assert admission.startable(needs_gpu=False) == 7
    admission.decide("cpu-hog", Resources(cpus=15))
    assert admission.startable(needs_gpu=False) == 0


def test_free_amounts(four_gpus):
    admission = make_admission(four_gpus)
    admission.decide("j", Resources(cpus=1.5, memory_mb=2048, gpus=1, gpu_model="H100"))
    free = admission.free()
    assert free.cpus == 14.5
    assert free.memory_bytes == 62 * GIB
    assert free.gpus == ["GPU-a0", "GPU-a1", "MIG-m3-0", "MIG-m3-1"]
    assert free.slots == 7


def test_cdi_names(four_gpus):
    admission = make_admission(four_gpus)
    units = {unit.uuid: unit for unit in admission.offer.units}
    by_index = ResourcesSection()
    by_uuid = ResourcesSection(cdi_device_names="uuid")
    assert cdi_device_name(units["GPU-h2"], by_index) == "nvidia.com/gpu=2"
    assert cdi_device_name(units["MIG-m3-1"], by_index) == "nvidia.com/gpu=3:1"
    assert cdi_device_name(units["GPU-h2"], by_uuid) == "nvidia.com/gpu=GPU-h2"
    assert cdi_device_name(units["MIG-m3-1"], by_uuid) == "nvidia.com/gpu=MIG-m3-1"


async def test_concurrent_jobs_share_no_gpu(four_gpus):
    admission = make_admission(four_gpus, slots=6)
    released = asyncio.Event()
    admission.add_listener(released.set)
    in_use: dict[str, str] = {}
    started: list[str] = []
    crashed: list[str] = []
    rng = random.Random(7)

    async def job(index: int) -> None:
        job_id = f"job-{index}"
        request = Resources(cpus=1, memory_mb=512, gpus=rng.choice([1, 1, 2, 3]))
        while True:
            decision = admission.decide(job_id, request)
            assert decision.verdict is not Verdict.NEVER
            if decision.verdict is Verdict.START:
                break
            released.clear()
            await released.wait()
        try:
            for unit in decision.grant.units:
                assert unit.uuid not in in_use, (
                    f"{unit.uuid} given to {in_use.get(unit.uuid)}"
                )
                in_use[unit.uuid] = job_id
            assert len(decision.grant.units) == request.gpus
            started.append(job_id)
            await asyncio.sleep(rng.uniform(0, 0.01))
            if index % 3 == 0:
                crashed.append(job_id)
                raise RuntimeError(f"{job_id} crashed")
        finally:
            for unit in decision.grant.units:
                del in_use[unit.uuid]
            admission.release(job_id)

    outcomes = await asyncio.wait_for(
        asyncio.gather(*(job(index) for index in range(40)), return_exceptions=True), 30
    )

    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert all(isinstance(error, RuntimeError) for error in errors), errors
    assert len(errors) == len(crashed) == 14
    assert len(started) == 40
    assert in_use == {}
    assert admission.running == 0
    assert len(admission.free_units()) == 5
    assert admission.free_slots() == 6
    assert admission.free_cpus() == 16.0


def test_job_without_gpu_conditions_serializes_as_before():
    now = datetime.now(UTC)
    fields = {
        "job_id": "job-1",
        "competition": "higgs",
        "queue": "cpu",
        "submission_id": "s",
        "image": "localhost/x:1",
        "command": ["true"],
        "created_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    plain = json.loads(JobSpec(**fields).model_dump_json())
    assert set(plain["resources"]) == {"cpus", "memory_mb", "gpus", "walltime_s"}

    conditioned = JobSpec(**fields, resources=Resources(gpus=1, gpu_model="A100"))
    data = json.loads(conditioned.model_dump_json())
    assert data["resources"]["gpu_model"] == "A100"
    assert "gpu_memory_mb" not in data["resources"]
    assert JobSpec.model_validate_json(conditioned.model_dump_json()) == conditioned
