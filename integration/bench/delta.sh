#!/usr/bin/env bash
# Delta layer benchmark (issue 10 §4): what a sync after a small change uploads and costs, and
# what a restore through a chain of deltas costs, each against its baseline measured in the same
# run, on the local-directory store (no server sharing the two cores).
#
#   integration/bench/delta.sh            # builds the release binary when ZLAYER_BIN is unset
#
# Env: ZLAYER_BIN, BENCH_DIR (parent of the scratch dir, default /tmp), BENCH_KEEP=1,
#      BENCH_FILES (5000), BENCH_FILE_KB (100) — the tree is FILES files of random bytes in
#      directories of 100, BENCH_CHANGE_PERCENT (1), BENCH_DELTAS (10), BENCH_RUNS (9).
#
# 1. checkpoint  full sync of the tree, then BENCH_CHANGE_PERCENT % of its files rewritten and
#                synced again (a delta): compressed bytes and wall time, delta / full.
#                Targets: ≤ 3 % of the bytes, ≤ 10 % of the time.
# 2. chain       BENCH_DELTAS more rounds of changes (a base + BENCH_DELTAS deltas), restored;
#                against the same final tree stored as one full layer (delta_chain_max = 0),
#                restored. BENCH_RUNS rounds, each restoring both (which goes first alternates:
#                this disk's noise is large); the ratio of the medians and the median of the
#                per-round ratios are printed, the page cache dropped before every restore;
#                both restores are checked equal to the tree. Target: ≤ 1.2× (ratio of medians).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
for tool in python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
if [ -z "${ZLAYER_BIN:-}" ]; then
  cargo build --release --quiet --bin zlayer-storage
  ZLAYER_BIN=$REPO/target/release/zlayer-storage
fi
FILES=${BENCH_FILES:-5000}
FILE_KB=${BENCH_FILE_KB:-100}
CHANGE=${BENCH_CHANGE_PERCENT:-1}
DELTAS=${BENCH_DELTAS:-10}
RUNS=${BENCH_RUNS:-9}

work=$(mktemp -d "${BENCH_DIR:-/tmp}/zl-delta-bench.XXXXXX")
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then echo "failed; kept $work" >&2
  elif [ "${BENCH_KEEP:-0}" != 1 ]; then rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT

calc() { python3 -c "import math; print($1)"; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
verdict() { if [ "$2" = True ]; then echo "target met:    $1 ($3)"; else echo "target missed: $1 ($3)"; fi; }
now_ms() { date +%s%3N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

# config NAME [CHAIN_MAX]: a local-directory store of its own.
config() {
  local d=$work/$1
  mkdir -p "$d"
  cat >"$d.toml" <<EOF
[storage]
backend = "local"
local_store_dir = "$d/store"
staging_dir = "$d/staging"
state_db_path = "$d/state.sqlite"
delta_chain_max = ${2:-$DELTAS}
EOF
}
zl() { local name=$1; shift; "$ZLAYER_BIN" --config "$work/$name.toml" "$@"; }
# sync_json NAME ID: syncs the tree, prints "compressed_bytes wall_ms".
sync_json() {
  local t0 t1 out
  t0=$(now_ms)
  out=$(zl "$1" sync --json --id "$2" "$work/tree")
  t1=$(now_ms)
  echo "$(python3 -c 'import json,sys; print(json.load(sys.stdin)["compressed_size_bytes"])' <<<"$out") $(( t1 - t0 ))"
}
# change ROUND: rewrites CHANGE % of the files (a different set each round).
change() {
  python3 - "$work/tree" "$FILES" "$FILE_KB" "$CHANGE" "$1" <<'PY'
import os, sys
root, files, kb, pct, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
n = max(1, int(files * pct / 100))
step = max(1, files // n)
for k in range(n):
    i = (k * step + rnd) % files
    with open(os.path.join(root, f"d{i // 100:03d}", f"f{i:05d}"), "wb") as f:
        f.write(os.urandom(kb * 1024))
PY
  sleep 0.2   # past the index's 100 ms racy margin
}
tree_sum() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1); }

echo "Delta layer benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(uname -r)"
echo "binary: $ZLAYER_BIN (tree at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown))"
python3 - "$work/tree" "$FILES" "$FILE_KB" <<'PY'
import os, sys
root, files, kb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(files):
    d = os.path.join(root, f"d{i // 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
        f.write(os.urandom(kb * 1024))
PY
sleep 0.2
echo "tree: $FILES files of $FILE_KB KiB ($(du -sm "$work/tree" | cut -f1) MB)"

echo
echo "== 1. checkpoint: $CHANGE % of the files changed, synced again"
config chain
read -r full_bytes full_ms < <(sync_json chain bench/0)
change 1
read -r delta_bytes delta_ms < <(sync_json chain bench/0)
echo "  full sync:  $full_bytes bytes in $full_ms ms"
echo "  delta sync: $delta_bytes bytes in $delta_ms ms"
bytes_ratio=$(calc "round($delta_bytes / $full_bytes, 4)")
time_ratio=$(calc "round($delta_ms / $full_ms, 4)")
verdict "checkpoint uploads ≤ 3 % of a full sync's bytes" "$(calc "$bytes_ratio <= 0.03")" "$(calc "round($bytes_ratio * 100, 2)") %"
verdict "checkpoint takes ≤ 10 % of a full sync's time" "$(calc "$time_ratio <= 0.10")" "$(calc "round($time_ratio * 100, 1)") %"

echo
echo "== 2. restore of a base + $DELTAS deltas vs one full layer of the same tree"
for r in $(seq 2 "$DELTAS"); do
  change "$r"
  sync_json chain bench/0 >/dev/null
done
chain_len=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["current"].get("chain", [])))' \
  "$work/chain/store/layers/manifests/bench_0.json")
echo "  chain under the current version: $chain_len archives (base + $(( chain_len - 1 )) deltas, then the current delta)"
[ "$chain_len" = "$DELTAS" ] || { echo "expected $DELTAS archives under the current version" >&2; exit 1; }
config full 0
sync_json full bench/0 >/dev/null
want=$(tree_sum "$work/tree")
chain_ms=(); full_ms=()
for r in $(seq 1 "$RUNS"); do
  order="chain full"; (( r % 2 == 0 )) && order="full chain"
  for kind in $order; do
    drop_caches
    t0=$(now_ms)
    zl "$kind" restore --id bench/0 "$work/restored-$kind-$r" >/dev/null
    t1=$(now_ms)
    [ "$(tree_sum "$work/restored-$kind-$r")" = "$want" ] || { echo "$kind restore differs from the tree" >&2; exit 1; }
    if [ "$kind" = chain ]; then chain_ms+=($(( t1 - t0 ))); else full_ms+=($(( t1 - t0 ))); fi
  done
done
mc=$(median "${chain_ms[@]}"); mf=$(median "${full_ms[@]}")
echo "  restore through the chain: median $mc ms [${chain_ms[*]}]"
echo "  restore of one full layer: median $mf ms [${full_ms[*]}]"
ratio=$(calc "round($mc / $mf, 3)")
per_round=$(python3 -c 'import sys, statistics; c = sys.argv[1].split(); f = sys.argv[2].split(); print(round(statistics.median(int(a) / int(b) for a, b in zip(c, f)), 3))' "${chain_ms[*]}" "${full_ms[*]}")
echo "  median of the per-round ratios: ${per_round}×"
verdict "restore of a base + $DELTAS deltas ≤ 1.2× one full layer" "$(calc "$ratio <= 1.2")" "${ratio}×"
