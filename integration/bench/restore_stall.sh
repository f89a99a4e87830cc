#!/usr/bin/env bash
# Benchmark: start latency of an unrelated container (containerd's own overlayfs) while a large
# layer restores for another container through zlayer, vs idle. A restore that runs inside
# containerd's metadata transaction stalls every other container start on the node.
#
#   integration/bench/restore_stall.sh [SAMPLES]     SAMPLES = runs idle and during (default 5)
#   SIZE_MB=1024 PART_SIZE_MB=64 RESTORE_TIMEOUT=900 GARAGE_BIN=... ZLAYER_BIN=... (optional)
#
# The layer (SIZE_MB of /dev/urandom, incompressible) is stored with `zlayer-storage sync`, so the
# restore is a download from Garage on loopback. A sample counts as "during" only when the
# restore was running when it started and when it ended (a restore spool in the staging dir, no
# "layer restored" log line yet, the restoring container not started).

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

# unrelated NAME: one `ctr run --rm` on overlayfs; prints its wall time in ns.
unrelated() {
    local t0 t1
    t0=$(now_ns)
    ctr_ run --rm --snapshotter overlayfs "$IMAGE_REF" "$1" /bin/true
    t1=$(now_ns)
    echo $(( t1 - t0 ))
}
median_ms() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {printf "%.1f", v[int((NR+1)/2)] / 1e6}'; }

unrelated warm >/dev/null
idle=()
for (( i=0; i<SAMPLES; i++ )); do idle+=("$(unrelated "idle-$i")"); done

out=$BENCH_DIR/out
mkdir -p "$out"
restoring() {
    compgen -G "$Z/staging/tmp/restore-*" >/dev/null &&
        ! grep -q 'layer restored' "$Z/snapshotter.log" && [[ ! -e $out/started ]]
}
t_spawn=$(now_ns)
ctr_ run --snapshotter zlayer --snapshotter-label "$ID_LABEL=stall/0" \
    --mount "type=bind,src=$out,dst=/out,options=rbind:rw" "$IMAGE_REF" big \
    /bin/sh -c 'touch /out/started; sha256sum /big > /out/sum' >"$BENCH_DIR/big.out" 2>&1 &
BIG_PID=$!
BENCH_PIDS+=("$BIG_PID")
WAIT_PID=$BIG_PID wait_for 120 "the restore to start" restoring

during=()
all_during=yes
for (( i=0; i<SAMPLES; i++ )); do
    before=no; after=no
    restoring && before=yes
    ns=$(unrelated "during-$i")
    restoring && after=yes
    log "  sample $i: $(( ns / 1000000 )) ms (restore running at start: $before, at end: $after)"
    if [[ $before == yes && $after == yes ]]; then during+=("$ns"); else all_during=no; fi
done

deadline=$(( $(date +%s) + RESTORE_TIMEOUT ))
while kill -0 "$BIG_PID" 2>/dev/null; do
    (( $(date +%s) < deadline )) || die "restoring container not done after $RESTORE_TIMEOUT s"
    sleep 0.1
done
wait "$BIG_PID" || die "ctr run of the restoring container failed: $(cat "$BENCH_DIR/big.out")"
t_done=$(now_ns)
[[ $(cut -d' ' -f1 "$out/sum") == "$big_sha" ]] || die "restored /big differs from the stored one"

idle_ms=$(median_ms "${idle[@]}")
printf 'unrelated ctr run --rm /bin/true on overlayfs, %d samples each; %d MiB layer restoring from Garage\n' \
    "$SAMPLES" "$SIZE_MB"
printf '  idle                 median %8s ms\n' "$idle_ms"
if (( ${#during[@]} > 0 )); then
    during_ms=$(median_ms "${during[@]}")
    printf '  during the restore   median %8s ms  (%d samples)\n' "$during_ms" "${#during[@]}"
    awk -v d="$during_ms" -v i="$idle_ms" 'BEGIN { printf "  ratio during/idle: %.2f\n", d / i }'
else
    printf '  during the restore   no sample ran entirely during the restore\n'
fi
printf '  restore running throughout every sample: %s%s\n' "$all_during" \
    "$([[ $all_during == yes ]] || echo " (raise SIZE_MB)")"
printf '  restoring container done %.1f s after its ctr run (restore + sha256sum); content verified\n' \
    "$(awk -v n="$(( t_done - t_spawn ))" 'BEGIN { print n / 1e9 }')"
