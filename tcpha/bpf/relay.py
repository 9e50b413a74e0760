"""BpfRelay: the back end's relay between a handed-off client socket and the application, in the kernel.

Both sockets go into a SOCKHASH whose sk_skb programs (tcpha.bpf.programs) send every segment received on
one socket out of the other (`bpf_sk_redirect_hash`, egress): the technique Cilium and Envoy use to bypass
the loopback stack. No byte crosses into userspace; Python only sets a relay up and takes it down:

- set-up: `peers[client] = app` and `peers[app] = client`, then the application socket and the client
  socket into `socks`, then SO_RCVLOWAT on each, which makes the kernel run the programs over bytes already
  queued (the request the front end peeked at travels in the restored receive queue; without the kick it
  would wait for the client's next segment). With start(hold_down=True) nothing joins the map before
  release(). (A redirect to a peer not in the map is not lost, the verdict passes it to the socket's own
  queue, but userspace would then have to copy it, and a later segment could overtake it: hence the order.)
- EOF: a relayed socket never becomes readable for data, so readability means FIN or an error. On FIN
  from one side the relay waits until every byte that side sent has been written into the other socket
  (TCP_INFO byte counters: bytes received on the source against bytes queued on the destination; the
  kernel's redirect queue is asynchronous), then shuts down writing towards the other side: half-close
  propagates as in the splice relay. Errors (RST) on either side close both; a watchdog looks at the
  socket of a finished direction (always readable at EOF, so not watched by the loop) every second.
- tear-down: peers entries removed, sockets closed (the kernel drops them from `socks`), `on_done` once.

`kernel_up=False` keeps the request direction (client -> app) in userspace: the client socket has no
`peers` entry, so its bytes stay in its own queue and the relay reads them and writes them to the app
(`on_request(data) -> data` sees them first); the response direction still runs in the kernel.

Same interface as the splice relay (start/release/close, bytes_up/bytes_down, closed, error, describe).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
from typing import Callable

from tcpha.bpf import programs
from tcpha.bpf.syscall import (MAP_TYPE_HASH, MAP_TYPE_SOCKHASH, NO_PREALLOC, PROG_TYPE_SK_SKB,
                               SK_SKB_STREAM_PARSER, SK_SKB_STREAM_VERDICT, BpfError, Map,
                               Program)
from tcpha.relay import SpliceRelay, close_sockets, peer_text
from tcpha.repair import TCP_INFO

log = logging.getLogger("tcpha.bpf.relay")

SO_COOKIE = 57
_TCPI = struct.Struct("<120xQQ")           # tcp_info: tcpi_bytes_acked at 120, tcpi_bytes_received at 128
CAPACITY = 262144                          # sockets in the map (two per relay)
CHUNK = 256 * 1024                         # userspace reads (kernel_up=False, or bytes passed before set-up)
DRAIN_FIRST = 0.001                        # EOF seen: first look at the destination's counters after this
DRAIN_MAX = 0.2                            # then doubling up to this
DRAIN_STALL = 300.0                        # no progress towards the destination for this long: give up
WATCHDOG = 1.0


def _cookie(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)


def _established(sock: socket.socket) -> bool:
    """Whether a TCP socket is ESTABLISHED (tcp_info's first byte is the state; TCP_ESTABLISHED = 1)."""
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0] == 1


def _ioctl_int(sock: socket.socket, request: int) -> int:
    buf = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def _counters(sock: socket.socket) -> tuple[int, int]:
    """(bytes written into the socket, bytes received by it), each from an origin fixed for the socket's
    life: written = tcpi_bytes_acked + send queue (write_seq); received = tcpi_bytes_received (rcv_nxt,
    a FIN counts one)."""
    acked, received = _TCPI.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCPI.size))
    return acked + _ioctl_int(sock, termios.TIOCOUTQ), received


class SockmapPath:
    """The maps and programs all relays of a process share (created once; see programs.py)."""

    def __init__(self, *, capacity: int = CAPACITY):
        self._objects: list = []
        try:
            self.socks = self._keep(Map(MAP_TYPE_SOCKHASH, 8, 8, capacity, "tcpha_socks"))
            self.peers = self._keep(Map(MAP_TYPE_HASH, 8, 8, capacity, "tcpha_peers", NO_PREALLOC))
            self._keep(Program(PROG_TYPE_SK_SKB, programs.parser(), "tcpha_parser")).attach(
                self.socks.fd, SK_SKB_STREAM_PARSER)
            self._keep(Program(PROG_TYPE_SK_SKB, programs.verdict(self.peers.fd, self.socks.fd),
                               "tcpha_verdict")).attach(self.socks.fd, SK_SKB_STREAM_VERDICT)
        except BaseException:
            self.close()
            raise

    def _keep(self, obj):
        self._objects.append(obj)
        return obj

    def insert(self, sock: socket.socket, cookie: bytes) -> None:
        self.socks.update(cookie, struct.pack("<Q", sock.fileno()))

    def close(self) -> None:
        for obj in reversed(self._objects):
            obj.close()
        self._objects.clear()


_PATH: SockmapPath | None = None
_PROBE: tuple[bool, str] | None = None


def datapath() -> SockmapPath:
    """This process's maps and programs (created at the first call; raises BpfError if the kernel cannot)."""
    global _PATH
    if _PATH is None:
        _PATH = SockmapPath()
    return _PATH


def probe() -> tuple[bool, str]:
    """(usable, why) for this kernel and process: maps created, programs verified and attached."""
    global _PROBE
    if _PROBE is None:
        try:
            datapath()
            _PROBE = (True, "the kernel accepted the sockhash and sk_skb programs")
        except (BpfError, OSError) as e:
            _PROBE = (False, str(e) or repr(e))
    return _PROBE


RELAYS = ("auto", "bpf", "splice")
# said in the start-up line whenever bpf is chosen (docs/kernel.md, "The BPF relay", Limits)
NO_BACKPRESSURE = "no back-pressure: what a slow client has not read is held in the kernel"


def choose_relay(setting: str) -> tuple[str, str]:
    """The relay to use for `relay = setting` and why: ('bpf' | 'splice', reason for the start-up log).
    `bpf` that the kernel refuses raises BpfError (the operator asked for it: a clear fatal error)."""
    if setting == "splice":
        return "splice", "relay = splice"
    ok, why = probe()
    if setting == "bpf":
        if not ok:
            raise BpfError(errno.EOPNOTSUPP, f"relay = bpf: {why}")
        return "bpf", f"relay = bpf: {why}; {NO_BACKPRESSURE}"
    if setting != "auto":
        raise ValueError(f"relay must be one of {', '.join(RELAYS)}, not {setting!r}")
    if ok:
        return "bpf", f"relay = auto: {why}; {NO_BACKPRESSURE}"
    return "splice", f"relay = auto: BPF unavailable ({why})"


def relay_class(name: str) -> type:
    """The class for a name returned by choose_relay()."""
    if name == "bpf":
        return BpfRelay
    return SpliceRelay


class _Direction:
    """One way of the relay: src -> dst, in the kernel or (kernel=False) through userspace."""

    __slots__ = ("relay", "src", "dst", "name", "kernel", "eof", "done", "rx0", "tx0", "moved",
                 "pending", "reading", "writing", "drain_timer", "drain_wait", "last_progress",
                 "last_written")

    def __init__(self, relay: "BpfRelay", src: socket.socket, dst: socket.socket, name: str, kernel: bool):
        self.relay = relay
        self.src = src
        self.dst = dst
        self.name = name
        self.kernel = kernel
        self.eof = False                  # src sent FIN
        self.done = False                 # FIN passed on to dst (or the direction aborted)
        self.rx0 = 0                      # src: received bytes at set-up, minus its queue then
        self.tx0 = 0                      # dst: written bytes at set-up
        self.moved = 0                    # final count once closed
        self.pending = b""                # userspace bytes waiting for dst to take them
        self.reading = False
        self.writing = False
        self.drain_timer: asyncio.TimerHandle | None = None
        self.drain_wait = DRAIN_FIRST
        self.last_progress = 0.0
        self.last_written = -1

    def snapshot(self) -> None:
        """Origins of the byte counters, before the sockets go into the map. The source's received
        count and queue are read until stable: a segment landing between the two reads would be
        counted twice or not at all."""
        for _ in range(100):
            _, rx = _counters(self.src)
            inq = _ioctl_int(self.src, termios.FIONREAD)
            _, rx_again = _counters(self.src)
            if rx == rx_again:
                break
        self.rx0 = rx - inq
        self.tx0 = _counters(self.dst)[0]

    def written(self) -> int:
        """Bytes this direction has put into dst so far."""
        if self.relay.closed:
            return self.moved
        try:
            return _counters(self.dst)[0] - self.tx0
        except OSError:
            return self.moved

    def received(self) -> int:
        """Bytes src has received from its peer since set-up (its FIN not counted)."""
        return _counters(self.src)[1] - self.rx0 - (1 if self.eof else 0)


class BpfRelay:
    """Relays `client` <-> `app` in the kernel until both directions end.

    Both sockets must be connected TCP sockets; they are made non-blocking and owned by the relay.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, app: socket.socket,
                 on_done: Callable[["BpfRelay"], None] | None = None, *, kernel_up: bool = True,
                 on_request: Callable[[bytes], bytes] | None = None, path: SockmapPath | None = None):
        self.loop = loop
        self.client = client
        self.app = app
        self.on_done = on_done
        self.on_request = on_request
        self.path = path or datapath()
        client.setblocking(False)
        app.setblocking(False)
        self.up = _Direction(self, client, app, "client->app", kernel_up)
        self.down = _Direction(self, app, client, "app->client", True)
        self.closed = False
        self.held = False
        self.error: str | None = None
        self.watched = 0                  # watchdog rounds (tests)
        self.copied = 0                   # bytes of kernel directions that userspace had to copy itself
        self._client_cookie = _cookie(client)
        self._app_cookie = _cookie(app)
        self._inserted: list[bytes] = []
        self._linked: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None

    # -- set-up --------------------------------------------------------------------------------
    def start(self, *, hold_down: bool = False) -> None:
        """Start relaying. hold_down: nothing moves until release() (see SpliceRelay.start: the
        restored socket's queue is not read, so its receive window stays as the front end left it)."""
        try:
            self.up.snapshot()
            self.down.snapshot()
        except OSError as e:
            self._fail("set-up", e)
            return
        self.held = hold_down
        if not hold_down:
            self._open()

    def release(self) -> None:
        """Start both directions held by start(hold_down=True), on the next turn of the loop: the caller
        sends its window probe now (repair.announce: repair mode on and off), and a response the kernel
        sent into the client socket while repair mode is on would be refused (EINVAL) and lost."""
        if not self.held or self.closed:
            return
        self.held = False
        self.loop.call_soon(self._open)

    def _open(self) -> None:
        """peers entries first, then the application socket, then the client socket: a segment reaching
        a socket of the map whose peer is not in it yet would go to userspace (SK_PASS), and a later one
        could overtake it through the kernel. Bytes reaching a socket before it joins the map wait in
        its TCP queue and go through the programs at the kick below, in order.

        A SOCKHASH takes only ESTABLISHED TCP sockets (the kernel answers EOPNOTSUPP for any other
        state). A client whose FIN came in before this point (an HTTP/1.0 client that shut down writing
        after its request) is in CLOSE_WAIT: such a relay copies through userspace instead, both ways.
        Failing it would close the client socket with its request unread, which the kernel answers with
        RST."""
        if self.closed:
            return
        try:
            if not (_established(self.client) and _established(self.app)):
                self._in_userspace()
                return
            self.path.peers.update(self._app_cookie, self._client_cookie)
            self._linked.append(self._app_cookie)
            if self.up.kernel:
                self.path.peers.update(self._client_cookie, self._app_cookie)
                self._linked.append(self._client_cookie)
            for sock, cookie in ((self.app, self._app_cookie), (self.client, self._client_cookie)):
                self.path.insert(sock, cookie)
                self._inserted.append(cookie)
            for sock in (self.client, self.app):
                # tcp_set_rcvlowat() calls the socket's data_ready, now the sockmap's: bytes queued
                # before the socket joined the map go through the programs now, ahead of any new ones.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                # a FIN came in between the state check and the insert: the application socket may
                # be in the map already, but it has had nothing to answer yet (the request is still
                # in the client socket), so nothing of it is in its BPF queue to lose
                try:
                    self._unlink()
                except BpfError as e2:
                    self._fail("set-up", e2)
                    return
                self._in_userspace()
                return
            self._fail("set-up", e)
            return
        for d in (self.up, self.down):
            self._want(d, read=True, write=False)

    def _in_userspace(self) -> None:
        """Relay both directions by recv/send (a socket the map does not take)."""
        log.debug("relay %s: a socket is no longer ESTABLISHED (its peer's FIN is in): relayed in "
                  "userspace", self.describe())
        self.up.kernel = self.down.kernel = False
        for d in (self.up, self.down):
            self._want(d, read=True, write=False)

    # -- events --------------------------------------------------------------------------------
    def _want(self, d: _Direction, *, read: bool, write: bool) -> None:
        if read != d.reading:
            if read:
                self.loop.add_reader(d.src.fileno(), self._readable, d)
            else:
                self.loop.remove_reader(d.src.fileno())
            d.reading = read
        if write != d.writing:
            if write:
                self.loop.add_writer(d.dst.fileno(), self._writable, d)
            else:
                self.loop.remove_writer(d.dst.fileno())
            d.writing = write

    def _readable(self, d: _Direction) -> None:
        """src readable: FIN, an error, or bytes for userspace (kernel_up=False; or passed by the verdict
        because the peer was not in the map yet)."""
        if self.closed:
            return
        try:
            data = d.src.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(d.name, e)
            return
        if not data:
            d.eof = True
            self._want(d, read=False, write=d.writing)
            if d.kernel:
                self._drain(d)
            elif not d.pending:
                self._finish(d)
            return
        if not d.kernel and self.on_request is not None:
            data = self.on_request(data)
        d.pending += data
        self._writable(d)

    def _writable(self, d: _Direction) -> None:
        if self.closed:
            return
        try:
            while d.pending:
                n = d.dst.send(d.pending)
                d.pending = d.pending[n:]
                if d.kernel:
                    self.copied += n
                else:
                    d.moved += n
        except (BlockingIOError, InterruptedError):
            self._want(d, read=False, write=True)       # no more reading until dst takes these
            return
        except OSError as e:
            self._fail(d.name, e)
            return
        if d.eof:
            self._want(d, read=False, write=False)
            if d.kernel:
                self._drain(d)
            else:
                self._finish(d)
        else:
            self._want(d, read=True, write=False)

    def _drain(self, d: _Direction) -> None:
        """src sent FIN: pass it on once all its bytes are in dst (the redirect queue is asynchronous)."""
        d.drain_timer = None
        if self.closed or d.done:
            return
        try:
            written, target = d.written(), d.received()
        except OSError as e:
            self._fail(d.name, e)
            return
        now = self.loop.time()
        if written >= target and not d.pending:
            self._finish(d)
            return
        if written != d.last_written:
            d.last_written, d.last_progress = written, now
        elif now - d.last_progress > DRAIN_STALL:
            self.error = f"{d.name}: {target - written} bytes not delivered in {DRAIN_STALL:.0f} s"
            log.warning("relay %s: %s", self.describe(), self.error)
            self.close()
            return
        d.drain_timer = self.loop.call_later(d.drain_wait, self._drain, d)
        d.drain_wait = min(d.drain_wait * 2, DRAIN_MAX)

    def _finish(self, d: _Direction) -> None:
        d.done = True
        if d.kernel:
            d.moved = d.written()
        try:
            d.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self.up.done and self.down.done:
            self.close()
        elif self._watchdog is None:
            self._watchdog = self.loop.call_later(WATCHDOG, self._watch)

    def _watch(self) -> None:
        """One direction has ended: its source is readable for ever (EOF), so the loop cannot tell us
        when it fails; look at it now and then (an RST from the client ends the other direction too)."""
        self._watchdog = None
        if self.closed:
            return
        self.watched += 1
        for d in (self.up, self.down):
            if d.eof:
                # an RST sets the socket's error (state CLOSE alone is no sign: both FINs exchanged
                # while the other direction still drains ends there too)
                err = d.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(d.name, OSError(err, os.strerror(err)))
                    return
        self._watchdog = self.loop.call_later(WATCHDOG, self._watch)

    def _unlink(self) -> None:
        """Take this relay's entries out of the maps (peers first: no redirect towards a socket leaving)."""
        while self._linked:
            self.path.peers.delete(self._linked[-1])
            self._linked.pop()
        while self._inserted:
            self.path.socks.delete(self._inserted[-1])    # closing would too; this stops redirects first
            self._inserted.pop()

    def _fail(self, where: str, e: OSError) -> None:
        self.error = f"{where}: {e.strerror or e}"
        log.debug("relay %s ended: %s", self.describe(), self.error)
        self.close()

    # -- interface shared with SpliceRelay -----------------------------------------------------
    @property
    def bytes_up(self) -> int:
        return self.up.written() if self.up.kernel else self.up.moved

    @property
    def bytes_down(self) -> int:
        return self.down.written() if self.down.kernel else self.down.moved

    def describe(self) -> str:
        return peer_text(self.client)

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        for d in (self.up, self.down):
            if d.kernel and not d.done:
                d.moved = d.written()
            if d.drain_timer is not None:
                d.drain_timer.cancel()
            self._want(d, read=False, write=False)
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        try:
            self._unlink()
        except BpfError as e:
            log.warning("relay %s: removing it from the BPF maps: %s", self.describe(), e)
        self._linked.clear()
        self._inserted.clear()
        close_sockets(self.client, self.app)
        if self.on_done is not None:
            self.on_done(self)
