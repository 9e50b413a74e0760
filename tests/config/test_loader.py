"""The TCPHA file loader: defaults, repeatables, rules, ports, and every error path."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest

from tcpha.config import (BE_SETTINGS, FE_SETTINGS, LOCAL_TARGET, BEConfig, ConfigError, FEConfig,
                          changed_options, load_be_config, load_fe_config)

REPO = Path(__file__).resolve().parents[2]


def _error(loader, path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loader(path)
    text = str(info.value)
    assert "\n" not in text
    assert re.match(rf"^{re.escape(path)}:\d+: \S", text), text
    return info.value


# -- defaults ----------------------------------------------------------------------------------

def test_fe_defaults_are_tcpha_originals(write_conf, fe_minimal, keyfile):
    cfg = load_fe_config(write_conf(fe_minimal))
    assert isinstance(cfg, FEConfig)
    assert (cfg.raddr, cfg.vaddr, cfg.ports) == ("0.0.0.0", "10.77.0.100", [80])
    assert (cfg.startservers, cfg.maxspareservers, cfg.minspareservers, cfg.maxclients) == (5, 5, 2, 256)
    assert (cfg.connperbe, cfg.redirectaddr, cfg.redirectport) == (2, "0.0.0.0", 8080)
    assert cfg.servers == [] and cfg.rules == []
    assert cfg.local_node is None


def test_fe_defaults_of_added_options(write_conf, fe_minimal, keyfile):
    cfg = load_fe_config(write_conf(fe_minimal))
    assert cfg.interface is None
    assert cfg.peekmax == 16384 and cfg.peektimeout == 10.0
    assert cfg.handofftimeout == 2.0 and cfg.flowtimeout == 3600.0
    assert cfg.dtcinterval == 2.0 and cfg.healthcheck == "tcp" and cfg.healthpath == "/"
    assert (cfg.rise, cfg.fall, cfg.healthport, cfg.healthtimeout) == (2, 1, 0, 1.0)
    assert cfg.rundir == "/run/tcpha/fe" and cfg.logfile is None and cfg.dbglevel == 3
    assert cfg.metrics is None and cfg.grace == 30.0 and cfg.registerport == 80
    assert cfg.authkey == keyfile.read_bytes().strip()
    assert cfg.authkey_path == str(keyfile)


def test_be_defaults(write_conf, be_minimal):
    cfg = load_be_config(write_conf(be_minimal))
    assert isinstance(cfg, BEConfig)
    assert (cfg.raddr, cfg.uaddr, cfg.vaddr, cfg.port) == ("10.77.0.11", "10.77.0.11", "10.77.0.100", 666)
    assert cfg.maxclients == 256 and not hasattr(cfg, "startservers")
    assert (cfg.redirectaddr, cfg.redirectport, cfg.dregister, cfg.feaddr, cfg.feport) == \
        ("0.0.0.0", 80, False, None, 80)
    assert cfg.app_address == ("127.0.0.1", 80)
    assert cfg.name == "10.77.0.11:666"
    assert (cfg.tlscert, cfg.tlskey, cfg.sessioncache, cfg.sessiontimeout, cfg.tlsports) == \
        (None, None, None, 300.0, [443])
    assert cfg.rundir == "/run/tcpha/be" and cfg.unixpath is None and cfg.rules == []


def test_every_setting_becomes_an_attribute(write_conf, fe_minimal, be_minimal):
    fe = load_fe_config(write_conf(fe_minimal, "fe.conf"))
    be = load_be_config(write_conf(be_minimal, "be.conf"))
    for table, cfg in ((FE_SETTINGS, fe), (BE_SETTINGS, be)):
        names = {f.name for f in dataclasses.fields(cfg)}
        assert names == {s.attr for s in table} | {"path", "authkey_path", "warnings"}


def test_key_is_not_in_repr(write_conf, fe_minimal):
    cfg = load_fe_config(write_conf(fe_minimal))
    assert cfg.authkey.decode() not in repr(cfg)


# -- format ------------------------------------------------------------------------------------

def test_comments_blank_lines_spacing_and_case(write_conf, keyfile):
    cfg = load_fe_config(write_conf(
        "# a comment\n\n   # an indented comment\nVADDR=10.77.0.100\n  Port   =   81  \n"
        f"authkey={keyfile}\nserver = 10.0.0.1 666\nrule = 10.0.0.1 a#b\n\n"))
    assert cfg.vaddr == "10.77.0.100" and cfg.ports == [81]
    assert cfg.rules[0].pattern == "a#b"  # '#' inside a value is part of it


def test_repeatables_keep_file_order_and_lines(write_conf, fe_minimal):
    cfg = load_fe_config(write_conf(
        fe_minimal
        + "rule = 10.0.0.2 .*\n"           # a rule before its server: allowed
        + "server = 10.0.0.1 666\nserver = 10.0.0.2 667 weight=3\nserver = unix:/run/tcpha/be.sock\n"
        + "rule = 10.0.0.1 jpg$\nrule = unix:/run/tcpha/be.sock ^/local/\n"))
    assert [(s.kind, s.host, s.port, s.path, s.weight) for s in cfg.servers] == [
        ("tcp", "10.0.0.1", 666, None, 1), ("tcp", "10.0.0.2", 667, None, 3),
        ("unix", None, None, "/run/tcpha/be.sock", 1)]
    assert [s.lineno for s in cfg.servers] == [4, 5, 6]
    assert [(r.target, r.pattern, r.lineno) for r in cfg.rules] == [
        ("10.0.0.2:667", ".*", 3), ("10.0.0.1:666", "jpg$", 7), ("unix:/run/tcpha/be.sock", "^/local/", 8)]
    assert cfg.server("10.0.0.2:667") is cfg.servers[1]
    assert cfg.server("10.9.9.9:1") is None


def test_rule_fields(write_conf, fe_minimal):
    cfg = load_fe_config(write_conf(
        fe_minimal + "server = 10.0.0.1 666\n"
        "rule = 10.0.0.1 jpg$\nrule = 10.0.0.1 host:^img\\.\nrule = 10.0.0.1 sni:^Secure\\.example$\n"
        "rule = 10.0.0.1 alpn:^h2$\nrule = 10.0.0.1 uri:host:x\nrule = 10.0.0.1 ^/a b$\n"))
    got = [(r.field, r.pattern) for r in cfg.rules]
    assert got == [("uri", "jpg$"), ("host", "^img\\."), ("sni", "^Secure\\.example$"), ("alpn", "^h2$"),
                   ("uri", "host:x"), ("uri", "^/a b$")]
    uri, host, sni, alpn = (r.regex for r in cfg.rules[:4])
    assert uri.search(b"/pics/a.jpg") and not uri.search(b"/pics/a.png")
    assert host.search(b"IMG.example.com")             # host and SNI rules ignore case
    assert sni.search(b"secure.example")
    assert alpn.search(b"h2") and not alpn.search(b"H2")
    assert isinstance(uri.pattern, bytes)


def test_rule_address_forms_and_local_node(write_conf, keyfile):
    base = f"vaddr = 10.77.0.100\nraddr = 10.77.0.10\nauthkey = {keyfile}\n"
    cfg = load_fe_config(write_conf(
        base + "redirectaddr = 127.0.0.1\nredirectport = 8081\n"
        "server = 10.0.0.1 666\nserver = 10.0.0.1 667\n"
        "rule = 10.0.0.1:667 a\nrule = 10.77.0.10 b\nrule = 127.0.0.1 c\nrule = local d\n"))
    assert [r.target for r in cfg.rules] == ["10.0.0.1:667", LOCAL_TARGET, LOCAL_TARGET, LOCAL_TARGET]
    assert cfg.local_node == ("127.0.0.1", 8081)


def test_rule_naming_several_servers_is_a_pool(write_conf, fe_minimal):
    cfg = load_fe_config(write_conf(
        fe_minimal + "server = 10.0.0.1 666\nserver = 10.0.0.2 666 weight=3\n"
        "rule = 10.0.0.1,10.0.0.2:666 host:^a\\.\nrule = 10.0.0.2 .*\n"))
    pool = ("10.0.0.1:666", "10.0.0.2:666")
    assert [(r.target, r.pool, r.lineno) for r in cfg.rules] == [
        (pool[0], pool, cfg.rules[0].lineno), (pool[1], pool, cfg.rules[0].lineno), ("10.0.0.2:666", (), cfg.rules[2].lineno)]
    assert cfg.servers[1].weight == 3
    for bad, why in (("10.0.0.1,,10.0.0.2", "empty address"), ("10.0.0.1,10.0.0.1", "named twice"),
                     ("10.0.0.1,10.0.0.9", "no 'server' line")):
        err = _error(load_fe_config, write_conf(fe_minimal + f"server = 10.0.0.1 666\nrule = {bad} x\n"))
        assert why in str(err), err


@pytest.mark.parametrize("text, ports", [("80", [80]), ("80 443", [80, 443]), ("80,443", [80, 443]),
                                         ("443, 80 8443", [443, 80, 8443])])
def test_port_lists(write_conf, fe_minimal, text, ports):
    assert load_fe_config(write_conf(fe_minimal + f"port = {text}\n")).ports == ports


def test_be_rules_and_tls_ports(write_conf, be_minimal):
    cfg = load_be_config(write_conf(
        be_minimal + "dregister = 1\nfeaddr = 10.77.0.10\ntlsports = 443 8443\n"
        "rule = jpg$\nrule = 10.77.0.11 host:^img\nrule = sni:x\n"))
    assert cfg.dregister is True and cfg.tlsports == [443, 8443]
    assert [(r.target, r.field, r.pattern) for r in cfg.rules] == [
        ("10.77.0.11:666", "uri", "jpg$"), ("10.77.0.11:666", "host", "^img"), ("10.77.0.11:666", "sni", "x")]


def test_values_with_units(write_conf, fe_minimal):
    cfg = load_fe_config(write_conf(fe_minimal + "peekmax = 32k\npeektimeout = 500ms\nflowtimeout = 2h\n"
                                    "metrics = 9100\ndtcinterval = 0\n"))
    assert (cfg.peekmax, cfg.peektimeout, cfg.flowtimeout) == (32768, 0.5, 7200.0)
    assert cfg.metrics == ("127.0.0.1", 9100) and cfg.dtcinterval == 0


def test_healthtimeout_follows_a_short_dtcinterval(write_conf, fe_minimal):
    cfg = load_fe_config(write_conf(fe_minimal + "dtcinterval = 0.5\n"))
    assert (cfg.dtcinterval, cfg.healthtimeout) == (0.5, 0.5)


def test_authkey_relative_to_the_config_file(tmp_path, keyfile):
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "fe.conf").write_text("vaddr = 10.77.0.100\nauthkey = ../authkey\n")
    cwd = os.getcwd()
    os.chdir("/")
    try:
        cfg = load_fe_config(str(sub / "fe.conf"))
    finally:
        os.chdir(cwd)
    assert os.path.samefile(cfg.authkey_path, keyfile)


def test_changed_options(write_conf, fe_minimal):
    a = load_fe_config(write_conf(fe_minimal + "server = 10.0.0.1 666\nrule = 10.0.0.1 a\n", "a.conf"))
    b = load_fe_config(write_conf(fe_minimal + "server = 10.0.0.1 666\nrule = 10.0.0.1 b\ndbglevel = 5\n",
                                  "b.conf"))
    assert changed_options(a, a) == []
    assert set(changed_options(a, b)) == {"rules", "dbglevel"}


def test_tls_certificate_is_loaded(write_conf, be_minimal, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=t"],
                   check=True, capture_output=True)
    cfg = load_be_config(write_conf(be_minimal + "tlscert = cert.pem\ntlskey = key.pem\n"
                                    "sessioncache = UNIX:/run/tcpha/scache\n"))
    assert cfg.tlscert == str(cert) and cfg.tlskey == str(key)
    assert cfg.sessioncache == "UNIX:/run/tcpha/scache"
    path = write_conf(be_minimal + "tlscert = cert.pem\ntlskey = cert.pem\n", "bad.conf")
    err = _error(load_be_config, path)
    assert err.line == 6 and "cannot load the certificate and key" in err.message


# -- error paths: exactly one line PATH:LINE: message ------------------------------------------

FE_ERRORS = [
    # (config body after the minimal lines, line, message fragment)
    ("bogus = 1\n", 3, "unknown option 'bogus'"),
    ("startserver = 5\n", 3, "unknown option 'startserver' (did you mean 'startservers'?)"),
    ("uaddr = 10.0.0.1\n", 3, "unknown option 'uaddr': it belongs in tcphabe.conf, not tcphafe.conf"),
    ("raddr = 10.0.0.256\n", 3, "raddr: bad IPv4 address '10.0.0.256'"),
    ("raddr = fe80::1\n", 3, "raddr: bad IPv4 address"),
    ("port = 0\n", 3, "port: bad port '0' (expected a number 1-65535)"),
    ("port = 80 65536\n", 3, "port: bad port '65536'"),
    ("port = http\n", 3, "port: bad port 'http'"),
    ("port = 80 80\n", 3, "port: port 80 listed twice"),
    ("redirectport = -1\n", 3, "redirectport: bad port '-1'"),
    ("server = 10.0.0.1 666\nrule = 10.0.0.1 (jpg\n", 4, "rule: bad regular expression '(jpg': missing )"),
    ("server = 10.0.0.1 666\nrule = 10.0.0.1 host:[a\n", 4, "rule: bad regular expression '[a'"),
    ("server = 10.0.0.1 666\nrule = 10.0.0.9 jpg$\n", 4,
     "rule names server 10.0.0.9, which no 'server' line declares"),
    ("rule = unix:/run/x.sock jpg$\n", 3, "rule names server 'unix:/run/x.sock', which no 'server' line"),
    ("server = 10.0.0.1 666\nserver = 10.0.0.1 667\nrule = 10.0.0.1 x\n", 5,
     "rule: '10.0.0.1' matches 2 servers (lines 3, 4); write ADDR:PORT"),
    ("server = 10.0.0.1 666\nrule = 10.0.0.1:667 x\n", 4, "rule names server 10.0.0.1:667"),
    ("server = 10.0.0.1 666\nrule = backend1 x\n", 4, "rule: bad address 'backend1'"),
    ("server = 10.0.0.1 666\nrule = 10.0.0.1\n", 4, "rule: expected 'ADDR [FIELD:]REGEX'"),
    ("server = 10.0.0.1 666\nrule = 10.0.0.1 sni:\n", 4, "rule: empty regular expression for sni"),
    ("rule = local x\n", 3, "rule names the local node (local) but redirectaddr is not set"),
    ("server = 10.0.0.1\n", 3, "server: expected 'ADDR PORT' or 'unix:/PATH'"),
    ("server = 10.0.0.300 666\n", 3, "server: bad IPv4 address '10.0.0.300'"),
    ("server = 10.0.0.1 99999\n", 3, "server: bad port '99999'"),
    ("server = 10.0.0.1 666 heavy\n", 3, "server: unexpected 'heavy'"),
    ("server = 10.0.0.1 666 weight=999\n", 3, "server: bad weight '999'"),
    ("server = unix:relative.sock\n", 3, "server: bad UNIX socket 'unix:relative.sock'"),
    ("server = 10.0.0.1 666\nserver = 10.0.0.1 666\n", 4, "server 10.0.0.1:666 is declared twice (first on line 3)"),
    ("port = 80\nport = 81\n", 4, "'port' is set twice (first on line 3); only 'server' and 'rule' may repeat"),
    ("vaddr = 10.77.0.101\n", 3, "'vaddr' is set twice (first on line 1)"),
    ("just words\n", 3, "expected 'key = value', got 'just words'"),
    ("port =\n", 3, "option 'port' has no value"),
    ("peektimeout = soon\n", 3, "peektimeout: bad duration 'soon'"),
    ("peektimeout = 0\n", 3, "peektimeout: 0 is out of range"),
    ("peekmax = 16q\n", 3, "peekmax: bad size '16q'"),
    ("dbglevel = 7\n", 3, "dbglevel: 7 is out of range (expected 0..6)"),
    ("startservers = five\n", 3, "startservers: bad integer 'five'"),
    ("healthcheck = icmp\n", 3, "healthcheck: bad value 'icmp' (expected one of: tcp, http)"),
    ("healthpath = health\n", 3, "healthpath: bad HTTP path 'health'"),
    ("interface = eth0/1\n", 3, "interface: bad interface name 'eth0/1'"),
    ("metrics = 10.0.0.1:http\n", 3, "metrics: bad port 'http'"),
    ("minspareservers = 6\n", 3, "minspareservers (6) is larger than maxspareservers (5)"),
    ("raddr = 10.77.0.100\n", 1, "vaddr must differ from raddr"),
    ("healthtimeout = 5\n", 3, "healthtimeout (5) is longer than dtcinterval (2)"),
]


@pytest.mark.parametrize("body, line, fragment", FE_ERRORS, ids=[e[2][:40] for e in FE_ERRORS])
def test_fe_error_paths(write_conf, fe_minimal, body, line, fragment):
    path = write_conf(fe_minimal + body)
    err = _error(load_fe_config, path)
    assert err.line == line, str(err)
    assert fragment in err.message, str(err)
    assert str(err) == f"{path}:{line}: {err.message}"


def test_exact_error_line(write_conf, fe_minimal):
    path = write_conf(fe_minimal + "server = 10.0.0.1 666\nrule = 10.0.0.2 jpg$\n")
    with pytest.raises(ConfigError) as info:
        load_fe_config(path)
    assert str(info.value) == f"{path}:4: rule names server 10.0.0.2, which no 'server' line declares"


@pytest.mark.parametrize("missing", ["vaddr", "authkey"])
def test_fe_missing_required(write_conf, keyfile, missing):
    lines = {"vaddr": "vaddr = 10.77.0.100", "authkey": f"authkey = {keyfile}"}
    del lines[missing]
    path = write_conf("\n".join(lines.values()) + "\n")
    err = _error(load_fe_config, path)
    assert err.line == 0
    assert err.message.startswith(f"missing required option '{missing}'")


@pytest.mark.parametrize("missing", ["raddr", "uaddr", "vaddr", "authkey"])
def test_be_missing_required(write_conf, be_minimal, missing):
    text = "".join(line + "\n" for line in be_minimal.splitlines() if not line.startswith(missing))
    err = _error(load_be_config, write_conf(text))
    assert (err.line, err.message.split(" (")[0]) == (0, f"missing required option '{missing}'")


BE_ERRORS = [
    ("dregister = maybe\n", 5, "dregister: bad boolean 'maybe' (expected 0 or 1)"),
    ("dregister = 1\n", 5, "dregister = 1 needs feaddr"),
    ("feaddr = 0.0.0.0\n", 5, "feaddr: 0.0.0.0 is not allowed here"),
    ("rule = 10.77.0.12 jpg$\n", 5, "rule names 10.77.0.12, but a back end's rules can only name itself"),
    ("rule = (x\n", 5, "rule: bad regular expression '(x'"),
    ("vaddr = 10.77.0.11\n", 5, "'vaddr' is set twice"),
    ("server = 10.0.0.1 666\n", 5, "unknown option 'server': it belongs in tcphafe.conf"),
    ("tlskey = /k.pem\n", 5, "tlskey is set but tlscert is not"),
    ("sessioncache = UNIX:/run/x\n", 5, "sessioncache is set but tlscert is not"),
    ("sessioncache = TCP:1.2.3.4\n", 5, "sessioncache:"),
    ("sessioncache = IP:9001\n", 5, "sessioncache: 'IP:9001' is a listen-only address"),
    ("tlscert = /nonexistent/cert.pem\n", 5, "tlscert: cannot read /nonexistent/cert.pem: No such file"),
    ("sessiontimeout = 0\n", 5, "sessiontimeout: 0 is out of range"),
    ("tlsports = 443 x\n", 5, "tlsports: bad port 'x'"),
    ("port = 70000\n", 5, "port: bad port '70000'"),
    ("unixpath = /" + "x" * 120 + "\n", 5, "unixpath: longer than 107 bytes"),
]


@pytest.mark.parametrize("body, line, fragment", BE_ERRORS, ids=[e[2][:40] for e in BE_ERRORS])
def test_be_error_paths(write_conf, be_minimal, body, line, fragment):
    path = write_conf(be_minimal + body)
    err = _error(load_be_config, path)
    assert (err.line, fragment in err.message) == (line, True), str(err)


def test_be_vaddr_must_differ(write_conf, keyfile):
    path = write_conf(f"raddr = 10.0.0.1\nuaddr = 10.0.0.2\nvaddr = 10.0.0.2\nauthkey = {keyfile}\n")
    assert str(_error(load_be_config, path)) == \
        f"{path}:3: vaddr (the VIP) must differ from raddr and uaddr"


# -- the file and the key file -----------------------------------------------------------------

def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.conf")
    assert str(_error(load_fe_config, path)) == \
        f"{path}:0: cannot read the config file: No such file or directory"


def test_not_utf8(write_conf, fe_minimal, tmp_path):
    path = tmp_path / "bin.conf"
    path.write_bytes(fe_minimal.encode() + b"rule = 10.0.0.1 \xff\n")
    err = _error(load_fe_config, str(path))
    assert (err.line, err.message) == (3, "not valid UTF-8 text")


def test_authkey_missing_file(write_conf, tmp_path):
    key = tmp_path / "none.key"
    path = write_conf(f"vaddr = 10.77.0.100\nauthkey = {key}\n")
    assert str(_error(load_fe_config, path)) == (
        f"{path}:2: authkey: cannot read key file {key}: No such file or directory "
        f"(create one with: tcpha-keygen {key})")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_authkey_readable_by_others_is_refused(write_conf, keyfile, mode):
    os.chmod(keyfile, mode)
    path = write_conf(f"vaddr = 10.77.0.100\nauthkey = {keyfile}\n")
    assert str(_error(load_fe_config, path)) == (
        f"{path}:2: authkey: key file {keyfile} is accessible by group or others "
        f"(mode {mode:04o}); run: chmod 600 {keyfile}")


def test_authkey_too_short(write_conf, tmp_path):
    key = tmp_path / "short.key"
    key.write_text("0123456789abcdef0123456789abcde\n")  # 31 bytes
    os.chmod(key, 0o600)
    path = write_conf(f"vaddr = 10.77.0.100\nauthkey = {key}\n")
    err = _error(load_fe_config, path)
    assert err.line == 2 and f"holds 31 bytes; at least 32 are needed" in err.message


def test_authkey_directory_and_empty(write_conf, tmp_path):
    d = tmp_path / "keydir"
    d.mkdir(mode=0o700)
    err = _error(load_fe_config, write_conf(f"vaddr = 10.77.0.100\nauthkey = {d}\n", "a.conf"))
    assert err.line == 2 and "is not a regular file" in err.message
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    os.chmod(empty, 0o600)
    err = _error(load_be_config, write_conf(
        f"raddr = 10.0.0.1\nuaddr = 10.0.0.1\nvaddr = 10.0.0.100\nauthkey = {empty}\n", "b.conf"))
    assert err.line == 4 and "holds 0 bytes" in err.message


# -- the sample configs ------------------------------------------------------------------------

def test_sample_configs_load(tmp_path, keyfile):
    for name, loader in (("fe/tcphafe.conf", load_fe_config), ("be/tcphabe.conf", load_be_config)):
        text = (REPO / name).read_text().replace("/etc/tcpha/authkey", str(keyfile))
        path = tmp_path / os.path.basename(name)
        path.write_text(text)
        cfg = loader(str(path))
        assert cfg.vaddr == "10.77.0.100"
    fe = load_fe_config(str(tmp_path / "tcphafe.conf"))
    assert fe.raddr == "10.77.0.10" and fe.ports == [80, 443]
    assert [s.name for s in fe.servers] == ["10.77.0.11:666", "10.77.0.12:666"]
    assert [(r.target, r.field, r.pattern) for r in fe.rules][:3] == [
        ("10.77.0.11:666", "uri", "jpg$"), ("10.77.0.11:666", "sni", "^img\\.example$"),
        ("10.77.0.12:666", "uri", ".*")]
    be = load_be_config(str(tmp_path / "tcphabe.conf"))
    assert (be.raddr, be.port, be.app_address) == ("10.77.0.11", 666, ("127.0.0.1", 8080))


def test_compile_rule_for_registered_back_ends(write_conf, be_minimal):
    from tcpha.config import compile_rule, register_rules
    be = load_be_config(write_conf(be_minimal + "dregister = 1\nfeaddr = 10.77.0.10\n"
                                   "rule = jpg$\nrule = host:^IMG\\.\n"))
    pairs = register_rules(be)
    assert pairs == (("uri", "jpg$"), ("host", "^IMG\\."))
    rules = [compile_rule(be.name, f, p) for f, p in pairs]
    assert [r.regex for r in rules] == [r.regex for r in be.rules]
    assert rules[1].regex.search(b"img.example")
    with pytest.raises(ValueError, match="bad regular expression"):
        compile_rule("x", "uri", "(")
    with pytest.raises(ValueError, match="unknown rule field 'cookie'"):
        compile_rule("x", "cookie", "a")
    with pytest.raises(ValueError, match="empty regular expression"):
        compile_rule("x", "sni", "")


def test_a_rule_may_set_its_own_rehandoff(write_conf, fe_minimal):
    """docs/rules.md: a last word ``rehandoff=on|off`` is the rule's own; a regex with spaces keeps them."""
    cfg = load_fe_config(write_conf(
        fe_minimal + "server = 10.0.0.1 666\nserver = 10.0.0.2 666\n"
        "rule = 10.0.0.1 jpg$ rehandoff=off\nrule = 10.0.0.1,10.0.0.2 host:^a\\. rehandoff=on\n"
        "rule = 10.0.0.2 ^/a b$\nrule = 10.0.0.2 ^/x rehandoff[=]on\n"))
    assert [(r.pattern, r.rehandoff) for r in cfg.rules] == [
        ("jpg$", "off"), ("^a\\.", "on"), ("^a\\.", "on"), ("^/a b$", ""), ("^/x rehandoff[=]on", "")]
    for bad, why in (("jpg$ rehandoff=yes", "rehandoff= takes on or off, got 'yes'"),
                     ("jpg$ rehandoff=", "rehandoff= takes on or off, got ''"),
                     ("rehandoff=on", "empty regular expression"),
                     (" host: rehandoff=on", "empty regular expression")):
        err = _error(load_fe_config, write_conf(fe_minimal + f"server = 10.0.0.1 666\nrule = 10.0.0.1 {bad}\n"))
        assert why in str(err) and "test.conf:4: rule: " in str(err), err
