"""The daemons' command lines keep the config error contract: one line PATH:LINE: message on
stderr, exit status 2, nothing started; --help lists the options from the settings table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tcpha.config import ConfigError, FE_SETTINGS, BE_SETTINGS, load_be_config, load_fe_config


def _run(component: str, *args: str) -> subprocess.CompletedProcess:
    code = f"import sys; from tcpha.cli.{component} import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("component, loader, body", [
    ("fe", load_fe_config, "vaddr = 10.77.0.100\nauthkey = {key}\nserver = 10.0.0.1 666\nrule = 10.0.0.2 jpg$\n"),
    ("fe", load_fe_config, "vaddr = 10.77.0.100\n"),
    ("fe", load_fe_config, "vaddr = 10.77.0.100\nauthkey = {key}\nrule = 10.0.0.1 (\n"),
    ("be", load_be_config, "raddr = 10.0.0.1\nuaddr = 10.0.0.1\nvaddr = 10.0.0.100\nauthkey = {key}\nport = 0\n"),
    ("be", load_be_config, "raddr = 10.0.0.1\nuaddr = 10.0.0.1\nvaddr = 10.0.0.100\nauthkey = /nonexistent/key\n"),
])
def test_bad_config_is_one_line_and_status_2(write_conf, keyfile, component, loader, body):
    path = write_conf(body.format(key=keyfile))
    with pytest.raises(ConfigError) as info:
        loader(path)
    for extra in (["--check-config"], []):  # with and without --check-config: nothing starts
        proc = _run(component, "-c", path, *extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"{info.value}\n"
        assert proc.stdout == ""


def test_good_config_checks(write_conf, fe_minimal):
    proc = _run("fe", "-c", write_conf(fe_minimal), "--check-config")
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.parametrize("component, table", [("fe", FE_SETTINGS), ("be", BE_SETTINGS)])
def test_help_lists_every_option(component, table):
    proc = _run(component, "--help")
    assert proc.returncode == 0
    for s in table:
        assert f"    {s.name} = {s.metavar}" in proc.stdout, s.name
