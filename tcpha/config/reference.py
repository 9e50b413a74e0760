"""Everything written about the options comes from the settings table, here.

``python -m tcpha.config [ROOT]`` writes, under ROOT (default: the repository):

* ``fe/tcphafe.conf.detail`` and ``be/tcphabe.conf.detail``: annotated reference files with every
  option commented out at its default;
* ``docs/configuration.md``: the operator's reference.

``help_epilog(component)`` is the option list ``tcpha-fe --help`` / ``tcpha-be --help`` show.
tests/config/test_reference.py fails when a committed file differs from what this module writes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from tcpha.config.settings import GROUPS, LIVE, OBSOLETE, Setting, settings_for
from tcpha.loglevels import DBGLEVELS, dbglevel_to_logging

__all__ = ["help_epilog", "add_help", "dbglevel_to_logging", "detail_file", "configuration_md",
           "generated_files", "write_all", "DBGLEVELS"]

FILE_NAMES = {"fe": "tcphafe.conf", "be": "tcphabe.conf"}
DAEMONS = {"fe": "tcpha-fe", "be": "tcpha-be"}

RULES_TEXT = (
    "Rules (tcphafe.conf): 'rule = ADDR REGEX' sends a connection to the server ADDR when REGEX is found "
    "in the request URI (Python regular expressions, unanchored search: 'jpg$', '^/api/', '.*'). Rules "
    "are tried in file order; the first that matches and whose back end can take the connection wins; "
    "the next matching rule is tried when a back end is down, draining or refuses. A prefix chooses "
    "another field: 'host:REGEX' (the Host header, case-insensitive), 'sni:REGEX' (TLS server name, "
    "case-insensitive), 'alpn:REGEX' (any offered ALPN protocol); 'uri:REGEX' names the URI explicitly. "
    "ADDR is a server's address as in its 'server' line (ADDR, or ADDR:PORT when two servers share an "
    "address, or unix:/PATH), or the front end's own raddr or redirectaddr or the word 'local' for the "
    "local node (needs redirectaddr). A request no rule takes goes to the local node if there is one, "
    "else gets 503. 'rule = ADDR,ADDR,... REGEX' names a pool: each connection the rule takes goes to "
    "one of its back ends chosen by smooth weighted round robin over the weights of those in service, "
    "the others being its fallbacks (separate rules stay an ordered fallback list, as in TCPHA).\n"
    "'server = ADDR PORT' names a back end's raddr and port; 'server = unix:/PATH' a tcpha-be on this "
    "host (its unixpath) that receives the connection itself over SCM_RIGHTS. Either may end in "
    "'weight=N' (0-256, default 1; 0 = drain; splits a pool rule's connections)."
)

BE_RULES_TEXT = (
    "Rules (tcphabe.conf): with dregister = 1 the back end sends its rules to the front end when it "
    "registers: 'rule = REGEX' (the URI), 'rule = host:REGEX', 'sni:REGEX', 'alpn:REGEX'. An address "
    "before the regex is accepted for compatibility and must be this back end's own."
)

# What a reload does, for the reference files: from each setting's declared ``reload``.
RELOAD_INTRO = {
    "fe": ("SIGHUP (systemctl reload) re-reads tcphafe.conf. Options marked 'reload: live' apply at once: "
           "servers are added and removed, rules, timeouts, health settings and the key are used for new "
           "connections (control connections made from then on use the new authkey; established ones, "
           "already authenticated, stay). Options marked 'reload: restart' keep their running value until a "
           "restart or an upgrade (tcpha-fe --upgrade), reported in one warning line. A file with an error "
           "is refused in one line and nothing changes."),
    "be": ("SIGHUP re-reads tcphabe.conf. Options marked 'reload: live' apply to new connections at once "
           "(connections being relayed keep what they started with; the certificate and key are read again; "
           "rules, dregister, feaddr and feport are sent to the front end again). Options marked 'reload: "
           "restart' keep their running value until a restart, reported in one warning line. A file with an "
           "error, a certificate that does not load or a log file that cannot be opened is refused in one "
           "line and nothing changes."),
}


def reload_text(s: Setting) -> str:
    """'live' or 'restart', as --help and the reference files show a setting's reload."""
    return "live" if s.reload == LIVE else "restart"


def obsolete_text(component: str) -> str:
    names = OBSOLETE[component]
    if not names:
        return ""
    by_reason: dict[str, list[str]] = {}
    for name, why in names.items():
        by_reason.setdefault(why, []).append(name)
    return (f"Obsolete (TCPHA's {FILE_NAMES[component]} had them; accepted with one warning line and ignored, "
            f"so an old file still loads): "
            + "; ".join(f"{', '.join(n)}: {why}" for why, n in by_reason.items()) + ".")


FORMAT_TEXT = (
    "Format: one 'key = value' per line; a line starting with '#' is a comment; blank lines are "
    "ignored; a '#' inside a value is part of it. 'server' and 'rule' may repeat; any other key "
    "appears once. Durations are seconds ('10', '0.5', '500ms', '5m'); sizes are bytes ('16384', '16k')."
)


def _groups(component: str) -> list[tuple[str, list[Setting]]]:
    table = settings_for(component)
    return [(title, [s for s in table if s.group == key]) for key, title in GROUPS.items()
            if any(s.group == key for s in table)]


def _default_text(s: Setting) -> str:
    if s.required:
        return "(required)"
    if s.default is None:
        return "(none)"
    return s.default


def help_epilog(component: str) -> str:
    """The list of config-file options, for ``tcpha-fe --help`` / ``tcpha-be --help``."""
    lines = [f"Options of {FILE_NAMES[component]} (key = value; see docs/configuration.md). 'reload: live': "
             f"SIGHUP applies a new value; 'reload: restart': kept until a restart."]
    for title, settings in _groups(component):
        lines.append("")
        lines.append(f"  {title}:")
        for s in settings:
            rep = " (repeatable)" if s.repeatable else ""
            lines.append(f"    {s.name} = {s.metavar}   [{_default_text(s)}]{rep} reload: {reload_text(s)}")
            lines.append(f"        {s.doc}")
    return "\n".join(lines)


def add_help(parser: argparse.ArgumentParser, component: str) -> None:
    """Make ``parser``'s --help end with the option table (adds no command-line flags)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = help_epilog(component)


def _comment(text: str, width: int = 98) -> list[str]:
    out: list[str] = []
    for paragraph in text.split("\n"):
        out.extend("# " + line for line in textwrap.wrap(paragraph, width - 2) or [""])
    return out


def detail_file(component: str) -> str:
    """The annotated reference file: every option, its doc, its default, commented out."""
    name = FILE_NAMES[component]
    lines = [
        f"# {name}.detail: every option of {name}, with its default. Copy what you need to {name}.",
        "# Generated by 'python -m tcpha.config' from tcpha/config/settings.py: do not edit.",
        "#",
        *_comment(FORMAT_TEXT),
        "#",
        *_comment(RULES_TEXT if component == "fe" else BE_RULES_TEXT),
        "#",
        *_comment(RELOAD_INTRO[component]),
        *(["#", *_comment(obsolete_text(component))] if obsolete_text(component) else []),
    ]
    for title, settings in _groups(component):
        lines += ["", "", f"# ---- {title} ----"]
        for s in settings:
            lines.append("")
            flags = [f"reload: {reload_text(s)}"]
            if s.required:
                flags.append("required")
            if s.repeatable:
                flags.append("repeatable")
            suffix = f" ({', '.join(flags)})"
            lines += _comment(f"{s.name} = {s.metavar}{suffix}")
            lines += _comment(s.doc)
            if s.default is not None and not s.repeatable:
                lines.append(f"#{s.name} = {s.default}")
            else:
                lines.append(f"#{s.name} = {s.example}")
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def configuration_md() -> str:
    """docs/configuration.md."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by 'python -m tcpha.config' from tcpha/config/settings.py: do not edit. -->",
        "",
        "tcpha-fe reads `tcphafe.conf` and tcpha-be reads `tcphabe.conf`, in TCPHA's format. Every option",
        "is declared once, in `tcpha/config/settings.py`; this page, `fe/tcphafe.conf.detail`,",
        "`be/tcphabe.conf.detail` and `--help` are generated from that table.",
        "",
        "## Format",
        "",
        FORMAT_TEXT,
        "",
        "A bad file stops the daemon before anything is started, with exactly one line",
        "`PATH:LINE: what is wrong` and exit status 2 (LINE is 0 when the problem is not on one line:",
        "a missing required option, an unreadable file). Checked: unknown keys (with a suggestion),",
        "duplicate keys, bad addresses, ports, durations and numbers, bad regular expressions, rules",
        "naming a server no `server` line declares, missing required options, an unusable `authkey`.",
        "",
        "Each option has a type (the `type` column): the loader converts the text once and `FEConfig` /",
        "`BEConfig` hold typed values (`int`, `float`, `bool`, `str`, lists), with the defaults of this table.",
        "",
        "## Reload (SIGHUP)",
        "",
        "What a reload does with a changed option is declared once, in the settings table, and shown in the",
        "`reload` column: `live` (applied by SIGHUP / `systemctl reload`) or `restart` (the running value is",
        "kept and the option is named in one warning line: `reload: port changed; applied at the next restart",
        "(or upgrade)`). Both daemons' reload code reads that declaration (`reload_plan` in",
        "`tcpha/config/settings.py`). The control file `settings` (`tcpha-ctl get settings`, `--be` for the",
        "back end) shows each option's value in force, read from what uses it.",
        "",
        "An option TCPHA's files had but tcpha does not read (listed under each file below) is accepted with",
        "one warning line `PATH:LINE: 'NAME' is obsolete and ignored: why`, so that an existing file keeps",
        "working; any other unknown option is an error.",
        "",
        "## Rules and servers",
        "",
        RULES_TEXT.replace("\n", "\n\n"),
        "",
        BE_RULES_TEXT,
        "",
        "## The control channel key (`authkey`)",
        "",
        "Both daemons refuse to start without `authkey`. `tcpha-keygen PATH` writes a new key",
        "(64 hex digits = 256 random bits) with mode 0600 and refuses to overwrite an existing file",
        "unless given `--force`. The same file (or a copy) is named in both configs. A key file is",
        "refused when it is not a regular file, when group or others have any access to it (like ssh",
        "refuses a readable private key: `chmod 600` it), or when it holds fewer than 32 bytes. Every",
        "control message is authenticated with HMAC-SHA256 under this key, bound to random per-connection",
        "nonces and a sequence number (see `tcpha/control/protocol.py`).",
        "",
        "## dbglevel",
        "",
        "| dbglevel | logging level | what is logged |",
        "| --- | --- | --- |",
    ]
    for level, (log_level, text) in DBGLEVELS.items():
        out.append(f"| {level} | {logging.getLevelName(log_level)} ({log_level}) | {text} |")
    for component in ("fe", "be"):
        cls = "FEConfig" if component == "fe" else "BEConfig"
        out += ["", f"## {FILE_NAMES[component]} ({DAEMONS[component]})", "", RELOAD_INTRO[component], ""]
        if obsolete_text(component):
            out += [obsolete_text(component), ""]
        for title, settings in _groups(component):
            out += [f"### {title}", "", f"| option | default | type | reload | `{cls}` attribute | meaning |",
                    "| --- | --- | --- | --- | --- | --- |"]
            for s in settings:
                default = _default_text(s)
                if s.repeatable:
                    default = "(repeatable)"
                out.append(f"| `{s.name} = {_md_cell(s.metavar)}` | `{_md_cell(default)}` | {s.kind} | "
                           f"{reload_text(s)} | `{s.attr}` | {_md_cell(s.doc)} |")
            out.append("")
        out.append(f"`{cls}` also has `path` (the file read) and `authkey_path`; `authkey` holds the key bytes.")
    return "\n".join(out) + "\n"


def generated_files() -> dict[str, str]:
    """Relative path -> content of every generated file."""
    return {
        "fe/tcphafe.conf.detail": detail_file("fe"),
        "be/tcphabe.conf.detail": detail_file("be"),
        "docs/configuration.md": configuration_md(),
    }


def repository_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_all(root: str | None = None) -> list[str]:
    root = root or repository_root()
    written = []
    for rel, content in generated_files().items():
        target = os.path.join(root, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(content)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcpha.config.reference",
                                     description="Write the configuration reference files from the settings table.")
    parser.add_argument("root", nargs="?", help="repository root (default: the one holding this package)")
    args = parser.parse_args(argv)
    for path in write_all(args.root):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
