#!/usr/bin/env bash
# Runs every Hearth test on this host: Rust unit and integration tests (real QEMU under
# TCG or KVM, real network namespaces), then the E2B Python SDK suite against a live
# `hearth serve`. Builds the base template once and shares it across all of them.
# Needs root. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir="$(pwd)"
venv="${HEARTH_VENV:-/opt/hearth-venv}"

scripts/install-deps.sh
scripts/build.sh

# One data dir per run: the base template is built here once and used by every test.
work_dir="${HEARTH_TEST_WORK_DIR:-$(mktemp -d /tmp/hearth-test.XXXXXX)}"
data_dir="$work_dir/data"
mkdir -p "$data_dir"
echo "test data dir: $data_dir"

server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
}
trap cleanup EXIT

start=$(date +%s)
hearth template build-base --data-dir "$data_dir"
echo "base template built in $(( $(date +%s) - start )) s"
template_dir="$(hearth template path base --data-dir "$data_dir")"

export HEARTH_TEST_TEMPLATE_DIR="$template_dir"
export HEARTH_TEST_ENVD="/usr/local/lib/hearth/envd"
# Pushes the SDK suite's test images into the registry that tests start on loopback.
cargo build --release --locked -p hearth-oci --bin hearth-oci-push
export HEARTH_OCI_PUSH="$root_dir/target/release/hearth-oci-push"
cargo test --release --locked --workspace -- --test-threads=2

netns_before=$(ip netns list | wc -l)

api_key="e2b_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3001 E2B_API_KEY="$api_key"

# Every sandbox's DNS goes to the resolver in the network tests' own "internet" namespace
# (tests/sdk/net_helpers.py), so no test query leaves the host.
serve_args=(hearth serve --data-dir "$data_dir" --api-listen 127.0.0.1:3000 --proxy-listen 127.0.0.1:3001
    --dns-server 198.18.0.2)

start_server() {
    HEARTH_API_KEY="$api_key" "${serve_args[@]}" >>"$work_dir/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 300); do
        curl -fsS -m 2 http://127.0.0.1:3000/health >/dev/null 2>&1 && return 0
        kill -0 "$server_pid" 2>/dev/null || { cat "$work_dir/server.log"; echo "error: hearth serve exited" >&2; exit 1; }
        sleep 1
    done
    echo "error: hearth serve did not answer /health within 300 s" >&2
    exit 1
}

stop_server() {
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    server_pid=""
}

status=0
start_server
"$venv/bin/python" -m pytest -q "$root_dir/tests/sdk" || status=$?

# Paused and autoPause sandboxes must outlive a restart of the server.
"$venv/bin/python" "$root_dir/tests/sdk/restart_check.py" prepare "$work_dir/restart.json" || status=$?
stop_server
start_server
"$venv/bin/python" "$root_dir/tests/sdk/restart_check.py" verify "$work_dir/restart.json" || status=$?
stop_server

# A VMM killed with SIGKILL, the server killed mid-create, then 1,000 create/kill cycles
# through a /26 slot subnet (16 slots): every count must come back to where it started.
HEARTH_API_KEY="$api_key" "$venv/bin/python" "$root_dir/tests/sdk/leak_check.py" \
    --cycles "${HEARTH_LEAK_CYCLES:-1000}" --log "$work_dir/server.log" -- \
    "${serve_args[@]}" --slot-subnet 10.207.255.0/26 --slot-pool-size 4 || status=$?

netns_after=$(ip netns list | wc -l)
if [[ "$netns_after" != "$netns_before" ]]; then
    echo "error: network namespaces left behind: $netns_before before the server, $netns_after after" >&2
    status=1
fi
if ((status != 0)); then
    echo "--- server log (last 200 lines) ---"
    tail -n 200 "$work_dir/server.log"
fi
exit "$status"
