#!/usr/bin/env bash
# Run the main job on the local setup: RabbitMQ, the artifact server, the coordinator
# and one agent on this machine evaluate the HiggsML demo's sample submission in
# rootless podman, first as one job and then as a sharded evaluation of 12 shard
# jobs pooled by the coordinator. Both scores are printed next to the one computed
# directly on the host.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bash scripts/setup-host.sh
bash scripts/install.sh
bin=$repo/.venv/bin
example=$repo/examples/higgsml-demo
keys=/var/lib/fairu/keys
logs=/var/lib/fairu/logs
mkdir -p "$logs"

echo "== building the example challenge bundles"
"$bin/python" "$example/build_bundles.py" --out "$example/dist" >/dev/null

export FAIRU_KEYS_DIR=$keys
if [ ! -f "$keys/root.key" ]; then
    echo "== making the root key and a job-signing key in $keys"
    "$bin/fairu-admin" keys init-root >/dev/null
    "$bin/fairu-admin" keys issue --valid-for 30d
fi
if ! "$bin/fairu-admin" keys list | grep -q " current "; then
    "$bin/fairu-admin" keys rotate --valid-for 30d
fi
"$bin/fairu-admin" topology declare
"$bin/fairu-admin" queues create cpu --competition higgsml-demo

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

echo "== starting the artifact server (log: $logs/artifacts.log)"
"$bin/fairu-artifacts" --root "$example/dist" --port 8470 >"$logs/artifacts.log" 2>&1 &
pids+=($!)
echo "== starting the coordinator (log: $logs/coordinator.log)"
# The key folder's job-signing key also signs the coordinator's shard jobs.
"$bin/fairu-coordinator" --db /var/lib/fairu/coordinator.sqlite --keys-dir "$keys" \
    --http 127.0.0.1:8480 --public-url http://127.0.0.1:8480 \
    >"$logs/coordinator.log" 2>&1 &
pids+=($!)
# The demo approves its own agent with a one-time enrollment token.
coordinator_db=/var/lib/fairu/coordinator.sqlite
for _ in $(seq 1 50); do [ -f "$coordinator_db" ] && break; sleep 0.2; done
token_file=/var/lib/fairu/local-enrollment.token
if [ ! -s "$token_file" ]; then
    "$bin/fairu-admin" agents --db "$coordinator_db" enroll --site local \
        | sed -n 2p | tr -d ' ' >"$token_file"
    chmod 600 "$token_file"
fi
echo "== starting fairu-agent (log: $logs/agent.log)"
"$bin/fairu-agent" start --config configs/sites/local.toml >"$logs/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    grep -q "serving" "$logs/agent.log" 2>/dev/null && break
    if ! kill -0 "${pids[2]}" 2>/dev/null; then
        echo "fairu-agent exited early:" >&2
        cat "$logs/agent.log" >&2
        exit 1
    fi
    sleep 0.2
done

agent_id=$(sed -n 's/.*agent \([^ ]*\) registered.*/\1/p' "$logs/agent.log" | head -n 1)
for _ in $(seq 1 50); do
    "$bin/fairu-admin" agents --db "$coordinator_db" list | grep -q "^local  $agent_id " && break
    sleep 0.2
done
if ! "$bin/fairu-admin" agents --db "$coordinator_db" list | grep -q "$agent_id  approved"; then
    # An agent whose state folder outlived its token: approve it by hand instead.
    "$bin/fairu-admin" agents --db "$coordinator_db" approve "$agent_id"
fi

echo "== submitting the sample submission"
job_id="demo-$(date +%Y%m%d-%H%M%S)"
"$bin/fairu-admin" submit "$example/job.toml" --job-id "$job_id" --wait

echo "== recorded by the coordinator"
recorded=no
for _ in $(seq 1 50); do
    if "$bin/fairu-admin" results show "$job_id" --db "$coordinator_db" 2>/dev/null; then
        recorded=yes
        break
    fi
    sleep 0.2
done
if [ "$recorded" != yes ]; then
    echo "the coordinator recorded no result for $job_id; see $logs/coordinator.log" >&2
    exit 1
fi

echo "== the same submission as a sharded evaluation (page: http://127.0.0.1:8480/)"
evaluation_id="demo-eval-$(date +%Y%m%d-%H%M%S)"
"$bin/fairu-admin" evaluate "$example/evaluation.toml" --evaluation-id "$evaluation_id" \
    --coordinator http://127.0.0.1:8480 --wait
"$bin/fairu-admin" evaluations show "$evaluation_id" --coordinator http://127.0.0.1:8480

echo "== the same predictions scored directly on this host"
"$bin/python" - "$example" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("build_bundles", sys.argv[1] + "/build_bundles.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
scores = module.expected_scores()
print(f"quantiles_score  {scores['quantiles_score']:.6g}")
PY
