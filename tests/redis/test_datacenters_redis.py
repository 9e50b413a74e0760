"""Data centers over one shared Redis (issue 12, part 1): a dc_server in "east" and one in "west" on the
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
