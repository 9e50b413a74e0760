"""The back end's relay for a connection that may move between requests (`rehandoff = on` on the front end).

The client's bytes go through userspace, through tcpha.sniff.framing.RehandoffPlanner, which passes each
request that stays (tcpha.sniff.rulecheck) to the application and holds the first one that goes elsewhere.
The application's bytes go to the client as in tcpha.relay (splice, through a pipe, unseen) wherever the
same planner already knows their framing (`app_opaque`: the rest of a Content-Length body or of a chunk's
data); only response heads and chunk-size lines are read into userspace and shown to it. When every
response before the held request is complete and written into the client socket,
`on_move(relay)` asks the front end to freeze the flow (MoveAsk); `frozen()` then dumps the client socket
with the held bytes put back in front of its receive queue (tcpha.repair.TcpState.with_unread), lets go of
it without FIN or RST and returns the state for `Moved`. `keep()` is the answer when the move cannot happen
(MoveRefused, no answer, the client closed meanwhile): the held request is for another back end, so it never
goes to this application: it is answered 503 and the connection closes (docs/kernel.md).

The same interface as tcpha.relay.SpliceRelay (start/release/close, bytes_up/bytes_down, closed, error,
describe, client) so that tcpha.be.handoff treats it as any relay. See docs/kernel.md, "Moving a keep-alive
connection".
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from http import HTTPStatus
from typing import Callable

from tcpha import repair
from tcpha.relay import PIPE_SIZE, close_sockets, peer_text, put_pipe, take_pipe
from tcpha.sniff.framing import Plan, RehandoffPlanner
from tcpha.sniff.http import RequestHead

log = logging.getLogger("tcpha.be.rehandoff")

CHUNK = 256 * 1024                # client -> application reads
# Application -> client (measured with bench/rehandoff_relay.py, bench/results/relay.md): bytes the planner
# need not see are spliced when there are at least SPLICE_MIN of them (SPLICE_MIN_CHUNK of a chunk's data);
# the rest is read and shown to it: HEAD_CHUNK when a response head is next (what follows it is copied
# too), LINE_CHUNK when a chunk's CRLF and size line are and the chunks are large, COPY_CHUNK for short
# rests and smaller chunks (per 64 KiB chunk, a line read and a splice pair cost more than the copy of the
# data they save, where one 256 KiB read copies several chunks).
SPLICE_MIN = 32 * 1024
SPLICE_MIN_CHUNK = 256 * 1024
HEAD_CHUNK = 16 * 1024
LINE_CHUNK = 256
COPY_CHUNK = CHUNK
_SPLICE = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)
# After a refusal (answer, then FIN) the client's unread bytes are read off for at most this long before the
# socket is closed: closing with unread data would answer with RST, which can destroy the answer in flight.
LINGER = 2.0


def refusal(status: int) -> bytes:
    """The answer to a request this back end will not give its application (then the connection closes)."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode()
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class RehandoffRelay:
    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, app: socket.socket,
                 on_done: Callable[["RehandoffRelay"], None] | None, *, stays: Callable[[RequestHead], bool],
                 on_move: Callable[["RehandoffRelay"], None]):
        self.loop = loop
        self.client = client
        self.app = app
        self.on_done = on_done
        self.on_move = on_move
        self.planner = RehandoffPlanner(stays)
        client.setblocking(False)
        app.setblocking(False)
        self.closed = False
        self.held = False
        self.error: str | None = None
        self.discarded = False            # moved away: no FlowClosed
        self.moving = False               # MoveAsk sent, waiting for the front end
        self._move_bytes = b""
        self._up = b""                    # for the application
        self._down = b""                  # for the client
        self._up_eof = self._down_eof = False
        self._up_done = self._down_done = False
        self._rfd = self._wfd = -1         # app -> client for the bytes the planner need not see (taken
                                          # at the first splice: connections of small responses never do)
        self._piped = 0                   # bytes in that pipe
        self._large_chunks = True         # chunked responses: the last chunk's data was spliced
        self._splicing = False            # the last read from the application was a splice
        self.spliced_down = 0             # of bytes_down, how many went through the pipe unseen
        self._reading = {"client": False, "app": False}
        self._writing = {"client": False, "app": False}
        self.bytes_up = 0
        self.bytes_down = 0
        self.pinned: str | None = None
        self.refused = 0                  # the status answered instead of a request (then closed)
        self._refusal_sent = False
        self._linger: asyncio.TimerHandle | None = None

    # -- life ------------------------------------------------------------------------------------
    def start(self, *, hold_down: bool = False) -> None:
        self.held = hold_down
        if not hold_down:
            self._arm()

    def release(self) -> None:
        if self.held and not self.closed:
            self.held = False
            self._arm()

    def describe(self) -> str:
        return peer_text(self.client)

    def _arm(self) -> None:
        self._watch_read("app", True)
        self._watch_read("client", self.planner.reading_client)
        self._client_readable()           # the restored request may be queued already

    def _watch_read(self, which: str, on: bool) -> None:
        if self.closed or on == self._reading[which]:
            return
        sock = self.client if which == "client" else self.app
        if on:
            self.loop.add_reader(sock.fileno(), self._client_readable if which == "client" else self._pump_down)
        else:
            self.loop.remove_reader(sock.fileno())
        self._reading[which] = on

    def _watch_write(self, which: str, on: bool) -> None:
        if self.closed or on == self._writing[which]:
            return
        sock = self.client if which == "client" else self.app
        if on:
            self.loop.add_writer(sock.fileno(), self._flush_up if which == "app" else self._pump_down)
        else:
            self.loop.remove_writer(sock.fileno())
        self._writing[which] = on

    # -- client -> application -----------------------------------------------------------------
    def _client_readable(self) -> None:
        if self.closed or self.held or not self.planner.reading_client or self._up_eof:
            self._watch_read("client", False)
            return
        try:
            data = self.client.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            self._watch_read("client", True)
            return
        except OSError as e:
            return self._fail("client", e)
        if not data:
            self._up_eof = True
            self._watch_read("client", False)
            self._flush_up()
            return
        self._apply(self.planner.client_data(data))
        self._watch_read("client", self.planner.reading_client and not self._up)

    def _apply(self, plan: Plan) -> None:
        if plan.pinned is not None and self.pinned is None:
            self.pinned = plan.pinned
            log.info("relay %s stays here: %s", self.describe(), plan.pinned)
        if plan.to_app:
            self._up += plan.to_app
            self._flush_up()
        if plan.move:
            self._move_bytes += plan.held
            self._maybe_move()
        if plan.refuse:
            self._refuse(plan.refuse, "a request head the front end would refuse")
        if plan.drop is not None:
            log.info("relay %s: %s", self.describe(), plan.drop)
            self._up_done = True          # nothing more for the application; the end comes with its response

    def _flush_up(self) -> None:
        if self.closed:
            return
        try:
            while self._up:
                n = self.app.send(self._up)
                self._up = self._up[n:]
                self.bytes_up += n
        except (BlockingIOError, InterruptedError):
            self._watch_write("app", True)
            self._watch_read("client", False)
            return
        except OSError as e:
            return self._fail("client->app", e)
        self._watch_write("app", False)
        if self._up_eof and not self._up_done:
            self._up_done = True
            try:
                self.app.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._maybe_end()
            return
        self._watch_read("client", self.planner.reading_client and not self._up_eof)

    # -- application -> client -----------------------------------------------------------------
    # Response heads, chunk-size lines and anything not framed yet are read here (recv, HEAD_CHUNK at a
    # time) and shown to the planner; the bytes whose framing is known (planner.app_opaque: the rest of a
    # Content-Length body or of a chunk's data, everything once nothing is framed any more) go app -> pipe
    # -> client with splice, unseen, as in tcpha.relay. Order: the pipe is filled only when `_down` is
    # empty, and the application is read only when both are, so the client gets the bytes as they came.
    def _pump_down(self) -> None:
        if self.closed:
            return
        client_fd = self.client.fileno()
        try:
            while True:
                if self._down:                                  # copied bytes first
                    n = self.client.send(self._down)
                    self._down = self._down[n:]
                    self.bytes_down += n
                    continue
                if self._piped:
                    n = os.splice(self._rfd, client_fd, self._piped, flags=_SPLICE)
                    self._piped -= n
                    self.bytes_down += n
                    continue
                # everything read from the application is in the client socket
                if self.refused and not self._refusal_sent:
                    self._answer_refusal()
                    continue
                self._watch_write("client", False)
                if self._down_eof:
                    if not self._down_done:
                        self._down_done = True
                        try:
                            self.client.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        self._maybe_end()
                    return
                self._maybe_move()
                if self.closed or not self._read_app():
                    return
        except (BlockingIOError, InterruptedError):
            self._watch_write("client", True)                   # back-pressure: stop reading the app
            self._watch_read("app", False)
        except OSError as e:
            if e.errno in _AGAIN:
                self._watch_write("client", True)
                self._watch_read("app", False)
                return
            self._fail("app->client", e)

    def _read_app(self) -> bool:
        """One read from the application into `_down` or the pipe; False when there is nothing to read
        (now or ever). Raises OSError for the caller's "app->client" failure."""
        opaque = self.planner.app_opaque
        try:
            # A chunk's data is spliced when the chunk is large; once it is, its rest too (down to SPLICE_MIN).
            chunk_start = self.planner.responses.in_chunked and not self._splicing
            if opaque >= (SPLICE_MIN_CHUNK if chunk_start else SPLICE_MIN):
                if self._wfd < 0:
                    self._rfd, self._wfd = take_pipe()
                n = os.splice(self.app.fileno(), self._wfd, min(opaque, PIPE_SIZE), flags=_SPLICE)
                data = b""
                self._large_chunks = self._splicing = True
            else:
                if opaque:
                    size = COPY_CHUNK      # a short rest: a copy costs less than a splice pair
                    self._large_chunks = False
                elif self.planner.responses.in_chunked:
                    # A CRLF and a size line: while the chunks are large, read little (the next chunk's
                    # data is spliced); once one was short, copy on.
                    size = LINE_CHUNK if self._large_chunks else COPY_CHUNK
                else:
                    size = HEAD_CHUNK
                    self._large_chunks = True
                data = self.app.recv(size)
                n = len(data)
                self._splicing = False
        except (BlockingIOError, InterruptedError):
            self._watch_read("app", True)
            return False
        except OSError as e:
            if e.errno in _AGAIN:
                self._watch_read("app", True)
                return False
            self._fail("app", e)
            return False
        if n == 0:
            self._down_eof = True
            self._watch_read("app", False)
            self._apply(self.planner.app_eof())
            if self.moving or self._move_bytes:
                self.keep("the application closed")
            return not self.closed
        if data:
            self._down += data
            self._apply(self.planner.app_data(data))
        else:
            self._piped += n
            self.spliced_down += n
            self._apply(self.planner.app_skipped(n))
        return not self.closed

    # -- the move ------------------------------------------------------------------------------
    def _maybe_move(self) -> None:
        """Every response before the held request is in the client socket: ask the front end."""
        if (self.closed or self.moving or not self._move_bytes or self._down or self._piped
                or not self.planner.moved):
            return
        self.moving = True
        log.debug("relay %s: moving at a response boundary (%d bytes held)", self.describe(), len(self._move_bytes))
        self.on_move(self)

    def frozen(self) -> bytes:
        """The front end froze the flow: the client socket's state with the held request in front (for
        Moved); the relay ends without FlowClosed. Raises OSError when the socket cannot be dumped (the
        client closed or reset it meanwhile): then call keep()."""
        state = repair.dump(self.client)
        data = state.with_unread(self._move_bytes).to_bytes()
        self.discarded = True
        for which in ("client", "app"):
            self._watch_read(which, False)
            self._watch_write(which, False)
        repair.discard(self.client)
        self.close()
        return data

    def keep(self, why: str) -> None:
        """The connection does not move. The held request is for another back end, so it never goes to this
        application: it is answered 503 and the connection closes (or, when the application has closed
        the connection after its last response, the client gets that close). Nothing held: the
        connection stays here, unframed."""
        if self.closed or self.planner.pinned is not None:
            return
        held, self._move_bytes = self._move_bytes, b""
        self.moving = False
        if held or self.planner.moved:
            if self._down_eof:
                log.info("relay %s: %s; the application closed: the request held for another back end "
                         "is dropped", self.describe(), why)
                self._up_done = True
                self._pump_down()
            else:
                self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, why)
            return
        self.planner.moved = self.planner.holding = False
        self.planner.pinned = why
        self.pinned = why
        log.info("relay %s stays here: %s", self.describe(), why)
        if held:
            self._up += held
            self._flush_up()
        self._watch_read("client", not self._up_eof)

    def _refuse(self, status: int, why: str) -> None:
        """At a response boundary: answer `status` instead of the request (every response before it is
        complete: the answer follows them in order), then close."""
        if self.closed or self.refused:
            return
        self.refused = int(status)
        log.info("relay %s: %s: answered %d and closed", self.describe(), why, status)
        self._watch_read("app", False)
        self._up_done = True
        self._pump_down()                 # writes what is read (copied, then piped), then the answer

    def _answer_refusal(self) -> None:
        """Everything read from the application is in the client socket: the refusal follows it."""
        self._refusal_sent = True
        self._down = refusal(self.refused)
        self._down_eof = True             # nothing more from the application: the client's side closes next

    # -- end -----------------------------------------------------------------------------------
    def _maybe_end(self) -> None:
        if not (self._up_done and self._down_done):
            return
        if self.refused and not self._up_eof and self._linger is None:
            # Read the client's unread bytes off until its FIN (or LINGER) before closing.
            self._linger = self.loop.call_later(LINGER, self.close)
            self._watch_read("client", False)
            self.loop.add_reader(self.client.fileno(), self._linger_read)
            self._reading["client"] = True
            return
        if self._linger is None:
            self.close()

    def _linger_read(self) -> None:
        try:
            data = self.client.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()

    def _fail(self, where: str, e: OSError) -> None:
        self.error = f"{where}: {e.strerror or e}"
        log.debug("relay %s ended: %s", self.describe(), self.error)
        self.close()

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        for which in ("client", "app"):
            self._watch_read(which, False)
            self._watch_write(which, False)
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        if self._rfd >= 0:
            put_pipe(self._rfd, self._wfd, empty=self._piped == 0)
        if self.discarded:
            close_sockets(self.app)       # the client socket was let go of by repair.discard
        else:
            close_sockets(self.client, self.app)
        if self.on_done is not None:
            self.on_done(self)
