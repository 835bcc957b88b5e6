"""The capacity probe: GPUs through a stand-in for pynvml, cgroup limits from text."""

from __future__ import annotations

import ctypes.util
import logging

import pynvml
import pytest

from fairu.agent import probe
from fairu.agent.probe import (
    describe_capacity,
    parse_cfs_quota,
    parse_cpu_max,
    parse_memory_limit,
    probe_capacity,
    probe_gpus,
)

# Every error code pynvml maps to its own exception class.
ALL_CODES = sorted(pynvml.NVMLError._valClassMapping)
# Codes that mean "this field is not available here" rather than "the device failed".
FIELD_ABSENT_CODES = {
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NO_PERMISSION,
}


def code_id(code: int) -> str:
    return pynvml.NVMLError._valClassMapping[code].__name__.removeprefix("NVMLError_")


def test_several_gpus_reported(fake_nvml, fake_gpu):
    nvml = fake_nvml(
        [
            fake_gpu("GPU-aaaa", name="NVIDIA A100-SXM4-40GB"),
            fake_gpu(
                "GPU-bbbb",
                name="NVIDIA H100 80GB HBM3",
                memory_total=80 * 2**30,
                memory_free=70 * 2**30,
                compute_capability=(9, 0),
            ),
        ]
    )
    report = probe_gpus(nvml)

    assert [gpu.index for gpu in report.gpus] == [0, 1]
    assert [gpu.uuid for gpu in report.gpus] == ["GPU-aaaa", "GPU-bbbb"]
    second = report.gpus[1]
    assert second.name == "NVIDIA H100 80GB HBM3"
    assert second.memory_total_bytes == 80 * 2**30
    assert second.memory_free_bytes == 70 * 2**30
    assert second.compute_capability == "9.0"
    assert second.mig_enabled is False
    assert second.mig_devices == []
    assert report.driver_version == "550.54.15"
    assert report.cuda_version == "12.4"
    assert nvml.initialized == 0


def test_mig_devices_listed(fake_nvml, fake_gpu, fake_mig_device):
    gpu = fake_gpu(
        "GPU-mig0",
        mig_mode=(pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE),
        mig_devices={
            0: fake_mig_device("MIG-1111", gpu_instance_id=7, compute_instance_id=0),
            # Slots 1 and 2 hold no MIG device, so NVML raises "Not Found" for them.
            3: fake_mig_device(
                "MIG-2222",
                name="NVIDIA A100-SXM4-40GB MIG 3g.20gb",
                memory_total=20 * 2**30,
                gpu_instance_id=2,
            ),
        },
    )
    report = probe_gpus(fake_nvml([gpu]))

    (probed,) = report.gpus
    assert probed.mig_enabled is True
    assert [device.index for device in probed.mig_devices] == [0, 3]
    assert [device.uuid for device in probed.mig_devices] == ["MIG-1111", "MIG-2222"]
    assert probed.mig_devices[0].gpu_instance_id == 7
    assert probed.mig_devices[0].compute_instance_id == 0
    assert probed.mig_devices[1].name == "NVIDIA A100-SXM4-40GB MIG 3g.20gb"
    assert probed.mig_devices[1].memory_total_bytes == 20 * 2**30


def test_mig_pending_is_not_enabled(fake_nvml, fake_gpu, fake_mig_device):
    # Enabling MIG takes effect after a GPU reset, so only the current mode counts.
    gpu = fake_gpu(
        "GPU-pend",
        mig_mode=(pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE),
        mig_devices={0: fake_mig_device("MIG-3333")},
    )
    (probed,) = probe_gpus(fake_nvml([gpu])).gpus
    assert probed.mig_enabled is False
    assert probed.mig_devices == []


def test_unsupported_fields_left_out(fake_nvml, fake_gpu):
    gpu = fake_gpu(
        "GPU-old",
        name="Tesla K80",
        mig_mode=None,
        errors={
            "nvmlDeviceGetMemoryInfo": pynvml.NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetCudaComputeCapability": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        },
    )
    nvml = fake_nvml(
        [gpu],
        errors={"nvmlSystemGetCudaDriverVersion": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND},
    )
    report = probe_gpus(nvml)

    (probed,) = report.gpus
    assert probed.uuid == "GPU-old"
    assert probed.name == "Tesla K80"
    assert probed.memory_total_bytes is None
    assert probed.memory_free_bytes is None
    assert probed.compute_capability is None
    assert probed.mig_enabled is None
    assert report.cuda_version is None
    assert report.driver_version == "550.54.15"


def test_unsupported_mig_fields_left_out(fake_nvml, fake_gpu, fake_mig_device):
    device = fake_mig_device(
        "MIG-4444",
        errors={
            "nvmlDeviceGetGpuInstanceId": pynvml.NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetComputeInstanceId": pynvml.NVML_ERROR_NO_PERMISSION,
            "nvmlDeviceGetMemoryInfo": pynvml.NVML_ERROR_NOT_SUPPORTED,
        },
    )
    gpu = fake_gpu("GPU-mig1", mig_mode=(1, 1), mig_devices={0: device})
    (probed,) = probe_gpus(fake_nvml([gpu])).gpus
    (mig,) = probed.mig_devices
    assert mig.uuid == "MIG-4444"
    assert mig.gpu_instance_id is None
    assert mig.compute_instance_id is None
    assert mig.memory_total_bytes is None


@pytest.mark.parametrize("code", ALL_CODES, ids=code_id)
def test_init_error_gives_no_gpus(code, fake_nvml, fake_gpu, caplog):
    nvml = fake_nvml([fake_gpu("GPU-x")], errors={"nvmlInit": code})
    with caplog.at_level(logging.DEBUG, logger="fairu.agent.probe"):
        report = probe_gpus(nvml)
    assert report.gpus == []
    assert report.driver_version is None
    assert len(caplog.records) == 1
    assert "NVML is not available" in caplog.records[0].getMessage()


@pytest.mark.parametrize("code", ALL_CODES, ids=code_id)
def test_count_error_gives_no_gpus(code, fake_nvml, fake_gpu, caplog):
    nvml = fake_nvml([fake_gpu("GPU-x")], errors={"nvmlDeviceGetCount": code})
    with caplog.at_level(logging.INFO, logger="fairu.agent.probe"):
        report = probe_gpus(nvml)
    assert report.gpus == []
    assert len(caplog.records) == 1
    assert "failed to count" in caplog.records[0].getMessage()
    assert nvml.initialized == 0


@pytest.mark.parametrize("code", ALL_CODES, ids=code_id)
def test_device_error_leaves_device_out(code, fake_nvml, fake_gpu, caplog):
    broken = fake_gpu("GPU-bad", errors={"nvmlDeviceGetHandleByIndex": code})
    nvml = fake_nvml([fake_gpu("GPU-ok0"), broken, fake_gpu("GPU-ok2")])
    with caplog.at_level(logging.INFO, logger="fairu.agent.probe"):
        report = probe_gpus(nvml)
    assert [gpu.uuid for gpu in report.gpus] == ["GPU-ok0", "GPU-ok2"]
    assert [gpu.index for gpu in report.gpus] == [0, 2]
    assert "GPU 1 left out" in caplog.text


@pytest.mark.parametrize("code", ALL_CODES, ids=code_id)
def test_field_error_by_kind(code, fake_nvml, fake_gpu):
    gpu = fake_gpu("GPU-f", errors={"nvmlDeviceGetMemoryInfo": code})
    report = probe_gpus(fake_nvml([gpu, fake_gpu("GPU-g")]))
    uuids = [probed.uuid for probed in report.gpus]
    if code in FIELD_ABSENT_CODES:
        assert uuids == ["GPU-f", "GPU-g"]
        assert report.gpus[0].memory_total_bytes is None
    else:
        assert uuids == ["GPU-g"]


@pytest.mark.parametrize("code", ALL_CODES, ids=code_id)
def test_mig_device_error_leaves_it_out(code, fake_nvml, fake_gpu, fake_mig_device):
    gpu = fake_gpu(
        "GPU-m",
        mig_mode=(1, 1),
        mig_devices={
            0: fake_mig_device("MIG-bad", errors={"nvmlDeviceGetUUID": code}),
            1: fake_mig_device("MIG-good"),
        },
    )
    (probed,) = probe_gpus(fake_nvml([gpu])).gpus
    assert [device.uuid for device in probed.mig_devices] == ["MIG-good"]


def test_shutdown_error_is_not_fatal(fake_nvml, fake_gpu):
    nvml = fake_nvml(
        [fake_gpu("GPU-s")], errors={"nvmlShutdown": pynvml.NVML_ERROR_UNINITIALIZED}
    )
    assert [gpu.uuid for gpu in probe_gpus(nvml).gpus] == ["GPU-s"]


def test_no_gpus_logs_once(fake_nvml, caplog):
    with caplog.at_level(logging.INFO, logger="fairu.agent.probe"):
        report = probe_gpus(fake_nvml([]))
    assert report.gpus == []
    assert [r.getMessage() for r in caplog.records] == [
        "no GPUs reported: NVML found none"
    ]


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="this host has NVML"
)
def test_real_pynvml_without_driver(caplog):
    with caplog.at_level(logging.INFO, logger="fairu.agent.probe"):
        report = probe_gpus()
    assert report.gpus == []
    assert len(caplog.records) == 1


def test_capacity_of_this_host(tmp_path, fake_nvml, fake_gpu):
    capacity = probe_capacity(tmp_path, fake_nvml([fake_gpu("GPU-h")]))
    assert capacity.cpu_cores >= 1
    assert 0 < capacity.usable_cpus <= capacity.cpu_cores
    assert capacity.memory_bytes > 0
    assert 0 < capacity.memory_available_bytes <= capacity.memory_bytes
    assert capacity.scratch_free_bytes is not None
    assert capacity.scratch_free_bytes > 0
    assert [gpu.uuid for gpu in capacity.gpus] == ["GPU-h"]
    text = describe_capacity(capacity)
    assert "GPU-h" in text
    assert "12.4" in text


@pytest.mark.parametrize(
    "text, cores",
    [
        pytest.param("max 100000\n", None, id="unlimited"),
        pytest.param("150000 100000\n", 1.5, id="one-and-a-half"),
        pytest.param("200000 50000", 4.0, id="short-period"),
    ],
)
def test_parse_cpu_max(text, cores):
    assert parse_cpu_max(text) == cores


def test_parse_cfs_quota():
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("50000\n", "100000\n") == 0.5


@pytest.mark.parametrize(
    "text, limit",
    [
        pytest.param("max\n", None, id="v2-unlimited"),
        pytest.param("9223372036854771712\n", None, id="v1-unlimited"),
        pytest.param("2147483648\n", 2**31, id="two-gib"),
    ],
)
def test_parse_memory_limit(text, limit):
    assert parse_memory_limit(text) == limit


def test_probe_without_nvml_library(monkeypatch, caplog):
    monkeypatch.setattr(probe, "NVML_LIBRARY", "libfairu-no-such-library.so.1")
    with caplog.at_level(logging.INFO, logger="fairu.agent.probe"):
        report = probe.probe_gpus()
    assert report.gpus == []
    assert report.driver_version is None
    assert "cannot load libfairu-no-such-library.so.1" in caplog.text
