"""A short soak: mixed traffic through the front end while everything around it is disturbed.

For one to two minutes, client threads run sessions through the VIP: downloads and uploads of 1 KiB to
20 MB (nginx serves the files; uploads are answered by the lab's python server behind it with the body's
sha256), each session one connection carrying one request, or several when it is keep-alive. Meanwhile:
tcpha-be on be1 is killed (SIGKILL) and restarted, the front end is reloaded (SIGHUP, with new weights),
upgraded (a second tcpha-fe takes over the listening sockets), killed (SIGKILL) and restarted, and
tcpha-be on be2 is killed and restarted; two rounds at least, three or four when the machine is quick.

Every completed response must be byte-exact. Every failed session must fall in one allowed class:

* `back end killed`: its connection was handed off to the back end that was killed, it had started
  before that back end was dead and it failed after the kill was sent. The connection lived in the
  killed process (it relays with splice), so it cannot survive it.
* `back end killed while taking it over`: the front end was handing the connection to the back end that
  was killed (its log: that back end "did not take the connection"), and took it back and handed it to
  the other one; but the dying back end had already restored it as a live socket, and its kernel reset
  the client when it closed that socket.
* `front end killed before handoff`: it failed after the front end was killed, it had started before the
  restarted front end answered, no response byte had come and no back end had taken it over (the back
  ends' logs: restored, and not dropped for want of a Steered). Connections handed off before the kill
  are steered by the kernel and must go on; those accepted but not handed off died with the process;
  those that came while no front end listened were refused.

Nothing may fail across the reload or the upgrade. Each session binds its own client port, unique in the
run, so the back ends' per-handoff log lines name the session they are about. After the run the front end
is stopped with SIGTERM and must leave no process, and the lab's teardown must leave no namespace, process
or nft table of its prefix.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tcpha.lab.http import file_content, start_http
from tcpha.lab.netns import lab_namespaces, pids_in_netns
from tests.deployment import Prod, fe_workers
from tests.support import running, wait_until

pytestmark = pytest.mark.netns

MB = 1 << 20
DOWNLOADS = {"1k.bin": 1024, "100k.bin": 100 * 1024, "1m.bin": MB, "5m.bin": 5 * MB, "20m.bin": 20_000_000}
DOWNLOAD_WEIGHTS = [40, 25, 18, 10, 7]
UPLOADS = [1024, 64 * 1024, MB, 5 * MB, 20_000_000]
UPLOAD_WEIGHTS = [40, 25, 18, 10, 7]
CLIENT_THREADS = 4             # plus one running paced 20 MB transfers, so that one is mid-flight at each fault
PACE = (64 * 1024, 0.002)      # the paced client moves 64 KiB, then pauses 2 ms (~25 MB/s at most)
IO_TIMEOUT = 30.0              # one recv/send; a hang shows as a failure of its own class
FIRST_PORT = 10000             # client ports: one per session, never reused in a run, below the
LAST_PORT = 32767              # ephemeral range (32768-60999) so that no other connection takes one
REFUSED_BACKOFF = 0.1          # a client whose connection was refused tries again after this
UPLOADS_PORT = 8081
SOAK_SECONDS = 60              # no new round of faults after this (a round takes 20-45 s)
MAX_ROUNDS = 4

TAKEN_BACK_RE = re.compile(r"[\d.]+:(\d+): back end ([\d.]+):\d+ did not take the connection")
RESTORED_RE = re.compile(r"handoff (\d+): [\d.]+:(\d+) restored from (\S+) in")
DROPPED_RE = re.compile(r"handoff (\d+) from (\S+): .*dropped silently")


@dataclass
class Session:
    """One client connection: its requests, when it ran, where it went and how it ended."""
    sid: int
    port: int
    keepalive: bool
    plan: list                   # [("GET", name) | ("POST", size)]
    t_start: float = 0.0
    t_end: float = 0.0
    backend: str | None = None   # from the responses' X-Tcpha-Backend
    responses: int = 0           # responses whose status line arrived
    done: int = 0                # requests completed and checked
    bytes_down: int = 0
    bytes_up: int = 0
    error: str | None = None     # None: every request completed and was byte-exact
    error_kind: str | None = None   # refused, reset, eof, timeout, status, mismatch, other
    slow: bool = False           # a paced 20 MB transfer (the witness that is mid-flight at a fault)
    stage: str = ""              # what the client was doing when it ended (for a failure's report)
    sockets: str = ""            # at a timeout: the connection's sockets as each namespace saw them then


class NoReconnect(http.client.HTTPConnection):
    """An HTTP/1.1 connection on a socket made in the client namespace; never reconnects on its own."""

    def connect(self):
        raise ConnectionError("connection lost (no reconnect: one session, one connection)")


@dataclass
class SoakLoad:
    prod: Prod
    threads: int = CLIENT_THREADS
    sessions: list = field(default_factory=list)
    expected_get: dict = field(default_factory=dict)        # name -> content
    upload_bodies: dict = field(default_factory=dict)       # size -> (bytes, sha256)
    _ports: itertools.count = field(default_factory=lambda: itertools.count(FIRST_PORT))
    _ids: itertools.count = field(default_factory=itertools.count)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.expected_get = {name: file_content(name, size) for name, size in DOWNLOADS.items()}
        for size in UPLOADS:
            body = file_content(f"upload-{size}", size)
            self.upload_bodies[size] = (body, hashlib.sha256(body).hexdigest())

    # -- counts ------------------------------------------------------------------------------------
    def ok(self, backend: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.sessions if s.t_end and s.error is None
                       and (backend is None or s.backend == backend))

    def finished(self) -> list[Session]:
        with self._lock:
            return [s for s in self.sessions if s.t_end]

    # -- running -----------------------------------------------------------------------------------
    def start(self) -> "SoakLoad":
        for i in range(self.threads + 1):
            t = threading.Thread(target=self._run, args=(random.Random(1000 + i), i == self.threads), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(4 * IO_TIMEOUT)
        assert not any(t.is_alive() for t in self._workers), "a client thread is stuck"

    def _plan(self, rng: random.Random) -> tuple[bool, list]:
        keepalive = rng.random() < 0.4
        plan = []
        for _ in range(rng.randint(2, 4) if keepalive else 1):
            if rng.random() < 0.3:
                plan.append(("POST", rng.choices(UPLOADS, UPLOAD_WEIGHTS)[0]))
            else:
                plan.append(("GET", rng.choices(list(DOWNLOADS), DOWNLOAD_WEIGHTS)[0]))
        return keepalive, plan

    def _run(self, rng: random.Random, slow: bool) -> None:
        while not self._stop.is_set():
            if slow:
                keepalive, plan = False, [rng.choice([("GET", "20m.bin"), ("POST", 20_000_000)])]
            else:
                keepalive, plan = self._plan(rng)
            with self._lock:
                s = Session(next(self._ids), next(self._ports), keepalive, plan, slow=slow)
                if s.port > LAST_PORT:
                    return                          # the run is over its port budget: the test says so
                self.sessions.append(s)
            s.t_start = time.monotonic()
            try:
                self._session(s)
            except Exception as e:  # noqa: BLE001 - every way a session can end is recorded and classified
                s.error = f"{type(e).__name__}: {e}"
                s.error_kind = _kind_of(e)
            s.t_end = time.monotonic()
            if s.error_kind == "refused":
                self._stop.wait(REFUSED_BACKOFF)    # as a real client does: no busy loop while nothing listens

    def _session(self, s: Session) -> None:
        lab, dep = self.prod.lab, self.prod.dep
        sock = lab.socket("client")
        try:
            sock.settimeout(IO_TIMEOUT)
            sock.bind((lab.ip("client"), s.port))
            sock.connect((dep.vip, 80))
        except BaseException:
            sock.close()
            raise
        conn = NoReconnect(dep.vip, 80, timeout=IO_TIMEOUT)
        conn.sock = sock
        try:
            for i, (method, what) in enumerate(s.plan):
                last = i == len(s.plan) - 1
                headers = {"Connection": "close" if last or not s.keepalive else "keep-alive"}
                s.stage = f"request {i + 1}: sending"
                if method == "GET":
                    conn.request("GET", "/" + what, headers=headers)
                    want = self.expected_get[what]
                else:
                    body, want = self.upload_bodies[what]
                    if s.slow:
                        headers["Content-Length"] = str(len(body))
                    conn.request("POST", f"/upload/{s.sid}-{i}", headers=headers,
                                 body=self._paced(s, body) if s.slow else body)
                    s.bytes_up += 0 if s.slow else len(body)
                s.stage = f"request {i + 1}: sent, waiting for the response"
                resp = conn.getresponse()
                s.stage = f"request {i + 1}: reading the response"
                s.responses += 1
                # nginx adds its header to the uploads server's own: "be1, be1"
                s.backend = s.backend or (resp.getheader("X-Tcpha-Backend") or "").split(",")[0].strip() or None
                data = b""
                at, differs = 0, None
                while chunk := resp.read(PACE[0] if s.slow else 1 << 18):
                    s.bytes_down += len(chunk)
                    if s.slow:
                        time.sleep(PACE[1])
                    if method == "GET":
                        if differs is None and chunk != want[at:at + len(chunk)]:
                            differs = at + next(i for i, (a, b) in enumerate(zip(chunk, want[at:])) if a != b) \
                                if chunk[:len(want) - at] != want[at:at + len(chunk)] else len(want)
                        at += len(chunk)
                    else:
                        data += chunk
                if resp.status != 200:
                    raise StatusError(f"{method} {what}: status {resp.status}")
                if resp.length:
                    # http.client's read(amt) returns b"" at an early end instead of raising IncompleteRead
                    raise http.client.IncompleteRead(b"", resp.length)
                if method == "GET":
                    if differs is not None or at != len(want):
                        raise Mismatch(f"GET {what}: {at} bytes received of {len(want)}, first difference at "
                                       f"{differs} (response {i + 1} of the connection)")
                else:
                    reply = json.loads(data)
                    if reply.get("sha256") != want or reply.get("bytes") != what:
                        raise Mismatch(f"POST {what} bytes: the origin got {reply}")
                s.done += 1
        except TimeoutError:
            s.sockets = self.sockets_of(s.port)
            raise
        finally:
            conn.close()

    def sockets_of(self, port: int) -> str:
        """The stalled connection's TCP sockets as the client, the front end and each back end see them, taken before
        the client closes its own: queues, windows, retransmissions and timers show which side holds the
        bytes (a back end's relay, or a client backed off after a freeze)."""
        lab = self.prod.lab
        out = []
        for host, side in [("client", "sport"), ("fe", "dport"), *((h, "dport") for h in self.prod.dep.backends)]:
            try:
                r = lab.run(host, ["ss", "-tniemo", "state", "all", f"( {side} = :{port} )"],
                            capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.SubprocessError) as e:    # the report must not hide the timeout
                out.append(f"{host}: ss failed: {e}")
                continue
            lines = [x.strip() for x in r.stdout.splitlines()[1:] if x.strip()]
            out.append(f"{host}: " + (" | ".join(lines) if lines else "no socket"))
        return "\n".join(out)


    @staticmethod
    def _paced(s: Session, body: bytes):
        for at in range(0, len(body), PACE[0]):
            piece = body[at:at + PACE[0]]
            yield piece
            s.bytes_up += len(piece)
            time.sleep(PACE[1])

    def slow_sessions(self, seconds: float) -> list[str]:
        """The paced client's sessions of the last `seconds`: what each did and how it ended (for a
        failure's report: a witness that never came may be one that stalled)."""
        now = time.monotonic()
        with self._lock:
            recent = [s for s in self.sessions if s.slow and (not s.t_end or s.t_end > now - seconds)]
        return [f"port {s.port} {s.plan[0][0]} to {s.backend}: {s.stage}, {s.bytes_up} B up, {s.bytes_down} B down, "
                f"{'running' if not s.t_end else s.error or 'ok'} after {(s.t_end or now) - s.t_start:.1f} s"
                for s in recent]

    def stuck(self, seconds: float) -> list[Session]:
        """The paced sessions running for more than `seconds`."""
        now = time.monotonic()
        with self._lock:
            return [s for s in self.sessions if s.slow and not s.t_end and now - s.t_start > seconds]

    def midflight(self) -> Session | None:
        """A paced session handed off (its response has begun) with much of its body still to come."""
        with self._lock:
            return next((s for s in self.sessions if s.slow and not s.t_end and s.responses
                         and s.bytes_down < 8 * MB), None)


class StatusError(Exception):
    pass


class Mismatch(Exception):
    pass


def _kind_of(e: Exception) -> str:
    if isinstance(e, Mismatch):
        return "mismatch"
    if isinstance(e, StatusError):
        return "status"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError)):
        return "eof"
    return "other"


@dataclass
class Fault:
    what: str                    # "kill be1", "reload fe", ...
    sent: float                  # the signal was sent (monotonic)
    over: float                  # the victim was dead, or the fault had taken effect
    back: float = 0.0            # the service was back (restarted process answering)
    host: str | None = None      # the back end killed
    witness: Session | None = None  # a paced download handed off before the fault: it must complete


def _handoffs_seen_by_backends(prod: Prod) -> tuple[dict[int, str], set[int]]:
    """client port -> back end that restored it; and the ports whose restored copy was then dropped
    (no Steered came: the front end did not hand it off)."""
    restored: dict[int, str] = {}
    dropped: set[int] = set()
    for host in prod.dep.backends:
        pending: dict[tuple[str, str], int] = {}
        for line in prod.lab.log_path(host, "tcpha-be").read_text(errors="replace").splitlines():
            if m := RESTORED_RE.search(line):
                pending[(m.group(3), m.group(1))] = int(m.group(2))
                restored[int(m.group(2))] = host
            elif m := DROPPED_RE.search(line):
                port = pending.get((m.group(2), m.group(1)))
                if port is not None:
                    dropped.add(port)
    return restored, dropped


def _handoffs_taken_back(prod: Prod) -> dict[int, set[str]]:
    """client port -> the back ends a front end tried first and took the connection back from (refused,
    timed out, control link lost), from every front end's log."""
    hosts = {prod.lab.ip(h): h for h in prod.dep.backends}
    tried: dict[int, set[str]] = {}
    for log_file in sorted((prod.lab.workdir / "logs").glob("fe-tcpha-fe*.log")):
        for m in TAKEN_BACK_RE.finditer(log_file.read_text(errors="replace")):
            tried.setdefault(int(m.group(1)), set()).add(hosts.get(m.group(2), m.group(2)))
    return tried


def classify(s: Session, faults: list[Fault], restored: dict[int, str], dropped: set[int],
             tried: dict[int, set[str]], t0: float) -> str:
    """The allowed class of a failed session, or 'NOT ALLOWED: why'."""
    target = s.backend or restored.get(s.port)
    handed_off = s.responses > 0 or (s.port in restored and s.port not in dropped)
    for f in faults:
        if f.host is not None and s.t_start < f.over and s.t_end >= f.sent \
                and s.error_kind in ("reset", "eof", "refused"):
            if f.host == target:
                return f"back end killed ({f.host})"
            if f.host in tried.get(s.port, ()) and s.responses == 0:
                # the dying back end had restored it (a live socket) when the kill came: its kernel reset
                # the client, though the front end took it back and handed it to the other one
                return f"back end killed while taking it over ({f.host})"
    for f in faults:
        if f.what == "kill fe" and not handed_off and s.t_start < f.back and s.t_end >= f.sent \
                and s.error_kind in ("reset", "eof", "refused"):
            return ("front end killed before handoff: " + ("refused while none listened" if s.error_kind == "refused"
                    else "started before the kill" if s.t_start < f.sent else "accepted by the dying one"))
    return (f"NOT ALLOWED: {s.error} (port {s.port}, back end {target}, handed off {handed_off}, "
            f"{s.responses} responses, plan {s.plan}, {s.stage}, ran {s.t_start - t0:.2f}-{s.t_end - t0:.2f} s)")


def _log_lines_of(logs: Path, ports: list[int], limit: int = 40) -> list[str]:
    """Every daemon's log lines naming one of these client ports (the back ends log at debug here: each
    relay's end with its byte counts), at most `limit` of them."""
    marks = tuple(f":{port} " for port in ports) + tuple(f":{port}:" for port in ports)
    out = []
    for log in sorted(logs.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(m in line for m in marks):
                out.append(f"{log.name}: {line[:300]}")
    return out[:limit]


def _start_origins(prod: Prod) -> None:
    prod.dep.files = dict(DOWNLOADS)
    for host in prod.dep.backends:
        prod.dep.origins[host] = start_http(prod.lab, host, port=8080, files=DOWNLOADS, kind="nginx",
                                            uploads_port=UPLOADS_PORT)


def _fe_options(prod: Prod, weights: tuple[int, int] = (1, 1)) -> dict:
    be1, be2 = prod.lab.ip("be1"), prod.lab.ip("be2")
    return {"rundir": prod.fe_rundir, "dbglevel": 4, "startservers": 2, "grace": 5, "dtcinterval": 1,
            "servers": [f"{be1} 666 weight={weights[0]}", f"{be2} 666 weight={weights[1]}"],
            "rules": [f"{be1},{be2} .*"]}


def _backend_up(prod: Prod, host: str) -> bool:
    ip = prod.lab.ip(host)
    return any(b["name"].startswith(ip) and str(b.get("status", "")).startswith("up")
               for b in prod.ctl_json("status")["backends"])


def test_soak_mixed_traffic_through_kills_reload_and_upgrade(lab, tmp_path):
    prod = Prod(lab)
    _start_origins(prod)
    for host in prod.dep.backends:
        prod.start_backend(host, dbglevel=5)
    prod.start_fe(**_fe_options(prod))
    fe_log = lambda: prod.fe_log()  # noqa: E731
    faults: list[Fault] = []
    load = SoakLoad(prod).start()
    t0 = time.monotonic()

    def progress(n: int = 25, backend: str | None = None, timeout: float = 60) -> None:
        """Wait until n more sessions (to `backend`, if given) have completed: traffic flows."""
        start = load.ok(backend)
        wait_until(lambda: load.ok(backend) >= start + n, timeout,
                   f"{n} more completed sessions{' on ' + backend if backend else ''} "
                   f"(finished {len(load.finished())})")

    def paced_witness() -> Session:
        try:
            return wait_until(load.midflight, 30, "a paced download in flight")
        except AssertionError as e:
            report = f"{e}; the paced client meanwhile: {load.slow_sessions(35)}"
            stuck = load.stuck(10)
            if stuck:                       # a stalled session: where its bytes are, and what the daemons said
                shutil.copytree(lab.workdir / "logs", tmp_path / "logs", dirs_exist_ok=True)
                for s in stuck:
                    report += f"\nsockets of port {s.port} now:\n{load.sockets_of(s.port)}"
                report += f"\nthe lab's logs: {tmp_path / 'logs'}; what they say of those clients:\n"
                report += "\n".join(_log_lines_of(tmp_path / "logs", [s.port for s in stuck]))
            raise AssertionError(report) from None

    def kill_backend(host: str) -> None:
        proc = prod.dep.be_procs[host]
        paced_witness()
        f = Fault(f"kill {host}", time.monotonic(), 0.0, host=host)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        f.over = time.monotonic()
        faults.append(f)
        lab.stop(proc)
        wait_until(lambda: not _backend_up(prod, host), 15, f"the front end to take {host} out")
        progress(40)                                     # served by the other one meanwhile
        prod.start_backend(host, dbglevel=5)
        f.back = time.monotonic()
        wait_until(lambda: _backend_up(prod, host), 30, f"{host} back in service")
        progress(20, backend=host)

    def reload(weights: tuple[int, int]) -> None:
        """SIGHUP with new weights: applied in place, nothing dropped."""
        n_reloads = fe_log().count("reloaded ")
        prod.dep.write_fe_config(**_fe_options(prod, weights))
        witness = paced_witness()
        faults.append(Fault("reload fe", time.monotonic(), time.monotonic(), witness=witness))
        os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
        wait_until(lambda: fe_log().count("reloaded ") > n_reloads, 15, "the reload")

    def upgrade(n: int) -> None:
        """A second tcpha-fe takes the listening sockets; the first finishes and leaves (status 0)."""
        old = prod.dep.fe_proc
        conf = prod.dep.dir / "tcphafe.conf"
        witness = paced_witness()
        f = Fault("upgrade fe", time.monotonic(), 0.0, witness=witness)
        new = lab.spawn("fe", prod.dep.python("tcpha.fe", "-c", str(conf)), name=f"tcpha-fe-up{n}", timeout=15)
        assert old.wait(30) == 0, "the predecessor did not stop cleanly after the upgrade"
        f.over = time.monotonic()
        faults.append(f)
        lab.stop(old)
        prod.dep.fe_proc = new
        wait_until(lambda: prod.ctl_json("status")["pid"] == new.pid, 30, "the successor's control socket")

    def kill_fe(weights: tuple[int, int]) -> None:
        """kill -9 the front end (its workers die with it), then start a new one: it adopts the kernel state."""
        victim = prod.dep.fe_proc
        workers = fe_workers(prod)
        assert workers, "the front end has no workers"
        witness = paced_witness()
        f = Fault("kill fe", time.monotonic(), 0.0, witness=witness)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        wait_until(lambda: not running(workers), 10, "the killed front end's workers to die with it")
        f.over = time.monotonic()
        faults.append(f)
        lab.stop(victim)
        log_before = len(fe_log())
        prod.start_fe(**_fe_options(prod, weights))
        f.back = time.monotonic()
        assert "kernel state adopted from a predecessor" in fe_log()[log_before:]

    try:
        progress(40)
        assert load.ok("be1") and load.ok("be2"), "the pool does not use both back ends"
        # rounds of every fault, at least two (each back end killed first once), more while the soak is
        # under SOAK_SECONDS: about two minutes in all on an idle machine as on a busy one
        for n in range(1, MAX_ROUNDS + 1):
            if n > 2 and time.monotonic() - t0 > SOAK_SECONDS:
                break
            first, second = ("be1", "be2") if n % 2 else ("be2", "be1")
            kill_backend(first)
            reload((3, 1) if n % 2 else (1, 1))
            progress(50)
            upgrade(n)
            progress(50)
            kill_fe((3, 1) if n % 2 else (1, 1))
            progress(50)
            kill_backend(second)
            progress(40)
    finally:
        load.stop()
    elapsed = time.monotonic() - t0

    # -- accounting ------------------------------------------------------------------------------------
    finished = load.finished()
    restored, dropped = _handoffs_seen_by_backends(prod)
    tried = _handoffs_taken_back(prod)
    failed = [s for s in finished if s.error is not None]
    classes: Counter = Counter()
    longest: dict[str, float] = {}
    bad_ports: list[int] = []
    for s in failed:
        c = classify(s, faults, restored, dropped, tried, t0)
        if c.startswith("NOT ALLOWED"):
            bad_ports.append(s.port)
        classes[c] += 1
        longest[c] = max(longest.get(c, 0.0), s.t_end - s.t_start)
    bad = sorted(c for c in classes if c.startswith("NOT ALLOWED"))
    # sessions that were running when a fault came and completed byte-exact anyway (handed off before a
    # front-end kill: steered by the kernel; across a reload or an upgrade; to the other back end)
    crossed = Counter(f.what.split()[0] + " " + ("be" if f.host else f.what.split()[1]) for f in faults
                      for s in finished if s.error is None and s.t_start < f.sent < s.t_end)
    n_requests = sum(s.done for s in finished)
    late = sum(f.read_text(errors="replace").count("reached this socket after its dump")
               for f in (lab.workdir / "logs").glob("fe-tcpha-fe*.log"))
    summary = (f"soak: {elapsed:.0f} s, {len(finished)} sessions ({sum(s.keepalive for s in finished)} "
               f"keep-alive), {n_requests} requests completed byte-exact, "
               f"{sum(s.bytes_down for s in finished) / MB:.0f} MiB down, "
               f"{sum(s.bytes_up for s in finished) / MB:.0f} MiB up; by back end "
               f"{dict(Counter(s.backend for s in finished if s.error is None))}; "
               f"faults injected {len(faults)} ({', '.join(f'{f.what} at {f.sent - t0:.1f} s' for f in faults)}); "
               f"completed across a fault: {dict(crossed)}; handoffs taken back for bytes after the dump: {late}; "
               f"failed sessions {len(failed)}: "
               f"{ {c: f'{n} (longest {longest[c]:.1f} s)' for c, n in classes.items()} }")
    print("\n" + summary)
    if bad:
        shutil.copytree(lab.workdir / "logs", tmp_path / "logs")
        summary += f"; the lab's logs: {tmp_path / 'logs'}; what they say of those clients:\n"
        summary += "\n".join(_log_lines_of(tmp_path / "logs", bad_ports))
        stalled = [f"sockets of port {s.port} at its timeout:\n{s.sockets}" for s in failed
                   if s.port in bad_ports and s.sockets]
        summary += "".join("\n" + x for x in stalled[:5])
    assert not bad, summary
    lost = [f"{f.what} at {f.sent - t0:.1f} s: {f.witness.error}" for f in faults
            if f.witness is not None and f.witness.error is not None]
    assert not lost, f"a download handed off before the fault did not complete: {lost}; {summary}"
    assert all(s.done == len(s.plan) for s in finished if s.error is None), summary
    assert load.ok() > 150, summary

    # -- clean stop, then nothing of the lab's prefix is left --------------------------------------
    fe_ns = lab.netns("fe")

    def cmdline(pid: int) -> str:
        try:
            return " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:  # exited since it was listed
            return ""
    fe_pids = [p for p in pids_in_netns([fe_ns]) if "tcpha.fe" in cmdline(p)]
    os.kill(prod.dep.fe_proc.pid, signal.SIGTERM)
    assert prod.dep.fe_proc.wait(30) == 0, summary
    wait_until(lambda: not running(fe_pids), 10, f"the front end's processes {fe_pids} to exit")
    lab_pids = list(pids_in_netns(lab.namespaces()))
    prefix = lab.prefix
    lab.down()
    assert lab_namespaces(prefix) == []
    left = running(lab_pids)
    assert left == [], f"processes left after teardown: {left}"
    mentions = [p.pid for p in psutil.process_iter(["cmdline"])
                if any(prefix + "-" in a for a in (p.info["cmdline"] or []))]
    assert mentions == [], f"processes naming the lab's namespaces left: {mentions}"
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert prefix not in tables
