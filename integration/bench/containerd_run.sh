#!/usr/bin/env bash
# Benchmark: container start/stop through zlayer vs containerd's built-in overlayfs, and the time
# from `ctr rm` to a labeled container's layer being durable in S3 (Garage).
#
#   integration/bench/containerd_run.sh [N]        N = containers per snapshotter (default 20)
#   PAYLOAD_MB=50 PART_SIZE_MB=8 DURABLE_TIMEOUT=600 GARAGE_BIN=... ZLAYER_BIN=... (optional)
#
# Both snapshotters run on the same private containerd; the containers have no identity, so zlayer
# has nothing to persist (pure snapshotter overhead). Runs alternate between the two snapshotters
# so background noise hits both equally. Target: zlayer / overlayfs <= 1.10.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${1:-20}
PAYLOAD_MB=${PAYLOAD_MB:-50}
PART_SIZE_MB=${PART_SIZE_MB:-8}
DURABLE_TIMEOUT=${DURABLE_TIMEOUT:-600}
ID_LABEL=containerd.io/snapshot/zlayer.id

bench_init
trap bench_cleanup EXIT
bench_build
start_garage
start_snapshotter $(( PART_SIZE_MB * 1024 * 1024 ))
start_containerd
import_image zlayer
import_image overlayfs

# One warm-up run each (first shim start, page cache).
ctr_ run --rm --snapshotter overlayfs "$IMAGE_REF" warm-o /bin/true
ctr_ run --rm --snapshotter zlayer "$IMAGE_REF" warm-z /bin/true

declare -A total=([overlayfs]=0 [zlayer]=0)
for (( i=0; i<N; i++ )); do
    for s in overlayfs zlayer; do
        t0=$(now_ns)
        ctr_ run --rm --snapshotter "$s" "$IMAGE_REF" "run-$s-$i" /bin/true
        t1=$(now_ns)
        total[$s]=$(( total[$s] + t1 - t0 ))
    done
done
# Every run's snapshot must be gone again (nothing leaked by either snapshotter).
[[ -z $(ctr_ containers ls -q) ]] || die "containers left behind"

awk -v n="$N" -v o="${total[overlayfs]}" -v z="${total[zlayer]}" 'BEGIN {
    printf "ctr run --rm /bin/true, %d containers each (alternating)\n", n
    printf "  overlayfs  total %8.3f s   mean %7.1f ms\n", o / 1e9, o / n / 1e6
    printf "  zlayer     total %8.3f s   mean %7.1f ms\n", z / 1e9, z / n / 1e6
    printf "  ratio zlayer/overlayfs: %.3f (target <= 1.10)\n", z / o
}'

# Durability: a labeled container writes PAYLOAD_MB of random data; time `ctr rm` itself and
# until its manifest is in the bucket (polled with signed HEAD requests every 50 ms).
ctr_ run --snapshotter zlayer --snapshotter-label "$ID_LABEL=bench/0" "$IMAGE_REF" durable \
    /bin/sh -c "dd if=/dev/urandom of=/payload bs=1M count=$PAYLOAD_MB 2>/dev/null"
manifest_url=$S3_ENDPOINT/$S3_BUCKET/layers/manifests/bench_0.json
head_manifest() {
    curl -sf -o /dev/null -I --aws-sigv4 "aws:amz:garage:s3" --user "$S3_KEY:$S3_SECRET" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$manifest_url"
}
head_manifest && die "manifest exists before ctr rm"
t0=$(now_ns)
ctr_ containers rm durable
t1=$(now_ns)
deadline=$(( $(date +%s) + DURABLE_TIMEOUT ))
until head_manifest; do
    (( $(date +%s) < deadline )) || die "layer not durable after $DURABLE_TIMEOUT s"
    sleep 0.05
done
t2=$(now_ns)

awk -v rm="$(( t1 - t0 ))" -v dur="$(( t2 - t0 ))" -v mb="$PAYLOAD_MB" -v part="$PART_SIZE_MB" 'BEGIN {
    printf "labeled container, %d MiB random payload, %d MiB parts, Garage on loopback\n", mb, part
    printf "  ctr containers rm returned after %8.1f ms\n", rm / 1e6
    printf "  layer durable in S3 after        %8.1f ms (from ctr rm)\n", dur / 1e6
}'
