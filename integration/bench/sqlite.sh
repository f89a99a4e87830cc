#!/usr/bin/env bash
# SQLite replication benchmark (issue 9, "Beyond the anchors"): `zlayer-storage db replicate`
# against baselines measured in the same run. Prints every figure and a "target met/missed"
# line per target; exits non-zero only on real errors (a tool failing, a wrong restore), never
# on a missed target.
#
#   bash integration/bench/sqlite.sh       # builds the release binary + bench writer; ~5-6 min
#
# Env: ZLAYER_BIN (skip building the binary), WRITER_BIN (the sqlite_bench_writer example; by
#      default next to ZLAYER_BIN in examples/, built when missing), GARAGE_BIN (default: garage
#      on PATH or ~/.cargo/bin/garage), BENCH_DIR (parent of the scratch dir, default /tmp),
#      BENCH_KEEP=1 (keep the scratch dir), BENCH_ONLY (subset of "tput lag stall idle resnap rss restore"),
#      BENCH_TPUT_SECS (8), BENCH_TPUT_ROUNDS (3; each = one run without and one with the
#      replicator, order alternating), BENCH_APP_AUTOCHECKPOINT (app's wal_autocheckpoint;
#      default SQLite's own, 1000),
#      BENCH_LAG_SECS (20), BENCH_LAG_RATE (20 commits/s), BENCH_STALL_RATE (2000 commits/s),
#      BENCH_STALL_SECS (30),
#      BENCH_IDLE_SECS (60), BENCH_RESNAP_ROWS (50000), BENCH_RSS_DBS (10), BENCH_RSS_SECS (20), BENCH_RSS_RATE (50 commits/s
#      over all databases), BENCH_RSS_IDLE_SECS (20),
#      BENCH_RESTORE_MB (200), BENCH_RESTORE_RUNS (3), BENCH_CHURN_SECS (5).
#
# 1. tput    writer = single-row autocommit INSERTs of 200 random bytes, WAL,
#            synchronous=NORMAL, for BENCH_TPUT_SECS, alone vs with `db replicate` (local-directory
#            store, default settings); tx/s ratio, per-commit latency p99/max, and the stalls (a
#            replicator's barrier holds the write lock): time in commits > 5 ms and their p99,
#            tx/s outside them, the largest -wal, replicator CPU, catch-up time after the writer.
# 2. lag     BENCH_LAG_RATE commits/s; a poller reads the local store's metadata.json every 5 ms
#            and records when each txid is first covered by a stored segment; commit → durable.
# 2b. stall BENCH_STALL_RATE single-row commits/s (a heavy app, below saturation) with the
#            replicator: its write-barrier holds, p50/p99/max.
# 3. idle    one database, Garage behind a counting HTTP proxy: requests and replicator CPU over
#            BENCH_IDLE_SECS after a flush.
# 3b. resnap a database replicated (local store), then 1 % of its rows rewritten and a TRUNCATE
#            checkpoint while the replicator is down: the new generation's base (a delta on the
#            previous generation) against the full base snapshot; the restore is checked.
# 4. rss     BENCH_RSS_DBS databases on one `db replicate` (Garage), light writes, then idle:
#            VmHWM/VmRSS, requests and CPU.
# 5. restore a BENCH_RESTORE_MB database replicated to Garage (base snapshot + BENCH_CHURN_SECS of
#            updates as segments): `db restore` (with and without integrity_check) vs the
#            baseline `sqlite3 .backup` + `zstd -3` uploaded once, restored as
#            `aws s3 cp s3://… - | zstd -d` (also with a `sync` of the output, and `curl` of a
#            presigned URL | zstd -d as the download + decompress floor).
# Helpers: integration/bench/sqlite/tools.py (proxy, manifest poller, /proc readers);
# integration/bench/sqlite/stale_snapshot.sh is a repro found while benchmarking, not a benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
TOOLS=$REPO/integration/bench/sqlite/tools.py

AWS=/usr/bin/aws
for tool in python3 sqlite3 zstd curl openssl "$AWS"; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
GARAGE_BIN=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
# The shared helpers: log, die, now_ns, free_port, wait_for (WAIT_PID), start_garage, s3_.
# shellcheck source=integration/bench/lib.sh
source "$REPO/integration/bench/lib.sh"

ONLY=${BENCH_ONLY:-tput lag stall idle resnap rss restore}
STALL_RATE=${BENCH_STALL_RATE:-2000}
STALL_SECS=${BENCH_STALL_SECS:-30}
RESNAP_ROWS=${BENCH_RESNAP_ROWS:-50000}
TPUT_SECS=${BENCH_TPUT_SECS:-8}
TPUT_ROUNDS=${BENCH_TPUT_ROUNDS:-3}
APP_AUTOCHECKPOINT=${BENCH_APP_AUTOCHECKPOINT:-}
LAG_SECS=${BENCH_LAG_SECS:-20}
LAG_RATE=${BENCH_LAG_RATE:-20}
IDLE_SECS=${BENCH_IDLE_SECS:-60}
RSS_DBS=${BENCH_RSS_DBS:-10}
RSS_SECS=${BENCH_RSS_SECS:-20}
RSS_RATE=${BENCH_RSS_RATE:-50}
RSS_IDLE_SECS=${BENCH_RSS_IDLE_SECS:-20}
RESTORE_MB=${BENCH_RESTORE_MB:-200}
RESTORE_RUNS=${BENCH_RESTORE_RUNS:-3}
CHURN_SECS=${BENCH_CHURN_SECS:-5}

want() { [[ " $ONLY " == *" $1 "* ]]; }
needs_garage() { want idle || want rss || want restore; }
if needs_garage; then
  [ -x "$GARAGE_BIN" ] || { echo "garage not found (set GARAGE_BIN)" >&2; exit 1; }
fi

# --- binaries: one cargo call for whatever is missing (CI builds once and passes both) ----------
targets=()
[ -z "${ZLAYER_BIN:-}" ] && targets+=(--bin zlayer-storage)
if [ -z "${WRITER_BIN:-}" ]; then
  if [ -n "${ZLAYER_BIN:-}" ] && [ -x "$(dirname "$ZLAYER_BIN")/examples/sqlite_bench_writer" ]; then
    WRITER_BIN=$(dirname "$ZLAYER_BIN")/examples/sqlite_bench_writer
  else
    targets+=(--example sqlite_bench_writer)
  fi
fi
if [ ${#targets[@]} -gt 0 ]; then
  cargo build --release --quiet "${targets[@]}"
fi
ZLAYER_BIN=${ZLAYER_BIN:-$REPO/target/release/zlayer-storage}
WRITER_BIN=${WRITER_BIN:-$REPO/target/release/examples/sqlite_bench_writer}
for b in "$ZLAYER_BIN" "$WRITER_BIN"; do
  [ -x "$b" ] || { echo "missing $b" >&2; exit 1; }
done

work=$(mktemp -d "${BENCH_DIR:-/tmp}/zl-sqlite-bench.XXXXXX")
declare -a PIDS=()
cleanup() {
  local rc=$? i
  set +e
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
    kill "${PIDS[i]}" 2>/dev/null && wait "${PIDS[i]}" 2>/dev/null
  done
  if [ "$rc" != 0 ]; then
    echo "failed; logs kept in $work" >&2
  elif [ "${BENCH_KEEP:-0}" != 1 ]; then
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT

# calc EXPR: python arithmetic for figures.
calc() { python3 -c "import math; print($1)"; }
json() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d[sys.argv[1]])' "$1"; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
verdict() { # verdict NAME MET(True/False) DETAIL
  if [ "$2" = True ]; then echo "target met:    $1 ($3)"; else echo "target missed: $1 ($3)"; fi
}

log "binary: $ZLAYER_BIN"
log "writer: $WRITER_BIN"
log "work dir: $work"
echo "SQLite replication benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "binary: $ZLAYER_BIN ($("$ZLAYER_BIN" version 2>/dev/null | head -1); tree at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown))"

# start_proxy NAME: counting proxy in front of Garage; sets PROXY_PORT, PROXY_LOG.
start_proxy() {
  PROXY_LOG=$work/$1.requests
  : >"$PROXY_LOG"
  python3 "$TOOLS" proxy "$work/$1.port" "$S3_PORT" "$PROXY_LOG" 2>"$work/$1.proxy.err" &
  PIDS+=($!)
  WAIT_PID=$! wait_for 10 "proxy $1" test -s "$work/$1.port"
  PROXY_PORT=$(cat "$work/$1.port")
}

# config NAME BACKEND [S3_PORT]: writes $work/NAME.toml (store, cache and socket of its own).
config() {
  local name=$1 backend=$2 port=${3:-} d=$work/$1
  mkdir -p "$d"
  {
    echo "[storage]"
    if [ "$backend" = local ]; then
      echo "backend = \"local\""
      echo "local_store_dir = \"$d/store\""
    else
      echo "backend = \"s3\""
      echo "bucket = \"$S3_BUCKET\""
      echo "endpoint_url = \"http://127.0.0.1:$port\""
      echo "region = \"garage\""
      echo "force_path_style = true"
      echo "access_key_id = \"$S3_KEY\""
      echo "secret_access_key_file = \"$work/s3-secret\""
    fi
    echo "prefix = \"$name/\""
    echo "staging_dir = \"$d/staging\""
    echo "state_db_path = \"$d/state.sqlite\""
    echo "[replicate]"
    echo "cache_dir = \"$d/cache\""
    echo "control_socket = \"$d/db.sock\""
  } >"$d.toml"
}

# replicate NAME DB...: starts `db replicate` with config NAME on the databases, waits until
# each is flushed (base snapshot in the store); sets REP_PID.
replicate() {
  local name=$1; shift
  local args=() db
  for db in "$@"; do args+=(--db "$db"); done
  RUST_LOG=${BENCH_RUST_LOG:-info} "$ZLAYER_BIN" --config "$work/$name.toml" db replicate "${args[@]}" \
    >"$work/$name.log" 2>&1 &
  REP_PID=$!
  PIDS+=("$REP_PID")
  for db in "$@"; do
    WAIT_PID=$REP_PID wait_for 60 "replicator $name" flush "$name" "$db"
  done
}
flush() { "$ZLAYER_BIN" --config "$work/$1.toml" db flush --db "$2" --timeout 60 >/dev/null; }
# stop_replicator PID: SIGTERM (it ships what is left), must exit 0.
stop_replicator() {
  kill -TERM "$1"
  wait "$1" || die "replicator $1 exited with $?"
}
cpu_of() { python3 "$TOOLS" cpu "$1"; }
# report_holds LABEL LOG...: the replicator's write-barrier holds (its `write barrier released
# held_us=…` debug lines): count, p50, p99, max, and the verdict on p99 ≤ 20 ms.
report_holds() {
  local label=$1; shift
  local holds n p50 p99 max
  holds=$(cat "$@" | sed 's/\x1b\[[0-9;]*m//g' | grep -o 'held_us=[0-9]*' | cut -d= -f2 | sort -n || true)
  if [ -z "$holds" ]; then
    echo "  write barrier holds ($label): none logged"
    return
  fi
  read -r n p50 p99 max < <(awk '{v[NR]=$1} END {
    i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
    printf "%d %.1f %.1f %.1f\n", NR, v[i50] / 1000, v[i99] / 1000, v[NR] / 1000 }' <<<"$holds")
  echo "  write barrier holds ($label): $n, p50 $p50 ms, p99 $p99 ms, max $max ms"
  verdict "write-lock holds the replicator causes (barriers, $label) p99 ≤ 20 ms" "$(calc "$p99 <= 20")" \
    "p99 $p99 ms over $n barriers"
}

# ============================================================================================
# 1. Write throughput with vs without the replicator
# ============================================================================================
if want tput; then
  echo
  echo "== 1. write throughput: single-row autocommit INSERTs, WAL, synchronous=NORMAL, ${TPUT_SECS} s per run"
  ac_args=()
  [ -n "$APP_AUTOCHECKPOINT" ] && ac_args=(--autocheckpoint "$APP_AUTOCHECKPOINT")
  without=(); with=(); with_p99=(); with_max=(); without_p99=(); rep_cpu=()
  with_stall=(); without_stall=(); with_slow=(); without_slow=(); with_clean=(); without_clean=()
  with_wal=(); without_wal=()
  run_tput() { # run_tput MODE ROUND
    local mode=$1 r=$2 d=$work/tput-$1-$2 out pid c0 c1 t0
    mkdir -p "$d"
    "$WRITER_BIN" throughput "$d/app.db" 0 >/dev/null   # creates the table, WAL mode
    if [ "$mode" = with ]; then
      config "tput-$r" local
      # The barrier's hold times come from the replicator's debug line for each release.
      BENCH_RUST_LOG=${BENCH_RUST_LOG:-info,zlayer_storage::replicator::source=debug} \
        replicate "tput-$r" "$d/app.db"
      pid=$REP_PID
      c0=$(cpu_of "$pid")
    fi
    out=$("$WRITER_BIN" throughput "$d/app.db" "$TPUT_SECS" "${ac_args[@]}")
    if [ "$mode" = with ]; then
      c1=$(cpu_of "$pid")
      t0=$(now_ns)
      flush "tput-$r" "$d/app.db"
      local catchup=$(( ($(now_ns) - t0) / 1000000 ))
      stop_replicator "$pid"
      local cpu; cpu=$(calc "round($c1 - $c0, 2)")
      rep_cpu+=("$cpu")
      out="${out%\}},\"replicator_cpu_s\":$cpu,\"flush_after_ms\":$catchup}"
    fi
    rm -rf "$d"
    echo "  round $r $mode: $out"
    local tps p99 mx stall slow clean
    tps=$(json tps <<<"$out"); p99=$(json p99_us <<<"$out"); mx=$(json max_us <<<"$out")
    stall=$(json slow_p99_ms <<<"$out"); slow=$(json in_slow_commits_ms <<<"$out")
    # Rate outside commits slower than 5 ms: what is left once the stalls are taken out.
    clean=$(calc "round($(json txns <<<"$out") / ($(json secs <<<"$out") - $slow / 1000))")
    local wal; wal=$(calc "round($(json wal_max_bytes <<<"$out") / 1048576)")
    if [ "$mode" = with ]; then
      with+=("$tps"); with_p99+=("$p99"); with_max+=("$mx"); with_stall+=("$stall"); with_slow+=("$slow"); with_clean+=("$clean"); with_wal+=("$wal")
    else
      without+=("$tps"); without_p99+=("$p99"); without_stall+=("$stall"); without_slow+=("$slow"); without_clean+=("$clean"); without_wal+=("$wal")
    fi
  }
  for (( r=1; r<=TPUT_ROUNDS; r++ )); do
    if (( r % 2 == 1 )); then run_tput without "$r"; run_tput with "$r"
    else run_tput with "$r"; run_tput without "$r"; fi
  done
  m_without=$(median "${without[@]}"); m_with=$(median "${with[@]}")
  ratio=$(calc "round($m_with / $m_without, 3)")
  worst_p99=$(printf '%s\n' "${with_p99[@]}" | sort -g | tail -1)
  worst_max=$(printf '%s\n' "${with_max[@]}" | sort -g | tail -1)
  worst_stall=$(printf '%s\n' "${with_stall[@]}" | sort -g | tail -1)
  echo "  without: median $m_without tx/s [${without[*]}]; per-commit p99 [${without_p99[*]}] µs;"
  echo "           time in commits > 5 ms [${without_slow[*]}] ms, their p99 [${without_stall[*]}] ms; tx/s outside them [${without_clean[*]}]"
  echo "  with:    median $m_with tx/s [${with[*]}]; per-commit p99 [${with_p99[*]}] µs, max [${with_max[*]}] µs;"
  echo "           time in commits > 5 ms [${with_slow[*]}] ms, their p99 [${with_stall[*]}] ms; tx/s outside them [${with_clean[*]}]"
  echo "           replicator CPU [${rep_cpu[*]}] s per ${TPUT_SECS} s"
  echo "  largest -wal file: without [${without_wal[*]}] MiB, with [${with_wal[*]}] MiB"
  echo "  ratio with/without: $ratio (outside commits > 5 ms: $(calc "round($(median "${with_clean[@]}") / $(median "${without_clean[@]}"), 3)"))"
  verdict "throughput with replicator ≥ 0.95× without" "$(calc "$ratio >= 0.95")" "$ratio×"
  worst_wal=$(printf '%s\n' "${with_wal[@]}" | sort -g | tail -1)
  if (( worst_wal > 64 )); then
    echo "  note: with the replicator the -wal grew to $worst_wal MiB (alone: ${without_wal[0]} MiB): checkpoints did not keep"
    echo "        up with the writer, so the ratio is not that of a sustainable state (see flush_after_ms: catch-up time)"
  fi
  verdict "per-commit latency p99 with replicator ≤ 20 ms" "$(calc "$worst_p99 <= 20000")" \
    "worst round $(calc "round($worst_p99 / 1000, 3)") ms"
  verdict "stalls (commits > 5 ms) p99 with replicator ≤ 20 ms" "$(calc "$worst_stall <= 20")" \
    "worst round $worst_stall ms, max $(calc "round($worst_max / 1000, 1)") ms; without the replicator [${without_stall[*]}] ms"
  # The write lock the replicator itself holds (its barriers), apart from the app's own checkpoints.
  report_holds "all rounds" "$work"/tput-*.log
fi

# ============================================================================================
# 2. Replication lag, local-directory store, default sync_interval_ms
# ============================================================================================
if want lag; then
  echo
  echo "== 2. replication lag commit → durable (local-directory store, sync_interval_ms = 1000): ${LAG_RATE} commits/s for ${LAG_SECS} s"
  d=$work/lag
  mkdir -p "$d"
  "$WRITER_BIN" throughput "$d/app.db" 0 >/dev/null
  config lag local
  replicate lag "$d/app.db"
  manifest=$work/lag/store/lag/sqlite/app/metadata.json
  [ -f "$manifest" ] || manifest=$(find "$work/lag/store" -name metadata.json | head -1)
  [ -n "$manifest" ] && [ -f "$manifest" ] || die "no metadata.json in the local store"
  read -r gen base < <(python3 "$TOOLS" last "$manifest")
  python3 "$TOOLS" watch "$manifest" "$d/watch.log" "$d/stop" 5 &
  watch_pid=$!
  PIDS+=("$watch_pid")
  "$WRITER_BIN" paced "$d/commits" "$LAG_RATE" "$LAG_SECS" "$d/app.db" 2>/dev/null
  sleep 3   # let the last commits ship on their own before the confirming flush
  flush lag "$d/app.db"
  touch "$d/stop"
  wait "$watch_pid"
  stop_replicator "$REP_PID"
  read -r gen_end last_end < <(python3 "$TOOLS" last "$manifest")
  n=$(wc -l <"$d/commits")
  [ "$gen_end" = "$gen" ] || die "a new generation started during the lag run ($gen → $gen_end); see $work/lag.log"
  [ "$last_end" = $(( base + n )) ] || die "store has txid $last_end, expected $(( base + n )) ($n commits after $base)"
  res=$(python3 "$TOOLS" lag "$d/commits" "$d/watch.log" "$gen" "$base")
  echo "  $res"
  p50=$(json p50_ms <<<"$res"); p99=$(json p99_ms <<<"$res")
  verdict "lag p50 ≤ 300 ms" "$(calc "$p50 <= 300")" "$p50 ms"
  verdict "lag p99 ≤ 1.5 s" "$(calc "$p99 <= 1500")" "$p99 ms"
fi

# ============================================================================================
# 2b. Barrier holds under a heavy but paced writer
# ============================================================================================
if want stall; then
  echo
  echo "== 2b. write-lock holds at ${STALL_RATE} commits/s for ${STALL_SECS} s (local-directory store)"
  d=$work/stall
  mkdir -p "$d"
  "$WRITER_BIN" throughput "$d/app.db" 0 >/dev/null
  config stall local
  BENCH_RUST_LOG=${BENCH_RUST_LOG:-info,zlayer_storage::replicator::source=debug} replicate stall "$d/app.db"
  "$WRITER_BIN" paced "$d/commits" "$STALL_RATE" "$STALL_SECS" "$d/app.db" 2>/dev/null
  flush stall "$d/app.db"
  stop_replicator "$REP_PID"
  n=$(wc -l <"$d/commits")
  echo "  $n commits ($(calc "round($n / $STALL_SECS)")/s achieved)"
  report_holds "${STALL_RATE}/s" "$work/stall.log"
fi

if needs_garage; then
  BENCH_DIR=$work start_garage   # lib.sh: Garage under $work/garage
  PIDS+=("${BENCH_PIDS[@]}")
  S3_PORT=${S3_ENDPOINT##*:}
  (umask 077 && printf '%s\n' "$S3_SECRET" >"$work/s3-secret")
  log "garage on $S3_ENDPOINT"
fi

# ============================================================================================
# 3. Idle database: store requests and CPU
# ============================================================================================
if want idle; then
  echo
  echo "== 3. idle database (Garage behind a counting proxy): ${IDLE_SECS} s after a flush"
  d=$work/idle
  mkdir -p "$d"
  "$WRITER_BIN" paced "$d/commits" 100 1 "$d/app.db" 2>/dev/null
  start_proxy idle
  config idle s3 "$PROXY_PORT"
  replicate idle "$d/app.db"
  pid=$REP_PID
  t0=$(now_ns); c0=$(cpu_of "$pid")
  sleep "$IDLE_SECS"
  t1=$(now_ns); c1=$(cpu_of "$pid")
  stop_replicator "$pid"
  during_setup=$(python3 "$TOOLS" count "$PROXY_LOG" 0 "$t0")
  idle=$(python3 "$TOOLS" count "$PROXY_LOG" "$t0" "$t1")
  reqs=$(json total <<<"$idle")
  secs=$(calc "($t1 - $t0) / 1e9")
  cpu=$(calc "round($c1 - $c0, 3)")
  echo "  requests before the window (start + flush): $during_setup"
  echo "  requests in the idle window: $idle → $(calc "round($reqs * 3600 / $secs)") per hour"
  echo "  replicator CPU in the window: ${cpu} s over $(calc "round($secs, 1)") s = $(calc "round($cpu * 100 / $secs, 3)") % of a core → $(calc "round($cpu * 3600 / $secs, 1)") CPU-s per hour"
  verdict "idle: 0 store requests" "$(calc "$reqs == 0")" "$reqs in $(calc "round($secs)") s"
  verdict "idle: ~0 CPU (≤ 0.1 % of a core)" "$(calc "$cpu * 100 / $secs <= 0.1")" \
    "$(calc "round($cpu * 100 / $secs, 3)") %"
fi

# ============================================================================================
# 3b. Re-snapshot after the app checkpointed while the replicator was down
# ============================================================================================
if want resnap; then
  echo
  echo "== 3b. app checkpoint (TRUNCATE) while the replicator is down: what the new generation uploads"
  d=$work/resnap
  mkdir -p "$d"
  sqlite3 "$d/app.db" "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $RESNAP_ROWS)
    INSERT INTO t(v) SELECT randomblob(1000) FROM n;" >/dev/null
  config resnap local
  replicate resnap "$d/app.db"
  stop_replicator "$REP_PID"
  # 1 % of the rows rewritten, then a checkpoint that restarts the WAL: the replicator never
  # sees those transactions (Litestream re-uploads the whole database here).
  sqlite3 "$d/app.db" "UPDATE t SET v = randomblob(1000) WHERE id % 100 = 0;
    PRAGMA wal_checkpoint(TRUNCATE); INSERT INTO t(v) VALUES (randomblob(10));" >/dev/null
  replicate resnap "$d/app.db"
  stop_replicator "$REP_PID"
  res=$(python3 - "$d/store/resnap/sqlite/app/metadata.json" "$d/app.db" <<'PY'
import json, sys, os
m = json.load(open(sys.argv[1]))
a, b = m["generations"][-2], m["generations"][-1]
base = b["snapshots"][0]
print(json.dumps({"full": a["snapshots"][0]["size"], "delta": base["size"],
                  "parent": bool(base.get("parent")), "db": os.path.getsize(sys.argv[2])}))
PY
)
  full=$(json full <<<"$res"); delta=$(json delta <<<"$res")
  out=$d/restored.db
  "$ZLAYER_BIN" --config "$work/resnap.toml" db restore --db "$d/app.db" --output "$out" >/dev/null
  same=$(python3 -c "
import sqlite3, sys
q = 'SELECT count(*), sum(length(v)), sum(id * length(v)) FROM t'
a = sqlite3.connect(sys.argv[1]).execute(q).fetchone()
b = sqlite3.connect(sys.argv[2]).execute(q).fetchone()
print(a == b)" "$d/app.db" "$out")
  [ "$same" = True ] || die "the restore through the delta differs from the source"
  echo "  database $(json db <<<"$res") bytes, $RESNAP_ROWS rows of 1000 random bytes; 1 % rewritten while down"
  echo "  full snapshot (first generation's base, what a full re-upload costs): $full bytes"
  echo "  new generation's base: $delta bytes, a delta on the previous generation: $(json parent <<<"$res")"
  echo "  ratio delta/full: $(calc "round($delta / $full, 4)"); restore through the delta equals the source"
  verdict "checkpoint while down uploads only changed pages (≤ 10 % of a full snapshot here)" \
    "$(calc "$delta <= $full * 0.10")" "$(calc "round($delta * 100 / $full, 2)") % of the full base"
fi

# ============================================================================================
# 4. RSS with many databases
# ============================================================================================
if want rss; then
  echo
  echo "== 4. ${RSS_DBS} databases on one replicator (Garage): ${RSS_RATE} commits/s in all for ${RSS_SECS} s, then ${RSS_IDLE_SECS} s idle"
  d=$work/rss
  mkdir -p "$d"
  dbs=()
  for (( i=0; i<RSS_DBS; i++ )); do
    "$WRITER_BIN" throughput "$d/db$i.db" 0 >/dev/null
    dbs+=("$d/db$i.db")
  done
  start_proxy rss
  config rss s3 "$PROXY_PORT"
  replicate rss "${dbs[@]}"
  pid=$REP_PID
  read -r hwm0 rss0 < <(python3 "$TOOLS" mem "$pid")
  t0=$(now_ns); c0=$(cpu_of "$pid")
  "$WRITER_BIN" paced "$d/commits" "$RSS_RATE" "$RSS_SECS" "${dbs[@]}" 2>/dev/null
  t1=$(now_ns); c1=$(cpu_of "$pid")
  for db in "${dbs[@]}"; do flush rss "$db"; done
  w=$(python3 "$TOOLS" count "$PROXY_LOG" "$t0" "$t1")
  t2=$(now_ns); c2=$(cpu_of "$pid")
  sleep "$RSS_IDLE_SECS"
  t3=$(now_ns); c3=$(cpu_of "$pid")
  read -r hwm rss < <(python3 "$TOOLS" mem "$pid")
  stop_replicator "$pid"
  idle=$(python3 "$TOOLS" count "$PROXY_LOG" "$t2" "$t3")
  ireqs=$(json total <<<"$idle")
  wsecs=$(calc "($t1 - $t0) / 1e9"); isecs=$(calc "($t3 - $t2) / 1e9")
  echo "  after start: VmHWM $(( hwm0 / 1024 )) MiB, VmRSS $(( rss0 / 1024 )) MiB"
  echo "  end:         VmHWM $(( hwm / 1024 )) MiB, VmRSS $(( rss / 1024 )) MiB"
  wreqs=$(json total <<<"$w")
  echo "  writing: requests $w = $(calc "round($wreqs * 3600 / $wsecs / $RSS_DBS)") per database-hour at $(calc "round($RSS_RATE / $RSS_DBS, 1)") commits/s each; CPU $(calc "round($c1 - $c0, 2)") s over $(calc "round($wsecs, 1)") s"
  echo "  idle:    requests $idle; CPU $(calc "round($c3 - $c2, 3)") s over $(calc "round($isecs, 1)") s = $(calc "round(($c3 - $c2) * 100 / $isecs, 3)") % of a core"
  verdict "RSS ≤ 40 MiB replicating ${RSS_DBS} databases" "$(calc "$hwm <= 40 * 1024")" "peak $(calc "round($hwm / 1024, 1)") MiB"
  verdict "idle: 0 store requests (${RSS_DBS} databases)" "$(calc "$ireqs == 0")" "$ireqs in $(calc "round($isecs)") s"
fi

# ============================================================================================
# 5. Restore of a large database vs download + decompress of a zstd .backup copy
# ============================================================================================
if want restore; then
  echo
  echo "== 5. restore of a ${RESTORE_MB} MB database from Garage"
  d=$work/restore
  mkdir -p "$d"
  t0=$(now_ns)
  "$WRITER_BIN" fill "$d/app.db" "$RESTORE_MB"
  size=$(stat -c %s "$d/app.db")
  log "filled $size bytes in $(( ($(now_ns) - t0) / 1000000 )) ms"
  config restore s3 "$S3_PORT"
  t0=$(now_ns)
  replicate restore "$d/app.db"
  snap_ms=$(( ($(now_ns) - t0) / 1000000 ))
  "$WRITER_BIN" churn "$d/app.db" "$CHURN_SECS" 200
  flush restore "$d/app.db"
  stop_replicator "$REP_PID"
  src_rows=$(sqlite3 "$d/app.db" "SELECT count(*), sum(length(body)) FROM items")
  objs=$(s3_ s3 ls --recursive "s3://$S3_BUCKET/restore/" | awk '{n++; b+=$3} END {print n " objects, " b " bytes"}')
  echo "  database: $size bytes; replicated as $objs (start + base snapshot + first flush: $snap_ms ms)"

  # Baseline: a consistent copy, zstd -3, uploaded once.
  sqlite3 "$d/app.db" ".backup '$d/backup.db'"
  zstd -q -3 "$d/backup.db" -o "$d/backup.db.zst"
  s3_ s3 cp --quiet "$d/backup.db.zst" "s3://$S3_BUCKET/baseline/backup.db.zst"
  echo "  baseline object: $(stat -c %s "$d/backup.db.zst") bytes (zstd -3 of the .backup copy)"
  rm -f "$d/backup.db" "$d/backup.db.zst"
  url=$(s3_ s3 presign "s3://$S3_BUCKET/baseline/backup.db.zst" --expires-in 3600)

  aws_t=(); aws_sync_t=(); curl_t=(); zl_t=(); zlnc_t=()
  time_ms() { local t0; t0=$(now_ns); "$@"; echo $(( ($(now_ns) - t0) / 1000000 )); }
  aws_restore() { s3_ s3 cp --quiet "s3://$S3_BUCKET/baseline/backup.db.zst" - | zstd -q -d -o "$1"; }
  curl_restore() { curl -sf "$url" | zstd -q -d -o "$1"; }
  aws_sync_restore() { aws_restore "$1" && sync "$1"; }
  zl_restore() {
    "$ZLAYER_BIN" --config "$work/restore.toml" db restore --db "$d/app.db" --output "$1" "${@:2}" \
      >/dev/null 2>>"$work/restore-cli.log"
  }
  check_rows() { [ "$(sqlite3 "$1" "SELECT count(*), sum(length(body)) FROM items")" = "$src_rows" ] || die "$1: rows differ from the source"; }
  for (( r=1; r<=RESTORE_RUNS; r++ )); do
    sync
    aws_t+=("$(time_ms aws_restore "$d/out-aws-$r.db" | tail -1)")
    sync
    zl_t+=("$(time_ms zl_restore "$d/out-zl-$r.db" | tail -1)")
    sync
    curl_t+=("$(time_ms curl_restore "$d/out-curl-$r.db" | tail -1)")
    sync
    zlnc_t+=("$(time_ms zl_restore "$d/out-zlnc-$r.db" --no-integrity-check | tail -1)")
    sync
    aws_sync_t+=("$(time_ms aws_sync_restore "$d/out-awss-$r.db" | tail -1)")
    check_rows "$d/out-aws-$r.db"; check_rows "$d/out-zl-$r.db"; check_rows "$d/out-zlnc-$r.db"
    [ "$(sqlite3 "$d/out-zl-$r.db" "PRAGMA integrity_check")" = ok ] || die "restored database fails integrity_check"
    rm -f "$d"/out-*-"$r".db*
  done
  m_aws=$(median "${aws_t[@]}"); m_curl=$(median "${curl_t[@]}")
  m_zl=$(median "${zl_t[@]}"); m_zlnc=$(median "${zlnc_t[@]}"); m_awss=$(median "${aws_sync_t[@]}")
  echo "  aws s3 cp | zstd -d:                 median $m_aws ms [${aws_t[*]}]"
  echo "  aws s3 cp | zstd -d; sync FILE:      median $m_awss ms [${aws_sync_t[*]}]"
  echo "  curl (presigned) | zstd -d:          median $m_curl ms [${curl_t[*]}]"
  echo "  db restore (integrity_check, fsync): median $m_zl ms [${zl_t[*]}]"
  echo "  db restore --no-integrity-check:     median $m_zlnc ms [${zlnc_t[*]}]"
  echo "  speed-up vs aws pipeline: $(calc "round($m_aws / $m_zl, 2)")× (no integrity check: $(calc "round($m_aws / $m_zlnc, 2)")×); vs curl pipeline: $(calc "round($m_curl / $m_zl, 2)")× ($(calc "round($m_curl / $m_zlnc, 2)")×)"
  verdict "restore faster than aws s3 cp + zstd -d of a .backup copy" "$(calc "$m_zl < $m_aws")" \
    "$m_zl vs $m_aws ms"
fi

echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
