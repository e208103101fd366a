#!/usr/bin/env bash
# Runs bench/pause_bench.py against a fresh `hearth serve` for each guest memory size:
# builds a base template of that size in its own data directory, starts the server,
# measures, stops it by PID and removes the data directory.
#
#   bench/pause_bench.sh [--sandboxes N] [--sizes "256 1024"] [--out FILE]
set -euo pipefail

root_dir="$(cd "$(dirname "$0")/.." && pwd)"
venv="${HEARTH_VENV:-/opt/hearth-venv}"
hearth="${HEARTH_BIN:-hearth}"
sandboxes=5
sizes="256 1024"
out="$root_dir/bench-pause-results.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --sandboxes) sandboxes="$2"; shift 2 ;;
        --sizes) sizes="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "error: unknown argument $1 (expected --sandboxes, --sizes or --out)" >&2; exit 2 ;;
    esac
done

work_dir="$(mktemp -d /tmp/hearth-pause-bench.XXXXXX)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
    rm -rf "$work_dir"
}
trap cleanup EXIT

api_key="e2b_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')"
: >"$out"
for size in $sizes; do
    data_dir="$work_dir/data-$size"
    "$hearth" template build-base --data-dir "$data_dir" --memory-mib "$size"
    HEARTH_API_KEY="$api_key" "$hearth" serve --data-dir "$data_dir" \
        --api-listen 127.0.0.1:3000 --proxy-listen 127.0.0.1:3001 >"$work_dir/server-$size.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 120); do
        curl -sf http://127.0.0.1:3000/health >/dev/null && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$work_dir/server-$size.log"; exit 1; }
        sleep 1
    done
    E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3001 E2B_API_KEY="$api_key" \
        "$venv/bin/python" "$root_dir/bench/pause_bench.py" --sandboxes "$sandboxes" --label "$size MiB guest" --out "$out"
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    server_pid=""
    rm -rf "$data_dir"
done
echo "results: $out"
