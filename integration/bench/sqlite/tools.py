#!/usr/bin/env python3
"""Helpers for integration/bench/sqlite.sh (python3 standard library only).

  tools.py proxy PORTFILE UPSTREAM_PORT LOG
      HTTP/1.1 forwarding proxy on 127.0.0.1 (ephemeral port written to PORTFILE) in front of
      127.0.0.1:UPSTREAM_PORT; appends "unix_ns METHOD PATH" to LOG for every request.
  tools.py watch MANIFEST OUT STOPFILE [INTERVAL_MS]
      polls the local store's metadata.json every INTERVAL_MS (default 5) until STOPFILE exists;
      writes "unix_ns generation last_txid" to OUT each time the last stored txid changes.
  tools.py last MANIFEST
      prints "generation last_txid" of the manifest's current generation.
  tools.py lag COMMITS WATCHLOG GENERATION BASE_TXID
      commit k of COMMITS ("db k unix_ns", database 0) is txid BASE_TXID+k of GENERATION;
      prints a JSON object with the commit → durable lag percentiles in ms.
  tools.py cpu PID       utime+stime of PID in seconds
  tools.py mem PID       "VmHWM_kB VmRSS_kB" of PID
  tools.py count LOG SINCE_NS [UNTIL_NS]
      requests in a proxy LOG in the window, as JSON {"total": n, "by_method": {...}}
"""

import json
import os
import socket
import sys
import threading
import time


# --- counting proxy ----------------------------------------------------------------------------

def _read_until(sock, buf, sep):
    while sep not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    i = buf.index(sep) + len(sep)
    return buf[:i], buf[i:]


def _forward_exact(src, dst, buf, n):
    """Forwards n body bytes (buf first); returns what was read beyond them."""
    take = buf[:n]
    dst.sendall(take)
    n -= len(take)
    rest = buf[len(take):]
    while n > 0:
        chunk = src.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("client closed mid-body")
        dst.sendall(chunk)
        n -= len(chunk)
    return rest


def _client_to_server(client, server, log, lock):
    buf = b""
    try:
        while True:
            head, buf = _read_until(client, buf, b"\r\n\r\n")
            if head is None:
                break
            lines = head.split(b"\r\n")
            method, path = (lines[0].split(b" ") + [b"", b""])[:2]
            headers = {}
            for line in lines[1:]:
                if b":" in line:
                    k, v = line.split(b":", 1)
                    headers[k.strip().lower()] = v.strip()
            with lock:
                log.write("%d %s %s\n" % (time.time_ns(), method.decode(), path.decode()))
                log.flush()
            server.sendall(head)
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size_line, buf = _read_until(client, buf, b"\r\n")
                    if size_line is None:
                        raise ConnectionError("client closed mid-chunk")
                    server.sendall(size_line)
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        # Trailers, then an empty line.
                        while True:
                            line, buf = _read_until(client, buf, b"\r\n")
                            if line is None:
                                raise ConnectionError("client closed in trailers")
                            server.sendall(line)
                            if line == b"\r\n":
                                break
                        break
                    buf = _forward_exact(client, server, buf, size + 2)
            else:
                n = int(headers.get(b"content-length", b"0") or b"0")
                buf = _forward_exact(client, server, buf, n)
    except (OSError, ConnectionError, ValueError):
        pass
    finally:
        try:
            server.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _server_to_client(server, client):
    try:
        while True:
            chunk = server.recv(1 << 20)
            if not chunk:
                break
            client.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (client, server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def proxy(portfile, upstream_port, logpath):
    upstream_port = int(upstream_port)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    log = open(logpath, "a")
    lock = threading.Lock()
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(lsock.getsockname()[1]))
    os.rename(tmp, portfile)
    while True:
        client, _ = lsock.accept()
        server = socket.create_connection(("127.0.0.1", upstream_port))
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_client_to_server, args=(client, server, log, lock), daemon=True).start()
        threading.Thread(target=_server_to_client, args=(server, client), daemon=True).start()


def count(logpath, since, until=None):
    since = int(since)
    until = int(until) if until is not None else None
    by = {}
    total = 0
    with open(logpath) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            t = int(parts[0])
            if t < since or (until is not None and t > until):
                continue
            total += 1
            by[parts[1]] = by.get(parts[1], 0) + 1
    print(json.dumps({"total": total, "by_method": by}))


# --- manifest ----------------------------------------------------------------------------------

def _last(manifest):
    g = manifest["generations"][-1]
    if g["segments"]:
        return g["id"], g["segments"][-1]["last"]
    if g["chunks"]:
        return g["id"], g["chunks"][-1]["last"]
    return g["id"], g["snapshots"][0]["txid"]


def last(path):
    with open(path, "rb") as f:
        gen, txid = _last(json.load(f))
    print(gen, txid)


def watch(path, out, stopfile, interval_ms="5"):
    interval = float(interval_ms) / 1000.0
    seen = []
    prev_stat = None
    prev = None
    while not os.path.exists(stopfile):
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != prev_stat:
                with open(path, "rb") as f:
                    data = f.read()
                cur = _last(json.loads(data))
                prev_stat = key
                if cur != prev:
                    seen.append((time.time_ns(), cur[0], cur[1]))
                    prev = cur
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(interval)
    with open(out, "w") as f:
        for t, g, x in seen:
            f.write("%d %s %d\n" % (t, g, x))


def _pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    i = max(1, min(len(sorted_vals), int(-(-len(sorted_vals) * p // 1)))) - 1
    return sorted_vals[i]


def lag(commits, watchlog, generation, base_txid):
    base_txid = int(base_txid)
    seen = []
    with open(watchlog) as f:
        for line in f:
            t, g, x = line.split()
            if g == generation:
                seen.append((int(t), int(x)))
    lags = []
    missing = 0
    n = 0
    with open(commits) as f:
        for line in f:
            db, k, t = line.split()
            if db != "0":
                continue
            n += 1
            txid = base_txid + int(k)
            durable = next((ts for ts, x in seen if x >= txid), None)
            if durable is None:
                missing += 1
            else:
                lags.append((durable - int(t)) / 1e6)
    lags.sort()
    print(json.dumps({
        "commits": n,
        "measured": len(lags),
        "missing": missing,
        "p50_ms": round(_pct(lags, 0.50), 1),
        "p90_ms": round(_pct(lags, 0.90), 1),
        "p99_ms": round(_pct(lags, 0.99), 1),
        "max_ms": round(lags[-1], 1) if lags else None,
        "min_ms": round(lags[0], 1) if lags else None,
        "manifest_updates": len(seen),
    }))


# --- /proc -------------------------------------------------------------------------------------

def cpu(pid):
    with open("/proc/%s/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime = field 14, stime = field 15.
    ticks = int(fields[11]) + int(fields[12])
    print("%.3f" % (ticks / os.sysconf("SC_CLK_TCK")))


def mem(pid):
    vals = {}
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                vals[k] = v.split()[0]
    print(vals.get("VmHWM", "0"), vals.get("VmRSS", "0"))


if __name__ == "__main__":
    cmds = {"proxy": proxy, "watch": watch, "last": last, "lag": lag, "cpu": cpu, "mem": mem,
            "count": count}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.stderr.write(__doc__)
        sys.exit(2)
    cmds[sys.argv[1]](*sys.argv[2:])
