"""The settings table declares each option's type and what a reload does with it; the loaded config holds
typed values with the table's defaults; reload code reads the declaration (no hand-kept lists)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest

from tcpha.config import BE_SETTINGS, FE_SETTINGS, BEConfig, FEConfig, load_be_config, load_fe_config
from tcpha.config.reference import generated_files, help_epilog
from tcpha.config.settings import LIVE, OBSOLETE, RESTART, reload_plan, settings_for

TABLES = [("fe", FE_SETTINGS, load_fe_config), ("be", BE_SETTINGS, load_be_config)]

# A value other than the default for every option (the loader must accept it in the minimal file).
OTHER_VALUE = {
    "fe": {"raddr": "10.77.0.10", "port": "80 443", "startservers": "3", "maxspareservers": "6",
           "minspareservers": "1", "maxclients": "100", "connperbe": "3", "redirectaddr": "10.77.0.10",
           "redirectport": "8081", "server": "10.77.0.11 666", "rule": "10.77.0.11 jpg$",
           "registerport": "81", "interface": "eth1", "peekmax": "8k", "peektimeout": "5",
           "handofftimeout": "1", "flowtimeout": "60", "steering": "nft", "dtcinterval": "3", "healthcheck": "http",
           "healthpath": "/up", "healthport": "8080", "healthtimeout": "0.5", "rise": "3", "fall": "2",
           "rundir": "/tmp/x", "usefuse": "0", "logfile": "/tmp/x.log", "dbglevel": "4",
           "metrics": "9100", "grace": "5", "vaddr": "10.77.0.101", "statsadmin": "on", "tunnel": "vxlan",
           "rehandoff": "on"},
    "be": {"raddr": "10.77.0.12", "uaddr": "10.77.0.13", "vaddr": "10.77.0.101", "port": "667",
           "maxclients": "10", "redirectaddr": "127.0.0.2", "redirectport": "8081", "appsource": "local",
           "appproxy": "v2", "dregister": "1",
           "feaddr": "10.77.0.10", "feport": "81", "rule": "jpg$", "registerretry": "1",
           "interface": "eth1", "unixpath": "/tmp/be.sock", "relay": "auto", "tlsports": "443 8443",
           "sessiontimeout": "60", "rundir": "/tmp/x", "usefuse": "0", "logfile": "/tmp/x.log",
           "dbglevel": "4", "metrics": "9101", "grace": "5", "tunnel": "vxlan"},
}
# Options whose other value needs a file (a certificate) or another option: left to the lab tests.
NEEDS_MORE = {("be", "tlscert"), ("be", "tlskey"), ("be", "sessioncache"), ("be", "sessioncachecafile"),
              ("be", "sessioncachecert"), ("be", "sessioncachekey"), ("be", "sessioncachecheckhost")}


def _minimal(component: str, key: str, skip: str = "") -> dict[str, str]:
    base = ({"vaddr": "10.77.0.100", "authkey": key} if component == "fe" else
            {"raddr": "10.77.0.11", "uaddr": "10.77.0.11", "vaddr": "10.77.0.100", "authkey": key})
    base.pop(skip, None)
    return base


def _text(options: dict[str, str]) -> str:
    return "".join(f"{k} = {v}\n" for k, v in options.items())


def _base_type(annotation: typing.Any) -> typing.Any:
    """int for int, list for list[int], (str, NoneType) for Optional[str]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return tuple(_base_type(a) for a in typing.get_args(annotation))
    return origin or annotation


@pytest.mark.parametrize("component, table, loader", TABLES)
def test_every_setting_declares_its_type_and_reload(component, table, loader):
    for s in table:
        assert s.reload in (LIVE, RESTART), s.name
        assert s.kind and s.value_type is not None, s.name


@pytest.mark.parametrize("component, table, loader", TABLES)
def test_loaded_values_are_typed_and_defaults_come_from_the_table(write_conf, keyfile, component, table, loader):
    cfg = loader(write_conf(_text(_minimal(component, str(keyfile)))))
    cls = FEConfig if component == "fe" else BEConfig
    empty = cls()                                   # the dataclass's own defaults: the table's
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for s in table:
        value = getattr(cfg, s.attr)
        if s.default is not None and not s.repeatable:
            assert value == s.default_value() == getattr(empty, s.attr), s.name
        if value is not None:
            assert isinstance(value, _base_type(hints[s.attr])), (s.name, value, hints[s.attr])
    # written as a config file would say it, read as a Python value
    assert (cfg.grace, cfg.dbglevel, cfg.usefuse) == (30.0, 3, True)
    assert type(cfg.grace) is float and type(cfg.dbglevel) is int and type(cfg.usefuse) is bool


@pytest.mark.parametrize("component, table, loader", TABLES)
def test_other_values_are_converted_once(write_conf, keyfile, component, table, loader):
    options = dict(_minimal(component, str(keyfile)), **{k: v for k, v in OTHER_VALUE[component].items()})
    if component == "be":
        options["rule"] = "jpg$"
    cfg = loader(write_conf(_text(options)))
    if component == "fe":
        assert (cfg.peekmax, cfg.ports, cfg.metrics, cfg.usefuse, cfg.healthtimeout) == \
            (8192, [80, 443], ("127.0.0.1", 9100), False, 0.5)
    else:
        assert (cfg.dregister, cfg.tlsports, cfg.maxclients, cfg.grace, cfg.usefuse) == \
            (True, [443, 8443], 10, 5.0, False)


@pytest.mark.parametrize("component, table, loader", TABLES)
def test_reload_plan_sorts_each_changed_option_by_its_declaration(write_conf, keyfile, component, table, loader):
    base = _minimal(component, str(keyfile))
    old = loader(write_conf(_text(base), "old.conf"))
    for s in table:
        if (component, s.name) in NEEDS_MORE:
            continue
        if s.name == "authkey":
            other_key = keyfile.with_name("other-key")
            other_key.write_text("b" * 64)
            other_key.chmod(0o600)
            options = dict(base, authkey=str(other_key))
        elif s.name == "sessionkeys":
            session_keys = keyfile.with_name("session-keys")
            session_keys.write_text("c" * 64 + "\n")
            session_keys.chmod(0o600)
            options = dict(base, sessionkeys=str(session_keys))
        else:
            options = dict(base, **{s.name: OTHER_VALUE[component][s.name]})
        if component == "be" and s.name == "dregister":
            options["feaddr"] = "10.77.0.10"
        if component == "fe" and s.name == "rule":
            options["server"] = OTHER_VALUE["fe"]["server"]
        new = loader(write_conf(_text(options), "new.conf"))
        live, restart = reload_plan(component, old, new)
        changed = [x.name for x in live + restart]
        assert s.name in changed, s.name
        assert s in (live if s.reload == LIVE else restart), s.name
    assert reload_plan(component, old, loader(write_conf(_text(base), "same.conf"))) == ([], [])


def test_the_two_daemons_have_no_hand_kept_lists():
    import tcpha.be.reload as be_reload
    assert not hasattr(be_reload, "NEEDS_RESTART")
    # the back end's plan is the table's
    assert [s.name for s in settings_for("be") if s.reload == RESTART] == \
        ["raddr", "uaddr", "vaddr", "port", "appsource", "relay", "interface", "tunnel", "unixpath", "authkey", "rundir",
         "usefuse", "metrics"]


def test_obsolete_back_end_options_load_with_one_warning_line(write_conf, keyfile):
    base = _text(_minimal("be", str(keyfile)))
    path = write_conf(base + "startservers = 5\nminspareservers = 2\nmaxspareservers = 5\n")
    cfg = load_be_config(path)
    assert cfg.warnings == [f"{path}:{n}: '{name}' is obsolete and ignored: {OBSOLETE['be'][name]}"
                            for n, name in ((5, "startservers"), (6, "minspareservers"), (7, "maxspareservers"))]
    assert not any(s.name in OBSOLETE["be"] for s in BE_SETTINGS)
    # an obsolete option is not an unknown one: those are still refused, with the line
    from tcpha.config import ConfigError
    with pytest.raises(ConfigError, match=r":5: unknown option 'startserver'"):
        load_be_config(write_conf(base + "startserver = 5\n", "typo.conf"))
    # the front end has a worker pool: there they are ordinary options
    fe = load_fe_config(write_conf(_text(_minimal("fe", str(keyfile))) + "startservers = 3\n", "fe.conf"))
    assert fe.startservers == 3 and fe.warnings == []


def test_check_config_prints_the_obsolete_warning(write_conf, keyfile):
    path = write_conf(_text(_minimal("be", str(keyfile))) + "startservers = 5\n")
    code = "import sys; from tcpha.cli.be import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "-c", path, "--check-config"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"{path}:5: 'startservers' is obsolete and ignored: {OBSOLETE['be']['startservers']}\n"


@pytest.mark.parametrize("component, table, loader", TABLES)
def test_the_reference_shows_what_a_reload_does(component, table, loader):
    name = "fe/tcphafe.conf.detail" if component == "fe" else "be/tcphabe.conf.detail"
    detail = generated_files()[name]
    docs = generated_files()["docs/configuration.md"]
    epilog = help_epilog(component)
    mode = {LIVE: "live", RESTART: "restart"}
    for s in table:
        assert f"# {s.name} = {s.metavar} (reload: {mode[s.reload]}" in detail, s.name
        line = [line for line in epilog.splitlines() if line.startswith(f"    {s.name} = ")][0]
        assert line.endswith(f" reload: {mode[s.reload]}"), line
        rows = [line for line in docs.splitlines() if line.startswith(f"| `{s.name} = ")]
        assert any(f"| {s.kind} | {mode[s.reload]} |" in row for row in rows), s.name
