#!/bin/sh
# containerd's snapshotter benchmark workload (snapshots/benchsuite: 16 layers of 1 MB files;
# Prepare, mount+write+unmount, Commit) through containerd's gRPC proxy client, against
# zlayer-storage and against containerd's overlay snapshotter served over the same proxy
# (contrib/snapshotservice). Rounds alternate between the two (first one switching each round,
# page cache flushed before each run); medians are compared.
#
# Usage (as root): integration/bench/benchsuite.sh
# Environment:
#   ZLAYER_STORAGE_BIN  binary to test (default: cargo build --release, target/release/zlayer-storage)
#   ROUNDS              alternating rounds per snapshotter (default 5)
#   BENCHTIME           go -test.benchtime per round (default 5x: five 16-layer chains)
#   TARGET              acceptable total-time ratio zlayer/overlay (default 1.05)
set -eu

[ "$(id -u)" = 0 ] || { echo "benchsuite.sh: must run as root (the workload mounts overlays)" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${ROUNDS:-5}
BENCHTIME=${BENCHTIME:-5x}
TARGET=${TARGET:-1.05}

if [ -z "${ZLAYER_STORAGE_BIN:-}" ]; then
    (cd "$repo" && cargo build --release --bin zlayer-storage >&2)
    ZLAYER_STORAGE_BIN="$repo/target/release/zlayer-storage"
fi
export ZLAYER_STORAGE_BIN

work=$(mktemp -d "${TMPDIR:-/tmp}/zlayer-benchsuite-XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
"$repo/integration/go-testsuite/build.sh" "$work/go" >&2
export ZLAYER_BENCH_DIR="$work"

results="$work/results"
: > "$results"
round=1
while [ "$round" -le "$ROUNDS" ]; do
    # Alternate who goes first, and flush dirty pages before each run: writeback left by one
    # run would otherwise slow down the next one's writes.
    if [ $((round % 2)) = 1 ]; then order="Zlayer Overlay"; else order="Overlay Zlayer"; fi
    for which in $order; do
        sync
        "$work/go/bench.test" -test.run '^$' -test.bench "^Benchmark${which}\$" -test.benchtime "$BENCHTIME" \
            | grep "^Benchmark${which}" | tee -a "$results" >&2
    done
    round=$((round + 1))
done

# Lines look like: BenchmarkZlayer-2  5  390706510 ns/op  26231701 commit-ns/op  22554664 prepare-ns/op  341768978 write-ns/op
awk -v target="$TARGET" '
function median(name, metric,    n, i, j, t, v) {
    n = count[name]
    for (i = 1; i <= n; i++) v[i] = val[name, metric, i]
    for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
{
    name = $1; sub(/^Benchmark/, "", name); sub(/-[0-9]+$/, "", name)
    k = ++count[name]
    for (i = 3; i < NF; i += 2) val[name, $(i + 1), k] = $i
}
END {
    if (!count["Zlayer"] || !count["Overlay"]) { print "benchsuite.sh: missing results" > "/dev/stderr"; exit 1 }
    printf "%-14s %16s %16s %8s\n", "ns/op (median)", "zlayer", "overlay", "ratio"
    split("ns/op prepare-ns/op write-ns/op commit-ns/op", metrics, " ")
    for (m = 1; m <= 4; m++) {
        z = median("Zlayer", metrics[m]); o = median("Overlay", metrics[m])
        printf "%-14s %16.0f %16.0f %7.3fx\n", metrics[m], z, o, z / o
        if (m == 1) total = z / o
    }
    printf "rounds: %d per snapshotter; total ratio %.3fx (target <= %.2fx): %s\n", count["Zlayer"], total, target,
        (total <= target) ? "met" : "NOT met"
}' "$results"
