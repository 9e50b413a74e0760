"""dc_test: the original's random add/remove/get/have test and benchmark driver.

Options, ranges, the algorithm and every output line are those of the C dc_test 1.4.x
(every Info and Error line and the usage text on stderr, nothing on stdout; exit 0 when every
test passed, 1 otherwise).  Extensions (not in the usage text, see docs/distcache.md):

* ``-timing``: two lines on stdout at the end, ``Info, elapsed time = S seconds`` and
  ``Info, operations per second = N`` (the original prints no timing);
* ``-clients N`` runs N clients in N processes at once (each with its own sessions and the
  same options) and sums their rates (with the two timing lines);
* ``-tls-cafile F [-tls-cert F -tls-key F] [-tls-checkhost NAME]``: connect over TLS
  (tcpha.distcache.tls); a certificate that does not check out is a server that cannot be
  reached, with one ``Error, ADDRESS: certificate verify failed: ...`` line saying why.

It is the benchmark driver, so the loop uses a raw socket and the codec directly: one request
written with one send, the reply parsed on a fast path when it arrives in one piece.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import sys
import time

from .address import Address, AddressError, connect_socket, parse_address, resolve
from .tls import CLIENT_OPTIONS as TLS_OPTIONS, ClientTls, TlsError, TlsOptions, describe_error
from .codec import FRAME_HEADER, MAX_FRAME_DATA, MAX_MESSAGE, PROTO_LEVEL, Message, MessageReader, Op, \
    ProtocolError, encode_message

__all__ = ["main", "run_client", "TestResult"]

# The original's usage text, byte for byte (the extensions are in docs/distcache.md).
USAGE = [
    '',
    "Usage: dc_test [options]     where 'options' are from;",
    "  -connect <addr>  (connect to server at address 'addr')",
    "  -progress <num>  (report transaction count every 'num' operations)",
    "  -sessions <num>  (create 'num' sessions to use for testing)",
    "  -datamin <num>   (each session's data must be at least <num> bytes)",
    "  -datamax <num>   (each session's data must be at most <num> bytes)",
    "  -timeout <secs>  (add sessions with a timeout of 'secs')",
    "  -timevar <secs>  (randomly offset '-timeout' +/- 'secs')",
    "  -ops <num>       (run <num> random tests, def: 10 * ('sessions')^2)",
    '  -persistent      (use a persistent connection for all operations)',
    '  -<h|help|?>      (display this usage message)',
    '',
    'Eg. dc_test -connect UNIX:/tmp/session_cache -sessions 10 -withcert 3',
    "  will start connecting to a cache server (or a cache proxy like 'dc_client')",
    '  and will runs tests using 10 sample SSL/TLS sessions, 3 of which will be',
    '  large due to peer-certificate encoding.',
    "NB: '-progress' ensures that if 'num' operations have accumulated,",
    '  statistics are generated. However in server mode, statistics are also',
    "  generated due to cache activity, so '-progress' just ensures they are",
    "  generated at least as often as the number of operations grows by 'num'.",
    '',
]

DEF_SESSIONS = 10
DEF_DATAMIN = 50
DEF_DATAMAX = 2100
DEF_TIMEOUT = 60
DEF_TIMEVAR = 5
MAX_SESSIONS = 512
MAX_TIMEOUT = 3600
MAX_OPS = 1000000
MAX_PROGRESS = 1000000
MAX_CLIENTS = 256
# The original waits forever for a reply; we give up after this long (a transaction failure).
IO_TIMEOUT = 60.0

_pack_header = FRAME_HEADER.pack
_unpack_header = FRAME_HEADER.unpack_from
_ADD_HEAD = struct.Struct(">II").pack


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _usage() -> int:
    sys.stderr.write("\n".join(USAGE) + "\n")
    sys.stderr.flush()
    return 0


def _atoi(text: str) -> int:
    """C atoi(): optional blanks and sign, then the leading digits; 0 when there are none."""
    s = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    n = 0
    for ch in s:
        if "0" <= ch <= "9":
            n = n * 10 + (ord(ch) - 48)
        else:
            break
    n *= sign
    # atoi returns an int (32 bits here); overflow wraps in practice.
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n & 0x80000000 else n


def _uint(text: str) -> int:
    return _atoi(text) & 0xFFFFFFFF          # (unsigned int)atoi(...)


def _ulong(text: str) -> int:
    return _atoi(text) & 0xFFFFFFFFFFFFFFFF  # (unsigned long)atoi(...) on LP64


class TestResult:
    __slots__ = ("ok", "done", "elapsed", "errors")

    def __init__(self, ok: bool, done: int, elapsed: float, errors: list[str]) -> None:
        self.ok = ok
        self.done = done
        self.elapsed = elapsed
        self.errors = errors


class _Failed(Exception):
    pass


_TIMEVAL = struct.Struct("ll")


class _Conn:
    """The transport of one dc_test client: a persistent socket or one per operation."""

    __slots__ = ("addr", "persistent", "sock", "uid", "target", "tls", "tls_failed")

    def __init__(self, addr: Address, persistent: bool, tls: ClientTls | None = None) -> None:
        self.addr = addr
        self.persistent = persistent
        self.tls = tls
        self.tls_failed = False
        self.sock: socket.socket | None = None
        self.uid = 1  # the C library's global counter starts at 1
        # Resolve once (not on every per-operation connect).
        self.target: tuple[int, object] | None = None
        if addr.kind == "unix":
            self.target = (socket.AF_UNIX, addr.path)
        elif addr.kind == "ip":
            family = socket.AF_INET6 if addr.ipv6 else socket.AF_INET
            try:
                info = socket.getaddrinfo(addr.host, addr.port, family, socket.SOCK_STREAM)
                self.target = (info[0][0], info[0][4])
            except OSError:
                self.target = None

    def open(self) -> socket.socket:
        if self.tls is not None:
            # Extension: TLS (Python's socket timeout; the handshake checks the certificate).
            sock = connect_socket(self.addr, IO_TIMEOUT)
            try:
                return self.tls.wrap(sock, self.addr)
            except ssl.SSLError as exc:
                if not self.tls_failed:   # one line: why the server cannot be used
                    self.tls_failed = True
                    _err(f"Error, {self.addr.text}: {describe_error(exc)}")
                raise
        if self.target is None:
            return connect_socket(self.addr, IO_TIMEOUT)
        family, sockaddr = self.target
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # A blocking socket with kernel send/receive timeouts: no poll() before every
            # recv as Python's settimeout() would do (this loop is the benchmark driver).
            tv = _TIMEVAL.pack(int(IO_TIMEOUT), 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            sock.connect(sockaddr)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    def transact(self, op: int, payload: bytes) -> bytes | None:
        """The reply payload, or None when the transaction failed (as int_transact() == 0)."""
        uid = self.uid
        self.uid = (uid + 1) & 0xFFFFFFFF
        if len(payload) <= MAX_FRAME_DATA:
            req = _pack_header(PROTO_LEVEL, 0, uid, 0, op, 1, len(payload)) + payload
        else:
            req = encode_message(Message(False, uid, Op(op), payload))
        sock = self.sock
        try:
            if sock is None:
                sock = self.open()
                if self.persistent:
                    self.sock = sock
        except OSError:
            return None
        try:
            sock.sendall(req)
            data = sock.recv(65536)
            if not data:
                raise _Failed
            n = len(data)
            if n >= 14:
                level, is_resp, r_uid, op_class, r_op, complete, dlen = _unpack_header(data, 0)
                if complete == 1 and n == 14 + dlen and level >> 16 == 0x11 and is_resp == 1 \
                        and op_class == 0 and dlen <= MAX_FRAME_DATA:
                    # Fast path: the whole one-frame reply arrived in one piece.
                    if r_uid != uid or r_op != op or not dlen:
                        raise _Failed
                    return data[14:]
            reader = MessageReader(expect_response=True)
            msgs = reader.feed(data)
            while not msgs:
                data = sock.recv(65536)
                if not data:
                    raise _Failed
                msgs = reader.feed(data)
            msg = msgs[0]
            if msg.uid != uid or msg.op != op or not msg.payload or len(msg.payload) > MAX_MESSAGE:
                raise _Failed
            return msg.payload
        except (OSError, _Failed, ProtocolError):
            if self.persistent:
                # The C client keeps its dead connection and fails from then on; we reconnect
                # on the next operation (the run stops at the first failure anyway).
                self.sock = None
            sock.close()
            return None
        finally:
            if not self.persistent and sock is not None:
                sock.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_client(addr: Address, sessions: int, datamin: int, datamax: int, timeout: int, timevar: int,
               tests: int, progress: int, persistent: bool, *, out=None,
               conn: _Conn | None = None) -> TestResult:
    """The test loop of the original do_client(); writes Info/Error lines unless out is None."""
    rnd = random.Random(os.urandom(16))
    getrandbits = rnd.getrandbits
    urandom = os.urandom
    ids: list[bytes] = []
    datas: list[bytes] = []
    for _ in range(sessions):
        # Rule (dc_test): id length 10..63, data length datamin..datamax-1, random bytes.
        idlen = 10 + int(54.0 * rnd.random())
        dlen = (datamin + int((1.0 * datamax - datamin) * rnd.random())) & 0xFFFFFFFF
        ids.append(urandom(idlen))
        datas.append(urandom(dlen))
    present = [False] * sessions
    if out is not None:
        out.write(f"Info, {sessions} sessions generated, will run {tests} random tests\n")
        out.flush()
    errors: list[str] = []
    transact = conn.transact
    add_base = 1000 * (timeout - timevar)
    var_span = 2000 * timevar
    idx = 0
    ok = False
    t0 = time.perf_counter()
    try:
        while idx < tests:
            s = getrandbits(32) % sessions
            op = getrandbits(32) % 4
            c2 = getrandbits(32)
            sid = ids[s]
            if op == 0:
                t = (c2 % var_span if timevar else 0) + add_base
                data = datas[s]
                payload = _ADD_HEAD(t & 0xFFFFFFFF, len(sid)) + sid + data
                if len(payload) > MAX_MESSAGE:
                    ret = False
                else:
                    reply = transact(0, payload)
                    ret = reply == b"\x00"
                if present[s]:
                    if ret:
                        errors.append("Error, add succeeded and shouldn't have!")
                        break
                else:
                    if not ret:
                        errors.append("Error, add failed!")
                        break
                    present[s] = True
            elif op == 1:
                reply = transact(2, sid)
                ret = reply == b"\x00"
                if present[s]:
                    if not ret:
                        errors.append("Error, remove failed!")
                        break
                    present[s] = False
                elif ret:
                    errors.append("Error, remove succeeded and shouldn't have!")
                    break
            elif op == 2:
                reply = transact(1, sid)
                ret = reply is not None and len(reply) >= 5
                if present[s]:
                    if not ret:
                        errors.append("Error, get failed!")
                        break
                    if reply != datas[s]:
                        errors.append("Error, received mismatched session")
                        break
                elif ret:
                    errors.append("Error, get succeeded and shouldn't have!")
                    break
            else:
                reply = transact(3, sid)
                if reply is None:
                    have = -1
                elif len(reply) != 1:
                    have = 0
                elif reply[0] == 0:
                    have = 1
                elif reply[0] == 1:
                    have = 0
                else:
                    have = -1
                if have < 0:
                    errors.append("Error, transaction failure")
                    break
                if present[s]:
                    if not have:
                        errors.append("Error, have failed!")
                        break
                elif have:
                    errors.append("Error, have succeeded and shouldn't have!")
                    break
            idx += 1
            if progress and idx % progress == 0 and out is not None:
                out.write(f"Info, total operations = {idx:7d}\n")
                out.flush()
        else:
            ok = True
    finally:
        elapsed = time.perf_counter() - t0
        conn.close()
    return TestResult(ok, idx, elapsed, errors)


def _report(info, timing, result_ok: bool, done: int, elapsed: float, rate: float, clients: int) -> None:
    """The original's last Info line on `info` (stderr); the -timing lines on `timing` (stdout) unless None."""
    if result_ok:
        info.write("Info, all tests complete\n")
    else:
        info.write(f"Info, {done} tests succeeded before the first failure\n")
    info.flush()
    if timing is None:
        return
    out = timing
    out.write(f"Info, elapsed time = {elapsed:.3f} seconds\n")
    if clients > 1:
        out.write(f"Info, operations per second = {rate:.0f} (sum of {clients} clients)\n")
    else:
        out.write(f"Info, operations per second = {rate:.0f}\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    sessions = None
    datamin = DEF_DATAMIN
    datamax = DEF_DATAMAX
    timeout = DEF_TIMEOUT
    timevar = DEF_TIMEVAR
    progress = 0
    persistent = False
    ops = MAX_OPS + 1
    connect = None
    clients = 1
    timing = False
    tls_files: dict[str, str] = {}

    def noarg(opt: str) -> int:
        # The original prints "-%s" with the option's own dash: "Error, --connect requires ...".
        _err(f"Error, -{opt} requires an argument")
        _usage()
        return 1

    def badrange(opt: str) -> int:
        _err(f"Error, -{opt} given an invalid argument")
        _usage()
        return 1

    i = 0
    n = len(args)
    while i < n:
        a = args[i]
        if a in ("-h", "-help", "-?"):
            return _usage()
        if a == "-persistent":
            persistent = True
        elif a == "-timing":
            timing = True
        elif a == "-withcert":
            _err("Error, no OpenSSL support compiled in, -with-cert not available.")
            return 1
        elif a in ("-connect", "-sessions", "-datamin", "-datamax", "-timeout", "-timevar",
                   "-progress", "-ops", "-clients", *TLS_OPTIONS):
            if i + 1 >= n:
                return noarg(a)
            i += 1
            v = args[i]
            if a in TLS_OPTIONS:
                tls_files[TLS_OPTIONS[a]] = v
            elif a == "-connect":
                connect = v
            elif a == "-sessions":
                sessions = _uint(v)
            elif a == "-datamin":
                datamin = _uint(v)
            elif a == "-datamax":
                datamax = _uint(v)
            elif a == "-timeout":
                timeout = _uint(v)
                if timeout > MAX_TIMEOUT:
                    return badrange(a)
            elif a == "-timevar":
                timevar = _uint(v)
                if timevar > MAX_TIMEOUT:
                    return badrange(a)
            elif a == "-progress":
                progress = _ulong(v)
                if progress > MAX_PROGRESS:
                    return badrange(a)
            elif a == "-ops":
                ops = _uint(v)
                if ops > MAX_OPS:
                    return badrange(a)
            elif a == "-clients":
                clients = _atoi(v)
                if not 1 <= clients <= MAX_CLIENTS:
                    return badrange(a)
        else:
            _err(f'Error, "{a}" not recognised')
            _usage()
            return 1
        i += 1

    if connect is None:
        _err("Error, must provide -connect")
        return 1
    if sessions is None:
        sessions = DEF_SESSIONS
    if sessions < 1 or sessions > MAX_SESSIONS:
        return badrange("-sessions")
    if timevar >= timeout:
        _err("Error, -timevar must be strictly smaller than -timeout")
        return 1
    if datamin < 4:
        _err("Error, -datamin should be at least 4")
        return 1
    if datamax > 4096:
        _err("Error, -datamax should be at most 4096")
        return 1
    if ops > MAX_OPS:
        ops = sessions * sessions * 10

    try:
        addr = parse_address(connect)
        if addr.kind == "ip" and addr.host is None:
            raise AddressError("listen-only address")
        if addr.kind == "ip":
            resolve(addr)  # as DC_CTX_new(): a name that does not resolve fails here
    except AddressError:
        _err("Error, 'DC_CTX' creation failed")
        return 1

    try:
        tls = ClientTls.from_options(TlsOptions(**tls_files))
    except TlsError as exc:
        _err(str(exc))
        return 1

    out = sys.stderr
    if clients > 1:
        return _run_many(addr, clients, sessions, datamin, datamax, timeout, timevar, ops, progress,
                         persistent, out, sys.stdout, tls)

    conn = _Conn(addr, persistent, tls)
    if persistent:
        # Rule (DC_CTX_new): a persistent context connects at creation; failure ends dc_test.
        try:
            conn.sock = conn.open()
        except OSError:
            _err("Error, 'DC_CTX' creation failed")
            return 1
    result = run_client(addr, sessions, datamin, datamax, timeout, timevar, ops, progress, persistent,
                        out=out, conn=conn)
    for line in result.errors:
        _err(line)
    rate = result.done / result.elapsed if result.elapsed > 0 else 0.0
    _report(out, sys.stdout if timing else None, result.ok, result.done, result.elapsed, rate, 1)
    return 0 if result.ok else 1


def _run_many(addr: Address, clients: int, sessions: int, datamin: int, datamax: int, timeout: int,
              timevar: int, ops: int, progress: int, persistent: bool, out, timing,
              tls: ClientTls | None = None) -> int:
    """-clients N: N forked processes, each a full dc_test client; rates are summed."""
    out.write(f"Info, {sessions} sessions generated, will run {ops} random tests\n")
    out.flush()
    children: list[tuple[int, int]] = []
    start = time.perf_counter()
    for _ in range(clients):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(rfd)
            code = 1
            try:
                conn = _Conn(addr, persistent, tls)
                if persistent:
                    try:
                        conn.sock = conn.open()
                    except OSError:
                        os.write(wfd, b"F 0 0\nError, 'DC_CTX' creation failed\n")
                        os._exit(1)
                res = run_client(addr, sessions, datamin, datamax, timeout, timevar, ops, 0, persistent,
                                 out=None, conn=conn)
                msg = f"{'O' if res.ok else 'F'} {res.done} {res.elapsed!r}\n" + "".join(e + "\n" for e in res.errors)
                os.write(wfd, msg.encode())
                code = 0 if res.ok else 1
            finally:
                os._exit(code)
        os.close(wfd)
        children.append((pid, rfd))
    all_ok = True
    total_rate = 0.0
    first_fail_done = None
    errors: list[str] = []
    done_total = 0
    for pid, rfd in children:
        chunks = []
        while True:
            b = os.read(rfd, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(rfd)
        os.waitpid(pid, 0)
        text = b"".join(chunks).decode(errors="replace").splitlines()
        if not text:
            all_ok = False
            errors.append("Error, a test client died")
            continue
        status, done, elapsed = text[0].split(" ")
        done_i = int(done)
        el = float(elapsed)
        done_total += done_i
        if el > 0:
            total_rate += done_i / el
        if status != "O":
            all_ok = False
            errors.extend(text[1:])
            if first_fail_done is None:
                first_fail_done = done_i
    wall = time.perf_counter() - start
    for line in errors:
        _err(line)
    _report(out, timing, all_ok, first_fail_done or 0, wall, total_rate, clients)
    return 0 if all_ok else 1
