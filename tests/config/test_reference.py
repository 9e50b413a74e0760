"""The generated reference files and --help come from the settings table and cannot drift."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest

from tcpha.config import (BE_SETTINGS, FE_SETTINGS, add_help, dbglevel_to_logging, help_epilog,
                          load_be_config, load_fe_config)
from tcpha.config.reference import generated_files, main, write_all

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", sorted(generated_files()))
def test_committed_file_equals_generated(rel):
    committed = (REPO / rel).read_text()
    assert committed == generated_files()[rel], (
        f"{rel} is out of date: run 'python -m tcpha.config' and commit the result")


def test_write_all_writes_the_same_files(tmp_path):
    assert main([str(tmp_path)]) == 0
    for rel, content in generated_files().items():
        assert (tmp_path / rel).read_text() == content
    assert len(write_all(str(tmp_path))) == 3


@pytest.mark.parametrize("component, table", [("fe", FE_SETTINGS), ("be", BE_SETTINGS)])
def test_every_option_is_documented_everywhere(component, table):
    name = "fe/tcphafe.conf.detail" if component == "fe" else "be/tcphabe.conf.detail"
    detail = generated_files()[name]
    docs = generated_files()["docs/configuration.md"]
    epilog = help_epilog(component)
    for s in table:
        assert s.doc.strip() and "\n" not in s.doc and len(s.doc) <= 110, s.name
        assert re.search(rf"^#{s.name} = ", detail, re.M), s.name
        assert f"`{s.name} = " in docs, s.name
        assert f"    {s.name} = {s.metavar}" in epilog, s.name


@pytest.mark.parametrize("component, loader", [("fe", load_fe_config), ("be", load_be_config)])
def test_detail_file_uncommented_is_a_valid_config(tmp_path, keyfile, component, loader):
    # Every '#key = value' line of the reference file, uncommented, must load: the defaults and
    # examples shown to operators are values the loader accepts.
    name = "fe/tcphafe.conf.detail" if component == "fe" else "be/tcphabe.conf.detail"
    lines = [line[1:] for line in generated_files()[name].splitlines() if re.match(r"^#[a-z]+ = ", line)]
    text = "\n".join(lines).replace("/etc/tcpha/authkey", str(keyfile)) + "\n"
    (tmp_path / "c.conf").write_text(text)
    cfg = loader(str(tmp_path / "c.conf"))
    assert len(lines) == len(FE_SETTINGS if component == "fe" else BE_SETTINGS)
    assert cfg.vaddr == "10.77.0.100"


def test_add_help_shows_the_options():
    parser = argparse.ArgumentParser(prog="tcpha-fe")
    add_help(parser, "fe")
    text = parser.format_help()
    assert "Options of tcphafe.conf" in text
    assert "    peekmax = BYTES   [16384]" in text
    assert "    vaddr = ADDR   [(required)]" in text
    assert "    rule = ADDR[,ADDR...] [FIELD:]REGEX [rehandoff=on|off]   [(none)] (repeatable)" in text


def test_dbglevel_mapping():
    assert [dbglevel_to_logging(n) for n in range(7)] == [
        logging.CRITICAL, logging.ERROR, logging.WARNING, 25, logging.INFO, logging.DEBUG, 5]
    assert logging.getLevelName(25) == "NOTICE"
