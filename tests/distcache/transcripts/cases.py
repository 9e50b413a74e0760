"""The command lines whose observable output (stdout, stderr, exit status) must be those of the
original C distcache tools.  Shared by record.py (runs the original and writes the transcripts) and
tests/distcache/test_transcripts.py (runs ours and compares byte for byte).

``{tmp}`` in an argument stands for a fresh empty directory of each run; it is written back as
``{tmp}`` in the recorded output.  Every case ends by itself (an option error, -h, an address
that cannot be used): none starts a server.  Where we differ from the original on purpose
(docs/distcache.md, "Differences from the original"), the case is not here or its difference
is in DELIBERATE, with the reason.
"""

from __future__ import annotations

TOOLS = ("dc_server", "dc_client", "dc_test", "dc_snoop")

_HELP = [["-h"], ["-help"], ["-?"], ["--help"], ["-h", "-bogus"], ["-bogus"], ["bogus"], ["-"], []]

_SERVER = _HELP + [
    ["-listen"], ["-sessions"], ["-progress"], ["-pidfile"], ["-user"], ["-sockowner"],
    ["-sockgroup"], ["-sockperms"],
    ["-sessions", "0"], ["-sessions", "abc"], ["-sessions", "-1"], ["-sessions", "60001"],
    ["-sessions", "100000"], ["-sessions", "63", "-listen"],
    ["-progress", "1000001"], ["-progress", "-1"], ["-progress", "x"],
    ["-daemon"], ["-killable"], ["-sessions", "64"], ["-sessions", "0", "-listen", "UNIX:{tmp}/s"],
    ["-listen", "FOO:bar"], ["-listen", "IP:nonexistent.invalid:1"], ["-listen", "IP:99999"],
    ["-listen", "UNIX:{tmp}/no/such/dir/s"], ["-listen", "IP:1:2:3"], ["-listen", ""],
    ["-listen", "UNIX:{tmp}/s", "-bogus"], ["-listen", "UNIX:{tmp}/s", "-sessions", "0"],
    ["-listen", "IP:nonexistent.invalid:1", "-sessions", "1"],
    ["-listen", "IP:nonexistent.invalid:1", "-sessions", "63"],
    ["-killable", "-listen", "FOO:bar"],
    ["-listen", "UNIX:{tmp}/s", "-progress", "2000000"],
]

_CLIENT = _HELP + [
    ["-listen"], ["-server"], ["-connect"], ["-retry"], ["-idle"], ["-pidfile"], ["-user"],
    ["-sockowner"], ["-sockgroup"], ["-sockperms"],
    ["-retry", "0"], ["-retry", "abc"], ["-retry", "3600001"], ["-retry", "10x"], ["-retry", "-5"],
    ["-idle", "3600001"], ["-idle", "abc"], ["-idle", "-1"],
    ["-daemon"], ["-killable"], ["-listen", "UNIX:{tmp}/c"],
    ["-server", "IP:nonexistent.invalid:1", "-listen"],
    ["-server", "FOO:bar", "-listen", "UNIX:{tmp}/c"],
    ["-server", "IP:9001", "-listen", "UNIX:{tmp}/c"],
    ["-server", "IP:127.0.0.1:1", "-listen", "FOO:bar"],
    ["-server", "IP:127.0.0.1:1", "-listen", "UNIX:{tmp}/no/such/dir/c"],
    ["-server", "IP:nonexistent.invalid:1", "-listen", "UNIX:{tmp}/c"],
    ["-server", "FOO:bar", "-listen", "FOO:bar"],
]

_TEST = _HELP + [
    ["-connect"], ["-sessions"], ["-datamin"], ["-datamax"], ["-timeout"], ["-timevar"],
    ["-progress"], ["-ops"], ["-withcert"], ["-withcert", "3"],
    ["-persistent"],
    ["-connect", "UNIX:{tmp}/x", "-sessions", "0"], ["-connect", "UNIX:{tmp}/x", "-sessions", "513"],
    ["-connect", "UNIX:{tmp}/x", "-sessions", "abc"], ["-connect", "UNIX:{tmp}/x", "-sessions", "-1"],
    ["-connect", "UNIX:{tmp}/x", "-timeout", "3601"], ["-connect", "UNIX:{tmp}/x", "-timevar", "3601"],
    ["-connect", "UNIX:{tmp}/x", "-timeout", "5", "-timevar", "5"],
    ["-connect", "UNIX:{tmp}/x", "-timeout", "0"],
    ["-connect", "UNIX:{tmp}/x", "-datamin", "3"], ["-connect", "UNIX:{tmp}/x", "-datamax", "4097"],
    ["-connect", "UNIX:{tmp}/x", "-progress", "1000001"], ["-connect", "UNIX:{tmp}/x", "-ops", "1000001"],
    ["-connect", "UNIX:{tmp}/x", "-ops", "-1"],
    ["-connect", "FOO:bar"], ["-connect", "IP:9001"], ["-connect", "IP:1:2:3"],
    ["-connect", "IP:nonexistent.invalid:1"], ["-connect", "IP:nonexistent.invalid:1", "-persistent"],
    ["-connect", "UNIX:{tmp}/nobody", "-persistent"],
]

_SNOOP = _HELP + [
    ["-listen"], ["-server"], ["-connect"],
    ["-listen", "UNIX:{tmp}/l"], ["-server", "UNIX:{tmp}/s"], ["-connect", "UNIX:{tmp}/s"],
    ["-listen", "FOO:bar", "-server", "UNIX:{tmp}/s"],
    ["-listen", "UNIX:{tmp}/no/such/dir/l", "-server", "UNIX:{tmp}/s"],
    ["-listen", "UNIX:{tmp}/l", "-server", "FOO:bar"],
    ["-listen", "UNIX:{tmp}/l", "-server", "IP:9001"],
    ["-listen", "UNIX:{tmp}/l", "-server", "IP:nonexistent.invalid:1"],
]

CASES: dict[str, list[list[str]]] = {
    "dc_server": _SERVER, "dc_client": _CLIENT, "dc_test": _TEST, "dc_snoop": _SNOOP,
}

# (tool, args) -> the fields where our output differs from the recorded original's, on purpose.
DELIBERATE: dict[tuple[str, tuple[str, ...]], dict] = {}
_LISTEN_FAILS = "the original exits 0 when it cannot listen (its exit status is its -killable flag); we exit 1"
for _args in (["-listen", "FOO:bar"], ["-listen", "IP:nonexistent.invalid:1"], ["-listen", "IP:99999"],
              ["-listen", "UNIX:{tmp}/no/such/dir/s"], ["-listen", "IP:1:2:3"], ["-listen", ""]):
    DELIBERATE[("dc_server", tuple(_args))] = {"status": 1, "why": _LISTEN_FAILS}
for _args in (["-listen", "IP:nonexistent.invalid:1", "-sessions", "1"],
              ["-listen", "IP:nonexistent.invalid:1", "-sessions", "63"]):
    DELIBERATE[("dc_server", tuple(_args))] = {
        "status": 1, "why": "the original exits 0 after 'malloc/initialisation failure'; we exit 1"}
_SNOOP_SAYS_WHY = ("the original exits 1 without a word when an address cannot be used; we print one "
                   "'Error, ...' line saying why")
for _args in (["-listen", "FOO:bar", "-server", "UNIX:{tmp}/s"],
              ["-listen", "UNIX:{tmp}/no/such/dir/l", "-server", "UNIX:{tmp}/s"],
              ["-listen", "UNIX:{tmp}/l", "-server", "FOO:bar"],
              ["-listen", "UNIX:{tmp}/l", "-server", "IP:9001"],
              ["-listen", "UNIX:{tmp}/l", "-server", "IP:nonexistent.invalid:1"]):
    # "stderr_line": stderr is exactly one line starting with this text (the reason varies by system).
    DELIBERATE[("dc_snoop", tuple(_args))] = {"stderr_line": "Error, ", "why": _SNOOP_SAYS_WHY}
