"""The VM description stays the namespace lab's topology."""

import json
from pathlib import Path

from tcpha.lab import DEFAULT_TOPOLOGY, make_topology
from tcpha.lab.vm import main, render

VAGRANT = Path(__file__).resolve().parents[2] / "vagrant"


def test_committed_vagrant_topology_is_the_default_topology():
    assert (VAGRANT / "topology.json").read_text() == render(DEFAULT_TOPOLOGY)


def test_vagrantfile_reads_the_generated_host_list():
    text = (VAGRANT / "Vagrantfile").read_text()
    assert 'File.read(File.join(__dir__, "topology.json"))' in text and 'host["lan_ip"]' in text


def test_render_more_backends(capsys):
    assert main(["--backends", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(render(make_topology(4)))
    assert [h["name"] for h in data["hosts"] if h["role"] == "be"] == ["be1", "be2", "be3", "be4"]


def test_bad_topology_file_one_line(tmp_path, capsys):
    assert main(["--topology", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.toml" in err
