#!/usr/bin/env bash
# Poststop hook benchmark: the hook's own work, against `/bin/true` fed the same stdin in the
# same run (process start-up the hook cannot avoid).
#
#   bash integration/bench/hook.sh        # builds the release binary, 300 runs per command
#
# Env: ZLAYER_BIN (skip the build), BENCH_RUNS (default 300), BENCH_WARMUP (default 20).
# Needs hyperfine (`apt-get install hyperfine`) and python3.
#
# Three commands, each under `env -i` (runc may give a hook no environment) with the OCI state
# on stdin, as runc passes it at poststop:
#   baseline   env -i /bin/true < state.json
#   listening  env -i zlayer-storage hook poststop --socket S < state.json, where S is a small
#              python listener that reads the request line and answers "queued" at once
#   absent     the same with no daemon (the socket path does not exist)
# The hook also reads /proc/self/mountinfo and parses the state and the answer, so this is its
# whole path except the daemon's own recording of the request. Target: own work ≤ 50 ms.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v hyperfine >/dev/null || { echo "missing hyperfine (apt-get install hyperfine)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "missing python3" >&2; exit 1; }
RUNS=${BENCH_RUNS:-300}
WARMUP=${BENCH_WARMUP:-20}

if [ -z "${ZLAYER_BIN:-}" ]; then
  cargo build --release --quiet --bin zlayer-storage
  ZLAYER_BIN=$PWD/target/release/zlayer-storage
fi
[ -x "$ZLAYER_BIN" ] || { echo "missing $ZLAYER_BIN" >&2; exit 1; }

work=$(mktemp -d /tmp/zl-hook-bench.XXXXXX)
listener_pid=
cleanup() {
  [ -n "$listener_pid" ] && kill "$listener_pid" 2>/dev/null && wait "$listener_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

bundle=$work/io.containerd.runtime.v2.task/default/bench1
mkdir -p "$bundle/rootfs"
printf '{"ociVersion":"1.0.2-dev","id":"bench1","status":"stopped","bundle":"%s","annotations":{"io.kubernetes.cri.container-type":"container"}}' \
  "$bundle" >"$work/state.json"

# The daemon stand-in: one request line in, one "queued" line out, a line per request logged.
sock=$work/control.sock
python3 - "$sock" "$work/requests.log" <<'PY' &
import socket, sys
path, log = sys.argv[1], open(sys.argv[2], "ab", buffering=0)
answer = b'{"ok":true,"state":"queued","request_id":1,"identity":"bench/0"}\n'
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(128)
while True:
    conn, _ = server.accept()
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    log.write(data.split(b"\n")[0] + b"\n")
    conn.sendall(answer)
    conn.close()
PY
listener_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "listener did not start" >&2; exit 1; }

state=$work/state.json
hyperfine --style basic --runs "$RUNS" --warmup "$WARMUP" --export-json "$work/result.json" \
  -n baseline "env -i /bin/true < $state" \
  -n listening "env -i $ZLAYER_BIN hook poststop --socket $sock < $state" \
  -n absent "env -i $ZLAYER_BIN hook poststop --socket $work/absent.sock < $state 2>/dev/null" >&2

requests=$(wc -l <"$work/requests.log")
expected=$((RUNS + WARMUP))
[ "$requests" -ge "$expected" ] || { echo "the listener saw $requests requests, expected $expected" >&2; exit 1; }
grep -q '"container_id":"bench1"' "$work/requests.log" || { echo "unexpected request: $(head -1 "$work/requests.log")" >&2; exit 1; }

python3 - "$work/result.json" <<'PY'
import json, sys
results = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
ms = {name: r["median"] * 1000 for name, r in results.items()}
spread = {name: (min(r["times"]) * 1000, max(r["times"]) * 1000) for name, r in results.items()}
base = ms["baseline"]
print(f"{'command':<10} {'median ms':>10} {'min-max ms':>16} {'own work ms':>12} {'ratio':>7}")
ok = True
for name in ("baseline", "listening", "absent"):
    own = ms[name] - base
    lo, hi = spread[name]
    print(f"{name:<10} {ms[name]:>10.2f} {lo:>7.2f}-{hi:<8.2f} {own:>12.2f} {ms[name] / base:>6.2f}x")
    if name != "baseline" and own > 50:
        ok = False
print("target: own work (median - baseline median) <= 50 ms:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
