"""The TCPHA config file format and the loader that checks it against the settings table.

Format (as TCPHA's tcphafe.conf / tcphabe.conf):

* one ``key = value`` per line; keys are case-insensitive; spaces around ``=`` are optional;
* a line whose first non-blank character is ``#`` is a comment, blank lines are ignored
  (a ``#`` later in a line is part of the value: regular expressions may contain it);
* ``server`` and ``rule`` may appear many times, in order; every other key at most once.

Every problem is reported as one line ``PATH:LINE: message`` (``ConfigError``); LINE is 0 when
the problem is not tied to a line (a missing required option, an unreadable file).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from typing import Any, Optional

from tcpha.config.settings import BE_SETTINGS, FE_SETTINGS, OBSOLETE, SETTINGS, Setting
from tcpha.secretfile import read_secret_file

__all__ = ["ConfigError", "ServerSpec", "RuleSpec", "FEConfig", "BEConfig", "LOCAL_TARGET",
           "load_fe_config", "load_be_config", "read_authkey", "changed_options",
           "MIN_KEY_BYTES", "RULE_FIELDS", "compile_rule", "register_rules"]

# A rule whose target is the front end's own local node (docs/operations.md, "The local node").
LOCAL_TARGET = "local"
# The shortest key accepted: 32 bytes of file content (tcpha-keygen writes 64 hex digits = 256 bits;
# `openssl rand -hex 16` is the shortest common form that passes).
MIN_KEY_BYTES = 32
RULE_FIELDS = ("uri", "host", "sni", "alpn")
# Host names and SNI are case-insensitive (RFC 9110 4.2.3, RFC 6066 3): so are their rules.
_CASELESS_FIELDS = ("host", "sni")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNIX_PATH_MAX = 107  # sun_path minus the terminating NUL


class ConfigError(Exception):
    """A config problem: ``str(e) == f"{path}:{line}: {message}"``."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        super().__init__(f"{path}:{line}: {message}")


@dataclass(frozen=True)
class ServerSpec:
    """``server = ADDR PORT [weight=N]`` or ``server = unix:/PATH [weight=N]``."""
    kind: str                 # 'tcp' | 'unix'
    host: str | None
    port: int | None
    path: str | None
    lineno: int
    weight: int = 1

    @property
    def name(self) -> str:
        """The server's name in rules, logs and RuleSpec.target: ``HOST:PORT`` or ``unix:/PATH``."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RuleSpec:
    """``rule = ADDR [FIELD:]REGEX``: the first rule whose regex is found in FIELD wins."""
    target: str               # a ServerSpec.name, or LOCAL_TARGET
    field: str                # 'uri' | 'host' | 'sni' | 'alpn'
    pattern: str
    regex: re.Pattern[bytes]
    lineno: int
    pool: tuple[str, ...] = ()   # ``rule = ADDR,ADDR,... REGEX``: every target of that one rule (split by weight)
    rehandoff: str = ""          # ``... REGEX rehandoff=on|off``: this rule's own; "": the global ``rehandoff``


def _field_type(s: Setting) -> Any:
    """The annotation of a setting's attribute: the parser's declared value type, a list of it for a
    repeatable option (servers and rules: ServerSpec / RuleSpec), bytes for the key."""
    if s.name == "authkey":
        return bytes
    if s.name == "server":
        return list[ServerSpec]
    if s.name == "rule":
        return list[RuleSpec]
    if s.repeatable:
        return list[s.value_type]
    if s.default is None and not s.required:
        return Optional[s.value_type]
    return s.value_type


def _config_class(name: str, table: list[Setting], doc: str, methods: dict[str, Any]) -> type:
    """A dataclass with one typed attribute per setting, defaulting to the table's default (already
    parsed: ``FEConfig().peekmax == 16384``): values are converted once, by the loader, never by readers."""
    fields: list[tuple[str, Any, Any]] = [("path", str, dataclasses.field(default=""))]
    for s in table:
        # repr=False for the key: a logged config must not leak it.
        fields.append((s.attr, _field_type(s), dataclasses.field(default_factory=s.default_value,
                                                                  repr=s.name != "authkey")))
    fields.append(("authkey_path", str, dataclasses.field(default="")))
    # Lines about the file that are not errors (an obsolete option ignored): logged once logging is set up.
    fields.append(("warnings", list[str], dataclasses.field(default_factory=list, repr=False, compare=False)))
    cls = dataclasses.make_dataclass(name, fields, namespace=methods, eq=True)
    cls.__doc__ = doc
    cls.__module__ = __name__
    return cls


def _server(self: Any, target: str) -> ServerSpec | None:
    """The ServerSpec a rule target names (None for LOCAL_TARGET or an unknown name)."""
    for server in self.servers:
        if server.name == target:
            return server
    return None


def _local_node(self: Any) -> tuple[str, int] | None:
    """(redirectaddr, redirectport) of the local node, or None when there is none."""
    if self.redirectaddr == "0.0.0.0":
        return None
    return (self.redirectaddr, self.redirectport)


def _app_address(self: Any) -> tuple[str, int]:
    """Where the back end relays connections: redirectaddr (0.0.0.0 means 127.0.0.1) and port."""
    host = "127.0.0.1" if self.redirectaddr == "0.0.0.0" else self.redirectaddr
    return (host, self.redirectport)


def _be_name(self: Any) -> str:
    """This back end's name as the front end knows it: ``raddr:port``."""
    return f"{self.raddr}:{self.port}"


FEConfig = _config_class(
    "FEConfig", FE_SETTINGS,
    "tcphafe.conf, loaded: one attribute per option of tcpha.config.settings.FE_SETTINGS "
    "(attr names: port -> ports, server -> servers, rule -> rules; authkey holds the key bytes, "
    "authkey_path the file).",
    {"server": _server, "local_node": property(_local_node)})
BEConfig = _config_class(
    "BEConfig", BE_SETTINGS,
    "tcphabe.conf, loaded: one attribute per option of tcpha.config.settings.BE_SETTINGS "
    "(attr names: rule -> rules; authkey holds the key bytes, authkey_path the file).",
    {"app_address": property(_app_address), "name": property(_be_name)})


def changed_options(old: Any, new: Any) -> list[str]:
    """Attribute names whose values differ between two loaded configs (for SIGHUP reloads)."""
    return [f.name for f in dataclasses.fields(old)
            if f.name not in ("path", "warnings") and getattr(old, f.name) != getattr(new, f.name)]


# -- reading the file ---------------------------------------------------------------------------

@dataclass
class _Line:
    lineno: int
    key: str
    value: str


def _read_lines(path: str) -> list[_Line]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(path, 0, f"cannot read the config file: {exc.strerror or exc}") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, lineno, "not valid UTF-8 text") from None
    lines = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ConfigError(path, lineno, f"expected 'key = value', got {_clip(stripped)!r}")
        value = value.strip()
        if not value:
            raise ConfigError(path, lineno, f"option '{key.lower()}' has no value")
        lines.append(_Line(lineno, key.lower(), value))
    return lines


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_options(path: str, component: str, lines: list[_Line]
                   ) -> tuple[dict[str, Any], dict[str, int], dict[str, list[_Line]]]:
    """Apply the table: values by attribute, and the line each option was set on."""
    table = {s.name: s for s in SETTINGS[component]}
    other = "be" if component == "fe" else "fe"
    other_names = {s.name for s in SETTINGS[other]}
    values: dict[str, Any] = {"warnings": []}
    raw_repeated: dict[str, list[_Line]] = {}
    where: dict[str, int] = {}
    for line in lines:
        setting = table.get(line.key)
        if setting is None and line.key in OBSOLETE[component]:
            values["warnings"].append(f"{path}:{line.lineno}: '{line.key}' is obsolete and ignored: "
                                      f"{OBSOLETE[component][line.key]}")
            continue
        if setting is None:
            raise ConfigError(path, line.lineno, _unknown_key(line.key, component, table, other_names))
        if setting.repeatable:
            raw_repeated.setdefault(setting.name, []).append(line)
            where.setdefault(setting.name, line.lineno)
            continue
        if setting.name in where:
            raise ConfigError(path, line.lineno,
                              f"'{setting.name}' is set twice (first on line {where[setting.name]}); "
                              f"only 'server' and 'rule' may repeat")
        where[setting.name] = line.lineno
        values[setting.attr] = _convert(path, line.lineno, setting, line.value)
    for setting in table.values():
        if setting.name in where:
            continue
        if setting.required:
            raise ConfigError(path, 0, f"missing required option '{setting.name}' ({setting.doc})")
        values[setting.attr] = setting.default_value()
    return values, where, raw_repeated


def _convert(path: str, lineno: int, setting: Setting, text: str) -> Any:
    try:
        value = setting.type(text)
        setting.validator(value)
    except ValueError as exc:
        raise ConfigError(path, lineno, f"{setting.name}: {exc}") from None
    return value


def _unknown_key(key: str, component: str, table: dict[str, Setting], other_names: set[str]) -> str:
    name = "tcphafe.conf" if component == "fe" else "tcphabe.conf"
    if key in other_names:
        other = "tcphabe.conf" if component == "fe" else "tcphafe.conf"
        return f"unknown option '{key}': it belongs in {other}, not {name}"
    close = difflib.get_close_matches(key, list(table), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown option '{key}'{hint}"


# -- server and rule lines ----------------------------------------------------------------------

def _parse_weight(path: str, lineno: int, words: list[str]) -> int:
    if not words:
        return 1
    if len(words) == 1 and words[0].startswith("weight="):
        text = words[0][len("weight="):]
        if text.isdigit() and int(text) <= 256:
            return int(text)
        raise ConfigError(path, lineno, f"server: bad weight {text!r} (expected 0-256)")
    raise ConfigError(path, lineno, f"server: unexpected {' '.join(words)!r} "
                                    f"(expected 'ADDR PORT [weight=N]' or 'unix:/PATH [weight=N]')")


def _parse_server(path: str, line: _Line) -> ServerSpec:
    words = line.value.split()
    first = words[0]
    if first.lower().startswith("unix:"):
        sock_path = first[len("unix:"):]
        if not sock_path.startswith("/"):
            raise ConfigError(path, line.lineno, f"server: bad UNIX socket {first!r} (expected unix:/PATH)")
        if len(os.fsencode(sock_path)) > _UNIX_PATH_MAX:
            raise ConfigError(path, line.lineno,
                              f"server: UNIX socket path longer than {_UNIX_PATH_MAX} bytes")
        return ServerSpec("unix", None, None, sock_path, line.lineno,
                          _parse_weight(path, line.lineno, words[1:]))
    if len(words) < 2:
        raise ConfigError(path, line.lineno,
                          f"server: expected 'ADDR PORT' or 'unix:/PATH', got {_clip(line.value)!r}")
    try:
        host = str(ipaddress.IPv4Address(first))
    except ValueError:
        raise ConfigError(path, line.lineno, f"server: bad IPv4 address {first!r}") from None
    if host == "0.0.0.0":
        raise ConfigError(path, line.lineno, "server: 0.0.0.0 is not a back end's address")
    text = words[1]
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(path, line.lineno, f"server: bad port {text!r} (expected a number 1-65535)")
    return ServerSpec("tcp", host, int(text), None, line.lineno,
                      _parse_weight(path, line.lineno, words[2:]))


def compile_rule(target: str, field_name: str, pattern: str, lineno: int = 0) -> RuleSpec:
    """A RuleSpec from its parts, compiled as the loader compiles rules; ValueError (one line).

    For rules that do not come from a file, e.g. a back end's Register message (dregister):
    ``[compile_rule(backend_name, f, p) for f, p in register.rules]``.
    """
    if field_name not in RULE_FIELDS:
        raise ValueError(f"unknown rule field {field_name!r} (expected one of: {', '.join(RULE_FIELDS)})")
    if not pattern:
        raise ValueError(f"empty regular expression for {field_name}")
    flags = re.IGNORECASE if field_name in _CASELESS_FIELDS else 0
    try:
        compiled = re.compile(pattern.encode("utf-8"), flags)
    except re.error as exc:
        raise ValueError(f"bad regular expression {_clip(pattern)!r}: {exc}") from None
    return RuleSpec(target, field_name, pattern, compiled, lineno)


def _parse_pattern(path: str, lineno: int, text: str, target: str) -> RuleSpec:
    """``[FIELD:]REGEX`` -> RuleSpec. No prefix means the URI (TCPHA)."""
    field_name, pattern = "uri", text
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() in RULE_FIELDS:
        field_name, pattern = prefix.lower(), rest
    try:
        return compile_rule(target, field_name, pattern, lineno)
    except ValueError as exc:
        raise ConfigError(path, lineno, f"rule: {exc}") from None


def register_rules(config: Any) -> tuple[tuple[str, str], ...]:
    """A BEConfig's rules as Register.rules: ((field, pattern), ...)."""
    return tuple((rule.field, rule.pattern) for rule in config.rules)


_RULE_REHANDOFF = re.compile(r"(?:(.*?)\s+)?rehandoff=(\S*)")


def _rule_rehandoff(path: str, lineno: int, text: str) -> tuple[str, str]:
    """``REGEX rehandoff=on|off`` -> (REGEX, "on"|"off"); a rule without it -> (text, ""). Only a last
    whitespace-separated word of that form is taken: a regex that must end so is written
    ``rehandoff[=]on``."""
    m = _RULE_REHANDOFF.fullmatch(text)
    if m is None:
        return text, ""
    if m.group(2) not in ("on", "off"):
        raise ConfigError(path, lineno, f"rule: rehandoff= takes on or off, got {_clip(m.group(2))!r}")
    return (m.group(1) or "").strip(), m.group(2)


def _split_rule(path: str, line: _Line) -> tuple[str, str]:
    parts = line.value.split(None, 1)
    if len(parts) < 2:
        raise ConfigError(path, line.lineno,
                          f"rule: expected 'ADDR [FIELD:]REGEX', got {_clip(line.value)!r}")
    return parts[0], parts[1].strip()


def _fe_rule_target(path: str, lineno: int, addr: str, servers: list[ServerSpec], values: dict[str, Any]) -> str:
    """Resolve a rule's ADDR to a server name, or to the local node."""
    if addr.lower().startswith("unix:"):
        for server in servers:
            if server.kind == "unix" and server.name == "unix:" + addr[len("unix:"):]:
                return server.name
        raise ConfigError(path, lineno, f"rule names server {addr!r}, which no 'server' line declares")
    host, sep, port_text = addr.partition(":")
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        if addr.lower() == LOCAL_TARGET:
            host = LOCAL_TARGET
        else:
            raise ConfigError(path, lineno, f"rule: bad address {addr!r} (expected a server's ADDR, "
                                            f"ADDR:PORT or unix:/PATH)") from None
    if sep and (not port_text.isdigit() or not 1 <= int(port_text) <= 65535):
        raise ConfigError(path, lineno, f"rule: bad port in {addr!r}")
    matches = [s for s in servers if s.kind == "tcp" and s.host == host
               and (not sep or s.port == int(port_text))]
    if len(matches) == 1:
        return matches[0].name
    if len(matches) > 1:
        raise ConfigError(path, lineno, f"rule: {addr!r} matches {len(matches)} servers "
                                        f"(lines {', '.join(str(s.lineno) for s in matches)}); write ADDR:PORT")
    own = {values["raddr"], values["redirectaddr"]} - {"0.0.0.0"}
    if host == LOCAL_TARGET or host in own:
        if values["redirectaddr"] == "0.0.0.0":
            raise ConfigError(path, lineno, f"rule names the local node ({addr}) but redirectaddr is not set")
        return LOCAL_TARGET
    raise ConfigError(path, lineno, f"rule names server {addr}, which no 'server' line declares")


# -- the key file -------------------------------------------------------------------------------

def read_authkey(key_path: str) -> bytes:
    """The key bytes of an authkey file; ValueError (one line) if it is unusable.

    Refused: unreadable, not a regular file, any access for group or others (like ssh refuses a
    private key other users can read: the key authenticates connection handoffs), and fewer than
    MIN_KEY_BYTES bytes after stripping surrounding whitespace.
    """
    data = read_secret_file(key_path, "key file")
    key = data.strip(b" \t\r\n")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key file {key_path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed "
                         f"(tcpha-keygen writes a good one)")
    return key


def _load_authkey(path: str, values: dict[str, Any], where: dict[str, int]) -> None:
    key_path = values["authkey"]
    if not os.path.isabs(key_path):
        key_path = os.path.join(os.path.dirname(os.path.abspath(path)), key_path)
    try:
        values["authkey"] = read_authkey(key_path)
    except ValueError as exc:
        raise ConfigError(path, where.get("authkey", 0), f"authkey: {exc}") from None
    values["authkey_path"] = key_path


# -- the two loaders ----------------------------------------------------------------------------

def load_fe_config(path: str) -> Any:
    """Read and check tcphafe.conf; returns an FEConfig or raises ConfigError (one line)."""
    lines = _read_lines(path)
    values, where, repeated = _parse_options(path, "fe", lines)
    servers: list[ServerSpec] = []
    for line in repeated.get("server", []):
        server = _parse_server(path, line)
        for other in servers:
            if other.name == server.name:
                raise ConfigError(path, line.lineno,
                                  f"server {server.name} is declared twice (first on line {other.lineno})")
        servers.append(server)
    rules: list[RuleSpec] = []
    for line in repeated.get("rule", []):
        addr, text = _split_rule(path, line)
        text, rehandoff = _rule_rehandoff(path, line.lineno, text)
        rule = _parse_pattern(path, line.lineno, text, "")  # the regex first: its errors come first
        rule = dataclasses.replace(rule, rehandoff=rehandoff)
        targets: list[str] = []
        for one in addr.split(","):
            if not one:
                raise ConfigError(path, line.lineno, f"rule: empty address in {addr!r} (write ADDR,ADDR,...)")
            target = _fe_rule_target(path, line.lineno, one, servers, values)
            if target in targets:
                raise ConfigError(path, line.lineno, f"rule: {one!r} named twice in {addr!r}")
            targets.append(target)
        # A rule naming several back ends is a pool: one RuleSpec per target, in order, sharing ``pool``;
        # the front end splits the pool's connections by weight (tcpha.fe.balance).
        pool = tuple(targets) if len(targets) > 1 else ()
        rules.extend(dataclasses.replace(rule, target=target, pool=pool) for target in targets)
    values["servers"] = servers
    values["rules"] = rules
    if values["vaddr"] == values["raddr"]:
        raise ConfigError(path, where["vaddr"], "vaddr must differ from raddr (the VIP is an extra address)")
    if values["minspareservers"] > values["maxspareservers"]:
        raise ConfigError(path, where.get("minspareservers", where.get("maxspareservers", 0)),
                          f"minspareservers ({values['minspareservers']}) is larger than "
                          f"maxspareservers ({values['maxspareservers']})")
    local = values["redirectaddr"]
    if local in (values["vaddr"],) and values["redirectport"] in values["ports"]:
        raise ConfigError(path, where.get("redirectport", where.get("redirectaddr", 0)),
                          "the local node (redirectaddr:redirectport) is the VIP's own port: a loop")
    if "healthtimeout" not in where and values["dtcinterval"] > 0:
        values["healthtimeout"] = min(values["healthtimeout"], values["dtcinterval"])
    if values["healthtimeout"] > values["dtcinterval"] > 0:
        raise ConfigError(path, where.get("healthtimeout", where.get("dtcinterval", 0)),
                          f"healthtimeout ({values['healthtimeout']:g}) is longer than "
                          f"dtcinterval ({values['dtcinterval']:g})")
    _load_authkey(path, values, where)
    return FEConfig(path=path, **values)


def load_be_config(path: str) -> Any:
    """Read and check tcphabe.conf; returns a BEConfig or raises ConfigError (one line)."""
    lines = _read_lines(path)
    values, where, repeated = _parse_options(path, "be", lines)
    own_name = f"{values['raddr']}:{values['port']}"
    own = {values["raddr"], values["uaddr"], own_name}
    if values["unixpath"]:
        own.add("unix:" + values["unixpath"])
    rules: list[RuleSpec] = []
    for line in repeated.get("rule", []):
        parts = line.value.split(None, 1)
        text = line.value
        if len(parts) == 2 and (_is_address(parts[0])):
            if parts[0] not in own:
                raise ConfigError(path, line.lineno,
                                  f"rule names {parts[0]}, but a back end's rules can only name itself "
                                  f"({values['raddr']})")
            text = parts[1].strip()
        rules.append(_parse_pattern(path, line.lineno, text, own_name))
    values["rules"] = rules
    if values["vaddr"] in (values["raddr"], values["uaddr"]):
        raise ConfigError(path, where["vaddr"], "vaddr (the VIP) must differ from raddr and uaddr")
    if values["dregister"] and values["feaddr"] is None:
        raise ConfigError(path, where["dregister"], "dregister = 1 needs feaddr (the front end's raddr)")
    if values["unixpath"] and len(os.fsencode(values["unixpath"])) > _UNIX_PATH_MAX:
        raise ConfigError(path, where["unixpath"], f"unixpath: longer than {_UNIX_PATH_MAX} bytes")
    for name in ("tlskey", "sessioncache"):
        if values[name] is not None and values["tlscert"] is None:
            raise ConfigError(path, where[name], f"{name} is set but tlscert is not")
    if values["tlscert"] is not None:
        _check_tls(path, values, where)
    _load_authkey(path, values, where)
    return BEConfig(path=path, **values)


def _is_address(word: str) -> bool:
    if word.lower().startswith("unix:/"):
        return True
    host = word.rpartition(":")[0] if word.count(":") == 1 else word
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _check_tls(path: str, values: dict[str, Any], where: dict[str, int]) -> None:
    base = os.path.dirname(os.path.abspath(path))
    for name in ("tlscert", "tlskey"):
        if values[name] is not None and not os.path.isabs(values[name]):
            values[name] = os.path.join(base, values[name])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(values["tlscert"], values["tlskey"])
    except FileNotFoundError as exc:
        name = "tlskey" if values["tlskey"] and exc.filename == values["tlskey"] else "tlscert"
        raise ConfigError(path, where[name], f"{name}: cannot read {exc.filename or values[name]}: "
                                             f"{exc.strerror}") from None
    except (OSError, ssl.SSLError) as exc:
        line = where.get("tlskey", where["tlscert"])
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(path, line, f"tlscert/tlskey: cannot load the certificate and key: {reason}") from None
