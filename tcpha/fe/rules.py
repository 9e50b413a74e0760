"""The front end's rule table: which back ends may take a connection, best first.

``rule = ADDR REGEX`` lines (TCPHA) and their field forms ``host:REGEX``, ``sni:REGEX``, ``alpn:REGEX`` are tried
in file order with ``re.search`` semantics (``jpg$``, ``.*``). :meth:`RuleTable.candidates` returns the targets of
*every* matching rule, in file order, each once: the first is where the connection goes (first match wins), the
others are the fallbacks the front end tries when a back end refuses, times out or is down.

What each field is matched against (docs/rules.md has the operator's version):

=========  ==============================================  ==================================================
field      plain HTTP connection                           TLS connection (routed before the handshake)
=========  ==============================================  ==================================================
uri        the request-target as sent, query included —    never (the URI is encrypted)
           or its path alone (a rule matches if its regex
           is found in either; see below)
host       Host header (lower case, no port), ``""`` if    the SNI, ``""`` if absent or unreadable
           absent (HTTP/1.0)
sni        never (there is no SNI)                         the SNI, ``""`` if absent or unreadable
alpn       never                                           each offered protocol (matches if any matches);
                                                           ``""`` if the client offered none
=========  ==============================================  ==================================================

Why a uri rule is tried on both the full target and its path: TCPHA matched the request URI, so patterns like
``\\?id=`` keep working, while ``jpg$`` — the pattern every TCPHA sample uses — also catches ``/a.jpg?v=2``, as an
operator used to nginx ``location`` or HAProxy ``path_end`` expects. Both forms carry the *normalised* path
(percent-decoded, ``//`` merged, dot-segments removed: what nginx serves, tcpha.sniff.http.normalise_path), so
``/a%2Ejpg`` and ``/x/../a.jpg`` match ``jpg$``; the query is matched as sent.

Why host rules see the SNI on TLS connections: the SNI *is* the host name the client asked for, and the Host
header is encrypted; so a ``host:^shop\\.`` rule routes both http:// and https:// traffic to the same pool.
``sni:`` rules apply to TLS only.

Absent data is the empty string, so ``sni:^$`` (or ``sni:.*``) is the default rule for TLS clients that sent no
SNI, and for ClientHellos the front end could not read (malformed, truncated, longer than ``peekmax``).
Host and SNI rules are compiled case-insensitive by tcpha.config (DNS names are, RFC 4343).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tcpha.sniff.http import target_path

if TYPE_CHECKING:
    from tcpha.sniff.http import RequestHead
    from tcpha.sniff.tls import ClientHello

__all__ = ["RequestFacts", "RuleTable", "RuleLike"]


class RuleLike(Protocol):
    """What the table needs of a rule: tcpha.config.RuleSpec has these attributes."""
    target: str
    field: str
    pattern: str
    regex: re.Pattern[bytes]
    lineno: int


@dataclass(slots=True)
class RequestFacts:
    """What the front end learnt from the peeked bytes. ``uri is None`` means a TLS connection."""
    uri: bytes | None
    host: bytes | None
    sni: str | None
    alpn: list[str] = field(default_factory=list)
    path: bytes | None = None   # uri without the query; derived from uri when not given
    leading: int = 0            # HTTP: bytes of empty lines before the request-line, dropped before a handoff

    @property
    def tls(self) -> bool:
        return self.uri is None

    @classmethod
    def from_request_head(cls, head: RequestHead) -> RequestFacts:
        """Facts of a plain HTTP request: uri rules see the normalised path (and query as sent), see
        tcpha.sniff.http.normalise_path; the request itself is handed on unchanged."""
        return cls(uri=head.target or head.uri, host=head.host, sni=None, alpn=[], path=head.path,
                   leading=head.leading)

    @classmethod
    def from_client_hello(cls, hello: ClientHello | None) -> RequestFacts:
        """Facts of a TLS connection; ``None`` for a ClientHello that could not be read (malformed, truncated,
        too long): such a connection is routed like one without SNI and ALPN."""
        if hello is None:
            return cls(uri=None, host=None, sni=None, alpn=[])
        return cls(uri=None, host=None, sni=hello.sni, alpn=list(hello.alpn))


_URI, _HOST, _SNI, _ALPN = range(4)
_FIELD_CODES = {"uri": _URI, "host": _HOST, "sni": _SNI, "alpn": _ALPN}


def _text_bytes(text: str) -> bytes:
    """SNI / ALPN strings back to the bytes the client sent (the TLS sniffer decodes them as latin-1)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


class RuleTable:
    """Rules in file order, compiled once; :meth:`candidates` runs per connection."""

    def __init__(self, rules: list[RuleLike]) -> None:
        self.rules = list(rules)
        compiled = []
        for rule in self.rules:
            code = _FIELD_CODES.get(rule.field)
            if code is None:
                raise ValueError(f"line {rule.lineno}: unknown rule field {rule.field!r}")
            regex = rule.regex
            if isinstance(regex.pattern, str):  # a str pattern cannot search bytes: recompile it as bytes
                regex = re.compile(regex.pattern.encode("utf-8"), regex.flags & ~re.UNICODE)
            compiled.append((code, regex.search, rule.target))
        self._compiled = tuple(compiled)
        # Which fields can match at all, so candidates() skips work when, e.g., every rule is a uri rule.
        self._fields = frozenset(code for code, _, _ in compiled)
        self._singles: list[RuleTable] | None = None
        # Pools (``rule = ADDR,ADDR REGEX``): the first target of each pool rule -> the pool, in order.
        # Its targets are consecutive entries (one RuleSpec each), so candidates() keeps them together.
        self.pools: dict[int, tuple[str, ...]] = {}
        for index, rule in enumerate(self.rules):
            pool = tuple(getattr(rule, "pool", ()) or ())
            if len(pool) > 1 and tuple(r.target for r in self.rules[index:index + len(pool)]) == pool \
                    and all(getattr(r, "pool", ()) == pool for r in self.rules[index:index + len(pool)]):
                self.pools[index] = pool

    def __len__(self) -> int:
        return len(self.rules)

    def candidates(self, facts: RequestFacts) -> list[str]:
        """Targets of the matching rules in file order, each once; ``[]`` when no rule matches."""
        if self.pools:
            return self.candidates_with_pools(facts)[0]
        out: list[str] = []
        if facts.uri is not None:
            # Plain HTTP: uri and host rules.
            uri = facts.uri
            path = facts.path if facts.path is not None else target_path(uri)
            host = facts.host if facts.host is not None else b""
            both = path != uri
            for code, search, target in self._compiled:
                if target in out:
                    continue  # already a candidate: no need to evaluate its regex again
                if code == _URI:
                    if search(uri) is None and not (both and search(path) is not None):
                        continue
                elif code == _HOST:
                    if search(host) is None:
                        continue
                else:
                    continue  # sni / alpn rules never match plain HTTP
                out.append(target)
            return out
        # TLS: host and sni rules see the SNI, alpn rules the offered protocols; uri rules never match.
        sni = _text_bytes(facts.sni) if facts.sni is not None else b""
        if _ALPN in self._fields:
            alpn = [_text_bytes(p) for p in facts.alpn] or [b""]
        else:
            alpn = []
        for code, search, target in self._compiled:
            if target in out:
                continue
            if code == _SNI or code == _HOST:
                if search(sni) is None:
                    continue
            elif code == _ALPN:
                for protocol in alpn:
                    if search(protocol) is not None:
                        break
                else:
                    continue
            else:
                continue
            out.append(target)
        return out

    def candidates_with_pools(self, facts: RequestFacts) -> tuple[list[str], list[tuple[int, int, tuple[str, ...]]]]:
        """candidates(), plus where the matching pool rules sit in it: (start, end, pool) for each pool rule
        that contributed two or more candidates (members an earlier rule already named are not repeated,
        so a span may be shorter than its pool). Without pools in the table: (candidates(facts), [])."""
        if not self.pools:
            return self.candidates(facts), []
        if self._singles is None:
            self._singles = [RuleTable([rule]) for rule in self.rules]
        out: list[str] = []
        spans: list[tuple[int, int, tuple[str, ...]]] = []
        index = 0
        rules = self.rules
        while index < len(rules):
            pool = self.pools.get(index)
            if pool is None:
                target = rules[index].target
                if target not in out and self._singles[index].candidates(facts):
                    out.append(target)
                index += 1
                continue
            # one pool rule: its members are entries index .. index+len(pool)-1, same field and regex
            if self._singles[index].candidates(facts):
                start = len(out)
                out.extend(t for t in pool if t not in out)
                if len(out) - start > 1:
                    spans.append((start, len(out), pool))
            index += len(pool)
        return out, spans

    def matching_rules(self, facts: RequestFacts) -> list[RuleLike]:
        """Every rule that matches, in file order, duplicates included (for logs and ``--check`` tools)."""
        if self._singles is None:
            self._singles = [RuleTable([rule]) for rule in self.rules]
        return [rule for rule, single in zip(self.rules, self._singles) if single.candidates(facts)]
