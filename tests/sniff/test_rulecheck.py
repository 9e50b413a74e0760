"""tcpha.sniff.rulecheck: a back end's "does this request stay here" agrees with the front end's rule table
(tcpha.fe.rules.RuleTable: the first candidate) for every request head."""

from __future__ import annotations

import itertools
import re

from tcpha.config.loader import RuleSpec
from tcpha.fe.rules import RequestFacts, RuleTable
from tcpha.sniff.http import parse_request_head
from tcpha.sniff.rulecheck import StayRules

BE1, BE2 = "10.77.0.11", "10.77.0.12"
RULES = [RuleSpec(BE1, "uri", r"jpg$", re.compile(rb"jpg$"), 1),
         RuleSpec(BE1, "host", r"^img\.", re.compile(rb"^img\.", re.IGNORECASE), 2),
         RuleSpec(BE2, "uri", r"\?id=", re.compile(rb"\?id="), 3),
         RuleSpec(BE2, "uri", r"^/(?!private/)", re.compile(rb"^/(?!private/)"), 4),
         RuleSpec(BE1, "uri", r"^/private/", re.compile(rb"^/private/"), 5)]
TARGETS = [b"/a.jpg", b"/a.jpg?v=2", b"/x/../b%2Ejpg", b"/index.html", b"/p?id=3", b"/private/a", b"/private/a.jpg",
           b"/img/logo.png", b"http://img.example/a.html"]
HOSTS = [b"www.example", b"IMG.example", b"img.example:8080"]


def head(target: bytes, host: bytes):
    h = parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 16384)
    assert not isinstance(h, type), target
    return h


def test_stays_exactly_when_the_front_end_would_choose_this_back_end_first():
    table = RuleTable(RULES)
    for me in (BE1, BE2):
        rules = StayRules([(r.field, r.pattern) for r in RULES], bytes(1 if r.target == me else 0 for r in RULES))
        for target, host in itertools.product(TARGETS, HOSTS):
            h = head(target, host)
            first = table.candidates(RequestFacts.from_request_head(h))[:1]
            assert rules.stays(h) == (first == [me]), (me, target, host, first)


def test_no_rule_matching_stays_and_tls_fields_are_refused():
    rules = StayRules([("uri", r"jpg$")], b"\x00")
    assert rules.stays(head(b"/index.html", b"a")) and not rules.stays(head(b"/a.jpg", b"a"))
    try:
        StayRules([("sni", r".")], b"\x01")
    except ValueError as e:
        assert "sni" in str(e)
    else:
        raise AssertionError("an sni rule was accepted")


def test_a_rules_own_rehandoff_decides_whether_its_requests_move():
    """The front end's Rules message (tcpha.fe.worker.Worker.rules_message) with per-rule ``rehandoff=``:
    a request stays on a back end its rule does not name only when that rule does not move connections;
    with no rule that moves, the message is empty and the back end never looks."""
    from dataclasses import replace
    from types import SimpleNamespace

    from tcpha.fe.worker import Worker

    def message(overall: str, own: list[str], me: str):
        rules = [replace(r, rehandoff=o) for r, o in zip(RULES, own)]
        backends = {BE1: object(), BE2: object()}
        w = SimpleNamespace(config=SimpleNamespace(rehandoff=overall), rules=RuleTable(rules), backends=backends)
        w.rule_moves = lambda rule: Worker.rule_moves(w, rule)
        w.rehandoff = Worker._any_rule_moves(w)
        return Worker.rules_message(w, backends[me])

    jpg, index = head(b"/a.jpg", b"www.example"), head(b"/index.html", b"www.example")
    everything = ["", "", "", "", ""]
    assert message("off", everything, BE1).rules == ()                     # nothing moves: not sent
    msg = message("on", everything, BE2)                                     # all move
    assert not StayRules(msg.rules, msg.here).stays(jpg) and StayRules(msg.rules, msg.here).stays(index)
    msg = message("on", ["off", "", "", "", ""], BE2)                        # the jpg rule does not move
    assert StayRules(msg.rules, msg.here).stays(jpg)
    msg = message("on", ["off", "", "", "", ""], BE1)                        # ... the others still do
    assert not StayRules(msg.rules, msg.here).stays(index)
    msg = message("off", ["on", "", "", "", ""], BE2)                        # only the jpg rule moves
    assert not StayRules(msg.rules, msg.here).stays(jpg)
    msg = message("off", ["on", "", "", "", ""], BE1)
    assert StayRules(msg.rules, msg.here).stays(index)
