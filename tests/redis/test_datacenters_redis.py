"""Data centers over one shared Redis: a dc_server in "east" and one in "west" on the
same Redis, a dc_client in each data center.  Sessions added through east's agent while east is up are
resumed (found) through the same agent after east's dc_server is killed -- served by west's dc_server,
as the counters show -- and the agent returns to east once east's dc_server is back."""

from __future__ import annotations

from tcpha.distcache.client import PERSISTENT, DistcacheClient, DistcacheError
from tests.distcache.dc_support import agent_counters, server_ops
from tests.distcache.dctools_support import procs, sockdir  # noqa: F401 (fixtures)
from tests.support import wait_until


def _get(address: str, sid: bytes) -> bytes | None:
    with DistcacheClient(address, 0, timeout=5) as c:
        return c.get(sid)


def test_sessions_survive_the_loss_of_a_data_center(redis_node, procs, sockdir):
    backend = f"redis://{redis_node.address}"
    dc_servers = {dc: procs.server(f"UNIX:{sockdir}/{dc}", "-backend", backend, "-dc", dc) for dc in ("east", "west")}
    servers = [f"UNIX:{sockdir}/west,dc=west", f"UNIX:{sockdir}/east,dc=east"]
    agents = {dc: procs.agent(f"UNIX:{sockdir}/agent-{dc}", *servers, args=("-dc", dc, "-retry", "100"))
              for dc in ("east", "west")}
    east, west = f"UNIX:{sockdir}/agent-east", f"UNIX:{sockdir}/agent-west"
    with DistcacheClient(east, PERSISTENT, timeout=5) as c:
        for i in range(50):
            assert c.add(b"sess-%d" % i, b"master-secret-%d" % i, 600000)
    with DistcacheClient(west, PERSISTENT, timeout=5) as c:
        for i in range(50):
            assert c.get(b"sess-%d" % i) == b"master-secret-%d" % i    # one store, read from west
    ce, cw = agent_counters(agents["east"]), agent_counters(agents["west"])
    assert ce["dc"] == {"east": ce["dc"]["east"], "west": 0} and ce["dc"]["east"] >= 50, ce
    assert cw["dc"] == {"east": 0, "west": cw["dc"]["west"]} and cw["dc"]["west"] >= 50, cw
    assert server_ops(dc_servers["east"]) == (ce["dc"]["east"], "east")
    assert server_ops(dc_servers["west"]) == (cw["dc"]["west"], "west")

    # East's dc_server dies: east's back ends still resume their sessions, through west.
    dc_servers["east"].p.kill()
    dc_servers["east"].p.wait(10)

    def resumed() -> bool:
        try:
            return _get(east, b"sess-0") == b"master-secret-0"
        except DistcacheError:
            return False
    wait_until(resumed, 15, "east's agent to resume a session through west")
    before = agent_counters(agents["east"])
    with DistcacheClient(east, PERSISTENT, timeout=5) as c:
        for i in range(50):
            assert c.get(b"sess-%d" % i) == b"master-secret-%d" % i
    after = agent_counters(agents["east"])
    assert after["dc"]["west"] - before["dc"]["west"] == 50 and after["dc"]["east"] == before["dc"]["east"]

    # East is back: the agent returns, and what was added meanwhile is there too.
    with DistcacheClient(east, 0, timeout=5) as c:
        assert c.add(b"added-in-outage", b"value-added-in-outage", 600000)
    dc_servers["east"] = procs.server(f"UNIX:{sockdir}/east", "-backend", backend, "-dc", "east")
    wait_until(lambda: agent_counters(agents["east"])["returns"] >= 1, 15, "east's agent to return to east")
    before = agent_counters(agents["east"])
    assert _get(east, b"added-in-outage") == b"value-added-in-outage"
    assert _get(east, b"sess-7") == b"master-secret-7"
    after = agent_counters(agents["east"])
    assert after["dc"]["east"] - before["dc"]["east"] == 2 and after["dc"]["west"] == before["dc"]["west"]
    assert server_ops(dc_servers["east"])[0] >= 2


def test_return_keeps_pipelined_requests_in_order(redis_node, procs, sockdir):
    """Each client writes ADD and GET of a new session in one go, without waiting.  Around the return
    from west to east the GET must never overtake its ADD (the agent holds new requests until west has
    answered everything it was sent): with one Redis behind both, every GET finds its session."""
    import socket
    import threading

    from tcpha.distcache.codec import Op, encode_add_payload
    from tests.distcache.dctools_support import read_responses, request

    backend = f"redis://{redis_node.address}"
    dc_servers = {dc: procs.server(f"UNIX:{sockdir}/{dc}", "-backend", backend, "-dc", dc) for dc in ("east", "west")}
    agent = procs.agent(f"UNIX:{sockdir}/agent-east", f"UNIX:{sockdir}/east,dc=east", f"UNIX:{sockdir}/west,dc=west",
                        args=("-dc", "east", "-retry", "100"))
    dc_servers["east"].p.kill()
    dc_servers["east"].p.wait(10)

    def on_west() -> bool:
        try:
            return _get(f"UNIX:{sockdir}/agent-east", b"probe") is None
        except DistcacheError:
            return False
    wait_until(on_west, 15, "the agent to fail over to west")
    stop = threading.Event()
    errors: list[str] = []
    counts = [0] * 4

    def load(n: int) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(f"{sockdir}/agent-east")
            i = 0
            while not stop.is_set():
                sid = b"pipelined-%d-%d" % (n, i)
                data = b"data-of-" + sid
                s.sendall(request(2 * i + 1, Op.ADD, encode_add_payload(sid, data, 600000))
                          + request(2 * i + 2, Op.GET, sid))
                add, get = read_responses(s, 2, timeout=10)
                if (add.uid, add.payload, get.uid, get.payload) != (2 * i + 1, b"\x00", 2 * i + 2, data):
                    errors.append(f"{sid!r}: ADD {add.payload!r}, GET {get.payload[:40]!r}")
                    return
                i += 1
                counts[n] = i
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(repr(exc))
        finally:
            s.close()

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(counts) or errors, 15, "the load to run")
        dc_servers["east"] = procs.server(f"UNIX:{sockdir}/east", "-backend", backend, "-dc", "east")
        wait_until(lambda: agent_counters(agent)["returns"] >= 1 or errors, 20, "the agent to return under load")
        start = list(counts)
        wait_until(lambda: all(c > s + 20 for c, s in zip(counts, start)) or errors, 20, "requests after the return")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    c = agent_counters(agent)
    assert c["returns"] == 1 and c["dc"]["west"] > 0 and c["dc"]["east"] > 0, c
