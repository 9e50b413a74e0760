"""tcpha.fe.rules: file order, first match, fallbacks, and which field each rule kind sees on HTTP and on TLS."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from types import SimpleNamespace

import pytest

from tcpha.config.loader import RuleSpec, compile_rule
from tcpha.fe.rules import RequestFacts, RuleTable
from tcpha.sniff.http import parse_request_head
from tcpha.sniff.tls import parse_client_hello


def rule(target: str, text: str, lineno: int = 1) -> RuleSpec:
    """A rule as a config line's ``[FIELD:]REGEX`` is compiled: tcpha.config's own compile_rule."""
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("uri", "host", "sni", "alpn"):
        return compile_rule(target, prefix, rest, lineno)
    return compile_rule(target, "uri", text, lineno)


def table(*lines: tuple[str, str]) -> RuleTable:
    return RuleTable([rule(t, p, i + 1) for i, (t, p) in enumerate(lines)])


def http(uri: bytes, host: bytes | None = b"www.example.com") -> RequestFacts:
    return RequestFacts(uri=uri, host=host, sni=None, alpn=[])


def tls(sni: str | None, alpn: list[str] | None = None) -> RequestFacts:
    return RequestFacts(uri=None, host=None, sni=sni, alpn=alpn or [])


TCPHA = table(("img", "jpg$"), ("img", "gif$"), ("dyn", r"\.php"), ("all", ".*"))


# -- TCPHA semantics ---------------------------------------------------------------------------------------------------

def test_first_match_then_fallbacks_in_file_order():
    assert TCPHA.candidates(http(b"/photos/a.jpg")) == ["img", "all"]
    assert TCPHA.candidates(http(b"/index.php?id=3")) == ["dyn", "all"]
    assert TCPHA.candidates(http(b"/")) == ["all"]


def test_targets_deduplicated_keep_first_position():
    t = table(("b", "^/x"), ("a", "x"), ("b", ".*"), ("a", ".*"), ("c", ".*"))
    assert t.candidates(http(b"/x")) == ["b", "a", "c"]


def test_no_match_is_empty():
    assert table(("img", "jpg$")).candidates(http(b"/a.png")) == []
    assert RuleTable([]).candidates(http(b"/")) == []


def test_search_not_match_semantics():
    assert table(("a", "images")).candidates(http(b"/static/images/x")) == ["a"]
    assert table(("a", "^images")).candidates(http(b"/static/images/x")) == []


def test_uri_rule_matches_path_or_full_target():
    t = table(("img", "jpg$"), ("q", r"\?id="), ("exact", "^/a$"))
    assert t.candidates(http(b"/a.jpg?v=2")) == ["img"]          # path ends in jpg
    assert t.candidates(http(b"/p?id=7")) == ["q"]               # only the full target has the query
    assert t.candidates(http(b"/a?x")) == ["exact"]
    assert t.candidates(http(b"/a.jpgx")) == []


def test_uri_rules_are_case_sensitive():
    assert table(("img", "jpg$")).candidates(http(b"/A.JPG")) == []


def test_path_given_by_facts_is_used():
    facts = RequestFacts(uri=b"http://h/a.jpg?x", host=b"h", sni=None, alpn=[], path=b"/a.jpg")
    assert table(("img", "^/a.jpg$")).candidates(facts) == ["img"]
    # and derived from an absolute-form uri when not given
    assert table(("img", "^/a.jpg$")).candidates(http(b"http://h/a.jpg?x")) == ["img"]


# -- host, sni, alpn ----------------------------------------------------------------------------------------------------

MIXED = table(("shop", r"host:^shop\.example\.com$"), ("api", "sni:^api\\."), ("h2", "alpn:^h2$"),
              ("img", "jpg$"), ("nosni", "sni:^$"), ("anyhttp", ".*"))


def test_http_sees_uri_and_host_rules_only():
    assert MIXED.candidates(http(b"/a.jpg", b"shop.example.com")) == ["shop", "img", "anyhttp"]
    assert MIXED.candidates(http(b"/", b"api.example.com")) == ["anyhttp"]     # sni rule never matches HTTP


def test_tls_sees_host_sni_alpn_rules_only():
    assert MIXED.candidates(tls("shop.example.com", ["http/1.1"])) == ["shop"]  # host rules see the SNI
    assert MIXED.candidates(tls("api.example.com", ["h2", "http/1.1"])) == ["api", "h2"]
    assert MIXED.candidates(tls("other.example")) == []                        # uri rules (.*) never match TLS


def test_sni_less_and_unreadable_hello_match_empty_string():
    assert MIXED.candidates(tls(None)) == ["nosni"]
    assert MIXED.candidates(RequestFacts.from_client_hello(None)) == ["nosni"]
    assert table(("d", "sni:.*")).candidates(tls(None)) == ["d"]
    assert table(("d", "host:^$")).candidates(tls(None)) == ["d"]


def test_http10_without_host_matches_empty_host():
    assert table(("a", "host:^$")).candidates(http(b"/", None)) == ["a"]
    assert table(("a", "host:.")).candidates(http(b"/", None)) == []


def test_alpn_any_offered_protocol_and_none():
    t = table(("h2", "alpn:^h2$"), ("none", "alpn:^$"))
    assert t.candidates(tls("x", ["http/1.1", "h2"])) == ["h2"]
    assert t.candidates(tls("x", [])) == ["none"]
    assert t.candidates(tls("x", ["http/1.1"])) == []


def test_host_and_sni_rules_case_insensitive_as_compiled():
    assert table(("a", "host:^WWW\\.Example\\.com$")).candidates(http(b"/", b"www.example.com")) == ["a"]
    assert table(("a", "sni:EXAMPLE")).candidates(tls("www.example.com")) == ["a"]


def test_non_latin1_text_does_not_crash():
    assert table(("a", "sni:.")).candidates(tls("\u2603.example")) == ["a"]


# -- real parsed inputs, real config --------------------------------------------------------------------------------------

def test_facts_from_parsed_head_and_hello(real_hellos):
    head = parse_request_head(b"GET /img/a.jpg?x=1 HTTP/1.1\r\nHost: Shop.Example.com:80\r\n\r\n", 16384)
    facts = RequestFacts.from_request_head(head)
    assert MIXED.candidates(facts) == ["shop", "img", "anyhttp"]
    hello = parse_client_hello(real_hellos["py-sni-alpn"], 16384)
    assert MIXED.candidates(RequestFacts.from_client_hello(hello)) == ["h2"]
    nosni = parse_client_hello(real_hellos["py-nosni"], 16384)
    assert MIXED.candidates(RequestFacts.from_client_hello(nosni)) == ["nosni"]


def load_rules(tmp_path, body: str) -> list:
    """The rules of a tcphafe.conf made of `body` (servers and rules), loaded by tcpha.config."""
    from tcpha.config import ConfigError, load_fe_config
    key = tmp_path / "authkey"
    key.write_text("0123456789abcdef" * 4 + "\n")
    key.chmod(0o600)
    path = tmp_path / "tcphafe.conf"
    path.write_text(f"vaddr = 10.77.0.100\nauthkey = {key}\n" + textwrap.dedent(body))
    try:
        return load_fe_config(str(path)).rules
    except ConfigError as e:  # pragma: no cover - a config-side change; say what it was
        pytest.fail(f"sample config refused: {e}")


def test_with_tcpha_config_loader(tmp_path):
    rules = load_rules(tmp_path, """\
        server = 10.77.0.11 666
        server = 10.77.0.12 666
        rule = 10.77.0.11 jpg$
        rule = 10.77.0.12 host:^API\\.
        rule = 10.77.0.12 sni:^$
        rule = 10.77.0.11 .*
        """)
    t = RuleTable(rules)
    be1, be2 = rules[0].target, rules[1].target
    assert be1 != be2
    assert t.candidates(http(b"/x.jpg?v=1", b"api.example.com")) == [be1, be2]
    assert t.candidates(http(b"/x", b"api.example.com")) == [be2, be1]
    assert t.candidates(tls("api.example.com")) == [be2]
    assert t.candidates(tls(None)) == [be2]
    assert t.candidates(tls("www.example.com")) == []


def test_matching_rules_for_logs():
    matched = MIXED.matching_rules(http(b"/a.jpg", b"shop.example.com"))
    assert [r.lineno for r in matched] == [1, 4, 6]


def test_str_pattern_recompiled_as_bytes():
    r = SimpleNamespace(target="a", field="uri", pattern="jpg$", regex=re.compile("jpg$"), lineno=1)
    assert RuleTable([r]).candidates(http(b"/a.jpg")) == ["a"]


def test_unknown_field_refused():
    with pytest.raises(ValueError, match="line 7"):
        RuleTable([RuleSpec("a", "cookie", "x", re.compile(b"x"), 7)])


# -- what uri rules see of a parsed request: the normalised path -------------------------------

ISSUE = table(("BE2", r"\.jpg$"), ("BE1", ".*"))


def route(target: bytes, host: bytes = b"www.example.com") -> list[str]:
    head = parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 16384)
    return ISSUE.candidates(RequestFacts.from_request_head(head))


@pytest.mark.parametrize("target", [b"/a.jpg", b"/a%2Ejpg", b"/a%2ejpg", b"/a.jp%67", b"/x/../a.jpg",
                                    b"/x/%2E%2E/a.jpg", b"/./a.jpg", b"//a.jpg", b"/a.jpg?v=2",
                                    b"http://www.example.com/x/../a%2Ejpg?v=2"])
def test_encoded_and_dotted_paths_match_as_the_server_resolves_them(target):
    assert route(target) == ["BE2", "BE1"]


@pytest.mark.parametrize("target", [b"/a.jpg%3F", b"/a.jpg/", b"/a.jpg/..", b"/a.jpg/x/..", b"/a%252Ejpg",
                                    b"/a.jpg;v=1"])
def test_paths_the_server_does_not_resolve_to_a_jpg_do_not_match(target):
    # /a.jpg/.. is "/", /a%252Ejpg is the file "a%2Ejpg": decoded once, as nginx does
    assert route(target) == ["BE1"]


def test_query_is_matched_as_sent():
    assert table(("q", r"\?id=%41"), ("p", "^/p$")).candidates(
        RequestFacts.from_request_head(parse_request_head(b"GET /p?id=%41 HTTP/1.1\r\nHost: h\r\n\r\n", 99)))\
        == ["q", "p"]


# -- pools: a rule naming several back ends (tcpha.fe.balance splits them by weight) -------------------

def pool_rules(targets: tuple, text: str, lineno: int) -> list:
    """The RuleSpecs of one ``rule = A,B,... REGEX`` line: one per member, each naming the whole pool."""
    return [dataclasses.replace(rule(t, text, lineno), pool=targets) for t in targets]


def test_pool_candidates_and_spans():
    t = RuleTable(pool_rules(("a", "b"), "jpg$", 1) + [rule("c", ".*", 2)] + pool_rules(("c", "d", "e"), ".*", 3))
    assert t.candidates_with_pools(http(b"/x.jpg")) == (["a", "b", "c", "d", "e"],
                                                         [(0, 2, ("a", "b")), (3, 5, ("c", "d", "e"))])
    assert t.candidates(http(b"/x.jpg")) == ["a", "b", "c", "d", "e"]
    # separate rules stay an ordered fallback list, never a pool
    assert t.candidates_with_pools(http(b"/x.html")) == (["c", "d", "e"], [(1, 3, ("c", "d", "e"))])
    plain = table(("a", "jpg$"), ("b", "jpg$"))
    assert plain.pools == {} and plain.candidates_with_pools(http(b"/x.jpg")) == (["a", "b"], [])


def test_smooth_wrr_is_smooth_follows_weights_and_skips_weight_zero():
    from tcpha.fe.balance import SmoothWRR
    wrr = SmoothWRR()
    weights = {"a": 3, "b": 1}
    assert "".join(wrr.pick(("a", "b"), weights.get) for _ in range(8)) == "aabaaaba"
    weights.update(a=1, b=3)
    picks = "".join(wrr.pick(("a", "b"), weights.get) for _ in range(400))
    assert abs(picks.count("b") - 300) <= 2
    weights["b"] = 0
    assert {wrr.pick(("a", "b"), weights.get) for _ in range(10)} == {"a"}
    assert wrr.order(["a", "b"], {"a": 0, "b": 0}.get) == ["a", "b"]         # nobody in service: as written
    assert wrr.order(["a", "b", "c"], {"a": 0, "b": 0, "c": 5}.get) == ["c", "a", "b"]


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (5, 2, 1), (256, 1, 7)])
def test_smooth_wrr_prefix_stays_within_one_pick_of_the_share(weights):
    from tcpha.fe.balance import SmoothWRR
    names = tuple("abcdefgh"[: len(weights)])
    weight_of = dict(zip(names, weights)).get
    wrr, counts, total = SmoothWRR(), dict.fromkeys(names, 0), sum(weights)
    for n in range(1, 3 * total + 1):
        counts[wrr.pick(names, weight_of)] += 1
        for name, w in zip(names, weights):
            assert abs(counts[name] - n * w / total) < 1 + 1e-9 * n, (n, counts)


def test_pool_line_from_a_config_file(tmp_path):
    t = RuleTable(load_rules(tmp_path, """\
        server = 10.77.0.11 666 weight=3
        server = 10.77.0.12 666
        server = 10.77.0.13 666
        rule = 10.77.0.11,10.77.0.12 \\.jpg$
        rule = 10.77.0.13 .*
        """))
    a, b, c = "10.77.0.11:666", "10.77.0.12:666", "10.77.0.13:666"
    facts = RequestFacts.from_request_head(parse_request_head(b"GET /x/../a%2Ejpg HTTP/1.0\r\n\r\n", 99))
    assert t.candidates_with_pools(facts) == ([a, b, c], [(0, 2, (a, b))])
    assert t.candidates_with_pools(http(b"/a.png")) == ([c], [])
