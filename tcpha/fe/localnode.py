"""The local node: what no back end takes is served by the application at redirectaddr:redirectport
on the front end's own host, by relaying (splice, as on a back end): the request bytes the front end
only peeked are still in the socket and reach the application first.

Used for connections that match no rule, whose matching back ends are all down or draining, and
for rules naming the front end itself (``rule = local REGEX`` or its own address). Without a local
node (redirectaddr 0.0.0.0) those connections get 503 as before.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from tcpha.config import LOCAL_TARGET as LOCAL
from tcpha.relay import SpliceRelay

log = logging.getLogger("tcpha.fe.localnode")


def serve_locally(worker: Any, d: Any) -> bool:
    """Relay Dispatch `d` to the local application; False when there is none or it cannot be reached."""
    node = worker.config.local_node
    if node is None:
        return False
    app = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        app.settimeout(0.5)     # an application on this host: connected at once, or refused at once
        app.connect(node)
    except OSError as e:
        app.close()
        log.warning("%s:%d: local node %s:%d unreachable: %s", d.peer[0], d.peer[1], node[0], node[1],
                    e.strerror or e)
        return False
    app.setblocking(False)
    app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if d.lowat != 1:
        d._set_lowat(1)
    key = (d.peer[0], d.peer[1], d.lport)
    ledger = worker.ledger

    def done(relay: Any) -> None:
        ledger.local_closed(key)

    relay = SpliceRelay(worker.loop, d.sock, app, done)
    relay.start()
    d.finished = True
    ledger.handed_off(d, LOCAL, target=LOCAL, outcome="local", relay=relay)
    worker.dispatch_done(d)
    return True
