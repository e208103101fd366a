#!/usr/bin/env bash
# Builds the release `hearth` binary and the static `envd` binary, and installs both:
# hearth to /usr/local/bin, envd to /usr/local/lib/hearth where `hearth` looks for it.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"

cargo build --release --locked -p hearth
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --profile envd -p envd --target x86_64-unknown-linux-gnu

envd="$target_dir/x86_64-unknown-linux-gnu/envd/envd"
# A static(-pie) binary has no NEEDED entries; any would mean a libc dependency in the guest.
if readelf -d "$envd" | grep -q NEEDED; then
    echo "error: $envd needs shared libraries; envd must be static" >&2
    exit 1
fi

install -D -m 0755 "$target_dir/release/hearth" /usr/local/bin/hearth
install -D -m 0755 "$envd" /usr/local/lib/hearth/envd
echo "installed /usr/local/bin/hearth and /usr/local/lib/hearth/envd"
