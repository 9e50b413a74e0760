"""How a client that is uploading at the moment of its handoff gets going again on the back end.

While the front end dumps the connection and waits for the back end's Restored, the client's packets
are dropped in the front end's kernel (the freeze, docs/kernel.md). Whatever the client sends then is
lost and comes again only when its retransmission timer fires, doubled for every retry that met the
freeze. So the back end must not invite the client to send before the flow is steered to it (no
window probe, no window update from reading the restored socket), and must prompt it once it is.

Measured in events from captures in the client's and the back end's namespaces, not in durations:
- the back end's window probe (the prompt) is answered by the client, and that answer reaches the back
  end (it was sent after the steering; a probe sent at restore time has its answer dropped);
- every segment the client sent after that prompt reached the back end as it was sent (a client invited
  to send into the freeze loses it there and sends it again only after its retransmission timeout).
"""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from tests.capture import FrameCapture, window_probes

pytestmark = pytest.mark.netns

MASK = 0xFFFFFFFF


def read_all(sock, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        b = sock.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


@pytest.mark.parametrize("first_part", [0, 1 << 20])
def test_upload_at_handoff_is_prompted_after_steering_and_loses_nothing_to_the_freeze(fresh, first_part):
    dep = fresh
    dep.origin_kind = "python"
    dep.start(fe={"rules": [f"{dep.lab.ip('be2')} ^/"]})
    body = hashlib.shake_256(b"upload").digest(10 * 1024 * 1024)
    head = (f"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    at_client = FrameCapture(dep.lab, "client")
    at_backend = FrameCapture(dep.lab, "be2")
    try:
        s = dep.connect(timeout=60)
        port = s.getsockname()[1]
        try:
            s.sendall(head + body[:first_part])
            sender = threading.Thread(target=s.sendall, args=(body[first_part:],))
            sender.start()
            raw = read_all(s, timeout=60)
            sender.join()
        finally:
            s.close()
    finally:
        at_client.stop()
        at_backend.stop()
    answer = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["backend"] == "be2"

    assert at_client.drops == 0 and at_backend.drops == 0, "the captures lost frames: nothing can be judged"
    cip, vip = dep.lab.ip("client"), dep.vip
    segs = [g for g in at_client.segments() if port in (g.sport, g.dport)]
    probes = window_probes(segs, vip, 80)
    assert probes, "the back end sent no window probe: the client was never prompted"
    prompt = probes[0]
    # The client's answer to the prompt: its first segment after it, acknowledging up to the probe.
    reply = next((g for g in segs if g.at >= prompt.at and g.src == cip and g.ack == (prompt.seq + 1) & MASK), None)
    assert reply is not None, "the client did not answer the back end's window probe"
    at_be = {(g.seq, g.ack, g.flags, g.length) for g in at_backend.segments() if g.src == cip and g.sport == port}
    assert (reply.seq, reply.ack, reply.flags, reply.length) in at_be, (
        "the client's answer to the back end's first window probe never reached the back end: the probe "
        "was sent before the flow was steered there")
    # Every segment the client sent after the prompt reached the back end as sent (the same IP id), not
    # only later as a retransmission: nothing went into the freeze. (Retransmissions as such are not
    # counted: a receiver slowed down by a busy machine draws spurious tail-loss probes.)
    reached = {(g.seq, g.ip_id) for g in at_backend.segments() if g.src == cip and g.sport == port and g.length}
    lost = [g for g in segs if g.src == cip and g.length and g.at > prompt.at and (g.seq, g.ip_id) not in reached]
    assert lost == [], (f"{len(lost)} segments ({sum(g.length for g in lost)} bytes) the client sent after the "
                        "back end's prompt never reached the back end: they went into the freeze")
