"""dc_server as a real process: the wire bytes, bad input, limits, options, persistence."""

from __future__ import annotations

import os
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tcpha.distcache.codec import (FRAME_HEADER, PROTO_LEVEL, Message, MessageReader, Op,
                                   encode_add_payload, encode_message, encode_response)
from tcpha.distcache.server import progress_line
from tests.support import wait_until as wait_for

ADD_ABC = bytes.fromhex("00110000 00 00000007 00 00 01 000f 000493e0 00000003 616263 44415441".replace(" ", ""))
ADD_OK = bytes.fromhex("00110000 01 00000007 00 00 01 0001 00".replace(" ", ""))
HAVE_ABC = bytes.fromhex("00110000 00 00000001 00 03 01 0003 616263".replace(" ", ""))


class Server:
    def __init__(self, proc: subprocess.Popen, path: str, errfile: Path) -> None:
        self.proc = proc
        self.path = path
        self.errfile = errfile

    @property
    def stderr(self) -> str:
        return self.errfile.read_text()

    def connect(self, timeout: float = 5.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking connect waits for room in the listen backlog; with a timeout set, Python connects
        # non-blocking and an AF_UNIX connect to a full backlog fails at once with EAGAIN.
        s.connect(self.path)
        s.settimeout(timeout)
        return s


@pytest.fixture
def dc_server(tmp_path):
    """start(*args) -> Server listening on a UNIX socket in tmp_path; every process killed after the test."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, path: str | None = None, wait: bool = True) -> Server:
        path = path or str(tmp_path / f"dc{len(procs)}.sock")
        errfile = tmp_path / f"dc{len(procs)}.err"
        with open(errfile, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "tcpha.cli.dc_server", "-listen", f"UNIX:{path}", *args],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        procs.append(proc)
        srv = Server(proc, path, errfile)
        if wait:
            def ready():
                if proc.poll() is not None:
                    raise AssertionError(f"dc_server exited {proc.returncode}: {errfile.read_text()}")
                try:
                    with srv.connect(1) as c:     # answered: the event loop is running
                        return rpc(c, Message(False, 0, Op.HAVE, b"ready?"))[0].payload == b"\x01"
                except OSError:
                    return False
            wait_for(ready, what="dc_server to listen")
        return srv

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def rpc(sock: socket.socket, *msgs: Message) -> list[Message]:
    sock.sendall(b"".join(encode_message(m) for m in msgs))
    reader = MessageReader(expect_response=True)
    out: list[Message] = []
    while len(out) < len(msgs):
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed by server")
        out += reader.feed(data)
    return out


def add_msg(uid, sid, data, timeout=300000):
    return Message(False, uid, Op.ADD, encode_add_payload(sid, data, timeout))


def recv_all_until_close(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return got
        got += data


# --- the wire --------------------------------------------------------------------------------------

def test_round_trip_examples_exact_bytes(dc_server):
    srv = dc_server()
    with srv.connect() as s:
        s.sendall(ADD_ABC)
        assert s.recv(100) == ADD_OK
        s.sendall(HAVE_ABC)
        assert s.recv(100) == bytes.fromhex("0011000001000000010003010001" "00")
        s.sendall(encode_message(Message(False, 2, Op.GET, b"abc")))
        assert s.recv(100) == bytes.fromhex("0011000001000000020001010004") + b"DATA"
        s.sendall(encode_message(Message(False, 3, Op.REMOVE, b"abc")))
        assert s.recv(100) == bytes.fromhex("0011000001000000030002010001" "00")
        s.sendall(encode_message(Message(False, 4, Op.REMOVE, b"abc")))
        assert s.recv(100) == bytes.fromhex("0011000001000000040002010001" "01")
        s.sendall(encode_message(Message(False, 5, Op.GET, b"abc")))
        assert s.recv(100) == bytes.fromhex("0011000001000000050001010001" "01")
        s.sendall(HAVE_ABC)
        assert s.recv(100) == bytes.fromhex("0011000001000000010003010001" "01")


def raw_add(timeout, id_len, rest):
    return struct.pack(">II", timeout, id_len) + rest


@pytest.mark.parametrize("payload,status", [
    (raw_add(1000, 3, b"abcD"), 0),
    (raw_add(604800001, 3, b"abcD"), 102),
    (raw_add(1000, 3, b"abc"), 100),
    (raw_add(1000, 0, b"abc"), 103),
    (raw_add(1000, 65, b"i" * 65 + b"d"), 103),
    # 104 (data > 32768) cannot be reached inside a 32768-byte message: see test_codec.
])
def test_add_statuses_on_the_wire(dc_server, payload, status):
    srv = dc_server()
    with srv.connect() as s:
        (reply,) = rpc(s, Message(False, 11, Op.ADD, payload))
        assert reply == Message(True, 11, Op.ADD, bytes([status]))


def test_duplicate_add_101_on_the_wire(dc_server):
    srv = dc_server()
    with srv.connect() as s:
        r = rpc(s, add_msg(1, b"sid", b"first"), add_msg(2, b"sid", b"second"),
                Message(False, 3, Op.GET, b"sid"))
        assert [m.payload for m in r] == [b"\x00", b"\x65", b"first"]


def test_short_add_payload_closes_without_reply(dc_server):
    srv = dc_server()
    with srv.connect() as s:
        s.sendall(encode_message(Message(False, 1, Op.HAVE, b"x")) +
                  encode_message(Message(False, 2, Op.ADD, b"\x00" * 7)))
        got = recv_all_until_close(s)
        # The HAVE before it is answered, then the connection closes; nothing for the ADD.
        assert got == encode_response(1, Op.HAVE, b"\x01")


def test_multi_frame_request_and_reply(dc_server):
    srv = dc_server()
    data = bytes(i % 256 for i in range(32768 - 8 - 10))      # the largest ADD that fits
    with srv.connect() as s:
        (r,) = rpc(s, add_msg(1, b"0123456789", data))
        assert r.payload == b"\x00"
        s.sendall(encode_message(Message(False, 2, Op.GET, b"0123456789")))
        expected = encode_response(2, Op.GET, data)
        got = b""
        while len(got) < len(expected):
            got += s.recv(65536)
        assert got == expected and len(expected) == 32750 + 16 * 14


def test_pipelined_requests_answered_in_order(dc_server):
    srv = dc_server("-sessions", "1000")
    msgs = []
    for i in range(300):
        msgs.append(add_msg(3 * i, b"id%d" % i, b"d%d" % i))
        msgs.append(Message(False, 3 * i + 1, Op.GET, b"id%d" % i))
        msgs.append(Message(False, 3 * i + 2, Op.REMOVE, b"id%d" % i))
    with srv.connect() as s:
        replies = rpc(s, *msgs)
    assert [m.uid for m in replies] == list(range(900))
    assert all(replies[3 * i + 1].payload == b"d%d" % i for i in range(300))


# --- bad input: that one connection closes, everyone else is served -----------------------------------

def frame(*, level=PROTO_LEVEL, resp=0, uid=1, op_class=0, op=1, complete=1, data=b"", dlen=None):
    return FRAME_HEADER.pack(level, resp, uid, op_class, op, complete,
                             len(data) if dlen is None else dlen) + data


@pytest.mark.parametrize("bad", [
    pytest.param(frame(level=0x00120000, data=b"abc"), id="version-mismatch"),
    pytest.param(frame(resp=1, data=b"abc"), id="wrong-direction"),
    pytest.param(frame(op=7, data=b"abc"), id="unknown-op"),
    pytest.param(frame(op_class=3, data=b"abc"), id="op-class"),
    pytest.param(frame(dlen=4000) + b"x" * 4000, id="frame-too-long"),
    pytest.param(b"".join(frame(op=1, complete=0, data=b"z" * 2048) for _ in range(17)), id="17-frames"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
])
def test_bad_input_closes_only_that_connection(dc_server, bad):
    srv = dc_server()
    with srv.connect() as good, srv.connect() as victim:
        rpc(good, add_msg(1, b"k", b"v"))
        victim.sendall(bad)
        assert recv_all_until_close(victim) == b""          # closed, no reply
        (r,) = rpc(good, Message(False, 2, Op.GET, b"k"))
        assert r.payload == b"v"
    assert srv.proc.poll() is None


def test_requests_before_a_corrupt_frame_are_answered(dc_server):
    """Better than the original (docs/distcache.md): the good request read together with a corrupt
    frame gets its answer before the connection is closed."""
    srv = dc_server()
    with srv.connect() as s:
        s.sendall(encode_message(Message(False, 9, Op.HAVE, b"abc")) + frame(op=7, data=b"abc"))
        data = recv_all_until_close(s)
    assert data == FRAME_HEADER.pack(PROTO_LEVEL, 1, 9, 0, Op.HAVE, 1, 1) + b"\x01"


def test_half_frame_stall_is_closed(dc_server):
    srv = dc_server("-stall", "300")
    with srv.connect() as idle, srv.connect() as staller:
        staller.sendall(HAVE_ABC[:9])
        t0 = time.monotonic()
        assert recv_all_until_close(staller, timeout=10) == b""
        assert time.monotonic() - t0 < 5
        # A connection holding no partial message is not a staller: still served.
        (r,) = rpc(idle, Message(False, 1, Op.HAVE, b"abc"))
        assert r.payload == b"\x01"


def test_two_thousand_simultaneous_connections(dc_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    try:
        srv = dc_server("-sessions", "5000")
        socks = []
        try:
            for _ in range(2000):
                socks.append(srv.connect(timeout=20))
            for i, s in enumerate(socks):
                s.sendall(encode_message(add_msg(i, b"conn%d" % i, b"data%d" % i)))
            sel = selectors.DefaultSelector()
            for s in socks:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            pending = set(socks)
            bad: list[bytes] = []          # answers that are not a 15-byte ADD reply (the test fails on one)

            def all_answered() -> bool:
                for key, _ in sel.select(1):
                    data = key.fileobj.recv(100)
                    if not (data[-1:] == b"\x00" and len(data) == 15):
                        bad.append(data)
                    sel.unregister(key.fileobj)
                    pending.discard(key.fileobj)
                return not pending or bool(bad)

            wait_for(all_answered, 60, "an answer on each of the 2000 connections", interval=0)
            assert not bad, bad[:3]
            assert not pending
            sel.close()
            for s in socks[:5]:
                s.setblocking(True)
                s.settimeout(5)
            (r,) = rpc(socks[0], Message(False, 9, Op.GET, b"conn1999"))
            assert r.payload == b"data1999"
            assert psutil.Process(srv.proc.pid).memory_info().rss < 300 * 2**20
        finally:
            for s in socks:
                s.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- command line ------------------------------------------------------------------------------------

def run_cli(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "tcpha.cli.dc_server", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_listen_is_required():
    r = run_cli()
    assert r.returncode == 1 and r.stderr == "Error, must provide -listen\n"


@pytest.mark.parametrize("args,first", [
    (["-foo"], 'Error, "-foo" not recognised'),
    # The original's doubled dash ("-%s" of "-listen").
    (["-listen"], "Error, --listen requires an argument"),
    (["-listen", "UNIX:/tmp/x", "-sessions"], "Error, --sessions requires an argument"),
    (["-listen", "UNIX:/tmp/x", "-sessions", "0"], "Error, --sessions given an invalid argument"),
    (["-listen", "UNIX:/tmp/x", "-sessions", "abc"], "Error, --sessions given an invalid argument"),
    (["-listen", "UNIX:/tmp/x", "-progress", "1000001"], "Error, --progress given an invalid argument"),
    (["-listen", "UNIX:/tmp/x", "-progress", "-1"], "Error, --progress given an invalid argument"),
    (["-listen", "UNIX:/tmp/x", "-sockperms", "9"], "Error, --sockperms given an invalid argument"),
    (["-listen", "UNIX:/tmp/x", "-persist-interval", "0"], "Error, --persist-interval given an invalid argument"),
])
def test_option_errors_print_line_then_usage(args, first):
    r = run_cli(*args)
    assert r.returncode == 1
    lines = r.stderr.split("\n")
    assert lines[0] == first
    assert lines[2].startswith("Usage: dc_server [options]")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["-h", "-help", "-?"])
def test_help(flag):
    r = run_cli(flag)
    assert r.returncode == 0 and "Usage: dc_server [options]" in r.stderr and "-sessions <num>" in r.stderr


@pytest.mark.parametrize("addr", ["nonsense", "UNIX:/" + "x" * 200, "IP:127.0.0.1:99999"])
def test_bad_listen_address(addr):
    """The original's line; exit 1 where the original exits 0 (docs/distcache.md)."""
    r = run_cli("-listen", addr)
    assert (r.returncode, r.stderr) == (1, f"Error, can't listen on '{addr}'\n")


@pytest.mark.parametrize("sessions", ["1", "63"])
def test_fewer_than_64_sessions(sessions):
    """Accepted by the original's option check, refused by its cache with this line (exit 0 there, 1 here)."""
    r = run_cli("-listen", "UNIX:/nonexistent/x", "-sessions", sessions)
    assert (r.returncode, r.stderr) == (1, "Error, malloc/initialisation failure\n")


def test_bad_backend(tmp_path):
    r = run_cli("-listen", f"UNIX:{tmp_path}/s", "-backend", "memcached://x")
    assert r.returncode == 1 and r.stderr.startswith("Error, -backend given an invalid argument")
    r = run_cli("-listen", f"UNIX:{tmp_path}/s", "-backend", "redis://127.0.0.1:1", "-persist", "f")
    assert r.returncode == 1 and r.stderr == "Error, -persist works with -backend memory only\n"


def test_sessions_above_60000_is_allowed(dc_server):
    srv = dc_server("-sessions", "1000000")
    with srv.connect() as s:
        assert rpc(s, add_msg(1, b"a", b"b"))[0].payload == b"\x00"


def test_pidfile_has_no_newline_and_killable(dc_server, tmp_path):
    pidfile = tmp_path / "dc.pid"
    srv = dc_server("-pidfile", str(pidfile), "-killable")
    assert pidfile.read_text() == str(srv.proc.pid)
    srv.proc.send_signal(signal.SIGUSR1)
    assert srv.proc.wait(10) == 0
    assert not os.path.exists(srv.path)        # the socket file is cleaned up


def test_sigusr1_without_killable_is_ignored(dc_server):
    srv = dc_server()
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1):
        srv.proc.send_signal(sig)
    with srv.connect() as c:   # still serving (the signals were delivered before this request)
        assert rpc(c, Message(False, 5, Op.HAVE, b"abc"))[0].payload == b"\x01"
    assert srv.proc.poll() is None and os.path.exists(srv.path)


def test_sigterm_is_a_clean_stop(dc_server):
    srv = dc_server()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0


def test_sockperms_and_bad_sockowner_only_warns(dc_server):
    srv = dc_server("-sockperms", "600", "-sockowner", "no-such-user-xyz")
    assert os.stat(srv.path).st_mode & 0o7777 == 0o600
    assert "Warning, couldn't set ownership" in srv.stderr
    with srv.connect() as s:
        assert rpc(s, Message(False, 1, Op.HAVE, b"x"))[0].payload == b"\x01"


@pytest.mark.root
def test_user_drops_privileges(dc_server, tmp_path):
    os.chmod(tmp_path, 0o755)
    srv = dc_server("-user", "nobody")
    import pwd
    nobody = pwd.getpwnam("nobody").pw_uid
    wait_for(lambda: psutil.Process(srv.proc.pid).uids().effective == nobody, what="uid change")
    with srv.connect() as s:
        assert rpc(s, add_msg(1, b"a", b"b"))[0].payload == b"\x00"


def test_daemon_detaches_and_writes_pidfile(tmp_path):
    path = tmp_path / "d.sock"
    pidfile = tmp_path / "d.pid"
    r = run_cli("-listen", f"UNIX:{path}", "-daemon", "-pidfile", str(pidfile))
    assert r.returncode == 0
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="pidfile"))
    try:
        proc = psutil.Process(pid)
        assert proc.cwd() == "/"
        s = wait_for(lambda: _try_connect(str(path)), what="daemon socket")
        with s:
            assert rpc(s, Message(False, 1, Op.HAVE, b"x"))[0].payload == b"\x01"
    finally:
        os.kill(pid, signal.SIGKILL)


def _try_connect(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return s
    except OSError:
        s.close()
        return None


def test_progress_line_format():
    assert progress_line(10, 10, 10, 0) == \
        "Info, total operations =      10  (+    10), total sessions =    10  (+ 10)\n"
    assert progress_line(1234567, 5, 3, 7) == \
        "Info, total operations = 1234567  (+     5), total sessions =     3  (-  4)\n"
    assert progress_line(20, 0, 3, 3).endswith("total sessions =     3  (=  0)\n")


def test_progress_lines_from_a_running_server(dc_server):
    srv = dc_server("-progress", "10")       # the fixture's readiness probe was operation 1
    with srv.connect() as s:
        for i in range(9):
            rpc(s, add_msg(i, b"id%d" % i, b"x"))
        wait_for(lambda: "Info, total operations" in srv.stderr, what="progress line")
    first = srv.stderr.splitlines()[0]
    assert first == "Info, total operations =      10  (+    10), total sessions =     9  (+  9)"


def test_no_progress_line_without_changes(dc_server):
    srv = dc_server()
    with srv.connect() as s:
        rpc(s, Message(False, 1, Op.HAVE, b"x"))      # an operation, but the count is unchanged
        rpc(s, add_msg(2, b"a", b"b"))
    line = wait_for(lambda: [ln for ln in srv.stderr.splitlines() if ln.startswith("Info, total")],
                    what="progress line")[0]
    # 3 operations: the fixture's readiness probe, the HAVE, the ADD.
    assert re.fullmatch(r"Info, total operations =       3  \(\+     3\), total sessions =     1  \(\+  1\)", line)


# --- persistence with a real process -------------------------------------------------------------

def test_persist_survives_clean_restart(dc_server, tmp_path):
    db = str(tmp_path / "sessions.db")
    srv = dc_server("-persist", db)
    with srv.connect() as s:
        rpc(s, *[add_msg(i, b"sess%d" % i, b"data%d" % i * 100) for i in range(100)])
        rpc(s, Message(False, 500, Op.REMOVE, b"sess7"))
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0
    srv2 = dc_server("-persist", db)
    with srv2.connect() as s:
        got = rpc(s, *[Message(False, i, Op.GET, b"sess%d" % i) for i in range(100)])
    assert got[7].payload == b"\x01"
    assert all(got[i].payload == b"data%d" % i * 100 for i in range(100) if i != 7)


def test_persist_survives_kill_9_after_the_interval(dc_server, tmp_path):
    db = str(tmp_path / "sessions.db")
    srv = dc_server("-persist", db, "-persist-interval", "100")
    with srv.connect() as s:
        rpc(s, *[add_msg(i, b"k%d" % i, b"v%d" % i, timeout=600000) for i in range(200)])
        # The guarantee is time-based: sessions acknowledged more than one interval before the kill.
        time.sleep(0.5)
    srv.proc.kill()
    srv.proc.wait(10)
    srv2 = dc_server("-persist", db, "-persist-interval", "100")
    with srv2.connect() as s:
        got = rpc(s, *[Message(False, i, Op.GET, b"k%d" % i) for i in range(200)])
    assert [m.payload for m in got] == [b"v%d" % i for i in range(200)]


def test_persist_keeps_original_expiry_across_restart(dc_server, tmp_path):
    db = str(tmp_path / "sessions.db")
    srv = dc_server("-persist", db, "-persist-interval", "50")
    t_add = time.time()
    with srv.connect() as s:
        rpc(s, add_msg(1, b"short", b"x", timeout=1500), add_msg(2, b"long", b"y", timeout=600000))
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(10)
    srv2 = dc_server("-persist", db)
    with srv2.connect() as s:
        if time.time() - t_add < 1.4:
            assert rpc(s, Message(False, 1, Op.HAVE, b"short"))[0].payload == b"\x00"
        # Not refreshed by the restart: gone once the original 1.5 s have passed.
        wait_for(lambda: rpc(s, Message(False, 1, Op.HAVE, b"short"))[0].payload == b"\x01",
                 timeout=5, what="the original expiry")
        assert time.time() - t_add >= 1.5
        assert rpc(s, Message(False, 2, Op.HAVE, b"long"))[0].payload == b"\x00"


def test_persist_damaged_file_is_reported_and_skipped(dc_server, tmp_path):
    from tcpha.distcache.persist import FILE_HEADER, encode_record
    db = tmp_path / "sessions.db"
    exp = int(time.time() * 1000) + 600000
    good = [encode_record(1, b"ok%d" % i, b"v%d" % i, exp) for i in range(5)]
    bad = bytearray(encode_record(1, b"bad", b"zzz", exp))
    bad[-1] ^= 0xFF
    db.write_bytes(FILE_HEADER + good[0] + good[1] + bytes(bad) + b"\x00garbage" + good[2] + good[3] + good[4][:-2])
    srv = dc_server("-persist", str(db))
    with srv.connect() as s:
        got = rpc(s, *[Message(False, i, Op.HAVE, b"ok%d" % i) for i in range(5)],
                  Message(False, 9, Op.HAVE, b"bad"))
    assert [m.payload for m in got] == [b"\x00"] * 4 + [b"\x01", b"\x01"]
    assert "skipped 2 damaged region(s)" in srv.stderr


# --- back-pressure and the async (Redis-style) store path ---------------------------------------

def test_client_that_does_not_read_keeps_server_memory_bounded(dc_server):
    srv = dc_server()
    big = b"B" * 32000
    with srv.connect() as s, srv.connect() as other:
        rpc(s, add_msg(1, b"big", big))
        s.setblocking(False)
        get = encode_message(Message(False, 2, Op.GET, b"big"))
        sent = 0
        last_progress = time.monotonic()
        # Up to ~1.5 GB of replies requested; the server must stop reading instead of buffering them.
        while sent < 50_000 and time.monotonic() - last_progress < 1.0:
            try:
                s.send(get * 100)
                sent += 100
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        assert sent < 50_000          # the socket filled up: the server stopped reading from us
        assert psutil.Process(srv.proc.pid).memory_info().rss < 200 * 2**20
        (r,) = rpc(other, Message(False, 3, Op.HAVE, b"big"))
        assert r.payload == b"\x00"


def test_async_store_is_awaited_in_order():
    import asyncio
    import random

    from tcpha.distcache.server import DistcacheServer
    from tcpha.distcache.store import SessionStore

    class SlowAsyncStore:
        is_async = True

        def __init__(self):
            self.inner = SessionStore(1000)
            self.rng = random.Random(3)

        async def _pause(self):
            await asyncio.sleep(self.rng.random() / 1000)

        async def add(self, sid, data, timeout_ms):
            await self._pause()
            return self.inner.add(sid, data, timeout_ms)

        async def get(self, sid):
            await self._pause()
            return self.inner.get(sid)

        async def remove(self, sid):
            await self._pause()
            return self.inner.remove(sid)

        async def has(self, sid):
            await self._pause()
            return self.inner.has(sid)

        def __len__(self):
            return len(self.inner)

    async def main():
        server = DistcacheServer(SlowAsyncStore(), show_progress=False)
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        port = lsock.getsockname()[1]
        await server.start(lsock)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            msgs = []
            for i in range(100):
                msgs += [add_msg(2 * i, b"s%d" % i, b"d%d" % i), Message(False, 2 * i + 1, Op.GET, b"s%d" % i)]
            writer.write(b"".join(encode_message(m) for m in msgs) + frame(level=0x00120000, data=b"x"))
            dec = MessageReader(expect_response=True)
            out = []
            while True:
                data = await asyncio.wait_for(reader.read(65536), 10)
                if not data:
                    break
                out += dec.feed(data)
            writer.close()
            return out
        finally:
            await server.stop()

    out = asyncio.run(main())
    # Every request answered in order, then the bad frame closed the connection.
    assert [m.uid for m in out] == list(range(200))
    assert all(out[2 * i + 1].payload == b"d%d" % i for i in range(100))


def test_redis_backend_unreachable_answers_misses(dc_server):
    pytest.importorskip("tcpha.distcache.redis_store")
    srv = dc_server("-backend", "redis://127.0.0.1:1")
    with srv.connect() as s:
        r = rpc(s, add_msg(1, b"a", b"b"), Message(False, 2, Op.GET, b"a"), Message(False, 3, Op.HAVE, b"a"))
    assert [m.payload for m in r] == [b"\x01", b"\x01", b"\x01"]
    assert srv.proc.poll() is None


def test_persist_path_problems_are_errors_not_data_loss(tmp_path):
    r = run_cli("-listen", f"UNIX:{tmp_path}/s", "-persist", str(tmp_path / "no" / "such" / "dir" / "f"))
    assert r.returncode == 1
    assert r.stderr.startswith("Error, cannot use persist file") and r.stderr.count("\n") == 1
    r = run_cli("-listen", f"UNIX:{tmp_path}/s2", "-persist", str(tmp_path))     # a directory
    assert r.returncode == 1 and r.stderr.startswith("Error, cannot use persist file")
