"""Data centers: dc_client -dc NAME prefers the dc_servers of its own data center
(-server ADDR,dc=NAME), fails over to the other data center when all of its own are down, and returns
when one of them is back; counters on SIGHUP show where every operation went.

Two "data centers" of real dc_server processes on UNIX sockets, each with the embedded store: each
dc_server has its own data, so these tests prove the routing (which server served what, from both
sides' counters), not that sessions survive the loss of a data center -- that needs a store shared by
both data centers (tests/redis/test_datacenters_redis.py).
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from dctools_support import procs, sockdir, wait_until  # noqa: E402,F401

from tcpha.distcache.client import PERSISTENT, DistcacheClient, DistcacheError  # noqa: E402
from tests.distcache.dc_support import agent_counters, server_ops  # noqa: E402


def _two_dcs(procs, sockdir, retry: str = "100"):
    servers = {name: procs.server(f"UNIX:{sockdir}/{name}", "-dc", name[:4])
               for name in ("east1", "east2", "west1", "west2")}
    # Listed interleaved, the foreign ones first: the agent must still take its own data center's first.
    server_args = [f"UNIX:{sockdir}/{n},dc={n[:4]}" for n in ("west1", "east1", "west2", "east2")]
    agents = {dc: procs.agent(f"UNIX:{sockdir}/agent-{dc}", *server_args, args=("-dc", dc, "-retry", retry))
              for dc in ("east", "west")}
    return servers, agents


def _ops(address: str, prefix: bytes, count: int) -> None:
    """count ADD+GET pairs, each answered by a server (a DistcacheError fails the test)."""
    with DistcacheClient(address, PERSISTENT, timeout=5) as c:
        for i in range(count):
            sid = prefix + b"-%d" % i
            assert c.add(sid, b"data-" + sid, 60000)
            assert c.get(sid) == b"data-" + sid


def _works(address: str, sid: bytes) -> bool:
    try:
        with DistcacheClient(address, 0, timeout=5) as c:
            return c.add(sid, b"x", 60000)
    except DistcacheError:
        return False


def test_no_operation_leaves_its_data_center_and_failover_comes_back(procs, sockdir):
    servers, agents = _two_dcs(procs, sockdir)
    east, west = f"UNIX:{sockdir}/agent-east", f"UNIX:{sockdir}/agent-west"
    _ops(east, b"e", 100)
    _ops(west, b"w", 100)

    # Both data centers up: every operation of each agent stayed in its data center, on its first
    # primary server, and the servers' own counters agree.
    ce, cw = agent_counters(agents["east"]), agent_counters(agents["west"])
    assert ce["dc"]["west"] == 0 and ce["dc"]["east"] >= 200, ce
    assert cw["dc"]["east"] == 0 and cw["dc"]["west"] >= 200, cw
    assert server_ops(servers["east1"]) == (ce["server"][f"UNIX:{sockdir}/east1"], "east")
    assert server_ops(servers["west1"]) == (cw["server"][f"UNIX:{sockdir}/west1"], "west")
    assert server_ops(servers["east2"])[0] == 0 and server_ops(servers["west2"])[0] == 0

    # East's servers killed: east's agent goes on through west's servers.
    for name in ("east1", "east2"):
        servers[name].p.kill()
        servers[name].p.wait(10)
    wait_until(lambda: _works(east, b"after-kill"), 15, "east's agent to fail over to west")
    before = agent_counters(agents["east"])
    _ops(east, b"e2", 50)
    during = agent_counters(agents["east"])
    assert during["dc"]["west"] - before["dc"]["west"] == 100, during
    assert during["dc"]["east"] == before["dc"]["east"]
    # The embedded store: a session added in east before the kill is not in west's store.
    with DistcacheClient(east, 0, timeout=5) as c:
        assert c.get(b"e-0") is None

    # East is back: the agent returns (in the background, within -retry) and uses east again.
    servers["east1"] = procs.server(f"UNIX:{sockdir}/east1", "-dc", "east")
    wait_until(lambda: agent_counters(agents["east"])["returns"] >= 1, 15, "east's agent to return to east")
    before = agent_counters(agents["east"])
    _ops(east, b"e3", 50)
    after = agent_counters(agents["east"])
    assert after["dc"]["west"] == before["dc"]["west"], after
    assert after["server"][f"UNIX:{sockdir}/east1"] - before["server"][f"UNIX:{sockdir}/east1"] == 100
    with DistcacheClient(east, 0, timeout=5) as c:
        assert c.get(b"e3-0") == b"data-e3-0"      # served by east1, which holds it
    # West's agent never left west.
    assert agent_counters(agents["west"])["dc"]["east"] == 0


def test_return_to_own_data_center_under_load_loses_nothing(procs, sockdir):
    """Clients keep sending while the agent moves back from west to east: every request gets a real
    answer (no [2], no empty 'no server' answer) and each client's answers stay in order."""
    servers, agents = _two_dcs(procs, sockdir, retry="200")
    east = f"UNIX:{sockdir}/agent-east"
    for name in ("east1", "east2"):
        servers[name].p.kill()
        servers[name].p.wait(10)
    wait_until(lambda: _works(east, b"after-kill"), 15, "east's agent to fail over to west")
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = [0] * 4

    def load(n: int) -> None:
        try:
            with DistcacheClient(east, PERSISTENT, timeout=10) as c:
                i = 0
                while not stop.is_set():
                    sid = b"load-%d-%d" % (n, i)
                    assert c.add(sid, b"v" + sid, 60000), sid
                    # ADD and GET of one session may go to different data centers around the
                    # return (separate stores here): GET answers data or "absent", never an error.
                    c.get(sid)
                    i += 1
                    counts[n] = i
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(counts), 15, "the load to run")
        # (Requests made while the agent was between servers after the kill were answered empty.)
        before = agent_counters(agents["east"])
        servers["east1"] = procs.server(f"UNIX:{sockdir}/east1", "-dc", "east")
        wait_until(lambda: agent_counters(agents["east"])["returns"] >= 1, 20, "the agent to return under load")
        start = list(counts)
        wait_until(lambda: all(c > s + 20 for c, s in zip(counts, start)) or errors, 20,
                   "more requests after the return")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    c = agent_counters(agents["east"])
    assert c["empty"] == before["empty"] and c["dc"]["west"] > before["dc"]["west"] > 0, (before, c)
    assert c["server"][f"UNIX:{sockdir}/east1"] > 0 and c["returns"] == 1, c


def test_counters_line_at_exit(procs, sockdir):
    """Without -dc too: the last line of a stopped dc_client says where its operations went."""
    procs.server(f"UNIX:{sockdir}/s")
    agent = procs.agent(f"UNIX:{sockdir}/a", f"UNIX:{sockdir}/s")
    _ops(f"UNIX:{sockdir}/a", b"x", 5)
    agent.stop()
    assert agent.p.returncode == 0
    last = agent.stderr().splitlines()[-1]
    assert last.startswith("Info, dc = -, forwarded: -=")
    assert f"servers: UNIX:{sockdir}/s(-)=" in last and int(last.split("forwarded: -=")[1].split(",")[0]) >= 10


def test_server_dc_syntax_errors(procs, sockdir):
    r = procs.run("tcpha.cli.dc_client", "-listen", f"UNIX:{sockdir}/a", "-server", f"UNIX:{sockdir}/s,dc=",
                  "-dc", "east")
    assert (r.returncode, r.stderr) == (1, "Error, -server given an invalid argument\n")
    r = procs.run("tcpha.cli.dc_client", "-dc", "no/slash", "-server", f"UNIX:{sockdir}/s")
    assert r.returncode == 1 and r.stderr.startswith("Error, -dc given an invalid argument\n")
    r = procs.run("tcpha.cli.dc_server", "-listen", f"UNIX:{sockdir}/s", "-dc", "a b")
    assert r.returncode == 1 and r.stderr.startswith("Error, --dc given an invalid argument\n")


@pytest.mark.parametrize("tool", ["dc_client", "dc_server"])
def test_help_is_still_the_originals(procs, tool):
    """-dc is an extension: -h stays the original's text (compared in test_transcripts.py)."""
    assert "-dc" not in procs.run(f"tcpha.cli.{tool}", "-h").stderr
