"""The settings table: every option of tcphafe.conf and tcphabe.conf, declared once.

Like gunicorn's settings, each option is one ``Setting`` row: name, parser, default, validator,
one-line doc, required, repeatable and which component reads it. Everything else is derived from
this table: the loader (``tcpha.config.loader``), the ``FEConfig``/``BEConfig`` attributes,
``tcpha-fe --help``, the annotated reference files ``fe/tcphafe.conf.detail`` and
``be/tcphabe.conf.detail`` and ``docs/configuration.md`` (``python -m tcpha.config.reference``).

Defaults are written as they would appear in a config file (text) and go through the same parser
as a value read from a file, so a default can never be something the file could not say.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tcpha.config import types as t

__all__ = ["Setting", "FE_SETTINGS", "BE_SETTINGS", "SETTINGS", "GROUPS", "OBSOLETE", "LIVE", "RESTART",
           "settings_for", "reload_plan", "in_force_form"]

# What a reload (SIGHUP) does with a changed option: LIVE applies it to the running daemon (new
# connections take the new value), RESTART keeps the running value and reports it in one line.
LIVE = "live"
RESTART = "restart"

# Documentation groups, in the order the reference files show them.
GROUPS = {
    "tcpha": "TCPHA options (original names and defaults)",
    "handoff": "Handoff and flow steering",
    "health": "Health detection",
    "security": "Control channel security",
    "tls": "TLS termination and the shared session cache",
    "operations": "Operation: control files, logging, metrics, stopping",
}


@dataclass(frozen=True)
class Setting:
    name: str                      # the key in the config file
    type: t.Parser                 # text -> value, raises ValueError(one line)
    default: str | None            # config-file text; None: no default (unset / required)
    validator: t.Validator         # value -> None, raises ValueError(one line)
    doc: str                       # one line
    required: bool = False
    repeatable: bool = False
    section: str = "fe"            # 'fe' | 'be'
    attr: str = ""                 # attribute on FEConfig/BEConfig (defaults to name)
    metavar: str = "VALUE"         # how --help and the reference files show the value
    group: str = "tcpha"
    example: str | None = None     # a sample value for the reference files when default is None
    reload: str = ""               # LIVE | RESTART: what SIGHUP does with a changed value (declared on every row)

    def __post_init__(self) -> None:
        if not self.attr:
            object.__setattr__(self, "attr", self.name)

    @property
    def kind(self) -> str:
        """What the value is (int, float, bool, str, path, address, port, list of ports, ...)."""
        return self.type.kind  # type: ignore[attr-defined]

    @property
    def value_type(self) -> Any:
        """The Python type of the loaded value (``list[...]`` of it for a repeatable option)."""
        return self.type.value_type  # type: ignore[attr-defined]

    def default_value(self) -> Any:
        """The Python value of the default (None when unset, [] for repeatable options)."""
        if self.repeatable:
            return []
        if self.default is None:
            return None
        return self.type(self.default)


_any = t.no_check
_count = t.in_range(1, 100000)
_timeout = t.in_range(0.001, 86400)

_FE_WORKERS = [
    ("startservers", "5", "worker processes started at start-up", RESTART),
    ("maxspareservers", "5", "most idle workers kept; idle workers beyond this are stopped", LIVE),
    ("minspareservers", "2", "fewest idle workers kept; more are started when fewer are idle", LIVE),
    ("maxclients", "256", "per worker, most requests being handed off at once (clients still sending a head: not counted)",
     LIVE),
]


def _fe_workers() -> list[Setting]:
    return [Setting(name, t.integer, default, _count, doc, section="fe", metavar="N", reload=reload)
            for name, default, doc, reload in _FE_WORKERS]


# Options TCPHA's files had that tcpha no longer reads: accepted with one warning line (an old file keeps
# working) instead of refused like an unknown option. name -> why it is ignored.
OBSOLETE: dict[str, dict[str, str]] = {
    "fe": {},
    "be": {name: "tcpha-be is one process (no worker pool); maxclients limits its connections"
           for name in ("startservers", "minspareservers", "maxspareservers")},
}


def _operations(section: str, rundir: str, logname: str) -> list[Setting]:
    fe_be = "tcpha-fe" if section == "fe" else "tcpha-be"
    # tcpha-fe's log file is opened by the arbiter before it forks: a new one needs a restart (or upgrade).
    logfile_reload = RESTART if section == "fe" else LIVE
    return [
        Setting("rundir", t.path, rundir, _any,
                f"directory of the control files (sys/dbglevel, sys/unload, conn, ...) and the control socket",
                section=section, group="operations", metavar="DIR", reload=RESTART),
        Setting("usefuse", t.boolean, "1", _any,
                "1: serve the control files with FUSE when available (else plain files); 0: plain files always",
                section=section, group="operations", metavar="0|1", reload=RESTART),
        Setting("logfile", t.optional_path, "-", _any,
                f"log file; '-' logs to stderr (journald). TCPHA logged to ./{logname}",
                section=section, group="operations", metavar="PATH", reload=logfile_reload),
        Setting("dbglevel", t.integer, "3", t.in_range(0, 6),
                "0 critical, 1 errors, 2 warnings, 3 notices, 4 one line per connection, 5 debug, 6 trace",
                section=section, group="operations", metavar="0-6", reload=LIVE),
        Setting("metrics", t.listen_address, "off", _any,
                "Prometheus endpoint: off, PORT (on 127.0.0.1) or ADDR:PORT",
                section=section, group="operations", metavar="off|[ADDR:]PORT", reload=RESTART),
        Setting("grace", t.seconds, "30", t.in_range(0, 86400),
                f"on unload/SIGTERM, how long {fe_be} waits for its connections to end before removing its state",
                section=section, group="operations", metavar="SECONDS", reload=LIVE),
    ]


FE_SETTINGS: list[Setting] = [
    Setting("raddr", t.ipv4, "0.0.0.0", _any,
            "real address of the front end; control connections and registrations use it",
            section="fe", metavar="ADDR", reload=RESTART),
    Setting("vaddr", t.ipv4, None, t.not_unspecified,
            "virtual address (VIP) clients connect to; the front end adds it to the LAN interface",
            section="fe", required=True, metavar="ADDR", example="10.77.0.100", reload=RESTART),
    Setting("port", t.port_list, "80", _any,
            "port(s) clients connect to on vaddr, e.g. '80 443'",
            section="fe", attr="ports", metavar="PORT [PORT...]", reload=RESTART),
    *_fe_workers(),
    Setting("connperbe", t.integer, "2", t.in_range(1, 64),
            "persistent control connections to each back end", section="fe", metavar="N", reload=RESTART),
    Setting("redirectaddr", t.ipv4, "0.0.0.0", _any,
            "local node: application address serving what no back end takes (0.0.0.0: no local node)",
            section="fe", metavar="ADDR", reload=LIVE),
    Setting("redirectport", t.port, "8080", _any,
            "local node: application port", section="fe", metavar="PORT", reload=LIVE),
    Setting("server", t.text, None, _any,
            "a back end: 'ADDR PORT' (its raddr and port) or 'unix:/PATH' (a tcpha-be on this host)",
            section="fe", repeatable=True, attr="servers", metavar="ADDR PORT | unix:/PATH",
            example="10.77.0.11 666", reload=LIVE),
    Setting("rule", t.text, None, _any,
            "'ADDR REGEX': URI, 'ADDR host:|sni:|alpn:REGEX'; first match wins; 'ADDR,ADDR': by weight; own rehandoff=",
            section="fe", repeatable=True, attr="rules", metavar="ADDR[,ADDR...] [FIELD:]REGEX [rehandoff=on|off]",
            example="10.77.0.11 jpg$", reload=LIVE),
    Setting("registerport", t.port_or_zero, "80", _any,
            "port on raddr where dregister back ends register (their feport); 0, or raddr 0.0.0.0: off",
            section="fe", group="handoff", metavar="PORT", reload=RESTART),
    Setting("interface", t.interface, "auto", _any,
            "LAN interface for the VIP and flow steering; auto: the one holding raddr (else the route to vaddr)",
            section="fe", group="handoff", metavar="NAME|auto", reload=RESTART),
    Setting("peekmax", t.size, "16384", t.in_range(512, 1024 * 1024),
            "most bytes of request head (or TLS ClientHello) read to choose a back end; longer: 400/414",
            section="fe", group="handoff", metavar="BYTES", reload=LIVE),
    Setting("peektimeout", t.seconds, "10", _timeout,
            "most time to wait for the request head; then 408", section="fe", group="handoff",
            metavar="SECONDS", reload=LIVE),
    Setting("handofftimeout", t.seconds, "2", _timeout,
            "most time to wait for a back end's 'restored'; then the next back end is tried",
            section="fe", group="handoff", metavar="SECONDS", reload=LIVE),
    Setting("flowtimeout", t.seconds, "3600", t.in_range(1, 7 * 86400),
            "safety timeout of a steering entry whose end the back end never reported",
            section="fe", group="handoff", metavar="SECONDS", reload=RESTART),
    Setting("rehandoff", t.choice("off", "on"), "off", _any,
            "on: each keep-alive request routed by the rules (the connection moves); a rule's own wins; docs/kernel.md",
            section="fe", group="handoff", metavar="off|on", reload=RESTART),
    Setting("steering", t.choice("auto", "bpf", "nft"), "auto", _any,
            "steering of handed-off flows: nft (netdev table) or bpf (tc ingress program); auto: bpf if the kernel can",
            section="fe", group="handoff", metavar="auto|bpf|nft", reload=RESTART),
    Setting("tunnel", t.choice("none", "vxlan", "ipip"), "none", _any,
            "none: flows go to the back end's MAC (same LAN); vxlan|ipip: encapsulated to its address (any subnet)",
            section="fe", group="handoff", metavar="none|vxlan|ipip", reload=RESTART),
    Setting("dtcinterval", t.seconds, "2", t.in_range(0, 3600),
            "seconds between health checks of each back end; 0: off", section="fe", group="health",
            metavar="SECONDS", reload=LIVE),
    Setting("healthcheck", t.choice("tcp", "http"), "tcp", _any,
            "application check: tcp (connect) or http (GET healthpath, 2xx/3xx is up)",
            section="fe", group="health", metavar="tcp|http", reload=LIVE),
    Setting("healthpath", t.text, "/", t.absolute_uri_path,
            "path requested by the http health check", section="fe", group="health", metavar="PATH", reload=LIVE),
    Setting("healthport", t.port_or_zero, "0", _any,
            "port of the application check; 0: the back end's redirectport as it reports it",
            section="fe", group="health", metavar="PORT", reload=LIVE),
    Setting("healthtimeout", t.seconds, "1", _timeout,
            "most time one health check may take (unset: at most dtcinterval)", section="fe", group="health",
            metavar="SECONDS", reload=LIVE),
    Setting("rise", t.integer, "2", t.in_range(1, 100),
            "consecutive successful checks before a down back end is put back", section="fe",
            group="health", metavar="N", reload=LIVE),
    Setting("fall", t.integer, "1", t.in_range(1, 100),
            "consecutive failed checks before a back end is taken out", section="fe", group="health",
            metavar="N", reload=LIVE),
    Setting("authkey", t.path, None, _any,
            "shared key file for the FE<->BE control channel (tcpha-keygen PATH writes one)",
            section="fe", group="security", required=True, metavar="PATH", example="/etc/tcpha/authkey", reload=LIVE),
    *_operations("fe", "/run/tcpha/fe", "tcphafe.log"),
    Setting("statsadmin", t.boolean, "off", _any,
            "on: the status page (on the metrics address) may drain/enable back ends, signed with the authkey",
            section="fe", group="operations", metavar="on|off", reload=LIVE),
]

BE_SETTINGS: list[Setting] = [
    Setting("raddr", t.ipv4, None, t.not_unspecified,
            "real address of this back end; it listens for control connections on raddr:port",
            section="be", required=True, metavar="ADDR", example="10.77.0.11", reload=RESTART),
    Setting("uaddr", t.ipv4, None, t.not_unspecified,
            "address this back end uses in its own ARP traffic (never the VIP)",
            section="be", required=True, metavar="ADDR", example="10.77.0.11", reload=RESTART),
    Setting("vaddr", t.ipv4, None, t.not_unspecified,
            "the front end's virtual address (VIP); held on lo without answering ARP for it",
            section="be", required=True, metavar="ADDR", example="10.77.0.100", reload=RESTART),
    Setting("port", t.port, "666", _any,
            "port for control connections from the front end", section="be", metavar="PORT", reload=RESTART),
    Setting("maxclients", t.integer, "256", _count,
            "most connections relayed at once; more handoffs are refused (the front end tries the next back end)",
            section="be", metavar="N", reload=LIVE),
    Setting("redirectaddr", t.ipv4, "0.0.0.0", _any,
            "application address handed-off connections are relayed to (0.0.0.0: this host, 127.0.0.1)",
            section="be", metavar="ADDR", reload=LIVE),
    Setting("redirectport", t.port, "80", _any,
            "application port handed-off connections are relayed to", section="be", metavar="PORT", reload=LIVE),
    Setting("appsource", t.choice("auto", "transparent", "local"), "auto", _any,
            "application connections from: transparent (client's address), local (ours); auto: transparent "
            "if it works", section="be", group="handoff",
            metavar="auto|transparent|local", reload=RESTART),
    Setting("appproxy", t.choice("off", "v1", "v2"), "off", _any,
            "PROXY protocol header (v1 text, v2 binary) with the client's and the VIP's address, first to "
            "the application", section="be", group="handoff", metavar="off|v1|v2", reload=LIVE),
    Setting("relay", t.choice("auto", "bpf", "splice"), "splice", _any,
            "splice, or bpf: the kernel relays (no back-pressure yet, docs/kernel.md); auto: bpf if the kernel can",
            section="be", group="handoff", metavar="auto|bpf|splice", reload=RESTART),
    Setting("dregister", t.boolean, "0", _any,
            "1: register with the front end at feaddr:feport, with this file's rules",
            section="be", metavar="0|1", reload=LIVE),
    Setting("feaddr", t.ipv4, None, t.not_unspecified,
            "front end's real address for dregister", section="be", metavar="ADDR",
            example="10.77.0.10", reload=LIVE),
    Setting("feport", t.port, "80", _any,
            "front end's registration port for dregister (tcphafe.conf registerport)",
            section="be", metavar="PORT", reload=LIVE),
    Setting("rule", t.text, None, _any,
            "with dregister: '[ADDR] REGEX' or '[ADDR] host:|sni:|alpn:REGEX' sent to the front end",
            section="be", repeatable=True, attr="rules", metavar="[ADDR] [FIELD:]REGEX",
            example="jpg$", reload=LIVE),
    Setting("registerretry", t.seconds, "2", t.in_range(0.1, 3600),
            "with dregister: seconds between registration attempts while the front end is unreachable",
            section="be", group="handoff", metavar="SECONDS", reload=LIVE),
    Setting("interface", t.interface, "auto", _any,
            "LAN interface (ARP filtering); auto: the one holding raddr",
            section="be", group="handoff", metavar="NAME|auto", reload=RESTART),
    Setting("tunnel", t.choice("none", "vxlan", "ipip"), "none", _any,
            "none: VIP on lo, flows come as LAN frames; vxlan|ipip: VIP on tcpha-vxlan|tunl0, flows come tunnelled",
            section="be", group="handoff", metavar="none|vxlan|ipip", reload=RESTART),
    Setting("unixpath", t.optional_path, "none", _any,
            "UNIX socket receiving connections from a front end on this host (its 'server = unix:PATH')",
            section="be", group="handoff", metavar="PATH|none", reload=RESTART),
    Setting("authkey", t.path, None, _any,
            "shared key file for the FE<->BE control channel (tcpha-keygen PATH writes one)",
            section="be", group="security", required=True, metavar="PATH", example="/etc/tcpha/authkey", reload=RESTART),
    Setting("tlscert", t.optional_path, "none", _any,
            "certificate chain (PEM); when set, TLS on tlsports is terminated here",
            section="be", group="tls", metavar="PATH|none", reload=LIVE),
    Setting("tlskey", t.optional_path, "none", _any,
            "private key (PEM); none: in the tlscert file", section="be", group="tls",
            metavar="PATH|none", reload=LIVE),
    Setting("tlsports", t.port_list, "443", _any,
            "VIP ports whose connections are TLS", section="be", group="tls", metavar="PORT [PORT...]", reload=LIVE),
    Setting("sessioncache", t.distcache_address, "none", _any,
            "distcache address of the shared TLS session cache (UNIX:/run/tcpha/scache, IP:host:port)",
            section="be", group="tls", metavar="ADDRESS|none", reload=LIVE),
    Setting("sessiontimeout", t.seconds, "300", t.in_range(1, 86400),
            "lifetime of a TLS session in the cache", section="be", group="tls", metavar="SECONDS", reload=LIVE),
    Setting("sessionkeys", t.session_keys, "none", _any,
            "key file sealing cached TLS sessions (AES-256-GCM); first key seals, all open (docs/tls.md)",
            section="be", group="tls", metavar="PATH|none", reload=LIVE),
    Setting("sessioncachecafile", t.optional_path, "none", _any,
            "TLS to sessioncache: its certificate must chain to these CAs (PEM; docs/distcache.md)",
            section="be", group="tls", metavar="PATH|none", reload=LIVE),
    Setting("sessioncachecert", t.optional_path, "none", _any,
            "client certificate (PEM) shown to sessioncache over TLS (with sessioncachecafile)",
            section="be", group="tls", metavar="PATH|none", reload=LIVE),
    Setting("sessioncachekey", t.optional_path, "none", _any,
            "private key (PEM) of sessioncachecert; none: in the sessioncachecert file",
            section="be", group="tls", metavar="PATH|none", reload=LIVE),
    Setting("sessioncachecheckhost", t.text, "none", _any,
            "name sessioncache's certificate must carry; none: the host of its IP:host:port address",
            section="be", group="tls", metavar="NAME|none", reload=LIVE),
    *_operations("be", "/run/tcpha/be", "tcphabe.log"),
]

SETTINGS = {"fe": FE_SETTINGS, "be": BE_SETTINGS}


def settings_for(component: str) -> list[Setting]:
    try:
        return SETTINGS[component]
    except KeyError:
        raise ValueError(f"component must be 'fe' or 'be', not {component!r}") from None


def reload_plan(component: str, old: Any, new: Any) -> tuple[list[Setting], list[Setting]]:
    """(applied live, kept until a restart): the settings whose values differ between two loaded configs
    of ``component``, split by their declared ``reload``. The one place reload code learns what to do."""
    live: list[Setting] = []
    restart: list[Setting] = []
    for s in settings_for(component):
        changed = getattr(old, s.attr) != getattr(new, s.attr)
        if s.name == "authkey":      # the same key bytes from another file is a change too
            changed = changed or getattr(old, "authkey_path", "") != getattr(new, "authkey_path", "")
        if changed:
            (live if s.reload == LIVE else restart).append(s)
    return live, restart


def in_force_form(s: Setting, value: Any) -> Any:
    """A setting's value as the ``settings`` control file shows it (JSON): the key as a fingerprint,
    servers by name, rules as [target, field, pattern] (with "rehandoff=on|off" when the rule sets it;
    [field, pattern] for a back end's). The same form for a loaded file's value and for
    the value a running daemon uses, so that the two can be compared."""
    if value is None:
        return None
    if s.name == "authkey":
        return hashlib.sha256(value).hexdigest()[:16]
    if s.name == "server":
        return sorted(getattr(v, "name", v) for v in value)
    if s.name == "rule":      # a back end's rules are sent without a target: it is always itself
        return [[r.field, r.pattern] if s.section == "be" else
                [r.target, r.field, r.pattern] + ([f"rehandoff={r.rehandoff}"] if r.rehandoff else []) for r in value]
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_table() -> None:
    # The table is the single declaration: catch a clash at import time, not in production.
    for component, table in SETTINGS.items():
        names = [s.name for s in table]
        attrs = [s.attr for s in table]
        assert len(set(names)) == len(names), f"{component}: an option is declared twice"
        assert len(set(attrs)) == len(attrs), f"{component}: two options share an attribute"
        for s in table:
            assert s.section == component, s
            assert "\n" not in s.doc, s
            assert s.reload in (LIVE, RESTART), f"{component}: {s.name} must declare reload=LIVE or RESTART"
            assert getattr(s.type, "kind", None) and hasattr(s.type, "value_type"), \
                f"{component}: the parser of {s.name} declares no kind/value_type (tcpha.config.types._kind)"
            assert s.name not in OBSOLETE[component], f"{component}: {s.name} is declared and obsolete"
            if s.default is not None and not s.repeatable:
                s.validator(s.type(s.default))


_check_table()
