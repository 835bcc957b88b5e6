#!/usr/bin/env bash
# Run the test suite against the real RabbitMQ node and rootless podman.
# Prepares the host first (scripts/setup-host.sh, as root); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
