"""PodmanRunner against the real rootless podman service from scripts/setup-host.sh."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import podman
import pytest
from podman.domain.containers_manager import ContainersManager

from fairu.runners import (
    ContainerError,
    Mount,
    PodmanRunner,
    PodmanSettings,
    RunnerUnavailable,
    RunSpec,
)

pytestmark = pytest.mark.podman

# Bind-mount sources must be searchable by the rootless podman user, and pytest's
# tmp_path lies under a 0700 folder of root.
WORK_BASE = Path(os.environ.get("FAIRU_TEST_WORK", "/var/tmp/fairu-tests"))
LOG_CAP = 64 * 1024
EPERM = 1
EROFS = 30


@pytest.fixture
def run_dir() -> Iterator[Path]:
    root = WORK_BASE / f"podman-{uuid.uuid4().hex[:8]}"
    (root / "output").mkdir(parents=True)
    (root / "inputs").mkdir()
    for folder in (WORK_BASE, root, root / "inputs"):
        folder.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def settings(podman_socket: str) -> PodmanSettings:
    return PodmanSettings(
        socket_url=podman_socket, log_cap_bytes=LOG_CAP, poll_interval_s=0.2
    )


@pytest.fixture
async def runner(settings: PodmanSettings) -> AsyncIterator[PodmanRunner]:
    podman_runner = PodmanRunner(settings)
    yield podman_runner
    await podman_runner.close()


@pytest.fixture
def client(podman_socket: str) -> Iterator[podman.PodmanClient]:
    with podman.PodmanClient(base_url=podman_socket, timeout=60) as podman_client:
        yield podman_client


def make_spec(run_dir: Path, image: str, command: list[str], **overrides) -> RunSpec:
    job_id = overrides.pop("job_id", f"test-{uuid.uuid4().hex[:8]}")
    values = {
        "job_id": job_id,
        "image": image,
        "command": command,
        "env": {},
        "mounts": [],
        "output_dir": run_dir / "output",
        "walltime_s": 60.0,
        "labels": {"fairu.job_id": job_id, "fairu.agent_id": f"agent-{job_id}"},
        "memory_mb": 512,
    }
    values.update(overrides)
    return RunSpec(**values)


def containers_of_job(client: podman.PodmanClient, job_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"fairu.job_id={job_id}"})


def python(code: str) -> list[str]:
    return ["python3", "-c", code]


async def test_run_writes_scores_and_log(runner, client, run_dir, image):
    code = (
        "import json\n"
        "json.dump({'accuracy': 0.75}, open('/output/scores.json', 'w'))\n"
        "print('scored 0.75')\n"
    )
    spec = make_spec(run_dir, image, python(code))

    outcome = await runner.run(spec)

    assert outcome.exit_code == 0
    assert not outcome.timed_out
    assert outcome.log_tail == "scored 0.75\n"
    assert not outcome.log_truncated
    assert outcome.run_s > 0
    assert json.loads((run_dir / "output" / "scores.json").read_text()) == {
        "accuracy": 0.75
    }
    assert containers_of_job(client, spec.job_id) == []


async def test_run_reports_nonzero_exit(runner, client, run_dir, image):
    spec = make_spec(
        run_dir, image, python("import sys; print('failing'); sys.exit(3)")
    )

    outcome = await runner.run(spec)

    assert outcome.exit_code == 3
    assert not outcome.timed_out
    assert "failing" in outcome.log_tail
    assert containers_of_job(client, spec.job_id) == []


async def test_run_kills_container_after_walltime(runner, client, run_dir, image):
    code = "import time; print('sleeping', flush=True); time.sleep(30)"
    spec = make_spec(run_dir, image, python(code), walltime_s=2.0)

    started = time.monotonic()
    outcome = await runner.run(spec)
    elapsed = time.monotonic() - started

    assert outcome.timed_out
    assert outcome.exit_code is None
    assert 2.0 <= outcome.run_s < 10.0
    assert elapsed < 20.0
    assert "sleeping" in outcome.log_tail
    assert containers_of_job(client, spec.job_id) == []


async def test_run_keeps_tail_of_log_flood(runner, client, run_dir, image):
    # 300,000 lines of 12 bytes: 3.6 MB, far more than the 64 KiB cap.
    code = "import sys\nfor i in range(300000): sys.stdout.write('line %06d\\n' % i)\n"
    spec = make_spec(run_dir, image, python(code))

    outcome = await runner.run(spec)

    assert outcome.exit_code == 0
    assert outcome.log_truncated
    marker, _, kept_log = outcome.log_tail.partition("\n")
    assert marker == f"[fairu: {300_000 * 12 - LOG_CAP} earlier bytes of log dropped]"
    assert len(kept_log.encode()) == LOG_CAP
    assert kept_log.endswith("line 299998\nline 299999\n")
    assert containers_of_job(client, spec.job_id) == []


async def test_run_keeps_long_lines_intact(runner, run_dir, image):
    # Lines of 20,001 bytes, longer than conmon's 8 KiB buffer, reach the log in pieces.
    code = "for i in range(10): print(str(i) * 20000)\n"
    spec = make_spec(run_dir, image, python(code))

    outcome = await runner.run(spec)

    assert outcome.log_truncated
    marker, _, kept_log = outcome.log_tail.partition("\n")
    assert marker == f"[fairu: {10 * 20_001 - LOG_CAP} earlier bytes of log dropped]"
    assert len(kept_log.encode()) == LOG_CAP
    assert kept_log.endswith("8" * 20000 + "\n" + "9" * 20000 + "\n")


SANDBOX_PROBE = r"""
import ctypes, json, os, resource

def try_write(path):
    try:
        with open(path, "w") as handle:
            handle.write("x")
        return 0
    except OSError as error:
        return error.errno

def unshare_errno(flags):
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.unshare(flags) == 0 else ctypes.get_errno()

with open("/proc/self/status") as handle:
    status = dict(line.split(":\t", 1) for line in handle.read().splitlines())
shm = os.statvfs("/dev/shm")
env_names = ("JOB_SETTING", "HOME", "NVIDIA_VISIBLE_DEVICES")
print(json.dumps({
    "ids": [os.getuid(), os.geteuid(), os.getgid()],
    "etc_write_errno": try_write("/etc/fairu-test"),
    "var_tmp_write_errno": try_write("/var/tmp/fairu-test"),
    "tmp_write_errno": try_write("/tmp/fairu-test"),
    "input_write_errno": try_write("/inputs/data/new-file"),
    "input_text": open("/inputs/data/data.txt").read(),
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "cap_eff": status["CapEff"].strip(),
    "cap_bnd": status["CapBnd"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
    "seccomp": status["Seccomp"].strip(),
    "unshare_user_errno": unshare_errno(0x10000000),
    "shm_bytes": shm.f_blocks * shm.f_frsize,
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    "data": resource.getrlimit(resource.RLIMIT_DATA),
    "cpu": resource.getrlimit(resource.RLIMIT_CPU),
    "cwd": os.getcwd(),
    "env": {name: os.environ.get(name) for name in env_names},
}))
"""


async def test_run_confines_container(runner, run_dir, image):
    data_dir = run_dir / "inputs" / "data"
    data_dir.mkdir(mode=0o755)
    (data_dir / "data.txt").write_text("input bytes")
    data_dir.chmod(0o755)
    (data_dir / "data.txt").chmod(0o644)
    spec = make_spec(
        run_dir,
        image,
        python(SANDBOX_PROBE),
        mounts=[Mount(source=data_dir, target="/inputs/data")],
        env={"JOB_SETTING": "on"},
        memory_mb=300,
        cpus=2.0,
        walltime_s=60.0,
    )

    outcome = await runner.run(spec)

    assert outcome.exit_code == 0, outcome.log_tail
    probe = json.loads(outcome.log_tail)
    assert probe["ids"] == [1000, 1000, 1000]
    assert probe["etc_write_errno"] == EROFS
    assert probe["var_tmp_write_errno"] == EROFS
    assert probe["tmp_write_errno"] == 0
    assert probe["input_write_errno"] == EROFS
    assert probe["input_text"] == "input bytes"
    assert probe["interfaces"] == ["lo"]
    assert probe["cap_eff"] == "0000000000000000"
    assert probe["cap_bnd"] == "0000000000000000"
    assert probe["no_new_privs"] == "1"
    # 2 is SECCOMP_MODE_FILTER.
    assert probe["seccomp"] == "2"
    assert probe["unshare_user_errno"] == EPERM
    assert probe["shm_bytes"] == 64 * 1024 * 1024
    assert probe["nofile"] == [1024, 1024]
    assert probe["data"] == [300 * 1024 * 1024, 300 * 1024 * 1024]
    # cpus × walltime_s plus 30 s of grace; the hard limit is one second later.
    assert probe["cpu"] == [150, 151]
    assert probe["cwd"] == "/output"
    assert probe["env"] == {
        "JOB_SETTING": "on",
        "HOME": "/tmp",
        "NVIDIA_VISIBLE_DEVICES": "void",
    }


async def test_run_data_ulimit_bounds_memory(runner, run_dir, image):
    code = (
        "import sys\n"
        "try:\n"
        "    block = bytearray(512 * 1024 * 1024)\n"
        "except MemoryError:\n"
        "    sys.exit(17)\n"
    )
    spec = make_spec(run_dir, image, python(code), memory_mb=256)

    outcome = await runner.run(spec)

    assert outcome.exit_code == 17, outcome.log_tail


async def test_run_fsize_ulimit_bounds_files(podman_socket, run_dir, image):
    settings = PodmanSettings(
        socket_url=podman_socket, ulimits={"fsize": (1024 * 1024, 1024 * 1024)}
    )
    # Python ignores SIGXFSZ, so the write past the limit fails with EFBIG (27).
    code = (
        "import sys\n"
        "try:\n"
        "    open('/output/big', 'wb').write(b'x' * 2 * 1024 * 1024)\n"
        "except OSError as error:\n"
        "    sys.exit(error.errno)\n"
    )
    limited = PodmanRunner(settings)
    try:
        outcome = await limited.run(make_spec(run_dir, image, python(code)))
    finally:
        await limited.close()

    assert outcome.exit_code == 27, outcome.log_tail
    assert (run_dir / "output" / "big").stat().st_size == 1024 * 1024


async def test_run_hands_output_dir_to_job_user(runner, client, run_dir, image):
    spec = make_spec(run_dir, image, python("open('/output/written', 'w').write('ok')"))
    uid_map = client.info()["host"]["idMappings"]["uidmap"]
    # Container UID 1000 falls in the range that starts at container UID 1.
    subordinate = next(entry for entry in uid_map if entry["container_id"] == 1)
    job_uid = subordinate["host_id"] + 1000 - 1

    outcome = await runner.run(spec)

    assert outcome.exit_code == 0, outcome.log_tail
    if os.geteuid() != 0:
        pytest.fail("run this test as root: only root hands the folder over by chown")
    info = spec.output_dir.stat()
    assert info.st_uid == job_uid
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert (spec.output_dir / "written").stat().st_uid == job_uid
    assert (spec.output_dir / "written").read_text() == "ok"


async def test_run_rejects_unsearchable_output_dir(
    runner, settings, client, run_dir, image
):
    if settings.socket_path.stat().st_uid == os.geteuid():
        pytest.fail("run this test as root: the socket must belong to another user")
    locked = run_dir / "locked"
    locked.mkdir(mode=0o700)
    output = locked / "output"
    output.mkdir()
    spec = make_spec(run_dir, image, ["true"], output_dir=output)

    with pytest.raises(
        ContainerError, match=f"directory {locked} is missing or lacks search"
    ):
        await runner.run(spec)

    assert containers_of_job(client, spec.job_id) == []


async def test_missing_image_raises_container_error(runner, client, run_dir):
    spec = make_spec(run_dir, "localhost/fairu-missing:0", ["true"])

    with pytest.raises(
        ContainerError, match="image localhost/fairu-missing:0 not found"
    ) as caught:
        await runner.run(spec)

    assert "scripts/build-image.sh" in str(caught.value)
    assert containers_of_job(client, spec.job_id) == []


async def test_missing_command_exits_nonzero(runner, client, run_dir, image):
    spec = make_spec(run_dir, image, ["/no/such/program"])

    outcome = await runner.run(spec)

    # podman's init (catatonit) starts, then fails to run the command.
    assert outcome.exit_code == 1
    assert "failed to exec pid1: No such file or directory" in outcome.log_tail
    assert containers_of_job(client, spec.job_id) == []


# NOTE: podman-py 5.8 does not close its socket when connecting to the service fails
# (podman/api/uds.py, UDSConnection.connect), so the garbage collector warns about it.
@pytest.mark.filterwarnings("ignore:unclosed <podman.api.uds.UDSSocket:ResourceWarning")
async def test_unreachable_socket_raises_runner_unavailable(run_dir, image):
    socket_path = run_dir / "no-service.sock"
    unreachable = PodmanRunner(PodmanSettings(socket_url=f"unix://{socket_path}"))
    try:
        with pytest.raises(RunnerUnavailable, match="scripts/setup-host.sh") as caught:
            await unreachable.check()
        assert f"socket {socket_path} not found" in str(caught.value)

        with pytest.raises(RunnerUnavailable, match="no-service.sock"):
            await unreachable.run(make_spec(run_dir, image, ["true"]))
    finally:
        await unreachable.close()
    del caught
    # Collect the leaked sockets now, while the warning filter above applies.
    gc.collect()


async def test_remove_labelled_removes_only_that_agent(runner, client, image):
    agent_id = f"agent-{uuid.uuid4().hex[:8]}"
    other_agent_id = f"agent-{uuid.uuid4().hex[:8]}"
    # Rootless slirp4netns networking fails on fairu's hosts, and jobs never use it.
    for index in range(2):
        client.containers.create(
            image,
            ["sleep", "30"],
            labels={"fairu.agent_id": agent_id, "fairu.job_id": f"{agent_id}-{index}"},
            network_mode="none",
            stop_timeout=0,
        ).start()
    other = client.containers.create(
        image, ["true"], labels={"fairu.agent_id": other_agent_id}, network_mode="none"
    )
    try:
        removed = await runner.remove_labelled(agent_id)

        assert removed == 2
        left = client.containers.list(
            all=True, filters={"label": f"fairu.agent_id={agent_id}"}
        )
        assert left == []
        assert client.containers.exists(other.id)
    finally:
        other.remove(force=True)


async def test_cancelled_run_removes_container(runner, client, run_dir, image):
    spec = make_spec(run_dir, image, ["sleep", "30"])
    task = asyncio.create_task(runner.run(spec))
    deadline = time.monotonic() + 30
    # Wait until it runs: a cancel during the create request leaves the removal to a
    # background task, which the next test covers.
    # A listed container's "State" is a plain string such as "running".
    while [c.attrs["State"] for c in containers_of_job(client, spec.job_id)] != [
        "running"
    ]:
        assert time.monotonic() < deadline, "the container never ran"
        await asyncio.sleep(0.1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The container shows up in the list before podman-py's create call returns, so
    # the cancel can still land during the creation. The removal then runs in a
    # cleanup task, which close() waits for.
    await runner.close()

    assert containers_of_job(client, spec.job_id) == []


async def test_run_cancelled_during_create_removes_container(
    runner, client, run_dir, image, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="fairu.runners.podman")
    spec = make_spec(run_dir, image, ["sleep", "30"])
    # The create call waits in its worker thread until the test has cancelled run(),
    # because a create can return within milliseconds.
    entered, release = threading.Event(), threading.Event()
    real_create = ContainersManager.create

    def held_create(self: ContainersManager, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(ContainersManager, "create", held_create)
    task = asyncio.create_task(runner.run(spec))
    assert await asyncio.to_thread(entered.wait, 30)

    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # close() waits for the removal that follows the creation.
    await runner.close()

    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if "created container" in message]
    removals = [message for message in messages if "removed container" in message]
    assert len(removals) == 1
    assert removals[0].startswith(f"job {spec.job_id}: ")
    assert containers_of_job(client, spec.job_id) == []


async def test_run_leaves_event_loop_free(runner, run_dir, image):
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    # Each container stamps its start and end with the host's clock, so the test can
    # tell that the two ran at the same time without timing the runs itself.
    stamp = "date +%s.%N > /output/start && sleep 2 && date +%s.%N > /output/end"
    # The first run reads the host information (0.5 s to 2 s for `GET /info`), which
    # is not what this test looks at.
    await runner.describe_sandbox()
    ticker = asyncio.create_task(tick())
    try:
        specs = []
        for index in range(2):
            job_id = f"loop-{index}-{uuid.uuid4().hex[:6]}"
            output = run_dir / job_id
            output.mkdir()
            specs.append(
                make_spec(
                    run_dir, image, ["/bin/sh", "-c", stamp], job_id=job_id, output_dir=output
                )
            )
        outcomes = await asyncio.gather(*(runner.run(spec) for spec in specs))
    finally:
        ticker.cancel()

    assert [outcome.exit_code for outcome in outcomes] == [0, 0]
    first, second = (
        [float((spec.output_dir / name).read_text()) for name in ("start", "end")]
        for spec in specs
    )
    # The runs overlap: each container started before the other one ended.
    assert first[0] < second[1]
    assert second[0] < first[1]
    # A loop blocked by a podman request for the 2 s of a run would tick a few times
    # at most. A free loop ticks about every 20 ms, even on a loaded machine.
    assert ticks >= 20


async def test_run_cpu_ulimit_ends_spin(podman_socket, run_dir, image):
    settings = PodmanSettings(
        socket_url=podman_socket, poll_interval_s=0.2, ulimits={"cpu": (2, 3)}
    )
    limited = PodmanRunner(settings)
    try:
        outcome = await limited.run(
            make_spec(run_dir, image, python("while True: pass"), walltime_s=30.0)
        )
    finally:
        await limited.close()

    # 152 is 128 + SIGXCPU: the soft limit of 2 CPU seconds ended the spin.
    assert outcome.exit_code == 152, outcome.log_tail
    assert not outcome.timed_out
    assert outcome.run_s < 15.0


async def test_run_kills_container_over_output_cap(podman_socket, run_dir, image):
    settings = PodmanSettings(
        socket_url=podman_socket,
        poll_interval_s=0.2,
        output_max_bytes=8 * 1024 * 1024,
        ulimits={"fsize": (64 * 1024 * 1024, 64 * 1024 * 1024)},
    )
    # Up to 128 files of 16 MiB, 2 GiB in all, unless the runner stops it first.
    code = (
        "chunk = b'x' * (16 * 1024 * 1024)\n"
        "for i in range(128):\n"
        "    open(f'/output/part{i}', 'wb').write(chunk)\n"
    )
    limited = PodmanRunner(settings)
    try:
        outcome = await limited.run(make_spec(run_dir, image, python(code)))
    finally:
        await limited.close()

    assert outcome.exit_code is None
    assert not outcome.timed_out
    assert "uses more than 8388608 bytes of disk" in outcome.output_too_large
    written = sum(path.stat().st_size for path in (run_dir / "output").iterdir())
    assert written < 2 * 1024**3


async def test_run_counts_output_entries(podman_socket, run_dir, image):
    settings = PodmanSettings(
        socket_url=podman_socket, poll_interval_s=0.2, output_max_entries=100
    )
    # 500 empty files take no disk blocks, so only the entry count can stop them.
    code = "for i in range(500): open(f'/output/f{i}', 'w').close()\n"
    limited = PodmanRunner(settings)
    try:
        outcome = await limited.run(make_spec(run_dir, image, python(code)))
    finally:
        await limited.close()

    assert outcome.output_too_large is not None
    assert "more than 100 files and folders" in outcome.output_too_large


async def test_run_marks_log_file_restart(podman_socket, run_dir, image):
    settings = PodmanSettings(
        socket_url=podman_socket,
        poll_interval_s=0.2,
        log_cap_bytes=LOG_CAP,
        log_file_max_bytes=1024 * 1024,
    )
    # 300,000 lines of 12 bytes become about 17 MB of log file with conmon's
    # timestamps, so conmon starts its 1 MiB file over many times.
    code = "import sys\nfor i in range(300000): sys.stdout.write('line %06d\\n' % i)\n"
    limited = PodmanRunner(settings)
    try:
        outcome = await limited.run(make_spec(run_dir, image, python(code)))
    finally:
        await limited.close()

    assert outcome.exit_code == 0
    assert outcome.log_truncated
    first_line = outcome.log_tail.partition("\n")[0]
    assert first_line == (
        "[fairu: the log file passed its limit of 1048576 bytes, so podman dropped "
        "earlier output]"
    )
    assert outcome.log_tail.endswith("line 299998\nline 299999\n")


async def test_describe_sandbox_reports_host(runner, client):
    host = client.info()["host"]

    sandbox = await runner.describe_sandbox()

    assert sandbox.runner == "podman"
    assert sandbox.rootless is host["security"]["rootless"]
    assert sandbox.cgroup_version == host["cgroupVersion"]
    assert sandbox.rlimits is True
    assert sandbox.user_namespaces_blocked is True
    if sandbox.rootless and sandbox.cgroup_version == "v1":
        assert not sandbox.memory_limit
        assert not sandbox.cpu_limit
        assert not sandbox.pids_limit
        assert not sandbox.cgroup_limits_enforced


def test_egress_options_use_slirp_without_host_loopback(run_dir):
    runner = PodmanRunner(PodmanSettings(socket_url="unix:///nonexistent.sock"))
    spec = make_spec(run_dir, "localhost/fairu-python:1", ["true"], egress=True)

    options = runner._create_options(spec, "fairu-test", None)

    assert options["network_mode"] == "slirp4netns"
    assert options["network_options"] == {"slirp4netns": ["allow_host_loopback=false"]}
    assert "seccomp_profile_path" not in options


def test_default_options_have_no_network(run_dir):
    runner = PodmanRunner(PodmanSettings(socket_url="unix:///nonexistent.sock"))
    spec = make_spec(run_dir, "localhost/fairu-python:1", ["true"])

    options = runner._create_options(spec, "fairu-test", Path("/profile.json"))

    assert options["network_mode"] == "none"
    assert "network_options" not in options
    assert options["seccomp_profile_path"] == "/profile.json"
    assert options["user"] == "1000:1000"
    assert options["read_only"] is True
    assert options["cap_drop"] == ["ALL"]
    assert options["no_new_privileges"] is True
