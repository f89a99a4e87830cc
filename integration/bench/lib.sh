# Shared launch logic for benchmark scripts: a private Garage, zlayer-storage snapshotter and
# containerd on loopback, all under one work dir, torn down by `bench_cleanup` (install it as an
# EXIT trap). Source it; do not run it.
#
# Inputs (environment):  GARAGE_BIN (default ~/.cargo/bin/garage), ZLAYER_BIN (default: release build).
# Provides:  bench_init, bench_build, start_garage, start_snapshotter, start_containerd, ctr_,
#            import_image, now_ns, wait_for, bench_cleanup.

set -euo pipefail

BENCH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GARAGE_BIN=${GARAGE_BIN:-$HOME/.cargo/bin/garage}
IMAGE_REF=docker.io/zlayer/busybox:test
declare -a BENCH_PIDS=()

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

now_ns() { date +%s%N; }

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.1 s; fails early when the
# process WAIT_PID (if set) has exited.
wait_for() {
    local secs=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        if [[ -n ${WAIT_PID:-} ]] && ! kill -0 "$WAIT_PID" 2>/dev/null; then
            die "process for $what exited"
        fi
        (( $(date +%s) < deadline )) || die "timed out waiting for $what"
        sleep 0.1
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# bench_init: create the work dir (short path: unix socket names are limited to 108 bytes).
bench_init() {
    [[ $(id -u) == 0 ]] || die "needs root (containerd, overlay mounts)"
    for bin in /usr/bin/containerd /usr/bin/ctr /usr/bin/umoci /bin/busybox "$GARAGE_BIN"; do
        [[ -x $bin ]] || die "missing $bin"
    done
    BENCH_DIR=$(mktemp -d /tmp/zl-bench-XXXXXX)
    BENCH_NS=bench$$
    log "work dir: $BENCH_DIR"
}

# bench_build: release binary, unless ZLAYER_BIN points at one.
bench_build() {
    if [[ -z ${ZLAYER_BIN:-} ]]; then
        (cd "$BENCH_REPO" && cargo build --release --bin zlayer-storage >&2)
        ZLAYER_BIN=$BENCH_REPO/target/release/zlayer-storage
    fi
    [[ -x $ZLAYER_BIN ]] || die "missing $ZLAYER_BIN"
}

# start_garage: single-node Garage with bucket `layers`; sets S3_ENDPOINT, S3_KEY, S3_SECRET, S3_BUCKET.
start_garage() {
    local g=$BENCH_DIR/garage s3 rpc admin
    mkdir -p "$g"
    s3=$(free_port); rpc=$(free_port); admin=$(free_port)
    cat >"$g/garage.toml" <<EOF
metadata_dir = "$g/meta"
data_dir = "$g/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "$(openssl rand -hex 16)"
EOF
    S3_ENDPOINT=http://127.0.0.1:$s3
    S3_KEY=GKzlayerbench0001
    S3_SECRET=$(openssl rand -hex 20)
    S3_BUCKET=layers
    GARAGE_DEFAULT_ACCESS_KEY=$S3_KEY GARAGE_DEFAULT_SECRET_KEY=$S3_SECRET GARAGE_DEFAULT_BUCKET=$S3_BUCKET \
        RUST_LOG=warn "$GARAGE_BIN" -c "$g/garage.toml" server --single-node --default-bucket \
        >"$g/garage.log" 2>&1 &
    BENCH_PIDS+=($!)
    WAIT_PID=$! wait_for 60 "garage" s3_ s3api head-bucket --bucket "$S3_BUCKET"
}

# s3_ ARGS...: Debian's awscli v2 against the private Garage.
s3_() {
    AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_DEFAULT_REGION=garage \
        AWS_EC2_METADATA_DISABLED=true /usr/bin/aws --endpoint-url "$S3_ENDPOINT" "$@"
}

# start_snapshotter PART_SIZE_BYTES: config + daemon; sets ZL_SOCKET, ZL_CONFIG, ZL_ROOT.
# ZL_SNAPSHOTTER_EXTRA: more `[snapshotter]` lines.
start_snapshotter() {
    local part=${1:-67108864} z=$BENCH_DIR/zlayer
    mkdir -p "$z"
    ZL_SOCKET=$BENCH_DIR/zlayer.sock
    ZL_CONFIG=$z/storage.toml
    ZL_ROOT=$z/root
    (umask 077 && printf '%s' "$S3_SECRET" >"$z/s3-secret") && chmod 600 "$z/s3-secret"
    cat >"$ZL_CONFIG" <<EOF
[storage]
backend = "s3"
bucket = "$S3_BUCKET"
prefix = "layers/"
endpoint_url = "$S3_ENDPOINT"
region = "garage"
force_path_style = true
access_key_id = "$S3_KEY"
secret_access_key_file = "$z/s3-secret"
staging_dir = "$z/staging"
state_db_path = "$z/state.sqlite"
part_size_bytes = $part

[snapshotter]
root = "$ZL_ROOT"
socket = "$ZL_SOCKET"
control_socket = "$BENCH_DIR/control.sock"
containerd_address = "$BENCH_DIR/containerd/containerd.sock"
persist = "labeled"
${ZL_SNAPSHOTTER_EXTRA:-}
EOF
    RUST_LOG=info "$ZLAYER_BIN" --config "$ZL_CONFIG" snapshotter >"$z/snapshotter.log" 2>&1 &
    BENCH_PIDS+=($!)
    WAIT_PID=$! wait_for 30 "snapshotter socket" python3 -c \
        'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$ZL_SOCKET"
}

# start_containerd: private containerd 1.6 with [proxy_plugins.zlayer]; sets CTR_ADDRESS.
start_containerd() {
    local c=$BENCH_DIR/containerd
    mkdir -p "$c"
    CTR_ADDRESS=$c/containerd.sock
    cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTR_ADDRESS"
[ttrpc]
  address = "$CTR_ADDRESS.ttrpc"
[debug]
  address = "$c/debug.sock"
  level = "warn"
[metrics]
  address = ""
[proxy_plugins.zlayer]
  type = "snapshot"
  address = "$ZL_SOCKET"
EOF
    /usr/bin/containerd --config "$c/config.toml" >"$c/containerd.log" 2>&1 &
    CONTAINERD_PID=$!
    BENCH_PIDS+=("$CONTAINERD_PID")
    WAIT_PID=$CONTAINERD_PID wait_for 30 "containerd" ctr_ version
}

ctr_() { /usr/bin/ctr --address "$CTR_ADDRESS" --namespace "$BENCH_NS" "$@"; }

# import_image SNAPSHOTTER: build the busybox test image (same recipe as integration/util/image.rs)
# once, then import and unpack it.
import_image() {
    local img=$BENCH_DIR/image
    if [[ ! -f $img/image.tar ]]; then
        mkdir -p "$img/rootfs"/{bin,etc,data/old,dev,proc,sys,run,root,tmp}
        chmod 1777 "$img/rootfs/tmp"
        install -m 0755 /bin/busybox "$img/rootfs/bin/busybox"
        for a in sh ls cat echo mkdir rm sleep touch stat find sha256sum head dd true sync; do
            ln -s busybox "$img/rootfs/bin/$a"
        done
        printf 'root:x:0:0:root:/root:/bin/sh\n' >"$img/rootfs/etc/passwd"
        printf 'root:x:0:\n' >"$img/rootfs/etc/group"
        umoci init --layout "$img/oci"
        umoci new --image "$img/oci:test"
        umoci insert --image "$img/oci:test" "$img/rootfs" /
        umoci config --image "$img/oci:test" --config.cmd /bin/sh --config.env PATH=/bin
        umoci gc --layout "$img/oci"
        tar -C "$img/oci" -cf "$img/image.tar" .
    fi
    ctr_ images import --base-name docker.io/zlayer/busybox --snapshotter "$1" "$img/image.tar" >/dev/null
}

# bench_cleanup: kill tasks, daemons (containerd first), shims, unmount, remove the work dir.
bench_cleanup() {
    local rc=$?
    set +e
    if [[ -n ${CTR_ADDRESS:-} ]] && [[ -S $CTR_ADDRESS ]]; then
        for t in $(ctr_ tasks ls -q 2>/dev/null); do
            ctr_ tasks kill -s SIGKILL "$t" 2>/dev/null
            ctr_ tasks rm -f "$t" >/dev/null 2>&1
        done
    fi
    local i
    for (( i=${#BENCH_PIDS[@]}-1; i>=0; i-- )); do
        kill "${BENCH_PIDS[i]}" 2>/dev/null && wait "${BENCH_PIDS[i]}" 2>/dev/null
    done
    if [[ -n ${CTR_ADDRESS:-} ]]; then
        # Shims started for our containerd carry its address on their command line.
        for pid in $(pgrep -f -- "containerd-shim-runc-v2 .*-address $CTR_ADDRESS( |\$)"); do
            kill -9 "$pid" 2>/dev/null
        done
    fi
    if [[ -n ${BENCH_DIR:-} ]]; then
        awk -v d="$BENCH_DIR" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r |
            while read -r m; do umount -l "$m"; done
        if (( rc != 0 )); then
            log "failed; logs kept in $BENCH_DIR (containerd/containerd.log, zlayer/snapshotter.log)"
        else
            rm -rf "$BENCH_DIR"
        fi
    fi
    [[ -n ${BENCH_NS:-} ]] && rm -rf "/run/containerd/runc/$BENCH_NS"
    exit "$rc"
}
