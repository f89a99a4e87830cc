#!/usr/bin/env bash
# Layer sync benchmark: zlayer-storage sync/restore against the obvious shell pipelines, same Garage.
#
#   integration/bench/layer.sh            # builds the release binary, generates ~520 MB, runs 3 rounds
#
# Env: ZLAYER_BIN (skip the build), GARAGE_BIN (default: garage on PATH or ~/.cargo/bin/garage),
#      BENCH_DIR (parent of the scratch dir, default /tmp), BENCH_KEEP=1 (keep the scratch dir),
#      BENCH_RUNS (rounds, default 3; medians decide, min-max shown),
#      BENCH_PART_SIZE (bytes, default 16 MiB), BENCH_CONCURRENCY (parts in flight, default 8),
#      BENCH_GARAGE_COMPRESSION (Garage's block compression_level, e.g. none; default: Garage's, zstd 1).
# Page cache: cannot be dropped reliably here, so every pipeline runs on a warm cache (the tree is
# read once before the first measurement). Prints each time, the ratios and PASS/FAIL per target.
#
# Fairness: both sides talk to the same single Garage (default config, which zstd-compresses
# blocks at level 1: CPU both pay), on the same 2 shared CPUs; the awscli pipeline uses awscli's
# defaults (8 MiB parts, 10 in flight). Nothing is deleted between rounds: restores go to fresh
# dirs, because ext4 slows down inode allocation right after mass deletions (`recently_deleted`
# in the kernel profile), which would penalise whichever restore runs after a cleanup.
set -euo pipefail
cd "$(dirname "$0")/../.."

AWS=/usr/bin/aws
for tool in "$AWS" zstd tar /usr/bin/time python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
GARAGE_BIN=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
[ -x "$GARAGE_BIN" ] || { echo "garage not found (set GARAGE_BIN)" >&2; exit 1; }

if [ -z "${ZLAYER_BIN:-}" ]; then
  cargo build --release --quiet --bin zlayer-storage
  ZLAYER_BIN=$PWD/target/release/zlayer-storage
fi

work=$(mktemp -d "${BENCH_DIR:-/tmp}/zlayer-bench.XXXXXX")
garage_pid=
cleanup() {
  [ -n "$garage_pid" ] && kill "$garage_pid" 2>/dev/null && wait "$garage_pid" 2>/dev/null
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- Garage, single node on loopback (same recipe as integration/util/garage.rs) ---------------
s3_port=$(free_port); rpc_port=$(free_port); admin_port=$(free_port)
mkdir -p "$work/garage/meta" "$work/garage/data"
garage_compression=
[ -n "${BENCH_GARAGE_COMPRESSION:-}" ] && garage_compression="compression_level = \"$BENCH_GARAGE_COMPRESSION\""
cat >"$work/garage/garage.toml" <<EOF
metadata_dir = "$work/garage/meta"
data_dir = "$work/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
$garage_compression
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin_port"
admin_token = "$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
EOF
export AWS_ACCESS_KEY_ID=GKzlayerbench0001
export AWS_SECRET_ACCESS_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export AWS_DEFAULT_REGION=garage AWS_REGION=garage
bucket=layers
endpoint="http://127.0.0.1:$s3_port"
GARAGE_DEFAULT_ACCESS_KEY=$AWS_ACCESS_KEY_ID GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET_ACCESS_KEY \
  GARAGE_DEFAULT_BUCKET=$bucket RUST_LOG=warn \
  "$GARAGE_BIN" -c "$work/garage/garage.toml" server --single-node --default-bucket \
  >"$work/garage/log" 2>&1 &
garage_pid=$!
for _ in $(seq 100); do
  "$AWS" --endpoint-url "$endpoint" s3 ls "s3://$bucket" >/dev/null 2>&1 && break
  sleep 0.2
done
"$AWS" --endpoint-url "$endpoint" s3 ls "s3://$bucket" >/dev/null || { cat "$work/garage/log" >&2; exit 1; }

# --- the tree: many small files plus some large ones, mixed compressibility -----------------
echo "generating tree in $work/tree ..."
python3 integration/bench/mixed_tree.py "$work/tree"
tree_bytes=$(du -sb "$work/tree" | cut -f1)
echo "tree: $(find "$work/tree" -type f | wc -l) files, $((tree_bytes / 1048576)) MiB"
tar -C "$work/tree" -cf - . | cat >/dev/null   # warm the page cache

# awscli's defaults are 8 MiB parts x 10 in flight. The streamed upload and the ranged restore
# cap their parts at 16 MiB whatever part_size_bytes says, so 16 MiB only changes the journaled
# (resume) path here; 8 in flight instead of the default 4 keeps Garage busy while packing.
part_size=${BENCH_PART_SIZE:-16777216}
concurrency=${BENCH_CONCURRENCY:-8}
cat >"$work/storage.toml" <<EOF
[storage]
backend = "s3"
bucket = "$bucket"
prefix = "bench/"
endpoint_url = "$endpoint"
region = "garage"
staging_dir = "$work/staging"
state_db_path = "$work/state.sqlite"
part_size_bytes = $part_size
max_concurrent_uploads = $concurrency
EOF

now() { date +%s.%N; }
# CPU seconds Garage has used so far (utime + stime of the server process).
garage_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$garage_pid/stat"; }
# run_timed NAME CMD...: wall time into $t_NAME, the pipeline's own CPU seconds (user + sys of
# it and its children) into $cpu_NAME, and what Garage spent meanwhile into $gcpu_NAME.
run_timed() {
  local name=$1; shift
  local start end g0 g1
  g0=$(garage_cpu)
  start=$(now)
  ( "$@"; times >"$work/cpu.$name" )
  end=$(now)
  sleep 0.2   # let Garage finish its bookkeeping for this request
  g1=$(garage_cpu)
  printf -v "t_$name" '%s' "$(python3 -c "print(round($end - $start, 3))")"
  # `times` in the subshell: line 2 is the user and system time of its waited-for children.
  printf -v "cpu_$name" '%s' "$(python3 -c "
import re, sys
t = [float(m) * 60 + float(s) for m, s in re.findall(r'(\d+)m([\d.]+)s', open(sys.argv[1]).read().splitlines()[1])]
print(round(sum(t), 3))" "$work/cpu.$name")"
  printf -v "gcpu_$name" '%s' "$(python3 -c "print(round($g1 - $g0, 3))")"
}
rss_of() { awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$1"; }

zl() { /usr/bin/time -v -o "$work/time.$1" "$ZLAYER_BIN" --config "$work/storage.toml" "${@:2}"; }
cores=$(nproc)

runs=${BENCH_RUNS:-3}
for r in $(seq "$runs"); do
  echo "round $r/$runs"
  echo "  compress only: tar | zstd -T0 -3 > /dev/null"
  run_timed compress bash -c "tar -C '$work/tree' -cf - . | zstd -q -T0 -3 > /dev/null"
  echo "  awscli pipeline: tar | zstd -T0 -3 | aws s3 cp -"
  run_timed aws_up bash -c "tar -C '$work/tree' -cf - . | zstd -q -T0 -3 | '$AWS' --endpoint-url '$endpoint' s3 cp --only-show-errors - 's3://$bucket/awscli/layer$r.tar.zst'"
  echo "  zlayer-storage sync"
  # A fresh prefix per round: the blob must not exist yet.
  sed -i "s|^prefix = .*|prefix = \"bench$r/\"|" "$work/storage.toml"
  run_timed sync zl sync sync --id "bench/$r" "$work/tree" >/dev/null
  echo "  zlayer-storage sync (unchanged)"
  run_timed resync zl resync sync --id "bench/$r" "$work/tree" >/dev/null
  echo "  awscli restore: aws s3 cp - | zstd -d | tar -x"
  mkdir "$work/aws-restore$r"
  run_timed aws_down bash -c "'$AWS' --endpoint-url '$endpoint' s3 cp --only-show-errors 's3://$bucket/awscli/layer$r.tar.zst' - | zstd -q -d | tar -C '$work/aws-restore$r' -xf -"
  echo "  zlayer-storage restore"
  run_timed restore zl restore restore --id "bench/$r" "$work/restored$r" >/dev/null
  diff -r "$work/tree" "$work/restored$r" >/dev/null || { echo "FAIL: restored tree differs" >&2; exit 1; }
  for v in compress aws_up sync resync aws_down restore; do
    eval "all_$v=\"\${all_$v:-} \$t_$v\""
    eval "allcpu_$v=\"\${allcpu_$v:-} \$cpu_$v\""
    eval "allgcpu_$v=\"\${allgcpu_$v:-} \$gcpu_$v\""
  done
  rss_sync=$(rss_of "$work/time.sync"); rss_restore=$(rss_of "$work/time.restore")
  all_rss="${all_rss:-} $(( rss_sync > rss_restore ? rss_sync : rss_restore ))"
  all_rss_sync="${all_rss_sync:-} $rss_sync"; all_rss_restore="${all_rss_restore:-} $rss_restore"
done

# median and "min-max" of a list of numbers
med() { python3 -c "import statistics,sys; print(round(statistics.median(map(float, sys.argv[1:])), 3))" $1; }
spread() { python3 -c "import sys; v=sorted(map(float, sys.argv[1:])); print(f'{v[0]:.3f}-{v[-1]:.3f}')" $1; }
maxof() { python3 -c "import sys; print(int(max(map(float, sys.argv[1:]))))" $1; }

fail=0
check() { # check LABEL VALUE OP LIMIT
  if python3 -c "import sys; sys.exit(0 if $2 $3 $4 else 1)"; then echo "PASS  $1: $2 (target $3 $4)"
  else echo "FAIL  $1: $2 (target $3 $4)"; fail=1; fi
}
ratio() { python3 -c "print(round($1 / $2, 3))"; }
# per-round ratios, so the spread of a ratio is visible too
ratios() { python3 -c "import sys; a=list(map(float, sys.argv[1].split())); b=list(map(float, sys.argv[2].split())); v=sorted(x/y for x,y in zip(a,b)); print(f'{v[0]:.2f}-{v[-1]:.2f}')" "$1" "$2"; }
echo
echo "== results (warm cache, $runs rounds: median [min-max]; tree $((tree_bytes / 1048576)) MiB; parts $((part_size / 1048576)) MiB x $concurrency) =="
for row in "tar | zstd -T0 -3 > /dev/null:compress" "tar | zstd -T0 -3 | aws s3 cp -:aws_up" \
           "zlayer-storage sync (full):sync" "zlayer-storage sync (unchanged):resync" \
           "aws s3 cp - | zstd -d | tar -x:aws_down" "zlayer-storage restore:restore"; do
  label=${row%:*}; var=all_${row##*:}
  printf '%-44s %8ss  [%s]\n' "$label" "$(med "${!var}")" "$(spread "${!var}")"
done
echo
echo "CPU seconds (median; client = the pipeline's processes, server = Garage meanwhile; $cores cores):"
for row in "tar | zstd -T0 -3 > /dev/null:compress" "tar | zstd -T0 -3 | aws s3 cp -:aws_up" \
           "zlayer-storage sync (full):sync" \
           "aws s3 cp - | zstd -d | tar -x:aws_down" "zlayer-storage restore:restore"; do
  label=${row%:*}; c=allcpu_${row##*:}; g=allgcpu_${row##*:}
  printf '%-44s client %6s  server %6s\n' "$label" "$(med "${!c}")" "$(med "${!g}")"
done
printf '%-44s %8s MiB\n' "peak RSS sync / restore (max)" "$(( $(maxof "$all_rss_sync") / 1024 )) / $(( $(maxof "$all_rss_restore") / 1024 ))"
echo
m_compress=$(med "$all_compress"); m_aws_up=$(med "$all_aws_up"); m_sync=$(med "$all_sync")
m_resync=$(med "$all_resync"); m_aws_down=$(med "$all_aws_down"); m_restore=$(med "$all_restore")
check "sync speed-up over awscli pipeline (x) [rounds $(ratios "$all_aws_up" "$all_sync")]" "$(ratio "$m_aws_up" "$m_sync")" ">=" 1.5
check "sync time / compress-only time (x) [rounds $(ratios "$all_sync" "$all_compress")]" "$(ratio "$m_sync" "$m_compress")" "<=" 1.3
# A sync cannot take less than the compression work plus what the co-located server burns
# ingesting the result, spread over every core: print that floor so a miss can be judged.
floor=$(python3 -c "print(round(($(med "$allcpu_compress") + $(med "$allgcpu_sync")) / $cores, 3))")
echo "      floor on this machine: (compress-only CPU + server CPU during sync) / $cores cores = ${floor}s = $(ratio "$floor" "$m_compress")x compress-only"
check "restore speed-up over awscli pipeline (x) [rounds $(ratios "$all_aws_down" "$all_restore")]" "$(ratio "$m_aws_down" "$m_restore")" ">=" 1.3
check "unchanged re-sync / full sync [rounds $(ratios "$all_resync" "$all_sync")]" "$(ratio "$m_resync" "$m_sync")" "<=" 0.05
check "peak RSS (MiB)" "$(( $(maxof "$all_rss") / 1024 ))" "<=" 150
exit $fail
