#!/usr/bin/env bash
# Bounded fuzz runs, one target after the other:
#   archive_reader  the restore path's archive reader (`fuzz_targets/archive_reader.rs`);
#   replicator      the SQLite WAL reader and the replication segment decoder and writer
#                   (`fuzz_targets/replicator.rs`).
#
#   1. seeds fuzz/corpus/<target> (git-ignored): archive_reader with the hostile corpus
#      (integration/fixtures/archive), the tar streams inside it (so mutations reach the tar
#      parser) and two valid layers packed by `zlayer-storage sync`; replicator with
#      fuzz/seeds/replicator (WAL files written by SQLite, segments, writer programs; made by
#      fuzz/seeds/replicator.py);
#   2. builds every target in one cargo-fuzz invocation (address sanitizer, debug assertions) on
#      the stable toolchain with RUSTC_BOOTSTRAP=1;
#   3. for each target, runs every committed reproducer (fuzz/regressions/<target>) and the
#      seeds, then fuzzes for ZLAYER_FUZZ_SECONDS (default 120): the whole run takes about that
#      times the number of targets, plus the build.
# ZLAYER_FUZZ_TARGETS (space-separated) runs only those targets.
# A crash, a hang (> 10 s on one input), an out-of-memory or a failed check (the targets panic)
# makes libFuzzer exit non-zero, and so this script, once the other targets ran too; the input is
# saved under fuzz/artifacts/<target>/.
#
# Needs: cargo-fuzz; for archive_reader also zstd and the debug binary (built here if missing).
set -euo pipefail
fuzz=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$fuzz")
secs=${ZLAYER_FUZZ_SECONDS:-120}
read -r -a targets <<<"${ZLAYER_FUZZ_TARGETS:-archive_reader replicator}"
for t in "${targets[@]}"; do
    [[ -f $fuzz/fuzz_targets/$t.rs ]] || { echo "fuzz: no target $t" >&2; exit 2; }
    mkdir -p "$fuzz/corpus/$t" "$fuzz/regressions/$t" "$fuzz/artifacts/$t"
done
wants() { [[ " ${targets[*]} " == *" $1 "* ]]; }

# 1. Seeds.
seed_archive_reader() {
    corpus=$fuzz/corpus/archive_reader
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
}
if wants archive_reader; then seed_archive_reader; fi
if wants replicator; then cp "$fuzz"/seeds/replicator/* "$fuzz/corpus/replicator/"; fi
for t in "${targets[@]}"; do
    echo "fuzz: $t: $(find "$fuzz/corpus/$t" -type f | wc -l) corpus inputs," \
        "$(find "$fuzz/regressions/$t" -type f | wc -l) regressions"
done

# 2. Build (timed: it is part of the CI budget) every target in one cargo invocation, always into
# fuzz/target: the instrumented artifacts must not land in (or rebuild) the main target dir.
# `cargo fuzz run` below passes the same flags, so its own build of the target is a no-op.
start=$(date +%s)
fuzz_build=(--debug-assertions --target-dir "$fuzz/target")
# The machine's one (stable) toolchain, with RUSTC_BOOTSTRAP=1 for cargo-fuzz's -Z flags: its
# rust-std ships the sanitizer runtimes, and a fresh machine has no other toolchain to fetch.
export RUSTC_BOOTSTRAP=1
(cd "$repo" && cargo fuzz build "${fuzz_build[@]}")
echo "fuzz: build took $(($(date +%s) - start)) s"

# 3. Run. The regressions dir comes second, so new inputs are only written to the corpus. Each
# input works under $TMPDIR: tmpfs when there is one (a third of the time per archive input).
cd "$repo"
if [[ -z ${ZLAYER_FUZZ_TMPDIR:-} && -d /dev/shm && -w /dev/shm ]]; then ZLAYER_FUZZ_TMPDIR=/dev/shm; fi
failed=()
for t in "${targets[@]}"; do
    log=$fuzz/artifacts/$t.log
    set +e
    TMPDIR=${ZLAYER_FUZZ_TMPDIR:-${TMPDIR:-/tmp}} \
        cargo fuzz run "${fuzz_build[@]}" "$t" "$fuzz/corpus/$t" "$fuzz/regressions/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done |stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" |
        sed "s/^/fuzz: $t: /" || true
    if ((rc != 0)); then
        tail -n 60 "$log"
        echo "fuzz: $t FAILED (exit $rc); input saved under fuzz/artifacts/$t/, full log $log" >&2
        failed+=("$t")
    else
        echo "fuzz: $t ran ${secs} s, nothing found"
    fi
done
((${#failed[@]} == 0)) || { echo "fuzz: failed: ${failed[*]}" >&2; exit 1; }
