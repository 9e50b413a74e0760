"""tcpha.sockdiag.destroy, called as the back end calls it: from inside its running asyncio loop."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from tcpha import sockdiag

pytestmark = pytest.mark.root


def _pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    return lsock, client, server


def test_destroy_from_inside_a_running_event_loop_resets_the_socket():
    """pyroute2's synchronous sockets run an event loop of their own; from the back end's loop that
    raised "This event loop is already running" and the handoff of a client reusing its port failed."""
    lsock, client, server = _pair()
    try:
        local, peer = server.getsockname()[:2], server.getpeername()[:2]

        async def in_the_loop() -> bool:
            return sockdiag.destroy(local, peer)
        assert asyncio.run(in_the_loop()) is True
        with pytest.raises(OSError) as info:            # the destroyed socket reports the abort
            server.recv(1)
        assert info.value.errno == errno.ECONNABORTED
    finally:
        for s in (client, server, lsock):
            s.close()
