#!/usr/bin/env bash
# Quick start: the main job end to end on a fresh Debian 12 machine, as root, with the embedded
# local-directory store (no S3 needed).
#
#   1. installs containerd, runc and build dependencies if missing, builds zlayer-storage (release);
#   2. starts a private containerd whose [proxy_plugins.zlayer] points at `zlayer-storage snapshotter`;
#   3. runs a container with identity demo/0 that writes /data/hello and deletes /etc/motd, removes it;
#   4. waits until the layer is durable in the store, then starts a NEW container with the same identity
#      and shows that it sees exactly that state.
# Everything lives in a temp dir that is removed at the end (kept on failure, for the logs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

need=()
for p in containerd runc busybox-static umoci protobuf-compiler build-essential pkg-config python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if (( ${#need[@]} )); then
    echo "installing: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"

# shellcheck source=bench/lib.sh
source "$here/bench/lib.sh"
[[ $(id -u) == 0 ]] || die "needs root (containerd, overlay mounts)"
BENCH_DIR=$(mktemp -d /tmp/zl-quick-XXXXXX)
BENCH_NS=quickstart
trap bench_cleanup EXIT
bench_build
log "work dir: $BENCH_DIR"

# The daemon with the default (local-directory) store.
z=$BENCH_DIR/zlayer
mkdir -p "$z"
ZL_SOCKET=$BENCH_DIR/zlayer.sock
ZL_CONFIG=$z/storage.toml
cat >"$ZL_CONFIG" <<CFG
[storage]
backend = "local"
local_store_dir = "$z/store"
staging_dir = "$z/staging"
state_db_path = "$z/state.sqlite"

[snapshotter]
root = "$z/root"
socket = "$ZL_SOCKET"
control_socket = "$BENCH_DIR/zlayer-control.sock"
containerd_address = "$BENCH_DIR/containerd/containerd.sock"
persist = "labeled"
CFG
"$ZLAYER_BIN" --config "$ZL_CONFIG" snapshotter >"$z/snapshotter.log" 2>&1 &
BENCH_PIDS+=($!)
wait_for 30 "snapshotter socket" python3 -c \
    'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$ZL_SOCKET"
start_containerd
import_image zlayer

label=containerd.io/snapshot/zlayer.id=demo/0
log "first container: write /data/hello"
ctr_ run --snapshotter zlayer --snapshotter-label "$label" "$IMAGE_REF" demo-1 \
    /bin/sh -c 'mkdir -p /data && echo "hello from the first container" > /data/hello'
ctr_ containers rm demo-1

log "waiting for the layer to become durable in $z/store"
layer_durable() {
    "$ZLAYER_BIN" --config "$ZL_CONFIG" status --json | python3 -c '
import json, sys
states = json.load(sys.stdin)
states = states.get("layers", states) if isinstance(states, dict) else states
sys.exit(0 if any(s.get("remote_digest") for s in states) else 1)'
}
wait_for 120 "layer upload" layer_durable

log "second container, same identity:"
out=$(ctr_ run --rm --snapshotter zlayer --snapshotter-label "$label" "$IMAGE_REF" demo-2 /bin/cat /data/hello)
echo "$out"
[[ $out == "hello from the first container" ]] || die "the layer was not restored"
log "OK: the second container saw the first one's layer"
