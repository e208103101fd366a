#!/usr/bin/env bash
# The main job on a fresh Debian 12 host, as root: install dependencies, build Hearth,
# start `hearth serve` in the background (it builds the base template on first start),
# then create and use a sandbox with the official E2B Python SDK.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
echo "building hearth and envd (release builds; several minutes on 2 cores)"
scripts/build.sh

data_dir="${HEARTH_DATA_DIR:-/var/lib/hearth}"
mkdir -p "$data_dir"
key_file="$data_dir/quickstart-api-key"
if [[ ! -s "$key_file" ]]; then
    hearth api-key create --data-dir "$data_dir" --name quickstart >"$key_file"
fi
api_key="$(cat "$key_file")"

if curl -fsS -m 2 http://127.0.0.1:3000/health >/dev/null 2>&1; then
    echo "a server already answers on 127.0.0.1:3000; using it (it must accept the key in $key_file)"
else
    echo "starting hearth serve (log: $data_dir/server.log); the first start builds the base template"
    nohup hearth serve --data-dir "$data_dir" >"$data_dir/server.log" 2>&1 &
    echo $! >"$data_dir/server.pid"
    ready=""
    last_step=""
    for _ in $(seq 1 900); do
        if curl -fsS -m 2 http://127.0.0.1:3000/health >/dev/null 2>&1; then
            ready=yes
            break
        fi
        if ! kill -0 "$(cat "$data_dir/server.pid")" 2>/dev/null; then
            tail -n 50 "$data_dir/server.log"
            echo "error: hearth serve exited; see $data_dir/server.log" >&2
            exit 1
        fi
        # Show the template build's progress from the server log as it happens.
        step="$(grep -o 'template build progress.*' "$data_dir/server.log" | tail -n 1 || true)"
        if [[ -n "$step" && "$step" != "$last_step" ]]; then
            echo "  ${step#template build progress }"
            last_step="$step"
        fi
        sleep 1
    done
    if [[ -z "$ready" ]]; then
        echo "error: hearth serve did not respond on 127.0.0.1:3000 within 15 minutes; see $data_dir/server.log" >&2
        exit 1
    fi
fi

# A key file can outlive the database it was created in; make a new key if the server rejects it.
status="$(curl -s -m 5 -o /dev/null -w '%{http_code}' -H "X-API-Key: $api_key" http://127.0.0.1:3000/sandboxes)"
if [[ "$status" == "401" ]]; then
    echo "the server rejects the key in $key_file; creating a new one"
    hearth api-key create --data-dir "$data_dir" --name quickstart >"$key_file"
    api_key="$(cat "$key_file")"
fi

export E2B_API_URL=http://127.0.0.1:3000
export E2B_SANDBOX_URL=http://127.0.0.1:3001
export E2B_API_KEY="$api_key"
"${HEARTH_VENV:-/opt/hearth-venv}/bin/python" examples/hello.py

cat <<MSG

Hearth is running (PID $(cat "$data_dir/server.pid" 2>/dev/null || echo "?"), log $data_dir/server.log).
Point the E2B SDK at it:
  export E2B_API_URL=http://127.0.0.1:3000
  export E2B_SANDBOX_URL=http://127.0.0.1:3001
  export E2B_API_KEY=$api_key
Run your E2B code with the SDK installed in ${HEARTH_VENV:-/opt/hearth-venv}:
  ${HEARTH_VENV:-/opt/hearth-venv}/bin/python your_script.py
Stop it with: kill \$(cat $data_dir/server.pid)
MSG
