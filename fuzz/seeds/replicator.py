#!/usr/bin/env python3
"""Writes the committed seeds of the `replicator` fuzz target into fuzz/seeds/replicator/.

The target picks its mode from the input's first bytes (see fuzz_targets/replicator.rs), so
there are three kinds of seed:
  wal-*: WAL files written by SQLite itself (copied while the connection is open, so they are
         not checkpointed away), one rewritten with big-endian checksums, one restarted over an
         older lifetime, and some with a partial trailing frame (the target's knobs);
  seg-*: valid segments in the format of src/replicator/segment.rs;
  ops-*: writer programs for the round-trip mode.
Every seed stays under the run's -max_len (64 KiB). Run: python3 fuzz/seeds/replicator.py
"""
import hashlib
import os
import shutil
import sqlite3
import struct
import tempfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replicator")
MAX_LEN = 64 * 1024


def write(name, data):
    assert len(data) <= MAX_LEN, (name, len(data))
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def sqlite_wal(page_size, txns, restart_after=None):
    """Runs `txns` (SQL strings, one transaction each) and returns the -wal file's bytes.
    With `restart_after`, checkpoints after that many transactions so the next write restarts
    the WAL over the older frames."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "app.db")
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA page_size={page_size}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        for i, sql in enumerate(txns):
            if restart_after is not None and i == restart_after:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            conn.execute("BEGIN")
            conn.execute(sql)
            conn.execute("COMMIT")
        copy = os.path.join(d, "copy")
        shutil.copyfile(path + "-wal", copy)
        conn.close()
        with open(copy, "rb") as f:
            return f.read()


def wal_checksum(seed, data, big_endian):
    s0, s1 = seed
    fmt = ">II" if big_endian else "<II"
    for i in range(0, len(data), 8):
        a, b = struct.unpack_from(fmt, data, i)
        s0 = (s0 + a + s1) & 0xFFFFFFFF
        s1 = (s1 + b + s0) & 0xFFFFFFFF
    return s0, s1


def to_big_endian(wal):
    """The same WAL as a big-endian host writes it: magic 0x377f0683, checksums over BE words."""
    page_size = struct.unpack_from(">I", wal, 8)[0]
    out = bytearray(wal)
    struct.pack_into(">I", out, 0, 0x377F0683)
    s = wal_checksum((0, 0), out[:24], True)
    struct.pack_into(">II", out, 24, *s)
    frame_len = 24 + page_size
    for off in range(32, len(out) - frame_len + 1, frame_len):
        s = wal_checksum(s, out[off : off + 8], True)
        s = wal_checksum(s, out[off + 24 : off + frame_len], True)
        struct.pack_into(">II", out, off + 16, *s)
    return bytes(out)


def segment(page_size, lineage, first_txid, txns):
    """A segment of `txns`: lists of (pgno, fill byte) pages, committed at 1000+i ns."""
    out = bytearray(b"ZLWSEG01" + struct.pack(">I", page_size) + lineage)
    out += struct.pack(">Q", first_txid)
    txid = first_txid
    for i, pages in enumerate(txns):
        out += b"T" + struct.pack(">Q", txid)
        for pgno, fill in pages:
            out += b"P" + struct.pack(">I", pgno) + bytes([fill]) * page_size
        out += b"C" + struct.pack(">qI", 1000 + i, 10 + i)
        out += hashlib.sha256(out).digest()
        txid += 1
    out += b"E" + struct.pack(">Q", max(txid - 1, 0))
    out += hashlib.sha256(out).digest()
    return bytes(out)


def ops(page_exp, first_txid, lineage, flip, mask, cut, stop, program):
    """A round-trip program; the layout is `Program::parse` in fuzz_targets/replicator.rs."""
    head = struct.pack(">BIBHBHB", page_exp, first_txid, lineage, flip, mask, cut, stop)
    return head + b"".join(program)


def page(pgno, fill):
    return struct.pack(">BHB", 0, pgno, fill)


def commit(ns, db_pages):
    return struct.pack(">BqI", 2, ns, db_pages)


DISCARD = b"\x03"

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)"
    small = "INSERT INTO t(v) VALUES (randomblob(20))"
    wal512 = sqlite_wal(512, [schema, small, "INSERT INTO t(v) VALUES (randomblob(1500))", small])
    write("wal-512", wal512)
    write("wal-512-be", to_big_endian(wal512))
    wal4k = sqlite_wal(4096, [schema, small, "INSERT INTO t(v) VALUES (randomblob(9000))"])
    write("wal-4096", wal4k)
    # Trailer: end at frame 2 of the full scan's range, the sink refusing its 3rd event.
    wal1k = sqlite_wal(1024, [schema] + [small] * 3 + ["DELETE FROM t WHERE id = 2"])
    write("wal-1024-trailer", wal1k + bytes([2, 3]))
    restarted = sqlite_wal(1024, [schema, "INSERT INTO t(v) VALUES (randomblob(3000))", small], 2)
    # The new lifetime is frame 1, an older one's frames follow; the trailer ends the scan at 1.
    write("wal-1024-restarted", restarted + bytes([1]))

    write("seg-512", segment(512, bytes([7]) * 16, 1, [[(1, 1), (2, 2), (1, 3)], [(5, 5)], []]))
    write("seg-4096", segment(4096, bytes(range(16)), 1000, [[(1, 0xAA)], [(3, 0x55), (2, 0)]]))

    three = [page(1, 1), page(2, 2), commit(5, 2), page(3, 3), DISCARD, page(4, 4),
             commit(-1, 4), commit(7, 4), page(9, 9)]
    write("ops-512", ops(0, 41, 7, 600, 0x40, 900, 1, three))
    write("ops-4096-stop-commit", ops(3, 0, 0, 40, 1, 5000, 0x81, three))
