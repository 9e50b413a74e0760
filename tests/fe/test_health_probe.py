"""The health prober's control connection to a back end, on loopback against a fake back end that speaks
the control protocol (no root, no namespace)."""

from __future__ import annotations

import asyncio
import os

from tcpha.control import messages
from tcpha.control.protocol import ControlConnection
from tcpha.fe.health import PROBE_LINGER, CheckTarget, HealthProber, HealthTable

KEY = os.urandom(32)


class FakeBackEnd:
    """Answers the front end's Hello; when the front end half-closes, sends what a back end may still have
    on its way (a FlowClosed for an orphaned flow), then closes, and records how its reading ended."""

    def __init__(self, last_words: list):
        self.last_words = last_words
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ControlConnection(KEY, role="be")
        try:
            while True:
                data = await reader.read(65536)
                if not data:                       # the front end's FIN
                    for msg in self.last_words:
                        writer.write(conn.send(msg))
                    await writer.drain()
                    # an RST answering those frames shows up here as a reset instead of a second EOF
                    await asyncio.sleep(0)
                    writer.close()
                    self.ended.set_result("eof")
                    return
                for msg in conn.feed(data):
                    if isinstance(msg, messages.Hello):
                        writer.write(conn.send(messages.Hello(node_id="fake be", port=666)))
        except ConnectionError as e:
            self.ended.set_result(type(e).__name__)


def test_a_flow_closed_sent_while_the_probe_closes_is_read_not_reset():
    """Closing the prober (front end stopping or upgraded, back end removed) half-closes each probe and
    reads on: a FlowClosed the back end sends at that moment reaches on_flow_closed. Aborting the
    connection instead made the kernel answer it with RST (TCPAbortOnData) and lost the report."""
    async def main():
        flow = messages.FlowClosed(client_ip="10.0.0.2", client_port=40000, vip="10.0.0.100", vport=80,
                                   xid=7)
        fake = FakeBackEnd([flow])
        server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        got: list = []
        prober = HealthProber(HealthTable(), key=KEY, raddr="127.0.0.1", vip="10.0.0.100", interval=0,
                              timeout=5, on_flow_closed=got.append)
        target = CheckTarget(name=f"127.0.0.1:{port}", kind="tcp", host="127.0.0.1", port=port)
        probe = await prober._probe(target)
        assert probe.hello.node_id == "fake be"
        gone = prober.remove(target.name)
        assert await asyncio.wait_for(fake.ended, 5) == "eof"
        assert gone is not None
        await asyncio.wait_for(gone, PROBE_LINGER + 5)
        assert probe.lost and got == [flow]
        server.close()
        await server.wait_closed()
    asyncio.run(main())


def test_a_back_end_that_never_closes_is_cut_after_the_linger():
    """A back end that keeps the connection open after the front end's FIN does not hold the front end's
    stop: the probe is aborted after PROBE_LINGER."""
    async def main():
        held: list = []

        async def silent(reader, writer):
            conn = ControlConnection(KEY, role="be")
            held.append(writer)
            while True:
                data = await reader.read(65536)
                if not data:
                    await asyncio.sleep(3600)      # never closes
                for msg in conn.feed(data):
                    if isinstance(msg, messages.Hello):
                        writer.write(conn.send(messages.Hello(node_id="silent be", port=666)))

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        prober = HealthProber(HealthTable(), key=KEY, raddr="127.0.0.1", vip="10.0.0.100", interval=0,
                              timeout=5)
        target = CheckTarget(name=f"127.0.0.1:{port}", kind="tcp", host="127.0.0.1", port=port)
        probe = await prober._probe(target)
        prober._tasks[target.name] = asyncio.ensure_future(asyncio.sleep(3600))   # as add() would
        gone = prober.close()
        assert len(gone) == 1
        await asyncio.wait_for(gone[0], PROBE_LINGER + 5)
        assert probe.lost
        for w in held:
            w.close()
        server.close()
    asyncio.run(main())
