"""Whether a request on a keep-alive connection stays on this back end: the front end's rules, as sent in
its `Rules` message, matched against the request head the way tcpha.fe.rules.RuleTable matches them.

The back end may not import the front end (tests/test_layering.py), and it needs only the plain-HTTP half
of the table: uri rules (re.search on the normalised target, or on its path alone) and host rules (on the
Host, case-insensitive; "" when absent). sni and alpn rules never match plain HTTP and are not sent.
First match wins: a request stays when the first rule it matches names this back end; a request no rule
matches stays too (the front end would answer it 503, and the back end that has it can do better).
"""

from __future__ import annotations

import re
from typing import Iterable

from .http import RequestHead

__all__ = ["StayRules"]


class StayRules:
    """Compiled once per `Rules` message; :meth:`stays` runs per request."""

    def __init__(self, rules: Iterable[tuple[str, str]], here: bytes) -> None:
        compiled = []
        for (field, pattern), mine in zip(rules, here):
            if field == "uri":
                compiled.append((True, re.compile(pattern.encode("utf-8")).search, bool(mine)))
            elif field == "host":
                compiled.append((False, re.compile(pattern.encode("utf-8"), re.IGNORECASE).search, bool(mine)))
            else:
                raise ValueError(f"rule field {field!r} cannot match a plain HTTP request")
        self._compiled = tuple(compiled)

    def __len__(self) -> int:
        return len(self._compiled)

    def stays(self, head: RequestHead) -> bool:
        uri = head.target or head.uri
        path = head.path if head.path else uri
        host = head.host if head.host is not None else b""
        both = path != uri
        for is_uri, search, mine in self._compiled:
            if is_uri:
                if search(uri) is None and not (both and search(path) is not None):
                    continue
            elif search(host) is None:
                continue
            return mine
        return True
