#!/usr/bin/env bash
# Checkpoint pause benchmark (issue 10 §4): how long a checkpoint keeps a running container
# frozen, on a 10,000-file upper that a writer inside the container keeps changing (about 1 %
# of its files a second), through the real path: containerd, runc, the cgroup freezer, the
# daemon's control socket (`zlayer-storage checkpoint`), Garage.
#
#   integration/bench/checkpoint.sh [N]      N checkpoints (default 30), one a second
#
# Env: ZLAYER_BIN (skip the build), GARAGE_BIN, BENCH_FILES (10000), BENCH_BUDGET_MS (200).
# Prints the pause's p50 / p99 / max and the bytes per checkpoint. Target: pause p99 ≤ 200 ms.
# No baseline ratio: the target is an absolute bound on the time the container is frozen.
#
# Phase 2 (BENCH_BIG_FILES, default 5000, of 100 KiB random bytes: ≥ 500 MB; 0 skips it): a
# second container's first checkpoint captures its whole upper (the baseline, in the same run);
# then 1 % of its files are rewritten and the next checkpoint's bytes and time are compared with
# it. Targets: ≤ 3 % of the bytes, ≤ 10 % of the time.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${1:-30}
FILES=${BENCH_FILES:-10000}
BUDGET_MS=${BENCH_BUDGET_MS:-200}
DIRS=$(( FILES / 100 ))

bench_init
trap bench_cleanup EXIT
bench_build
start_garage
ZL_SNAPSHOTTER_EXTRA="checkpoint_interval_secs = 0
checkpoint_pause_ms = $BUDGET_MS" start_snapshotter
start_containerd
import_image zlayer

host=$BENCH_DIR/host
mkdir -p "$host"
# $DIRS dirs of 100 files (~1 KiB each), then, every 0.1 s, 10 of them rewritten.
script="mkdir -p /data; i=0; pad=x
for k in 1 2 3 4 5 6 7 8 9; do pad=\"\$pad\$pad\"; done
while [ \$i -lt $DIRS ]; do mkdir /data/d\$i; j=0
  while [ \$j -lt 100 ]; do echo \"file \$i \$j \$pad\" > /data/d\$i/f\$j; j=\$((j+1)); done
  i=\$((i+1)); done
echo > /zl-in/ready
n=0
while true; do k=0
  while [ \$k -lt 10 ]; do n=\$((n+1)); echo \"step \$n\" > /data/d\$((n % $DIRS))/f\$(( (n / $DIRS) % 100 )); k=\$((k+1)); done
  sleep 0.1; done"
ctr_ run -d --snapshotter zlayer --label zlayer.id=bench/ckpt \
    --mount "type=bind,src=$host,dst=/zl-in,options=rbind:rw" \
    "$IMAGE_REF" ck /bin/sh -c "$script" >/dev/null
wait_for 300 "the container to write its $FILES files" test -e "$host/ready"
ckpt() { "$ZLAYER_BIN" --config "$ZL_CONFIG" checkpoint ck --namespace "$BENCH_NS" --json; }
# The first checkpoint uploads the whole upper (its first pass is a full layer).
first=$(ckpt)
log "first checkpoint: $first"
out=$BENCH_DIR/checkpoints.jsonl
fails=$BENCH_DIR/failures.txt
: >"$fails"
for (( r = 1; r <= N; r++ )); do
    sleep 1
    t0=$(now_ns)
    # A checkpoint over its budget fails (thawed, nothing published): counted, not fatal.
    if reply=$(ckpt 2>>"$fails"); then
        printf '%s %s\n' "$(tr -d '\n' <<<"$reply")" "$(( ($(now_ns) - t0) / 1000000 ))" >>"$out"
    else
        echo "FAILED" >>"$fails"
    fi
done
summary=$(python3 - "$out" "$BUDGET_MS" "$FILES" "$(grep -c '^FAILED$' "$fails")" "$N" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    body, wall = line.rsplit(" ", 1)
    rows.append((json.loads(body), int(wall)))
budget = float(sys.argv[2])
failed = int(sys.argv[4])
# A failed attempt held the container up to the budget: counted at the budget.
pauses = sorted([r["pause_us"] / 1000 for r, _ in rows] + [budget] * failed)
bytes_ = sorted(int(r["bytes"]) for r, _ in rows)
walls = sorted(w for _, w in rows)
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
print(f"checkpoints: {len(rows)} durable, {failed} over the budget, of {sys.argv[5]} on a {sys.argv[3]}-file upper, ~100 files rewritten per second")
print(f"pause ms: p50 {pct(pauses, 50):.1f}, p99 {pct(pauses, 99):.1f}, max {pauses[-1]:.1f} (budget {budget:.0f}; failed attempts counted at the budget)")
if bytes_:
    print(f"bytes per checkpoint: p50 {pct(bytes_, 50)}, max {bytes_[-1]}")
    print(f"checkpoint wall time ms (CLI call, both passes and the upload): p50 {pct(walls, 50)}, max {walls[-1]}")
ok = failed == 0 and pct(pauses, 99) <= 200
print(f"{'PASS' if ok else 'FAIL'}  pause p99 <= 200 ms with every checkpoint durable")
PY
)
echo "$summary"

BIG=${BENCH_BIG_FILES:-5000}
if (( BIG > 0 )); then
    ctr_ tasks kill -s SIGKILL ck >/dev/null 2>&1 || true
    big=$BENCH_DIR/big
    mkdir -p "$big"
    bdirs=$(( (BIG + 99) / 100 ))
    change=$(( BIG / 100 ))
    bscript="mkdir -p /big; i=0
while [ \$i -lt $bdirs ]; do mkdir /big/d\$i; j=0
  while [ \$j -lt 100 ]; do dd if=/dev/urandom of=/big/d\$i/f\$j bs=100k count=1 2>/dev/null; j=\$((j+1)); done
  i=\$((i+1)); done
echo > /zl-in/ready
while [ ! -e /zl-in/change ]; do sleep 0.1; done
k=0
while [ \$k -lt $change ]; do dd if=/dev/urandom of=/big/d\$((k % $bdirs))/f\$((k / $bdirs)) bs=100k count=1 2>/dev/null; k=\$((k+1)); done
echo > /zl-in/changed
sleep 1000000"
    ctr_ run -d --snapshotter zlayer --label zlayer.id=bench/big \
        --mount "type=bind,src=$big,dst=/zl-in,options=rbind:rw" \
        "$IMAGE_REF" big /bin/sh -c "$bscript" >/dev/null
    wait_for 900 "the big container to write $BIG files" test -e "$big/ready"
    sync
    bckpt() { "$ZLAYER_BIN" --config "$ZL_CONFIG" checkpoint big --namespace "$BENCH_NS" --json; }
    t0=$(now_ns); full=$(bckpt); t_full=$(( ($(now_ns) - t0) / 1000000 ))
    touch "$big/change"
    wait_for 300 "the big container to rewrite $change files" test -e "$big/changed"
    t0=$(now_ns); delta=$(bckpt); t_delta=$(( ($(now_ns) - t0) / 1000000 ))
    python3 - "$full" "$delta" "$t_full" "$t_delta" "$BIG" "$change" <<'PY'
import json, sys
full, delta = json.loads(sys.argv[1]), json.loads(sys.argv[2])
tf, td = int(sys.argv[3]), int(sys.argv[4])
fb, db = int(full["bytes"]), int(delta["bytes"])
print(f"big upper: {sys.argv[5]} files of 100 KiB; first checkpoint {fb} bytes in {tf} ms (pause {full['pause_us']/1000:.1f} ms)")
print(f"after {sys.argv[6]} files (1 %) were rewritten: {db} bytes in {td} ms (pause {delta['pause_us']/1000:.1f} ms)")
rb, rt = db / fb, td / tf
print(f"{'PASS' if rb <= 0.03 else 'FAIL'}  checkpoint bytes / full {rb:.2%} (<= 3 %)")
print(f"{'PASS' if rt <= 0.10 else 'FAIL'}  checkpoint time / full {rt:.2%} (<= 10 %)")
PY
fi
