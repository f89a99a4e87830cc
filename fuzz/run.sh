#!/usr/bin/env bash
# Bounded fuzz run of the archive reader (`fuzz_targets/archive_reader.rs`).
#
#   1. seeds fuzz/corpus/archive_reader (git-ignored) with the hostile corpus
#      (integration/fixtures/archive), the tar streams inside it (so mutations reach the tar
#      parser) and two valid layers packed by `zlayer-storage sync`;
#   2. builds the target with cargo-fuzz (address sanitizer, debug assertions) on the stable
#      toolchain with RUSTC_BOOTSTRAP=1;
#   3. runs every committed reproducer (fuzz/regressions/archive_reader) and the seeds, then
#      fuzzes for ZLAYER_FUZZ_SECONDS (default 120).
# A crash, a hang (> 10 s on one input), an out-of-memory or a write outside the target (the
# target panics) makes libFuzzer exit non-zero, and so this script; the input is saved under
# fuzz/artifacts/archive_reader/.
#
# Needs: cargo-fuzz, zstd, the debug binary (built here if missing).
set -euo pipefail
fuzz=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$fuzz")
secs=${ZLAYER_FUZZ_SECONDS:-120}
corpus=$fuzz/corpus/archive_reader
regressions=$fuzz/regressions/archive_reader
log=$fuzz/artifacts/archive_reader.log
mkdir -p "$corpus" "$regressions" "$fuzz/artifacts/archive_reader"

# 1. Seeds.
for f in "$repo"/integration/fixtures/archive/*.tar.zst; do
    name=$(basename "$f" .tar.zst)
    cp "$f" "$corpus/$name.tar.zst"
    # The decompressed tar, when it is a small one (not the bomb, not the broken frames).
    if zstd -dqc "$f" 2>/dev/null | head -c $((256 * 1024 + 1)) >"$corpus/$name.tar" &&
        (($(stat -c %s "$corpus/$name.tar") <= 256 * 1024)); then
        :
    else
        rm -f "$corpus/$name.tar"
    fi
done
bin=${CARGO_TARGET_DIR:-$repo/target}/debug/zlayer-storage
[[ -x $bin ]] || (cd "$repo" && cargo build --locked --quiet --bin zlayer-storage)
work=$(mktemp -d /tmp/zlayer-fuzz-seed-XXXXXX)
trap 'rm -rf "$work"' EXIT
tree=$work/upper
mkdir -p "$tree/etc/app" "$tree/var/lib/opaque" "$tree/data"
echo "hello" >"$tree/data/hello"
printf 'key = "value"\n' >"$tree/etc/app/config.toml"
ln -s ../data/hello "$tree/etc/app/link"
ln "$tree/data/hello" "$tree/data/hardlink"
mkfifo "$tree/data/fifo"
chmod 0600 "$tree/etc/app/config.toml"
if [[ $(id -u) == 0 ]]; then
    mknod "$tree/data/deleted" c 0 0 # a whiteout
    setfattr -n trusted.overlay.opaque -v y "$tree/var/lib/opaque" 2>/dev/null || true
fi
setfattr -n user.note -v seed "$tree/data/hello" 2>/dev/null || true
sparse=$work/sparse
mkdir -p "$sparse/big"
truncate -s 1M "$sparse/big/file"
echo tail >>"$sparse/big/file"
n=0
for upper in "$tree" "$sparse"; do
    n=$((n + 1))
    ZLAYER_STORAGE_BACKEND=local ZLAYER_STORAGE_PREFIX= \
        ZLAYER_STORAGE_LOCAL_STORE_DIR="$work/store" ZLAYER_STORAGE_STAGING_DIR="$work/staging" \
        ZLAYER_STORAGE_STATE_DB_PATH="$work/state.sqlite" \
        "$bin" --config /dev/null sync --id "fuzz-seed/$n" "$upper" >/dev/null
done
seeded=0
for blob in "$work"/store/*.tar.zst; do
    cp "$blob" "$corpus/valid-$(basename "$blob")"
    seeded=$((seeded + 1))
done
((seeded == 2)) || { echo "fuzz: expected 2 valid seed archives, got $seeded" >&2; exit 1; }
echo "fuzz: $(find "$corpus" -type f | wc -l) corpus inputs, $(find "$regressions" -type f | wc -l) regressions"

# 2. Build (timed: it is part of the CI budget), always into fuzz/target: the instrumented
# artifacts must not land in (or rebuild) the main target dir.
start=$(date +%s)
fuzz_build=(--debug-assertions --target-dir "$fuzz/target" archive_reader)
# The machine's one (stable) toolchain, with RUSTC_BOOTSTRAP=1 for cargo-fuzz's -Z flags: its
# rust-std ships the sanitizer runtimes, and a fresh machine has no other toolchain to fetch.
export RUSTC_BOOTSTRAP=1
(cd "$repo" && cargo fuzz build "${fuzz_build[@]}")
echo "fuzz: build took $(($(date +%s) - start)) s"

# 3. Run. The regressions dir comes second, so new inputs are only written to the corpus. Each
# input is extracted under $TMPDIR: tmpfs when there is one (a third of the time per input).
cd "$repo"
if [[ -z ${ZLAYER_FUZZ_TMPDIR:-} && -d /dev/shm && -w /dev/shm ]]; then ZLAYER_FUZZ_TMPDIR=/dev/shm; fi
set +e
TMPDIR=${ZLAYER_FUZZ_TMPDIR:-${TMPDIR:-/tmp}} \
    cargo fuzz run "${fuzz_build[@]}" "$corpus" "$regressions" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 >"$log" 2>&1
rc=$?
set -e
grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done |stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" || true
if ((rc != 0)); then
    tail -n 60 "$log"
    echo "fuzz: FAILED (exit $rc); input saved under fuzz/artifacts/archive_reader/, full log $log" >&2
    exit 1
fi
echo "fuzz: archive_reader ran ${secs} s, nothing found"
