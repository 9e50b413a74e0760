"""The request-smuggling and rule-evasion corpus against the parser and the rule table: every case is either
refused with its fixed status or parsed to the fixed host and normalised path; the lab's rules then send it
where the corpus says (the same cases run through nginx back ends in tests/e2e/test_request_parsing.py)."""

from __future__ import annotations

import pytest

from tcpha.config.loader import compile_rule
from tcpha.fe.rules import RequestFacts, RuleTable
from tcpha.sniff.http import HeadError, RequestHead, parse_request_head
from tests.sniff.smuggling_corpus import CASES

MAX = 16384
LAB_RULES = RuleTable([compile_rule("be1", "uri", "jpg$", 1), compile_rule("be1", "host", r"^img\.", 2),
                       compile_rule("be2", "uri", "^/(?!private/)", 3)])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case_is_refused_or_parsed_as_written(case):
    if isinstance(case.parsed, int):
        with pytest.raises(HeadError) as info:
            parse_request_head(case.raw, MAX)
        assert info.value.status == case.parsed, info.value
        return
    head = parse_request_head(case.raw, MAX)
    assert isinstance(head, RequestHead), head
    assert (head.host, head.path) == case.parsed
    candidates = LAB_RULES.candidates(RequestFacts.from_request_head(head))
    assert (candidates[0] if candidates else 503) == case.lab
