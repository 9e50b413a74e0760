"""Reading the data-center counters of dc_client and dc_server (tests of -dc, in tests/distcache and
tests/redis): send SIGHUP, wait for the new Info line on stderr, parse it."""

from __future__ import annotations

import re
import signal

from tests.support import wait_until

_AGENT_LINE = re.compile(r"^Info, dc = (?P<dc>\S+), forwarded: (?P<dcs>.*?), servers: (?P<servers>.*?), "
                         r"unanswered \(no server\) = (?P<empty>\d+), returns to own dc = (?P<returns>\d+)$", re.M)
_SERVER_LINE = re.compile(r"^Info, total operations = +(?P<ops>\d+) .*, dc = (?P<dc>\S+)$", re.M)


def _after_sighup(proc, pattern: re.Pattern) -> re.Match:
    before = len(pattern.findall(proc.stderr()))
    proc.p.send_signal(signal.SIGHUP)
    return wait_until(lambda: (lambda ms: ms[-1] if len(ms) > before else None)(list(pattern.finditer(proc.stderr()))),
                      15, f"an Info line from {proc.name} after SIGHUP")


def agent_counters(proc) -> dict:
    """{'dc': {dc: ops}, 'server': {address: ops}, 'empty': n, 'returns': n} of a running dc_client."""
    m = _after_sighup(proc, _AGENT_LINE)
    per_dc = {k: int(v) for k, v in (item.split("=") for item in m["dcs"].split())}
    per_server = {}
    for item in m["servers"].split():
        addr, _, n = item.rpartition("=")
        per_server[addr[: addr.rindex("(")]] = int(n)
    return {"dc": per_dc, "server": per_server, "empty": int(m["empty"]), "returns": int(m["returns"])}


def server_ops(proc) -> tuple[int, str]:
    """(operations served, dc) of a running dc_server started with -dc."""
    m = _after_sighup(proc, _SERVER_LINE)
    return int(m["ops"]), m["dc"]
