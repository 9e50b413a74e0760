"""The back end's relay for a connection that may move between requests (`rehandoff = on` on the front end).

Both directions go through userspace: the client's bytes through tcpha.sniff.framing.RehandoffPlanner,
which passes each request that stays (tcpha.sniff.rulecheck) to the application and holds the first one
that goes elsewhere; the application's bytes are shown to the same planner (response framing) and written
to the client. When every response before the held request is complete and written into the client socket,
`on_move(relay)` asks the front end to freeze the flow (MoveAsk); `frozen()` then dumps the client socket
with the held bytes put back in front of its receive queue (tcpha.repair.TcpState.with_unread), lets go of
it without FIN or RST and returns the state for `Moved`. `keep()` is the answer when the move cannot happen
(MoveRefused, no answer, the client closed meanwhile): the held request goes to this application after all.

The same interface as tcpha.relay.SpliceRelay (start/release/close, bytes_up/bytes_down, closed, error,
describe, client) so that tcpha.be.handoff treats it as any relay. See docs/kernel.md, "Moving a keep-alive
connection".
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from tcpha import repair
from tcpha.relay import close_sockets, peer_text
from tcpha.sniff.framing import Plan, RehandoffPlanner
from tcpha.sniff.http import RequestHead

log = logging.getLogger("tcpha.be.rehandoff")

CHUNK = 256 * 1024


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
        self._reading = {"client": False, "app": False}
        self._writing = {"client": False, "app": False}
        self.bytes_up = 0
        self.bytes_down = 0
        self.pinned: str | None = None

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
            self.loop.add_reader(sock.fileno(), self._client_readable if which == "client" else self._app_readable)
        else:
            self.loop.remove_reader(sock.fileno())
        self._reading[which] = on

    def _watch_write(self, which: str, on: bool) -> None:
        if self.closed or on == self._writing[which]:
            return
        sock = self.client if which == "client" else self.app
        if on:
            self.loop.add_writer(sock.fileno(), self._flush_up if which == "app" else self._flush_down)
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
    def _app_readable(self) -> None:
        if self.closed:
            return
        try:
            data = self.app.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._fail("app", e)
        if not data:
            self._down_eof = True
            self._watch_read("app", False)
            self._apply(self.planner.app_eof())
            if self.moving or self._move_bytes:
                self.keep("the application closed")
            self._flush_down()
            return
        self._down += data
        self._apply(self.planner.app_data(data))
        self._flush_down()

    def _flush_down(self) -> None:
        if self.closed:
            return
        try:
            while self._down:
                n = self.client.send(self._down)
                self._down = self._down[n:]
                self.bytes_down += n
        except (BlockingIOError, InterruptedError):
            self._watch_write("client", True)
            self._watch_read("app", False)
            return
        except OSError as e:
            return self._fail("app->client", e)
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
        self._watch_read("app", True)
        self._maybe_move()

    # -- the move ------------------------------------------------------------------------------
    def _maybe_move(self) -> None:
        """Every response before the held request is in the client socket: ask the front end."""
        if self.closed or self.moving or not self._move_bytes or self._down or not self.planner.moved:
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
        """The connection does not move: the held request goes to this application."""
        if self.closed or self.planner.pinned is not None:
            return
        held, self._move_bytes = self._move_bytes, b""
        self.moving = False
        self.planner.moved = self.planner.holding = False
        self.planner.pinned = why
        self.pinned = why
        log.info("relay %s stays here: %s", self.describe(), why)
        if held:
            self._up += held
            self._flush_up()
        self._watch_read("client", not self._up_eof)

    # -- end -----------------------------------------------------------------------------------
    def _maybe_end(self) -> None:
        if self._up_done and self._down_done:
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
        if self.discarded:
            close_sockets(self.app)       # the client socket was let go of by repair.discard
        else:
            close_sockets(self.client, self.app)
        if self.on_done is not None:
            self.on_done(self)
