#!/usr/bin/env python3
"""Hostile Forward/syslog clients against a collector: peak RSS and worst /healthz per attack.

Usage: scripts/forward-attacks.py BIN [ATTACK...]
  BIN: a logmesh binary (e.g. /work/main-bin/logmesh or target/debug/logmesh).
  ATTACK: tag | tag3 | record | gzip | idle | preauth (default: all).

Starts an aggregator and a collector (--forward, --syslog; static discovery, --insecure) on
loopback per attack, samples the collector's VmRSS and GET /healthz every 20 ms while the
attack runs, and prints one line per attack:
  ATTACK idle_rss_MiB peak_rss_MiB delta_MiB worst_healthz_ms outcome
Needs python3 only (msgpack framing is written by hand).
"""

import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def healthz(admin):
    t = time.monotonic()
    try:
        s = socket.create_connection(admin, timeout=30)
        s.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        while s.recv(4096):
            pass
        s.close()
    except OSError:
        return 30.0
    return time.monotonic() - t


def wait_log(proc, msg, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if v.get("fields", {}).get("message") == msg:
            return v["fields"]
    raise SystemExit(f"no log line {msg!r}")


def drain(proc):
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()


def start(binary, d, extra):
    agg = subprocess.Popen(
        [binary, "aggregator", "--insecure", "--discovery", "static", "--node-id", "agg-1",
         "--data-dir", f"{d}/agg", "--out-dir", f"{d}/out", "--listen", "127.0.0.1:0",
         "--admin", "127.0.0.1:0", "--log-format", "json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    quic = wait_log(agg, "aggregator ready")["quic"]
    drain(agg)
    col = subprocess.Popen(
        [binary, "collector", "--insecure", "--discovery", "static", "--static-aggregators",
         f"agg-1@{quic}", "--node-id", "col-1", "--data-dir", f"{d}/col", "--admin",
         "127.0.0.1:0", "--forward", "127.0.0.1:0", "--log-format", "json"] + extra,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    fwd = wait_log(col, "forward input listening")["addr"]
    admin = wait_log(col, "collector running")["admin"]
    drain(col)
    host, port = fwd.rsplit(":", 1)
    ahost, aport = admin.rsplit(":", 1)
    return agg, col, (host, int(port)), (ahost, int(aport))


def nil_tag_frame(n):
    return b"\x92\xdd" + struct.pack(">I", n) + b"\xc0" * n + b"\x01"


def nil_record_frame(n):
    return b"\x93\xa3nil\x01\x81\xa1k\xdd" + struct.pack(">I", n) + b"\xc0" * n


def gzip_bomb_frame(total):
    member = gzip.compress(b"\0" * (16 << 20), 9)
    z = member * (total // (16 << 20))
    opt = b"\x82\xa5chunk\xa4bomb\xaacompressed\xa4gzip"
    return b"\x93\xa4bomb\xc6" + struct.pack(">I", len(z)) + z + opt, len(z)


def send_and_wait(addr, data, read_first=False, timeout=60):
    """Send data; return what the server did: 'closed', 'answered' or 'open'."""
    s = socket.create_connection(addr)
    if read_first:
        s.recv(4096)  # HELO
    try:
        s.sendall(data)
    except OSError:
        return "closed"
    s.settimeout(timeout)
    try:
        b = s.recv(4096)
        return "closed" if not b else "answered"
    except socket.timeout:
        return "open"
    except OSError:
        return "closed"
    finally:
        s.close()


def attack(name, addr):
    if name == "tag":
        return send_and_wait(addr, nil_tag_frame(60 << 20))
    if name == "tag3":
        out = []
        ts = [threading.Thread(target=lambda: out.append(send_and_wait(addr, nil_tag_frame(60 << 20))))
              for _ in range(3)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return ",".join(out)
    if name == "record":
        return send_and_wait(addr, nil_record_frame(60 << 20), timeout=20)
    if name == "gzip":
        f, zlen = gzip_bomb_frame(1600 << 20)
        return f"{len(f) >> 10}KiB->1600MiB " + send_and_wait(addr, f)
    if name == "idle":
        conns = [socket.create_connection(addr) for _ in range(3000)]
        time.sleep(5)
        closed = 0
        for c in conns:
            c.setblocking(False)
            try:
                if c.recv(1) == b"":
                    closed += 1
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
            c.close()
        return f"{closed}/3000 closed by the server after 5s"
    if name == "preauth":
        # a PING whose hostname is a 60 MiB array, before the handshake
        n = 60 << 20
        f = b"\x96\xa4PING\xdd" + struct.pack(">I", n) + b"\xc0" * n + b"\xa0" * 4
        return send_and_wait(addr, f, read_first=True)
    raise SystemExit(f"unknown attack {name}")


def main():
    binary = sys.argv[1]
    names = sys.argv[2:] or ["tag", "tag3", "record", "gzip", "idle", "preauth"]
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            extra = ["--forward-shared-key", "k"] if name == "preauth" else []
            agg, col, addr, admin = start(binary, d, extra)
            try:
                time.sleep(1)
                idle = rss(col.pid)
                stop = threading.Event()
                peak = [idle, 0.0]

                def sample():
                    while not stop.is_set():
                        peak[0] = max(peak[0], rss(col.pid))
                        peak[1] = max(peak[1], healthz(admin))
                        time.sleep(0.02)

                t = threading.Thread(target=sample)
                t.start()
                outcome = attack(name, addr)
                time.sleep(1)
                stop.set()
                t.join()
                mib = 1 << 20
                print(f"{name} idle={idle // mib}MiB peak={peak[0] // mib}MiB "
                      f"delta={(peak[0] - idle) // mib}MiB worst_healthz={peak[1] * 1000:.0f}ms "
                      f"outcome={outcome}", flush=True)
            finally:
                col.kill()
                agg.kill()
                col.wait()
                agg.wait()


if __name__ == "__main__":
    main()
