#!/usr/bin/env bash
# Full sync against the shell bound (issue 10: "full syncs must not regress"): a full
# `zlayer-storage sync` into the local-directory store against `tar | zstd -T0 -3` into a file on
# the same disk, with the client CPU per synced GB next to each.
#
#   ZLAYER_BIN=target/release/zlayer-storage bash integration/bench/fullsync.sh
#
# Env: ZLAYER_BIN (builds the release binary when unset), BENCH_DIR (parent of the scratch dir,
#      default /tmp), BENCH_KEEP=1 (keep the scratch dir), BENCH_RUNS (rounds, default 3; medians
#      decide, min-max shown).
#
# Target: sync wall time ≤ 1.10× the *durable* bound, median over the rounds.
#   bound       tar -C tree -cf - . | zstd -T0 -3 -q -o FILE, then `sync FILE` (fsync of FILE).
#               Our sync fsyncs the blob it stores before it reports success, so the fair bound
#               makes its file durable too; the gate uses "pipeline + fsync". The pipeline alone
#               (page cache only) is measured in the same round and reported beside it.
#   sync        zlayer-storage sync --id fullsync/N of the tree into a local-directory store of its
#               own per round (fresh store, staging and state dirs): a full layer each time, never
#               a delta and never a blob the store already holds. Everything is on one disk.
# Page cache: nothing is dropped; both sides run warm (the tree is read once before the first
# round). Before each measured command a global `sync` (not timed) flushes what the previous
# one left dirty, so neither side pays for the other's writeback. Rounds alternate which side
# goes first. Nothing is deleted between rounds (every output stays until the end).
# CPU: user + system seconds of the measured command and all its children and threads
# (/usr/bin/time), per GB of tree (sum of the regular files' sizes, 10^9 bytes).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
for tool in tar zstd python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
if [ -z "${ZLAYER_BIN:-}" ]; then
  cargo build --release --quiet --bin zlayer-storage
  ZLAYER_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/zlayer-storage
fi
[ -x "$ZLAYER_BIN" ] || { echo "missing $ZLAYER_BIN" >&2; exit 1; }
RUNS=${BENCH_RUNS:-3}

work=$(mktemp -d "${BENCH_DIR:-/tmp}/zl-fullsync-bench.XXXXXX")
cleanup() {
  local rc=$?
  if [ "${finished:-0}" != 1 ]; then echo "failed; kept $work" >&2
  elif [ "${BENCH_KEEP:-0}" != 1 ]; then rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT

echo "Full sync benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(uname -r)"
echo "binary: $ZLAYER_BIN (tree at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown))"
echo "scratch: $work ($(df -P "$work" | awk 'NR==2 {print $1}'))"

# The tree: layer.sh's mix of small text-like and random files and large random and log-like
# files, ~520 MB, generated once.
python3 integration/bench/mixed_tree.py "$work/tree"
tree_bytes=$(find "$work/tree" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
tree_files=$(find "$work/tree" -type f | wc -l)
echo "tree: $tree_files files, $tree_bytes bytes ($(python3 -c "print(round($tree_bytes / 1e9, 3))") GB)"
sleep 0.2                                        # past the index's 100 ms racy margin
tar -C "$work/tree" -cf - . | cat >/dev/null     # warm the page cache
sync

# timed NAME CMD...: wall seconds into $w_NAME, user + system CPU seconds of CMD and everything
# it waited for into $c_NAME.
timed() {
  local name=$1; shift
  local t0 t1
  t0=$(date +%s%N)
  /usr/bin/time -f '%U %S' -o "$work/time.$name" "$@"
  t1=$(date +%s%N)
  printf -v "w_$name" '%s' "$(python3 -c "print(round(($t1 - $t0) / 1e9, 3))")"
  printf -v "c_$name" '%s' "$(awk '{print $1 + $2}' "$work/time.$name")"
}

# config N: a local-directory store, staging dir and state db of its own, all under $work.
config() {
  local d=$work/zl$1
  mkdir -p "$d"
  cat >"$d.toml" <<EOF
[storage]
backend = "local"
local_store_dir = "$d/store"
staging_dir = "$d/staging"
state_db_path = "$d/state.sqlite"
EOF
}

run_bound() {
  local r=$1 out=$work/bound/layer$r.tar.zst
  mkdir -p "$work/bound"
  sync
  timed pipe bash -c "tar -C '$work/tree' -cf - . | zstd -T0 -3 -q -o '$out'"
  timed fsync sync "$out"
  all_pipe+=("$w_pipe")
  all_bound+=("$(python3 -c "print(round($w_pipe + $w_fsync, 3))")")
  cpu_bound+=("$(python3 -c "print(round($c_pipe + $c_fsync, 3))")")
  bound_size=$(stat -c %s "$out")
  echo "  bound: pipeline ${w_pipe}s + fsync ${w_fsync}s, $bound_size bytes, CPU $(python3 -c "print(round($c_pipe + $c_fsync, 2))")s"
}

run_sync() {
  local r=$1 out
  config "$r"
  sync
  timed zl "$ZLAYER_BIN" --config "$work/zl$r.toml" sync --json --id "fullsync/$r" "$work/tree" \
    >"$work/sync$r.json"
  out=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["compressed_size_bytes"])' "$work/sync$r.json")
  # A full layer: the round's store holds exactly one archive of about that size.
  find "$work/zl$r/store" -type f -name '*.tar.zst' | grep -q . \
    || { echo "no archive in the round's store" >&2; exit 2; }
  all_sync+=("$w_zl"); cpu_sync+=("$c_zl")
  sync_size=$out
  echo "  sync:  ${w_zl}s, $out bytes compressed, CPU ${c_zl}s"
}

all_pipe=(); all_bound=(); cpu_bound=(); all_sync=(); cpu_sync=()
for r in $(seq 1 "$RUNS"); do
  echo "round $r/$RUNS"
  if (( r % 2 )); then run_bound "$r"; run_sync "$r"; else run_sync "$r"; run_bound "$r"; fi
done

med() { python3 -c "import statistics,sys; print(round(statistics.median(map(float, sys.argv[1:])), 3))" "$@"; }
spread() { python3 -c "import sys; v=sorted(map(float, sys.argv[1:])); print(f'{v[0]:.3f}-{v[-1]:.3f}')" "$@"; }
per_gb() { python3 -c "print(round($1 / ($tree_bytes / 1e9), 2))"; }
ratios() { python3 -c "import sys; a=sys.argv[1].split(); b=sys.argv[2].split(); v=sorted(float(x)/float(y) for x,y in zip(a,b)); print(f'{v[0]:.3f}-{v[-1]:.3f}')" "$1" "$2"; }

m_pipe=$(med "${all_pipe[@]}"); m_bound=$(med "${all_bound[@]}"); m_sync=$(med "${all_sync[@]}")
mc_bound=$(med "${cpu_bound[@]}"); mc_sync=$(med "${cpu_sync[@]}")
echo
echo "== results (warm cache, $RUNS rounds: median [min-max]; tree $(python3 -c "print(round($tree_bytes / 1e9, 3))") GB, $(nproc) cores) =="
printf '%-52s %8ss  [%s]\n' "tar | zstd -T0 -3 -o FILE (page cache only)" "$m_pipe" "$(spread "${all_pipe[@]}")"
printf '%-52s %8ss  [%s]\n' "tar | zstd -T0 -3 -o FILE; sync FILE (durable bound)" "$m_bound" "$(spread "${all_bound[@]}")"
printf '%-52s %8ss  [%s]\n' "zlayer-storage sync, full layer, local store" "$m_sync" "$(spread "${all_sync[@]}")"
echo
echo "client CPU (user + system, median) per GB of tree:"
printf '%-52s %6ss  = %s s/GB\n' "durable bound" "$mc_bound" "$(per_gb "$mc_bound")"
printf '%-52s %6ss  = %s s/GB\n' "zlayer-storage sync" "$mc_sync" "$(per_gb "$mc_sync")"
echo "compressed: bound $bound_size bytes, sync $sync_size bytes (last round)"
echo
echo "sync / pipeline without fsync (not gated): $(python3 -c "print(round($m_sync / $m_pipe, 3))")× [rounds $(ratios "${all_sync[*]}" "${all_pipe[*]}")]"
ratio=$(python3 -c "print(round($m_sync / $m_bound, 3))")
if python3 -c "import sys; sys.exit(0 if $ratio <= 1.10 else 1)"; then verdict=PASS; fail=0; else verdict=FAIL; fail=1; fi
finished=1
echo "$verdict  full sync / durable tar | zstd bound: ${ratio}× (target ≤ 1.10×) [rounds $(ratios "${all_sync[*]}" "${all_bound[*]}")]"
exit $fail
