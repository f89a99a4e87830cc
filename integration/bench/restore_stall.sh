#!/usr/bin/env bash
# Benchmark: start latency of unrelated containers (containerd's own overlayfs, and zlayer without
# identity) while a large layer restores for another container through zlayer, vs idle. A restore
# inside Prepare holds zlayer's metadata lock in containerd (shared): containerd's GC of zlayer
# snapshots waits for it, and every zlayer Prepare waits behind that GC.
#
#   integration/bench/restore_stall.sh [SAMPLES]     SAMPLES = runs idle and during (default 5)
#   SIZE_MB=1024 PART_SIZE_MB=64 RESTORE_TIMEOUT=900 GARAGE_BIN=... ZLAYER_BIN=... (optional)
#
# The layer (SIZE_MB of /dev/urandom, incompressible) is stored with `zlayer-storage sync`, so the
# restore is a download from Garage on loopback. A sample counts as "during" when the restore was
# running when it started (a restore spool in the staging dir, no "layer restored" log line yet,
# the restoring container not started); whether it still ran at each sample's end is reported.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SAMPLES=${1:-5}
SIZE_MB=${SIZE_MB:-1024}
PART_SIZE_MB=${PART_SIZE_MB:-64}
RESTORE_TIMEOUT=${RESTORE_TIMEOUT:-900}
ID_LABEL=containerd.io/snapshot/zlayer.id

bench_init
trap bench_cleanup EXIT
# The release build as it is; built only when missing.
if [[ -z ${ZLAYER_BIN:-} && -x $BENCH_REPO/target/release/zlayer-storage ]]; then
    ZLAYER_BIN=$BENCH_REPO/target/release/zlayer-storage
fi
bench_build
log "binary: $ZLAYER_BIN"
start_garage
start_snapshotter $(( PART_SIZE_MB * 1024 * 1024 ))
start_containerd
import_image zlayer
import_image overlayfs

Z=$BENCH_DIR/zlayer
# The CLI gets its own state DB and staging dir, so it never contends with the daemon.
sed -e "s#$Z/staging#$Z/cli-staging#" -e "s#$Z/state.sqlite#$Z/cli-state.sqlite#" \
    "$ZL_CONFIG" >"$Z/cli.toml"
layer=$BENCH_DIR/layer
mkdir -p "$layer"
dd if=/dev/urandom of="$layer/big" bs=1M count="$SIZE_MB" status=none
big_sha=$(sha256sum "$layer/big" | cut -d' ' -f1)
t0=$(now_ns)
"$ZLAYER_BIN" --config "$Z/cli.toml" sync --id stall/0 "$layer" >&2
log "stored $SIZE_MB MiB as stall/0 in $(( ($(now_ns) - t0) / 1000000 )) ms"
rm -rf "$layer"

# unrelated SNAPSHOTTER NAME: one `ctr run --rm` without identity; prints its wall time in ns.
unrelated() {
    local t0 t1
    t0=$(now_ns)
    ctr_ run --rm --snapshotter "$1" "$IMAGE_REF" "$2" /bin/true
    t1=$(now_ns)
    echo $(( t1 - t0 ))
}
median_ms() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {printf "%.1f", v[int((NR+1)/2)] / 1e6}'; }

unrelated overlayfs warm-o >/dev/null
unrelated zlayer warm-z >/dev/null
idle_o=(); idle_z=()
for (( i=0; i<SAMPLES; i++ )); do
    idle_o+=("$(unrelated overlayfs "idle-o-$i")")
    idle_z+=("$(unrelated zlayer "idle-z-$i")")
done

out=$BENCH_DIR/out
mkdir -p "$out"
restoring() {
    compgen -G "$Z/staging/tmp/restore*" >/dev/null &&
        ! grep -q 'layer restored' "$Z/snapshotter.log" && [[ ! -e $out/started ]]
}
t_spawn=$(now_ns)
ctr_ run --snapshotter zlayer --snapshotter-label "$ID_LABEL=stall/0" \
    --mount "type=bind,src=$out,dst=/out,options=rbind:rw" "$IMAGE_REF" big \
    /bin/sh -c 'touch /out/started; sha256sum /big > /out/sum' >"$BENCH_DIR/big.out" 2>&1 &
BIG_PID=$!
BENCH_PIDS+=("$BIG_PID")
WAIT_PID=$BIG_PID wait_for 120 "the restore to start" restoring

during_o=(); during_z=()
all_during=yes
# sample SNAPSHOTTER NAME ARRAY: one sample, kept in ARRAY when the restore was running at its
# start (a start the restore stalls ends only after it).
sample() {
    local before=no after=no ns
    restoring && before=yes
    ns=$(unrelated "$1" "$2")
    restoring && after=yes
    log "  $2: $(( ns / 1000000 )) ms (restore running at start: $before, at end: $after)"
    [[ $after == yes ]] || all_during=no
    if [[ $before == yes ]]; then
        local -n into=$3
        into+=("$ns")
    fi
}
for (( i=0; i<SAMPLES; i++ )); do
    sample overlayfs "during-o-$i" during_o
    sample zlayer "during-z-$i" during_z
done

deadline=$(( $(date +%s) + RESTORE_TIMEOUT ))
while kill -0 "$BIG_PID" 2>/dev/null; do
    (( $(date +%s) < deadline )) || die "restoring container not done after $RESTORE_TIMEOUT s"
    sleep 0.1
done
wait "$BIG_PID" || die "ctr run of the restoring container failed: $(cat "$BENCH_DIR/big.out")"
t_done=$(now_ns)
[[ $(cut -d' ' -f1 "$out/sum") == "$big_sha" ]] || die "restored /big differs from the stored one"

printf 'unrelated ctr run --rm /bin/true (no identity), %d samples each; %d MiB layer restoring from Garage\n' \
    "$SAMPLES" "$SIZE_MB"
report() {
    local name=$1 idle_name=$2 during_name=$3
    local -n idle_ns=$idle_name during_ns=$during_name
    local idle_ms during_ms
    idle_ms=$(median_ms "${idle_ns[@]}")
    printf '  %-9s idle median %8s ms' "$name" "$idle_ms"
    if (( ${#during_ns[@]} > 0 )); then
        during_ms=$(median_ms "${during_ns[@]}")
        awk -v d="$during_ms" -v i="$idle_ms" -v n="${#during_ns[@]}" \
            'BEGIN { printf "   during the restore median %8s ms (%d samples)   ratio %.2f\n", d, n, d / i }'
    else
        printf '   during the restore: no sample started during it\n'
    fi
}
report overlayfs idle_o during_o
report zlayer idle_z during_z
printf '  restore still running at the end of every sample: %s%s\n' "$all_during" \
    "$([[ $all_during == yes ]] || echo " (a stalled start, or raise SIZE_MB)")"
printf '  restoring container done %.1f s after its ctr run (restore + sha256sum); content verified\n' \
    "$(awk -v n="$(( t_done - t_spawn ))" 'BEGIN { print n / 1e9 }')"
