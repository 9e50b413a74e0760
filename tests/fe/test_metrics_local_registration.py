"""Metrics (point 10), the local node (point 5) and dynamic registration (point 4), through real daemons."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tcpha.lab.http import start_http
from tcpha.metrics import parse_exposition
from tests.deployment import fe_workers
from tests.support import wait_until

pytestmark = pytest.mark.netns

METRICS_PORT = 9109


def scrape(prod) -> dict:
    r = prod.lab.run("fe", ["curl", "-sf", f"http://127.0.0.1:{METRICS_PORT}/metrics"], capture_output=True,
                     text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return parse_exposition(r.stdout)


def value(samples: dict, name: str, **labels) -> float | None:
    want = tuple(sorted(labels.items()))
    for (n, ls), v in samples.items():
        if n == name and tuple(sorted(ls)) == want:
            return v
    return None


def test_metrics_are_off_by_default_and_scraped_when_on(prod):
    be1, be2 = f"{prod.lab.ip('be1')}:666", f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"metrics": f"127.0.0.1:{METRICS_PORT}",
                   "rules": prod.rules("{be1} jpg$", "{be2} ^/(?!private/)")})
    for _ in range(5):
        assert prod.dep.request("/img/logo.jpg").status == 200
    for _ in range(3):
        assert prod.dep.request("/index.html").status == 200
    assert prod.dep.request("/private/x").status == 503
    m = scrape(prod)
    assert value(m, "tcpha_fe_handoffs_total", backend=be1, rule="uri:jpg$", outcome="handed_off") >= 5
    assert value(m, "tcpha_fe_handoffs_total", backend=be2, rule="uri:^/(?!private/)", outcome="handed_off") >= 3
    assert value(m, "tcpha_fe_responses_total", status="503") == 1
    count = value(m, "tcpha_fe_handoff_latency_seconds_count")
    assert count >= 8
    assert value(m, "tcpha_fe_handoff_latency_seconds_bucket", le="+Inf") == count
    assert value(m, "tcpha_fe_handoff_latency_seconds_sum") > 0
    assert value(m, "tcpha_fe_backend_up", backend=be1) == 1
    assert value(m, "tcpha_fe_workers") == 1
    assert value(m, "tcpha_fe_active_flows") is not None
    # the same text is in the control directory
    assert "tcpha_fe_handoffs_total" in prod.fe_cat("metrics")


def test_metrics_off_by_default(prod):
    prod.start()
    r = prod.lab.run("fe", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            f"http://127.0.0.1:{METRICS_PORT}/metrics"], capture_output=True, text=True, timeout=10)
    assert r.stdout == "000"                       # nothing listens


def test_local_node_serves_unmatched_local_rules_and_all_down(prod):
    files = {"index.html": 512, "private/x": 100, "local/page.html": 300}
    start_http(prod.lab, "fe", port=8081, addr="127.0.0.1", files=files, name="localnode")
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"redirectaddr": "127.0.0.1", "redirectport": 8081, "dtcinterval": 1,
                   "rules": prod.rules("{be1} jpg$", "local ^/local/", "{be2} ^/(?!private/)")})
    r = prod.dep.request("/private/x")                 # no rule matches
    assert (r.status, r.backend) == (200, "fe")
    r = prod.dep.request("/local/page.html")            # a rule naming the local node
    assert (r.status, r.backend) == (200, "fe")
    assert len(r.body) == 300
    assert prod.dep.request("/index.html").backend == "be2"
    prod.dep.be_procs["be2"].send_signal(signal.SIGKILL)   # every back end its rules allow is down
    assert wait_until(lambda: any(b["name"] == be2 and b["status"] == "down"
                                  for b in prod.ctl_json("status")["backends"]), 5)
    r = prod.dep.request("/index.html")
    assert (r.status, r.backend) == (200, "fe")
    assert prod.dep.request("/img/logo.jpg").backend == "be1"


def _registered(prod, name):
    return [b for b in prod.ctl_json("status")["backends"] if b["name"] == name]


@pytest.mark.parametrize("order", ["fe-first", "be-first"])
def test_dynamic_registration(prod, order):
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.dep.files["dyn/a.html"] = 700
    fe = {"servers": [f"{prod.lab.ip('be1')} 666"], "rules": prod.rules("{be1} jpg$"), "registerport": 7000,
          "dtcinterval": 1}
    be = {"dregister": 1, "feaddr": prod.lab.ip("fe"), "feport": 7000, "rule": "^/dyn/", "registerretry": 0.5}
    prod.dep.start_origins()
    prod.start_backend("be1")
    if order == "fe-first":
        prod.start_fe(ready="/img/logo.jpg", **fe)
        assert prod.dep.request("/dyn/a.html").status == 503
        prod.start_backend("be2", **be)
    else:
        prod.start_backend("be2", **be)
        time.sleep(1.0)                                  # it retries while the front end is not there
        prod.start_fe(ready="/img/logo.jpg", **fe)
    assert wait_until(lambda: _registered(prod, be2), 10), (prod.fe_log()[-3000:],
                                                           prod.lab.log_path("be2", "tcpha-be").read_text()[-3000:])
    entry = _registered(prod, be2)[0]
    assert entry["dynamic"] is True
    r = wait_until(lambda: (lambda x: x if x.status == 200 else None)(prod.dep.request("/dyn/a.html")), 5)
    assert r and r.backend == "be2" and len(r.body) == 700
    assert prod.dep.request("/img/logo.jpg").backend == "be1"
    assert prod.dep.request("/index.html").status == 503   # only its own rules (^/dyn/) reach it; none match
    # the back end unloads: the front end removes it at once (Unregister)
    prod.lab.stop(prod.dep.be_procs.pop("be2"), grace=10)
    assert wait_until(lambda: not _registered(prod, be2), 5)
    assert prod.dep.request("/dyn/a.html").status == 503
    log = prod.fe_log()
    assert f"back end {be2} registered (" in log and f"back end {be2} removed: " in log, log[-3000:]


def test_registration_with_a_wrong_key_is_refused(prod):
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.dep.start_origins()
    prod.start_backend("be1")
    prod.start_fe(ready="/img/logo.jpg", servers=[f"{prod.lab.ip('be1')} 666"], rules=prod.rules("{be1} jpg$"),
                  registerport=7000)
    other = prod.dep.dir / "otherkey"
    other.write_text("ab" * 32 + "\n")
    other.chmod(0o600)
    prod.start_backend("be2", dregister=1, feaddr=prod.lab.ip("fe"), feport=7000, rule="^/dyn/",
                       registerretry=0.5, authkey=str(other))
    wait_until(lambda: f"registration from {prod.lab.ip('be2')} dropped: " in prod.fe_log(), 10,
               "the front end dropping the wrongly keyed registration")
    assert not _registered(prod, be2)


def test_control_channel_errors_are_counted(prod):
    be2 = f"{prod.lab.ip('be2')}:666"
    other = prod.dep.dir / "otherkey"
    other.write_text("cd" * 32 + "\n")
    other.chmod(0o600)
    prod.dep.start_origins()
    prod.start_backend("be1")
    prod.start_backend("be2", authkey=str(other))        # a back end with the wrong key
    prod.start_fe(ready="/img/logo.jpg", metrics=f"127.0.0.1:{METRICS_PORT}")
    assert wait_until(lambda: (value(scrape(prod), "tcpha_fe_control_errors_total", backend=be2) or 0) >= 1, 10)


def _register_by_hand(prod, host: str, register, vaddr: str | None = None):
    """From `host`'s namespace, one registration exchange with the running front end, written with the
    control codec by hand (so the test can send what a correct tcpha-be never would): Hello both ways,
    then `register`. Returns the front end's Registered, or None when it closed or reset the connection
    (it aborts a back end of another VIP: a reset when our Register is already on its way)."""
    from tcpha.config.loader import read_authkey
    from tcpha.control import messages as control
    from tcpha.control.protocol import ControlConnection

    key = read_authkey(str(prod.dep.key))
    fe_ip = prod.lab.ip("fe")

    def exchange():
        conn = ControlConnection(key, role="be")
        with socket.create_connection((fe_ip, 7000), timeout=10) as s:
            s.sendall(conn.send(control.Hello(node_id="test", addr=prod.lab.ip(host), port=666,
                                              vaddr=vaddr or prod.dep.vip)))
            sent = False
            while True:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:     # dropped with a reset (the front end aborts)
                    return None
                if not data:
                    return None
                for msg in conn.feed(data):
                    if isinstance(msg, control.Hello) and not sent:
                        s.sendall(conn.send(register))
                        sent = True
                    elif isinstance(msg, control.Registered):
                        return msg
    return prod.lab.call(host, exchange)


def test_registration_refusals(prod):
    """docs/operations.md, dynamic registration: the front end refuses an address that is not the
    connection's source, rules that do not compile, a static server's name, and a back end serving
    another VIP; each refusal is logged, answered (or the connection dropped, for the VIP) and changes
    nothing, and a correct registration from the same host is then accepted."""
    from tcpha.control import messages as control

    be1, be2 = prod.lab.ip("be1"), prod.lab.ip("be2")
    prod.dep.start_origins()
    prod.start_backend("be1")
    prod.start_fe(ready="/img/logo.jpg", servers=[f"{be1} 666"], rules=prod.rules("{be1} jpg$"),
                  registerport=7000)
    good_rules = (("uri", "^/dyn/"),)
    cases = [
        (control.Register(addr=be1, port=666, rules=good_rules), f"address {be1} is not the connection's source"),
        (control.Register(addr=be2, port=666, rules=(("uri", "^/dyn/("),)), "rule: "),
        (control.Register(addr=be2, port=666, rules=()), "no rules"),
    ]
    for register, why in cases:
        answer = _register_by_hand(prod, "be2", register)
        assert answer is not None and answer.accepted is False and why in answer.reason, (answer, why)
        assert f"registration of {register.addr}:666 refused: " in prod.fe_log()
    # A static server registering under its own name.
    answer = _register_by_hand(prod, "be1", control.Register(addr=be1, port=666, rules=good_rules))
    assert answer is not None and answer.accepted is False
    assert answer.reason == "already a static server of this front end"
    # Another VIP: dropped after the Hellos, never answered.
    assert _register_by_hand(prod, "be2", control.Register(addr=be2, port=666, rules=good_rules),
                             vaddr="10.99.99.99") is None
    assert f"registration from {be2} dropped: it serves VIP 10.99.99.99, not ours" in prod.fe_log()
    assert not _registered(prod, f"{be2}:666")
    assert [b["name"] for b in prod.ctl_json("status")["backends"]] == [f"{be1}:666"]
    # The same host, correctly: accepted (the refusals above left nothing behind that blocks it).
    answer = _register_by_hand(prod, "be2", control.Register(addr=be2, port=666, rules=good_rules))
    assert answer is not None and answer.accepted is True, answer
    assert f"back end {be2}:666 registered (1 rules: uri:^/dyn/)" in prod.fe_log()
    # ...and removed again when that connection closed (the exchange above closes it).
    wait_until(lambda: f"back end {be2}:666 removed: " in prod.fe_log(), 10, "the closed registration removed")
    assert not _registered(prod, f"{be2}:666")


def _handed_off(samples: dict) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == "tcpha_fe_handoffs_total" and ("outcome", "handed_off") in ls)


def test_counters_keep_a_dead_workers_counts(prod):
    """docs/operations.md, metrics: the control plane keeps the last counts of a worker that died, so a
    counter never goes backwards when a worker is killed and replaced; the replacement adds its own."""
    prod.start(fe={"metrics": f"127.0.0.1:{METRICS_PORT}", "startservers": 3, "minspareservers": 1,
                   "maxspareservers": 5})
    assert wait_until(lambda: len(fe_workers(prod)) == 3, 10)
    base = _handed_off(scrape(prod))
    for _ in range(30):
        assert prod.dep.request("/index.html").status == 200
    counted = _handed_off(scrape(prod))
    assert counted == base + 30
    for victim in fe_workers(prod)[:2]:                    # two of three: at least one of them served some
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in fe_workers(prod), 10, f"worker {victim} gone")
    assert _handed_off(scrape(prod)) == counted            # nothing lost with them
    for _ in range(10):
        assert prod.dep.request("/index.html").status == 200
    # a replacement worker's counts join once its link to the control plane is up (it may serve first)
    assert wait_until(lambda: _handed_off(scrape(prod)) == counted + 10, 10), _handed_off(scrape(prod))
