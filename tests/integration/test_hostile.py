"""Hostile submissions through a real agent, the real broker and rootless podman.

Each job below is a small script in the test image that attacks the sandbox, and each
must end with a specific final status while the agent keeps serving. The agent runs
with tight limits so that the attacks stay small on the CI machine. RLIMIT_NPROC is
64 for the job's UID: before the fork bomb first ran, a spawner bounded to 200
children stopped at 62 under this limit. RLIMIT_FSIZE is 64 MiB, /tmp 16 MiB,
/output 32 MiB and 1000 entries, the log file 4 MiB, and the walltimes are short.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import podman
import psutil
import pytest

from fairu.protocol.models import FinalStatus, Resources

pytestmark = [pytest.mark.broker, pytest.mark.podman]

MIB = 1024 * 1024
EPERM, ENOENT, EACCES, ENOSPC, EROFS = 1, 2, 13, 28, 30
ENETUNREACH, ECONNREFUSED = 101, 111

AGENT_LIMITS = f"""
tmpfs_size = "16m"
output_max_bytes = {32 * MIB}
output_max_entries = 1000
log_file_max_bytes = {4 * MIB}
ulimits = {{ nofile = [256, 256], nproc = [64, 64], fsize = [{64 * MIB}, {64 * MIB}] }}
"""


def python(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


# Writes the probe's findings as scores, so each can be asserted on its own.
SCORES = "json.dump(scores, open('/output/scores.json', 'w'))\n"

FORK_BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""

MEMORY_HOG = """
block = bytearray(2 * 1024**3)
"""

TMPFS_HOG = (
    """
import json

def fill(folder):
    # Files of 8 MiB stay under RLIMIT_FSIZE, so only the file system's size stops them.
    written = 0
    try:
        for index in range(128):
            with open(f"{folder}/fill{index}", "wb") as handle:
                for _ in range(8):
                    handle.write(b"x" * 1024 * 1024)
                    handle.flush()
                    written += 1024 * 1024
    except OSError as error:
        return written, error.errno
    return written, 0

tmp_bytes, tmp_errno = fill("/tmp")
shm_bytes, shm_errno = fill("/dev/shm")
scores = {"tmp_bytes": tmp_bytes, "tmp_errno": tmp_errno,
          "shm_bytes": shm_bytes, "shm_errno": shm_errno}
"""
    + SCORES
)

CPU_SPIN = """
while True:
    pass
"""

OUTPUT_FLOOD = """
chunk = b"x" * (16 * 1024 * 1024)
for i in range(256):
    open(f"/output/part{i}", "wb").write(chunk)
"""

OUTPUT_FILES = """
for i in range(100_000):
    open(f"/output/f{i}", "w").close()
"""

LOG_FLOOD = (
    """
import json, sys
for i in range(400_000):
    sys.stdout.write("flood line %07d\\n" % i)
scores = {"lines": 400_000}
"""
    + SCORES
)

NETWORK = (
    """
import json, os, socket

def tcp(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(3)
        try:
            sock.connect((host, port))
        except OSError as error:
            return error.errno or -1
    return 0

def unix(path):
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError as error:
            return error.errno
    return 0

scores = {"rabbitmq_loopback": tcp("127.0.0.1", 5672),
          "podman_socket": unix(os.environ["PODMAN_SOCKET"]),
          "interfaces": len(os.listdir("/sys/class/net")),
          "routes": len(open("/proc/net/route").read().splitlines()) - 1}
for index, address in enumerate(os.environ["HOST_ADDRESSES"].split()):
    scores[f"rabbitmq_host_{index}"] = tcp(address, 5672)
"""
    + SCORES
)

ROOT_FS_WRITES = (
    """
import json

def write(path, mode="w"):
    try:
        with open(path, mode) as handle:
            handle.write("fairu-hostile\\n")
    except OSError as error:
        return error.errno
    return 0

scores = {"etc_passwd": write("/etc/passwd", "a"),
          "usr_bin": write("/usr/bin/fairu-hostile"),
          "root_dir": write("/fairu-hostile"),
          "var_tmp": write("/var/tmp/fairu-hostile"),
          "run": write("/run/fairu-hostile"),
          "home": write("/home/runner/fairu-hostile"),
          "cgroup": write("/sys/fs/cgroup/fairu-hostile"),
          "proc_sys": write("/proc/sys/kernel/hostname")}
"""
    + SCORES
)

HOST_READS = (
    """
import json, os

def read(path):
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        return error.errno
    return 0

def look(path):
    try:
        os.stat(path)
    except OSError as error:
        return error.errno
    return 0

scores = {"etc_shadow": read("/etc/shadow"),
          "agent_key": read(os.environ["AGENT_KEY"]),
          "agent_jobs": read(os.environ["AGENT_DB"]),
          "work_tree": look(os.environ["WORK_TREE"]),
          "erlang_cookie": read("/var/lib/rabbitmq/.erlang.cookie"),
          "podman_run_dir": look(os.path.dirname(os.environ["PODMAN_SOCKET"])),
          "visible_pids": sum(1 for entry in os.listdir("/proc") if entry.isdigit())}
"""
    + SCORES
)

SETUID = (
    """
import ctypes, json, os, subprocess, time

scores = {}
try:
    os.setuid(0)
    scores["setuid_root"] = 0
except OSError as error:
    scores["setuid_root"] = error.errno

# su is setuid root in the image. Read its effective UID once it runs.
su = subprocess.Popen(["su", "root", "-c", "id"], stdin=subprocess.PIPE,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(200):
    status = dict(line.split(":\\t", 1)
                  for line in open(f"/proc/{su.pid}/status").read().splitlines())
    if status["Name"].strip() == "su":
        break
    time.sleep(0.01)
scores["su_effective_uid"] = int(status["Uid"].split()[1])
su.kill()
su.wait()

libc = ctypes.CDLL(None, use_errno=True)
scores["unshare_user"] = 0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno()
scores["mount_tmpfs"] = (0 if libc.mount(b"x", b"/tmp", b"tmpfs", 0, None) == 0
                         else ctypes.get_errno())
"""
    + SCORES
)

NORMAL = (
    """
import json
scores = {"ok": 1}
"""
    + SCORES
)


@dataclass
class Attack:
    name: str
    code: str
    status: FinalStatus
    error_code: str | None
    resources: Resources = field(default_factory=lambda: Resources(walltime_s=60))


ATTACKS = [
    Attack(
        "fork-bomb",
        FORK_BOMB,
        FinalStatus.TIMED_OUT,
        "timed_out",
        Resources(walltime_s=6),
    ),
    Attack(
        "memory-hog",
        MEMORY_HOG,
        FinalStatus.FAILED,
        "nonzero_exit",
        Resources(memory_mb=256, walltime_s=60),
    ),
    Attack("tmpfs-hog", TMPFS_HOG, FinalStatus.SUCCEEDED, None),
    Attack(
        "cpu-spin",
        CPU_SPIN,
        FinalStatus.TIMED_OUT,
        "timed_out",
        Resources(walltime_s=3),
    ),
    Attack(
        "output-flood", OUTPUT_FLOOD, FinalStatus.OUTPUT_TOO_LARGE, "output_too_large"
    ),
    Attack(
        "output-files", OUTPUT_FILES, FinalStatus.OUTPUT_TOO_LARGE, "output_too_large"
    ),
    Attack("log-flood", LOG_FLOOD, FinalStatus.SUCCEEDED, None),
    Attack("network", NETWORK, FinalStatus.SUCCEEDED, None),
    Attack("root-fs-writes", ROOT_FS_WRITES, FinalStatus.SUCCEEDED, None),
    Attack("host-reads", HOST_READS, FinalStatus.SUCCEEDED, None),
    Attack("setuid", SETUID, FinalStatus.SUCCEEDED, None),
]


def host_addresses() -> list[str]:
    """Return this host's non-loopback IPv4 addresses, which stay on this host."""
    addresses = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name == "AF_INET" and not entry.address.startswith("127."):
                addresses.append(entry.address)
    return addresses


def job_host_uid(podman_socket: str) -> int:
    """Return the host UID that container UID 1000 maps to under rootless podman."""
    with podman.PodmanClient(base_url=podman_socket, timeout=30) as client:
        uid_map = client.info()["host"]["idMappings"]["uidmap"]
    for entry in uid_map:
        if entry["container_id"] <= 1000 < entry["container_id"] + entry["size"]:
            return entry["host_id"] + 1000 - entry["container_id"]
    raise AssertionError(f"container UID 1000 is outside the mapping {uid_map}")


def processes_of(uid: int) -> list[int]:
    return [
        process.pid
        for process in psutil.process_iter(["uids"])
        if process.info["uids"] is not None and process.info["uids"].real == uid
    ]


async def test_hostile_jobs_end_contained(
    competition, start_agent, signing_key, publish, results, make_job, podman_socket
):
    job_uid = job_host_uid(podman_socket)
    # Containers of earlier tests (a killed agent's job, say) may still be ending;
    # the fork-bomb check below counts every process of this UID.
    deadline = time.monotonic() + 120
    while processes_of(job_uid) and time.monotonic() < deadline:
        await asyncio.sleep(1)
    assert processes_of(job_uid) == [], "another job of this UID is running"
    agent = start_agent(competition, extra=AGENT_LIMITS)
    state = agent.config_path.parent / "state"
    environment = {
        "HOST_ADDRESSES": " ".join(host_addresses()),
        "PODMAN_SOCKET": podman_socket.removeprefix("unix://"),
        "AGENT_KEY": str(state / "identity.key"),
        "AGENT_DB": str(state / "jobs.sqlite"),
        "WORK_TREE": str(Path(__file__).resolve().parents[2]),
    }
    jobs = {}
    for attack in [*ATTACKS, Attack("normal", NORMAL, FinalStatus.SUCCEEDED, None)]:
        job = make_job(
            competition,
            job_id=f"{attack.name}-{os.urandom(4).hex()}",
            command=python(attack.code),
            env=environment,
            resources=attack.resources,
        )
        jobs[attack.name] = job
        await publish(competition, signing_key.sign(job))

    outcomes = {}
    for attack in [*ATTACKS, Attack("normal", NORMAL, FinalStatus.SUCCEEDED, None)]:
        result = await results.wait(jobs[attack.name].job_id, timeout_s=300)
        outcomes[attack.name] = result
        assert result.status is attack.status, (attack.name, result)
        assert (result.error.code if result.error else None) == attack.error_code, (
            attack.name,
            result.error,
        )

    fork_bomb = outcomes["fork-bomb"]
    assert fork_bomb.durations.run_s < 20
    assert processes_of(job_uid) == []

    memory_hog = outcomes["memory-hog"]
    assert memory_hog.exit_code == 1
    assert "MemoryError" in memory_hog.log_tail

    tmpfs = outcomes["tmpfs-hog"].scores
    assert tmpfs["tmp_bytes"] <= 16 * MIB
    assert tmpfs["tmp_errno"] == ENOSPC
    assert tmpfs["shm_bytes"] <= 64 * MIB
    assert tmpfs["shm_errno"] == ENOSPC

    cpu_spin = outcomes["cpu-spin"]
    assert cpu_spin.exit_code is None
    assert 3 <= cpu_spin.durations.run_s < 15

    assert (
        "uses more than 33554432 bytes of disk"
        in outcomes["output-flood"].error.message
    )
    assert "more than 1000 files and folders" in outcomes["output-files"].error.message

    log_flood = outcomes["log-flood"]
    assert log_flood.log_truncated
    assert log_flood.log_tail.startswith("[fairu: ")
    assert log_flood.log_tail.endswith("flood line 0399999\n")
    assert log_flood.scores == {"lines": 400_000.0}

    network = outcomes["network"].scores
    assert network["rabbitmq_loopback"] == ECONNREFUSED
    assert network["podman_socket"] == ENOENT
    assert network["interfaces"] == 1
    assert network["routes"] == 0
    host_results = {name: value for name, value in network.items() if "_host_" in name}
    assert host_results
    assert set(host_results.values()) == {ENETUNREACH}

    # The kernel checks permissions before the read-only mount, so a file that uid
    # 1000 may not write fails with EACCES even on the read-only root.
    writes = outcomes["root-fs-writes"].scores
    assert writes == {
        "etc_passwd": EACCES,
        "usr_bin": EROFS,
        "root_dir": EROFS,
        "var_tmp": EROFS,
        "run": EROFS,
        "home": EROFS,
        "cgroup": EACCES,
        "proc_sys": EROFS,
    }

    reads = outcomes["host-reads"].scores
    assert reads["etc_shadow"] == EACCES
    assert reads["agent_key"] == ENOENT
    assert reads["agent_jobs"] == ENOENT
    assert reads["work_tree"] == ENOENT
    # RabbitMQ's cluster secret on the host.
    assert reads["erlang_cookie"] == ENOENT
    assert reads["podman_run_dir"] == ENOENT
    # The job's process and podman's init, and nothing of the host.
    assert reads["visible_pids"] <= 3

    setuid = outcomes["setuid"].scores
    assert setuid["setuid_root"] == EPERM
    assert setuid["su_effective_uid"] == 1000
    assert setuid["unshare_user"] == EPERM
    assert setuid["mount_tmpfs"] == EPERM

    assert outcomes["normal"].scores == {"ok": 1.0}
    assert agent.process is not None and agent.process.poll() is None
    assert "Traceback" not in agent.log()
    with podman.PodmanClient(base_url=podman_socket, timeout=30) as client:
        agent_id = outcomes["normal"].agent_id
        left = client.containers.list(
            all=True, filters={"label": f"fairu.agent_id={agent_id}"}
        )
    assert left == []
