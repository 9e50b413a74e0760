"""End to end through nginx back ends: the front end's parser and rules against the request-smuggling and
rule-evasion corpus (tests/sniff/smuggling_corpus.py), and empty lines before the request-line.

Every case is either refused by the front end with its fixed status, or answered by the back end the corpus
names; and then nginx's access log on that back end must show the host and path the front end routed on
(nginx's $host and $uri re-matched through the same rules give that back end): the front end and the server
agree on what was asked for, so no request reaches a pool its path or host does not belong to.
"""

from __future__ import annotations

import pytest

from tcpha.config.loader import compile_rule
from tcpha.fe.rules import RequestFacts, RuleTable
from tests.e2e.conftest import lab_rules
from tests.e2e.test_handoff import header, raw_exchange, status_of
from tests.sniff.smuggling_corpus import CASES, get
from tests.support import wait_until

pytestmark = pytest.mark.netns

# tests/e2e/conftest.py RULES_BE1_BE2, named by back end for re-matching nginx's view of a request
RULES = RuleTable([compile_rule("be1", "uri", "jpg$", 1), compile_rule("be1", "host", r"^img\.", 2),
                   compile_rule("be2", "uri", "^/(?!private/)", 3)])


READY_PATH = "/whoami"       # what LabDeployment.wait_fe_ready asks for


@pytest.fixture(scope="module")
def logged(lab_module):
    """tcpha-fe + tcpha-be + nginx origins that log each request's $host and $uri."""
    from tcpha.lab.demo import LabDeployment
    dep = LabDeployment(lab_module, origin_access_log=True)
    dep.start(fe={"rules": lab_rules(lab_module)})
    yield dep


def entries(dep) -> dict[str, list[dict]]:
    """Each origin's access log entries, without the deployment's readiness requests (/whoami: one that
    timed out under load can still be logged late, after a case has counted the entries before it)."""
    return {name: [e for e in origin.access_entries() if e.get("uri") != READY_PATH]
            for name, origin in dep.origins.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_is_refused_or_served_by_the_host_and_path_nginx_uses(logged, case):
    dep = logged
    before = sum(map(len, entries(dep).values()))     # stable: each earlier request was logged before its FIN
    raw = raw_exchange(dep, case.raw)
    assert raw, f"{case.name}: connection closed without an answer"
    status = status_of(raw)
    if not isinstance(case.lab, str):
        # refused (or matched by no rule) by the front end itself, which kept the connection: no back end saw it
        assert (status, header(raw, b"server")) == (case.lab, b"tcpha-fe"), raw[:300]
        assert header(raw, b"x-tcpha-backend") is None
        return
    backend = header(raw, b"x-tcpha-backend")
    assert backend == case.lab.encode(), raw[:300]
    logs = wait_until(lambda: (lambda e: e if sum(map(len, e.values())) > before else None)(entries(dep)),
                      timeout=10, what=f"nginx access log entry for {case.name}")
    assert sum(map(len, logs.values())) == before + 1, f"one request, several log entries: {logs}"
    entry = logs[case.lab][-1]
    assert entry["status"] == status
    host, path = case.parsed
    # nginx resolved the same path (and host) the front end matched the rules on ...
    assert entry["uri"].encode("latin-1") == path, entry
    if host is not None:
        assert entry["host"].encode("latin-1") == host, entry
    # ... and nginx's view of the request, through the same rules, names the back end that served it
    uri = entry["uri"] + ("?" + entry["args"] if entry["args"] else "")
    facts = RequestFacts(uri=uri.encode("latin-1"), host=entry["host"].encode("latin-1"), sni=None,
                         path=entry["uri"].encode("latin-1"))
    assert RULES.candidates(facts)[:1] == [case.lab], entry


@pytest.mark.parametrize("kind", ["python", "nginx"])
def test_empty_lines_before_the_request_line_reach_any_server_as_a_plain_request(fresh, kind):
    """RFC 9112 2.2: a server SHOULD ignore empty lines before the request-line; Python's http.server does
    not (it closes without a byte). The front end reads them off before the handoff, so the back end's server
    gets a request that starts with its request-line, whatever it is."""
    dep = fresh
    dep.origin_kind = kind
    dep.start(fe={"rules": lab_rules(dep.lab)})
    for prefix in (b"\r\n", b"\n", b"\r\n\r\n\n"):
        raw = raw_exchange(dep, prefix + get(b"/img/logo.jpg"))
        assert raw, f"{kind}: no answer to a request after {prefix!r}"
        assert (status_of(raw), header(raw, b"x-tcpha-backend")) == (200, b"be1"), raw[:200]
        assert raw.endswith(dep.origins["be1"].expected("img/logo.jpg"))
