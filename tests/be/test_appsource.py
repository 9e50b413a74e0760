"""tcpha.be.appsource in a lab namespace (root): the routing policy of transparent application connections,
installed once, replaced after a kill -9, removed at stop; the start-up check choosing the mode; a client
port already in use towards the application falling back to our own address, counted; and tcpha-be's
start-up line saying which mode is in use and why."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tcpha.be.appsource import APPSOURCE_MARK, APPSOURCE_TABLE, AppSource, AppSourceError
from tcpha.lab.demo import APP_PORT, LabDeployment
from tcpha.lab.http import start_http
from tests.support import wait_until

pytestmark = pytest.mark.netns


def _ours(lab, host: str) -> tuple[int, int]:
    """(our fwmark rules, routes in our table) in host's namespace."""
    def count() -> tuple[int, int]:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            rules = [r for r in ipr.get_rules(family=socket.AF_INET)
                     if r.get_attr("FRA_TABLE") == APPSOURCE_TABLE and r.get_attr("FRA_FWMARK") == APPSOURCE_MARK]
            routes = [r for r in ipr.get_routes(family=socket.AF_INET, table=APPSOURCE_TABLE)
                      if r.get_attr("RTA_TABLE") == APPSOURCE_TABLE]
        return len(rules), len(routes)
    return lab.call(host, count)


def test_policy_installed_replaced_after_a_crash_and_removed(lab):
    before = lab.sysctl("be1", "net.ipv4.tcp_fwmark_accept")
    assert before == "0"
    first = lab.call("be1", AppSource.start, "auto", ("127.0.0.1", APP_PORT))
    assert first.mode == "transparent", first.reason
    assert _ours(lab, "be1") == (1, 1)
    assert lab.sysctl("be1", "net.ipv4.tcp_fwmark_accept") == "1"
    # A second process over what a killed one left (first is never stopped): replaced, not doubled.
    second = lab.call("be1", AppSource.start, "transparent", ("127.0.0.1", APP_PORT))
    assert second.policy is not None and second.policy.replaced == 2
    assert _ours(lab, "be1") == (1, 1)
    lab.call("be1", second.stop)
    assert _ours(lab, "be1") == (0, 0)


def test_auto_falls_back_to_local_when_transparent_cannot_work_and_transparent_refuses(lab):
    remote = lab.ip("be2")      # an application on another host: its replies could not come back
    chosen = lab.call("be1", AppSource.start, "auto", (remote, APP_PORT))
    assert chosen.mode == "local" and "not an address of this host" in chosen.reason
    assert _ours(lab, "be1") == (0, 0)          # nothing left behind by the failed check
    with pytest.raises(AppSourceError, match="appsource = transparent: .*not an address of this host"):
        lab.call("be1", AppSource.start, "transparent", (remote, APP_PORT))
    assert lab.call("be1", AppSource.start, "local", (remote, APP_PORT)).mode == "local"


def test_client_port_in_use_towards_the_application_falls_back_counted(lab):
    """The client is connected to the application (on the back end's LAN address) from port P; the
    connection handed off from P is made from our own address instead of landing in the client's."""
    start_http(lab, "be1", port=APP_PORT)
    app = (lab.ip("be1"), APP_PORT)
    source = lab.call("be1", AppSource.start, "transparent", app)
    try:
        direct = lab.socket("client")
        direct.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        direct.bind((lab.ip("client"), 0))
        direct.settimeout(5)
        direct.connect(app)
        client = (lab.ip("client"), direct.getsockname()[1])

        def connect(c):
            sock, rc = source.connect(c, app)
            if rc:
                sock.settimeout(5)
                sock.connect(app)           # EINPROGRESS: finish it
            return sock

        taken = lab.call("be1", connect, client)
        assert taken.getsockname()[0] == lab.ip("be1") and source.fallbacks == 1
        free = lab.call("be1", connect, (lab.ip("client"), client[1] + 1 if client[1] < 65535 else 1024))
        assert free.getsockname()[0] == lab.ip("client") and source.fallbacks == 1
        for s in (direct, taken, free):
            s.close()
    finally:
        lab.call("be1", source.stop)


def test_daemon_says_which_mode_and_survives_kill_9(lab):
    dep = LabDeployment(lab)
    dep.start_origins()
    dep.start_backend("be1")                       # the default: appsource = auto
    wait_until(lambda: "application connections from the client's address" in lab.log_tail("be1", "tcpha-be", 50),
               timeout=15, what="the start-up line saying transparent")
    assert "a transparent connect succeeded at start" in lab.log_tail("be1", "tcpha-be", 50)
    assert _ours(lab, "be1") == (1, 1)
    os.kill(dep.be_procs["be1"].pid, signal.SIGKILL)
    dep.be_procs["be1"].wait(10)
    assert _ours(lab, "be1") == (1, 1)             # left behind by the killed process
    dep.start_backend("be1")
    wait_until(lambda: "rules/routes of an earlier process replaced" in lab.log_tail("be1", "tcpha-be", 50),
               timeout=15, what="the restart replacing the killed process's policy")
    assert _ours(lab, "be1") == (1, 1)
    assert lab.stop(dep.be_procs.pop("be1"), grace=15) == 0
    assert _ours(lab, "be1") == (0, 0)


def test_fallbacks_are_exported_for_prometheus():
    from tcpha.metrics import backend_exposition
    text = backend_exposition(handoffs=0, refused=0, fdpassed=0, control_errors=0, relayed=0, front_ends=0,
                              registered=None, appsource_fallbacks=3)
    assert "\ntcpha_be_appsource_fallbacks_total 3\n" in text


def test_the_loopback_check_is_made_once_per_application_address(monkeypatch):
    """Whether the application's address is in 127/8 (no socket lookup needed) is worked out once per
    address, not per connection; outside 127/8 every connection asks the kernel, and only a connection
    of the client's own on that 4-tuple (not TIME_WAIT, not a listener) counts as a clash."""
    import types

    import tcpha.be.appsource as appsource

    parsed: list[str] = []

    def ip_address(text: str):
        parsed.append(text)
        return __import__("ipaddress").ip_address(text)

    monkeypatch.setattr(appsource, "ipaddress", types.SimpleNamespace(ip_address=ip_address))

    class Lookup:
        def __init__(self):
            self.asked: list[tuple] = []
            self.states = [1, 6, None, 10]      # ESTABLISHED, TIME_WAIT, none, LISTEN

        def state(self, local, remote):
            self.asked.append((local, remote))
            return self.states[len(self.asked) - 1]

        def close(self):
            pass

    source = AppSource("transparent", "a test")
    source._lookup = lookup = Lookup()
    for port in range(40000, 40004):
        assert source._app_connected_to(("192.0.2.7", port), ("127.0.0.1", APP_PORT)) is False
    assert parsed == ["127.0.0.1"] and lookup.asked == []
    clashes = [source._app_connected_to(("192.0.2.7", port), ("10.88.0.2", APP_PORT)) for port in range(4)]
    assert clashes == [True, False, False, False]
    assert parsed == ["127.0.0.1", "10.88.0.2"] and len(lookup.asked) == 4
