#!/usr/bin/env python3
"""Full vs resumed TLS handshake rates, with sessions shared through a dc_server and without.

Run by hand (not in CI):   python bench/tls/run.py [--seconds 3] [--clients 2]
Writes bench/results/tls.md.

Scenarios, for TLS 1.2 and 1.3 and each key type:
  shared    two tcpha.tls.resume_server processes A and B sharing one dc_server (UNIX socket);
            "full": the client never offers a session; "resumed": it offers its newest session,
            alternating A, B, A, ... so every resumption crosses servers.
  unshared  the same two processes without a shared cache (OpenSSL's internal cache each):
            "resumed" alternating A/B then resumes nothing (every one is full), which is what
            a non-sticky balancer costs without distcache; "same server" offers it to A only.
Each client process runs connections one after another: connect, handshake, read the server's
line, close.  Rate = all connections / wall time.

Through the front end: bench/tls/through_fe.py builds the namespace lab (tcpha-fe, two tcpha-be
terminating TLS, dc_server + dc_clients) and writes bench/results/tls-fe.md.  This script's
--target HOST:PORT[,...] --no-start --cafile CERT --sni A,B --request PATH runs the same clients
against any running servers (e.g. from the lab's client namespace against VIP:443).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "tls.md"
DC_SERVER = [sys.executable, "-c", "import sys; from tcpha.cli.dc_server import main; sys.exit(main())"]


def make_cert(d: str, key_type: str) -> tuple[str, str]:
    cert, key = f"{d}/{key_type}.crt", f"{d}/{key_type}.key"
    newkey = ["-newkey", "rsa:2048"] if key_type == "rsa2048" else \
        ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-days", "1", "-keyout", key, "-out", cert,
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def start_server(name: str, cert: str, key: str, cache: str | None) -> tuple[subprocess.Popen, tuple[str, int]]:
    argv = [sys.executable, "-m", "tcpha.tls.resume_server", "--cert", cert, "--key", key, "--name", name]
    if cache:
        argv += ["--cache", cache]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    m = re.match(r"listening on (\S+):(\d+)", p.stdout.readline())
    if not m:
        p.kill()
        raise SystemExit(f"{name} did not start")
    return p, (m.group(1), int(m.group(2)))


def one(target, ctx, session, request=b""):
    """One connection: handshake, then the server's first bytes (resume_server speaks first; an
    HTTP server behind the front end gets `request` and is read to the end).  Reading past the
    handshake also makes the client take a TLS 1.3 ticket sent after it."""
    addr, sni = target
    t0 = time.perf_counter()
    raw = socket.create_connection(addr, timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname=sni, session=session) as tls:
        if request:
            tls.sendall(request)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        else:
            data = tls.recv(128)
        dt = time.perf_counter() - t0
        return dt, tls.session_reused, tls.session, data


def client(args):
    targets, cafile, version, mode, seconds, q, request = args
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[version]
    session = None
    if mode != "full":
        _, _, session, _ = one(targets[0], ctx, None, request)
    lat, reused, n, errors = [], 0, 0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        addr = targets[0] if mode == "same" else targets[n % len(targets)]
        try:
            dt, r, s, _ = one(addr, ctx, session if mode != "full" else None, request)
        except (OSError, ssl.SSLError):
            errors += 1
            continue
        n += 1
        lat.append(dt)
        reused += r
        if mode != "full" and s is not None:
            session = s  # a real client keeps the newest session (TLS 1.3: the newest ticket)
    q.put((n, reused, errors, lat))


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def run(targets, cafile, version, mode, seconds, clients, server_pids=(), request=b""):
    q = multiprocessing.Queue()
    cpu0 = cpu_seconds(list(server_pids))
    t0 = time.perf_counter()
    ps = [multiprocessing.Process(target=client, args=((targets, cafile, version, mode, seconds, q, request),))
          for _ in range(clients)]
    for p in ps:
        p.start()
    res = [q.get() for _ in ps]
    wall = time.perf_counter() - t0
    for p in ps:
        p.join()
    n = sum(r[0] for r in res)
    cpu = cpu_seconds(list(server_pids)) - cpu0
    lat = sorted(x for r in res for x in r[3])
    return {"n": n, "cpu_us": cpu / n * 1e6 if n and server_pids else 0.0, "rate": n / min(wall, seconds + 0.2), "reused": sum(r[1] for r in res),
            "errors": sum(r[2] for r in res),
            "p50": statistics.median(lat) * 1000 if lat else 0,
            "p99": lat[int(len(lat) * 0.99) - 1] * 1000 if lat else 0}


def bio_handshake(sctx, cctx, session=None):
    """One handshake over memory BIOs (no sockets, no threads): (client SSLObject, server CPU seconds)."""
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = sctx.wrap_bio(si, so, server_side=True)
    c = cctx.wrap_bio(ci, co, server_hostname="localhost", session=session)
    c_done = s_done = False
    server_time = 0.0
    while not (c_done and s_done):
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        si.write(co.read())
        if not s_done:
            t0 = time.thread_time()
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
            server_time += time.thread_time() - t0
        ci.write(so.read())
    s.write(b"x")  # the client reads past a TLS 1.3 ticket sent after the handshake
    ci.write(so.read())
    c.read(1)
    return c, server_time


def handshake_costs(cert, key, version, cache, dc_pid, count=400):
    """Server CPU (µs) per handshake for full, resumed through the shared cache (alternating two
    contexts) and resumed through OpenSSL's internal cache (one context, unshared): the CPU time
    of the server's do_handshake calls plus dc_server's CPU time, per handshake.  CPU time, not
    wall time, so that other work on the machine does not count."""
    from tcpha.tls import share_sessions

    cctx = ssl.create_default_context(cafile=cert)
    cctx.minimum_version = cctx.maximum_version = ssl.TLSVersion[version]

    def server(shared):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        if shared and not share_sessions(ctx, cache):
            raise SystemExit("share_sessions failed")
        return ctx

    a, b, internal = server(True), server(True), server(False)
    out = {}
    for name, ctxs, resume in (("full", (a, b), False), ("resumed, shared cache, alternating A/B", (a, b), True),
                               ("resumed, internal cache, same server", (internal,), True)):
        session = bio_handshake(ctxs[0], cctx)[0].session
        dc_cpu = cpu_seconds([dc_pid])
        times, reused = [], 0
        for i in range(count):
            c, t = bio_handshake(ctxs[i % len(ctxs)], cctx, session if resume else None)
            times.append(t)
            reused += c.session_reused
            session = c.session
        dc_cpu = cpu_seconds([dc_pid]) - dc_cpu
        out[name] = ((sum(times) + dc_cpu) / count * 1e6, reused, count)
    return out


def median_rows(rows: list) -> list:
    """One row per (setup, key, version, mode): the one with the median rate."""
    groups: dict[tuple, list] = {}
    for setup, key, version, mode, r in rows:
        groups.setdefault((setup, key, version, mode), []).append(r)
    out = []
    for k, rs in groups.items():
        rs.sort(key=lambda r: r["rate"])
        out.append((*k, rs[len(rs) // 2]))
    return out


def cache_costs(address: str, dc_pid: int, count: int = 3000) -> dict[str, tuple[float, float, float]]:
    """Per operation on dc_server (UNIX socket, 135-byte session): (wall µs, client CPU µs,
    dc_server CPU µs) of a GET and an ADD each waited for (DistcacheClient, what the get callback
    does) and of an ADD posted without waiting (tcpha.tls.sharing.PostedOperations, what the
    new-session callback does)."""
    from tcpha.distcache.client import PERSISTENT, DistcacheClient
    from tcpha.tls.sharing import PostedOperations
    c = DistcacheClient(address, PERSISTENT, timeout=1)
    posted = PostedOperations(address, timeout=1)
    c.add(b"x" * 32, b"y" * 135, 60000)
    ids = [os.urandom(32) for _ in range(2 * count)]
    out = {}
    answered = []
    for name, op in (("GET, waited", lambda i: c.get(b"x" * 32)),
                     ("ADD, waited", lambda i: c.add(ids[i], b"y" * 135, 60000)),
                     ("ADD, posted", lambda i: posted.add(ids[count + i], b"y" * 135, 60000, answered.append))):
        dc0, t0, w0 = cpu_seconds([dc_pid]), time.thread_time(), time.perf_counter()
        for i in range(count):
            op(i)
        wall, cpu = time.perf_counter() - w0, time.thread_time() - t0
        if name == "ADD, posted":            # every answer read: the whole cost counted
            while len(answered) < count:
                posted.poll()
            cpu = time.thread_time() - t0
        out[name] = (wall / count * 1e6, cpu / count * 1e6, (cpu_seconds([dc_pid]) - dc0) / count * 1e6)
    c.close()
    posted.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", default="p256,rsa2048")
    ap.add_argument("--versions", default="TLSv1_2,TLSv1_3")
    ap.add_argument("--target", help="HOST:PORT[,HOST:PORT] of running servers (e.g. the front end)")
    ap.add_argument("--cafile", help="with --target: the servers' CA/certificate")
    ap.add_argument("--no-start", action="store_true", help="with --target: start nothing")
    ap.add_argument("--sni", default="localhost", help="with --target: server names to cycle through")
    ap.add_argument("--request", help="with --target: send 'GET PATH' and read the answer to its end")
    ap.add_argument("--label", help="with --target: the setup column")
    ap.add_argument("--key-label", default="-", help="with --target: the key column")
    ap.add_argument("--json", help="with --target: write the rows as JSON here instead of the results")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    rows = []
    bio_rows: list = []
    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="tcpha-bench-tls-")
    extra = ""
    try:
        if a.target:
            if not (a.no_start and a.cafile):
                raise SystemExit("--target needs --no-start and --cafile")
            addrs = [(h, int(p)) for h, _, p in (t.rpartition(":") for t in a.target.split(","))]
            snis = a.sni.split(",")
            # Consecutive connections cycle through the addresses and the server names: behind the
            # front end, SNI rules send them to different back ends.
            targets = [(addrs[i % len(addrs)], snis[i % len(snis)]) for i in range(max(len(addrs), len(snis)))]
            request = (f"GET {a.request} HTTP/1.1\r\nHost: {snis[0]}\r\nConnection: close\r\n\r\n".encode()
                       if a.request else b"")
            for _ in range(a.rounds):
                for version in a.versions.split(","):
                    for mode in ("full", "alternate"):
                        r = run(targets, a.cafile, version, mode, a.seconds, a.clients, request=request)
                        rows.append((a.label or "target " + a.target, a.key_label, version, mode, r))
            rows = median_rows(rows)
            if a.json:
                Path(a.json).write_text(json.dumps(rows))
                return 0
        else:
            cache = f"UNIX:{tmp}/scache"
            dc = subprocess.Popen(DC_SERVER + ["-listen", cache, "-sessions", "60000"],
                                  stderr=subprocess.DEVNULL)
            procs.append(dc)
            deadline = time.monotonic() + 10
            while not os.path.exists(f"{tmp}/scache"):
                if time.monotonic() > deadline or dc.poll() is not None:
                    raise SystemExit("dc_server did not start")
                time.sleep(0.05)
            costs = cache_costs(cache, dc.pid)
            extra = "\n".join(["One cache operation on dc_server (UNIX socket, 135-byte session; 3000 in a row):", "",
                               "| operation | wall µs | client CPU µs | dc_server CPU µs |",
                               "| --- | ---: | ---: | ---: |"] +
                              [f"| {k} | {v[0]:.0f} | {v[1]:.0f} | {v[2]:.0f} |" for k, v in costs.items()]) + "\n"
            for key_type in a.keys.split(","):
                cert, key = make_cert(tmp, key_type)
                setups = {}
                for setup in ("shared", "unshared"):
                    servers = [start_server(n, cert, key, cache if setup == "shared" else None) for n in "AB"]
                    procs.extend(p for p, _ in servers)
                    # Server CPU: the two servers, plus the dc_server when it serves them.
                    pids = [p.pid for p, _ in servers] + ([dc.pid] if setup == "shared" else [])
                    setups[setup] = ([(addr, "localhost") for _, addr in servers], pids)
                # Rounds interleave the scenarios, so that load from elsewhere on the machine
                # hits them alike; each row is the round with the median rate.
                results: dict[tuple, list[dict]] = {}
                for _ in range(a.rounds):
                    for setup, (targets, pids) in setups.items():
                        for version in a.versions.split(","):
                            modes = ("full", "alternate") if setup == "shared" else ("full", "alternate", "same")
                            for mode in modes:
                                r = run(targets, cert, version, mode, a.seconds, a.clients, pids)
                                results.setdefault((setup, key_type, version, mode), []).append(r)
                                print(setup, key_type, version, mode, f"{r['rate']:.0f}/s", flush=True,
                                      file=sys.stderr)
                for k, rs in results.items():
                    rows.extend(median_rows([(*k, r) for r in rs]))
                for version in a.versions.split(","):
                    for name, cost in handshake_costs(cert, key, version, cache, dc.pid).items():
                        bio_rows.append((key_type, version, name, cost))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(a, rows, extra, bio_rows)
    return 0


NOTES = """## Reading these numbers

- The machine is 2 CPUs shared with other work (see the load average above): the end-to-end
  rates move by ±20 % between runs; the CPU-time columns are steadier.
- Cache operations per handshake (tests/tls/test_share_sessions.py counts them on the wire): full
  handshake one ADD; TLS 1.2 resumption one GET; TLS 1.3 resumption one GET and one ADD (the one
  new ticket, num_tickets = 1); no REMOVE (OpenSSL removes a used TLS 1.3 ticket only when early
  data is on). The GET is waited for (it is in the handshake); ADDs are posted, not waited for.
- A waited-for operation is a round trip on the handshake's path (the server does nothing else
  meanwhile) and wakes both processes; how much CPU the wake-ups cost depends on the machine's load
  (2026-11-30: GET 21/20 µs client/dc_server with the other CPU idle, 69/63 µs with both busy). A
  posted ADD costs 10-20 µs each side either way (answers read in batches) and no wait.
  `wall µs` of a posted ADD is the throughput of 3000 in a row, not a latency.
- TLS 1.2: a resumption skips the key exchange and the certificate signature; through the shared
  cache the server spends 2-5x less CPU than on a full handshake (more with RSA keys).
- TLS 1.3: the resumption mode clients offer (psk_dhe_ke, all that browsers and, by default,
  Python's and OpenSSL's clients offer) still does an ECDHE key exchange and a new ticket is issued:
  it saves only the certificate and its signature: about 2x with RSA-2048, little or nothing with
  P-256, whose signature costs less than the GET's round trip.
- "unshared, alternating A/B" is what a non-sticky balancer gets without a shared cache: every
  offered session is unknown to the other server, so every handshake is full (2 resumed = each
  client's very first offer, made to the server that issued it).
"""


MODE_TEXT = {"full": "full (no session offered)", "alternate": "resumed, alternating A/B",
             "same": "resumed, same server"}


def write_results(a, rows, extra: str, bio_rows: list) -> None:
    out = ["# TLS handshake rates: full vs resumed, shared session cache vs none", "",
           f"`python bench/tls/run.py --seconds {a.seconds} --clients {a.clients} --rounds {a.rounds}` on "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
           f"{os.cpu_count()} CPUs (shared with other work; load average {os.getloadavg()[0]:.1f} at the end), "
           f"Python {platform.python_version()}, "
           f"{ssl.OPENSSL_VERSION}.", "",
           "Servers: `tcpha.tls.resume_server` processes (threaded, one CPython process each); clients: "
           f"{a.clients} processes, each one connection at a time (connect, handshake, read a line, close). "
           "Loopback. Each row: the median of the rounds (by rate).", ""]
    if extra:
        out += [extra]
    out += ["`rate` is end to end, clients and servers sharing the same 2 CPUs; `server CPU` is the "
            "servers' own CPU time per connection (both servers, plus dc_server in the shared setup) and "
            "`capacity` its inverse: the handshakes per second one CPU of server can do.", "",
            "| setup | key | TLS | connections | rate /s | server CPU µs/conn | capacity /s/CPU | reused | errors | p50 ms | p99 ms |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for setup, key, version, mode, r in rows:
        cpu, cap = (f"{r['cpu_us']:.0f}", f"{1e6 / r['cpu_us']:.0f}") if r["cpu_us"] else ("-", "-")
        out.append(f"| {setup} | {key} | {version.replace('_', '.')} | {MODE_TEXT.get(mode, mode)} | "
                   f"{r['rate']:.0f} | {cpu} | {cap} | {r['reused']}/{r['n']} | {r['errors']} | "
                   f"{r['p50']:.2f} | {r['p99']:.2f} |")
    out += ["", "## Resumed / full (target ≥ 1.5×)", "",
            "| setup | key | TLS | connections | rate ratio | server capacity ratio | resumed |",
            "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    full = {(s, k, v): r for s, k, v, m, r in rows if m == "full"}
    for s, k, v, m, r in rows:
        if m != "full" and (s, k, v) in full:
            f = full[(s, k, v)]
            ratio = r["rate"] / f["rate"]
            cap = f"{f['cpu_us'] / r['cpu_us']:.2f}×" if r["cpu_us"] and f["cpu_us"] else "-"
            out.append(f"| {s} | {k} | {v.replace('_', '.')} | {MODE_TEXT.get(m, m)} | {ratio:.2f}× | "
                       f"{cap} | {r['reused']}/{r['n']} |")
    if bio_rows:
        out += ["", "## The handshake alone (in process, memory BIOs: no sockets, no threads)", "",
                "Server CPU per handshake, 400 handshakes: CPU time of the server's `do_handshake` calls "
                "(OpenSSL and the session callbacks, client side of the cache round trips included) plus "
                "dc_server's CPU time; speed-up = full / this.", "",
                "| key | TLS | handshake | server CPU µs | speed-up vs full | resumed |",
                "| --- | --- | --- | ---: | ---: | ---: |"]
        fulls = {(k, v): c[0] for k, v, n, c in bio_rows if n == "full"}
        for k, v, n, (us, reused, count) in bio_rows:
            out.append(f"| {k} | {v.replace('_', '.')} | {n} | {us:.0f} | {fulls[(k, v)] / us:.2f}× | {reused}/{count} |")
    out += ["", NOTES]
    out += ["", "Through the front end (tcpha-fe handing off to two tcpha-be that terminate TLS, in the "
            "namespace lab): `bench/tls/through_fe.py`, results in `bench/results/tls-fe.md`. This script's "
            "`--target VIP:443 --no-start --cafile CERT --sni A,B --request /` runs the same clients against "
            "any running servers.", ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(out))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
