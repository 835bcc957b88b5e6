"""Fixtures shared by all tests.

The podman fixtures fail, never skip, when the API service or the image is missing,
so that a CI machine without them cannot pass.
"""

from __future__ import annotations

import os
import pwd
import types
from dataclasses import dataclass, field
from typing import Any

import podman
import pynvml
import pytest
from podman.errors import APIError

# The rootless user whose podman API service scripts/setup-host.sh starts.
PODMAN_USER = "fairu"
EXAMPLE_IMAGE = "localhost/fairu-python:1"
SETUP_FIX = "run scripts/setup-host.sh as root"


@pytest.fixture(scope="session")
def podman_socket() -> str:
    """URL of the podman API socket: $FAIRU_PODMAN_SOCKET, else user fairu's socket."""
    url = os.environ.get("FAIRU_PODMAN_SOCKET")
    if not url:
        try:
            uid = pwd.getpwnam(PODMAN_USER).pw_uid
        except KeyError:
            pytest.fail(f"user {PODMAN_USER} not found; {SETUP_FIX}", pytrace=False)
        url = f"unix:///run/user/{uid}/podman/podman.sock"
    with podman.PodmanClient(base_url=url, timeout=10) as client:
        try:
            answered = client.ping()
        except APIError as error:
            pytest.fail(
                f"the podman API service at {url} is not answering "
                f"({error.__cause__ or error}); {SETUP_FIX}",
                pytrace=False,
            )
    if not answered:
        pytest.fail(
            f"the podman API service at {url} failed _ping; {SETUP_FIX}", pytrace=False
        )
    return url


@pytest.fixture(scope="session")
def image(podman_socket: str) -> str:
    """Name of the example image, checked to exist in the podman service's store."""
    with podman.PodmanClient(base_url=podman_socket, timeout=10) as client:
        if not client.images.exists(EXAMPLE_IMAGE):
            pytest.fail(
                f"image {EXAMPLE_IMAGE} not found at {podman_socket}; {SETUP_FIX} "
                "(it runs scripts/build-image.sh)",
                pytrace=False,
            )
    return EXAMPLE_IMAGE


# --- the NVML boundary --------------------------------------------------------------
#
# The one fake in the suite: a stand-in for the pynvml module with its real API shape.
# Its errors are pynvml's own classes, raised as pynvml raises them
# (`NVMLError(code)` returns the subclass for the code), and memory info is pynvml's
# own ctypes struct.


@dataclass
class FakeMigDevice:
    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    memory_total: int = 5 * 2**30
    memory_free: int = 5 * 2**30
    gpu_instance_id: int = 1
    compute_instance_id: int = 0
    # NVML function name to the NVML_ERROR_* code it returns for this device.
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB"
    memory_total: int = 40 * 2**30
    memory_free: int = 39 * 2**30
    compute_capability: tuple[int, int] = (8, 0)
    mig_mode: tuple[int, int] | None = (0, 0)
    # MIG slot index to device; NVML raises NVML_ERROR_NOT_FOUND for other slots.
    mig_devices: dict[int, FakeMigDevice] = field(default_factory=dict)
    max_mig_devices: int = 7
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Handle:
    device: FakeGpu | FakeMigDevice


class FakeNvml(types.ModuleType):
    """A pynvml stand-in serving the listed GPUs; `errors` fails whole calls."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver_version: str = "550.54.15",
        cuda_version: int = 12040,
        errors: dict[str, int] | None = None,
    ) -> None:
        super().__init__("pynvml")
        for name in dir(pynvml):
            if name.startswith(("NVMLError", "NVML_")):
                setattr(self, name, getattr(pynvml, name))
        self.gpus = gpus
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.errors = dict(errors or {})
        self.initialized = 0

    def _check(self, call: str, device: FakeGpu | FakeMigDevice | None = None) -> None:
        code = self.errors.get(call)
        if code is None and device is not None:
            code = device.errors.get(call)
        if code is not None:
            raise pynvml.NVMLError(code)
        if call != "nvmlInit" and self.initialized <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self._check("nvmlInit")
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check("nvmlSystemGetCudaDriverVersion")
        return self.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._check("nvmlDeviceGetHandleByIndex", self.gpus[index])
        return _Handle(self.gpus[index])

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._check("nvmlDeviceGetUUID", handle.device)
        return handle.device.uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        self._check("nvmlDeviceGetName", handle.device)
        return handle.device.name

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> Any:
        self._check("nvmlDeviceGetMemoryInfo", handle.device)
        memory = pynvml.c_nvmlMemory_t()
        memory.total = handle.device.memory_total
        memory.free = handle.device.memory_free
        memory.used = handle.device.memory_total - handle.device.memory_free
        return memory

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        self._check("nvmlDeviceGetCudaComputeCapability", handle.device)
        assert isinstance(handle.device, FakeGpu)
        return handle.device.compute_capability

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        self._check("nvmlDeviceGetMigMode", handle.device)
        assert isinstance(handle.device, FakeGpu)
        if handle.device.mig_mode is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return list(handle.device.mig_mode)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetMaxMigDeviceCount", handle.device)
        assert isinstance(handle.device, FakeGpu)
        return handle.device.max_mig_devices

    def nvmlDeviceGetMigDeviceHandleByIndex(
        self, handle: _Handle, index: int
    ) -> _Handle:
        self._check("nvmlDeviceGetMigDeviceHandleByIndex", handle.device)
        assert isinstance(handle.device, FakeGpu)
        device = handle.device.mig_devices.get(index)
        if device is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return _Handle(device)

    def nvmlDeviceGetGpuInstanceId(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetGpuInstanceId", handle.device)
        assert isinstance(handle.device, FakeMigDevice)
        return handle.device.gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetComputeInstanceId", handle.device)
        assert isinstance(handle.device, FakeMigDevice)
        return handle.device.compute_instance_id


@pytest.fixture
def fake_nvml() -> type[FakeNvml]:
    return FakeNvml


@pytest.fixture
def fake_gpu() -> type[FakeGpu]:
    return FakeGpu


@pytest.fixture
def fake_mig_device() -> type[FakeMigDevice]:
    return FakeMigDevice
