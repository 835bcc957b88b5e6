#!/usr/bin/env bash
# Check what fairu sees of this host's NVIDIA GPUs, and run one container pinned to
# one GPU when podman and a CDI spec are there.
#
#   scripts/check-gpu.sh
#
# Steps that lack what they need are skipped with the reason; each step has its own
# time limit, so the script ends within 5 minutes even when a tool hangs. It exits 1
# when a step that ran failed, and 0 otherwise (all passed or skipped).
#
# Environment:
#   FAIRU_PYTHON           a Python that can import fairu (default: .venv/bin/python,
#                          then python3)
#   FAIRU_GPU_CHECK_IMAGE  image for the container steps (default localhost/fairu-python:1);
#                          the CDI spec mounts nvidia-smi into it, so any image works
#   FAIRU_PODMAN_SOCKET    podman API socket for the fairu runner step (default: the
#                          socket of the user running this script)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

image="${FAIRU_GPU_CHECK_IMAGE:-localhost/fairu-python:1}"
socket="${FAIRU_PODMAN_SOCKET:-unix:///run/user/$(id -u)/podman/podman.sock}"
summary=()
failed=0

step() { printf '\n== %s\n' "$1"; }
pass() { summary+=("PASS  $1"); }
skip() { summary+=("SKIP  $1: $2"); printf 'skipped: %s\n' "$2"; }
fail() { summary+=("FAIL  $1: $2"); printf 'FAILED: %s\n' "$2"; failed=1; }

python=""
for candidate in "${FAIRU_PYTHON:-}" .venv/bin/python python3; do
    if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 \
        && timeout 30 "$candidate" -c 'import fairu.agent.probe' >/dev/null 2>&1; then
        python="$candidate"
        break
    fi
done

step "1. nvidia-smi"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    skip "nvidia-smi" "nvidia-smi not found (no NVIDIA driver installed?)"
elif timeout 60 nvidia-smi -L; then
    pass "nvidia-smi"
else
    fail "nvidia-smi" "nvidia-smi -L failed or timed out after 60 s"
fi

step "2. fairu capacity probe (NVML)"
probe_json=""
if [[ -z "$python" ]]; then
    skip "probe" "no Python here can import fairu; install it (python3 -m pip install .) or set FAIRU_PYTHON"
elif probe_json=$(timeout 60 "$python" -m fairu.agent.cli probe --json --log-level WARNING); then
    timeout 60 "$python" -m fairu.agent.cli probe --log-level WARNING
    gpus=$(printf '%s' "$probe_json" | "$python" -c 'import json, sys; print(len(json.load(sys.stdin)["capacity"]["gpus"]))')
    if [[ "$gpus" -gt 0 ]]; then
        pass "probe ($gpus GPUs)"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        fail "probe" "nvidia-smi exists but NVML reported no GPU"
    else
        skip "probe" "the probe ran and found no GPU, as expected without a driver"
    fi
else
    fail "probe" "fairu-agent probe failed or timed out after 60 s"
fi

step "3. CDI spec for nvidia.com/gpu"
device=""
if command -v nvidia-ctk >/dev/null 2>&1; then
    # `nvidia-ctk cdi list` prints one fully qualified device name per line.
    device=$(timeout 60 nvidia-ctk cdi list 2>/dev/null | grep -E '^nvidia\.com/gpu=' \
        | grep -v '=all$' | head -n 1)
fi
if [[ -z "$device" ]] && grep -qs 'nvidia.com/gpu' /etc/cdi/* /var/run/cdi/* 2>/dev/null; then
    device="nvidia.com/gpu=0"
fi
if [[ -n "$device" ]]; then
    printf 'first GPU device: %s\n' "$device"
    pass "CDI spec ($device)"
else
    skip "CDI spec" "no CDI spec names nvidia.com/gpu; make one with: sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
fi

step "4. podman run pinned to one GPU"
if [[ -z "$device" ]]; then
    skip "podman run" "no CDI device (step 3)"
elif ! command -v podman >/dev/null 2>&1; then
    skip "podman run" "podman not found"
elif ! timeout 60 podman image exists "$image"; then
    skip "podman run" "image $image not found; build it (scripts/build-image.sh) or set FAIRU_GPU_CHECK_IMAGE"
else
    if output=$(timeout 120 podman run --rm --network none --device "$device" "$image" nvidia-smi -L); then
        printf '%s\n' "$output"
        seen=$(printf '%s\n' "$output" | grep -c '^GPU ')
        if [[ "$seen" -eq 1 ]]; then
            pass "podman run (1 GPU visible)"
        else
            fail "podman run" "the container saw $seen GPUs instead of 1"
        fi
    else
        fail "podman run" "podman run --device $device failed or timed out after 120 s"
    fi
fi

step "5. fairu's podman runner with RunSpec.gpu_devices"
if [[ -z "$device" ]]; then
    skip "fairu runner" "no CDI device (step 3)"
elif [[ -z "$python" ]]; then
    skip "fairu runner" "no Python here can import fairu"
elif ! timeout 30 curl -sf --unix-socket "${socket#unix://}" http://d/_ping >/dev/null 2>&1; then
    skip "fairu runner" "no podman API service at $socket; start it (systemctl --user start podman.socket) or set FAIRU_PODMAN_SOCKET"
elif ! timeout 60 podman image exists "$image"; then
    skip "fairu runner" "image $image not found"
else
    work=$(mktemp -d /var/tmp/fairu-gpu-check.XXXXXX)
    chmod 0777 "$work"
    if timeout 180 "$python" - "$socket" "$image" "$device" "$work" <<'EOF'
import asyncio
import sys
from pathlib import Path

from fairu.runners.base import RunSpec
from fairu.runners.podman import PodmanRunner, PodmanSettings

socket, image, device, work = sys.argv[1:]


async def main() -> int:
    runner = PodmanRunner(PodmanSettings(socket_url=socket))
    try:
        outcome = await runner.run(
            RunSpec(
                job_id="gpu-check",
                image=image,
                command=["nvidia-smi", "-L"],
                env={},
                mounts=[],
                output_dir=Path(work),
                walltime_s=120,
                labels={"fairu.job_id": "gpu-check", "fairu.agent_id": "gpu-check"},
                gpu_devices=[device],
            )
        )
    finally:
        await runner.close()
    print(outcome.log_tail, end="")
    seen = sum(line.startswith("GPU ") for line in outcome.log_tail.splitlines())
    if outcome.exit_code != 0 or seen != 1:
        print(f"exit code {outcome.exit_code}, {seen} GPUs visible instead of 1")
        return 1
    return 0


sys.exit(asyncio.run(main()))
EOF
    then
        pass "fairu runner (1 GPU visible)"
    else
        fail "fairu runner" "the job container failed, timed out after 180 s, or did not see exactly 1 GPU"
    fi
    rm -rf "$work"
fi

printf '\n== summary\n'
printf '%s\n' "${summary[@]}"
exit "$failed"
