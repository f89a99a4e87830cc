#!/usr/bin/env bash
# Repro found while benchmarking (not a benchmark): snapshots taken while a saturating writer keeps
# the replicator more than one pump (PUMP_FRAMES) behind copy the database as seen by the OLD pin
# but are labelled with the cursor's later txid, so a point-in-time restore to such a txid returns
# an older database (integrity_check still "ok") or fails its integrity check.
#
#   bash integration/bench/sqlite/stale_snapshot.sh     # exit 1 = reproduced, 0 = not seen
#
# Env: ZLAYER_BIN, WRITER_BIN (default: target/release/{zlayer-storage,examples/sqlite_bench_writer}),
#      SECS (writer run, default 8).
set -euo pipefail
cd "$(dirname "$0")/../../.."
ZLAYER_BIN=${ZLAYER_BIN:-$PWD/target/release/zlayer-storage}
WRITER_BIN=${WRITER_BIN:-$PWD/target/release/examples/sqlite_bench_writer}
SECS=${SECS:-8}
w=$(mktemp -d /tmp/zl-stale-snap.XXXXXX)
rep=
trap '[ -n "$rep" ] && kill "$rep" 2>/dev/null; rm -rf "$w"' EXIT
cat >"$w/c.toml" <<EOF
[storage]
backend = "local"
local_store_dir = "$w/store"
prefix = "x/"
staging_dir = "$w/staging"
state_db_path = "$w/state.sqlite"
[replicate]
cache_dir = "$w/cache"
control_socket = "$w/db.sock"
snapshot_interval_secs = 1
EOF
"$WRITER_BIN" throughput "$w/app.db" 0 >/dev/null
"$ZLAYER_BIN" --config "$w/c.toml" db replicate --db "$w/app.db" >"$w/rep.log" 2>&1 &
rep=$!
until "$ZLAYER_BIN" --config "$w/c.toml" db flush --db "$w/app.db" >/dev/null 2>&1; do sleep 0.2; done
"$WRITER_BIN" throughput "$w/app.db" "$SECS" >/dev/null
"$ZLAYER_BIN" --config "$w/c.toml" db flush --db "$w/app.db" >/dev/null
kill -TERM "$rep"; wait "$rep"; rep=
bad=0
# Every snapshot but the generation's base: restore exactly at its txid; rows must equal the txid
# (one row per transaction, ids 1, 2, …).
for txid in $(python3 - "$w/store/x/sqlite/app/metadata.json" <<'EOF'
import json, sys
g = json.load(open(sys.argv[1]))["generations"][-1]
print(" ".join(str(s["txid"]) for s in g["snapshots"][1:]))
EOF
); do
  out=$w/at-$txid.db
  if ! "$ZLAYER_BIN" --config "$w/c.toml" db restore --db "$w/app.db" --output "$out" --txid "$txid" \
      >/dev/null 2>"$w/err"; then
    echo "txid $txid: restore failed: $(tail -1 "$w/err" | cut -c1-200)"; bad=1; continue
  fi
  rows=$(sqlite3 "$out" "SELECT count(*) FROM t")
  if [ "$rows" != "$txid" ]; then echo "txid $txid: restored $rows rows"; bad=1; else echo "txid $txid: ok"; fi
done
exit "$bad"
