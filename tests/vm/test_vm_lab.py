"""The VM lab (tcpha.lab.qemu): Debian guests from vagrant/build-box's box, under QEMU (TCG on this
machine kind), with the Debian kernel's ipip: routed mode `tunnel = ipip` as TCPHA does it.

    client 10.91.0.2 ─┐                 ┌─ be1 10.92.0.11  (VIP on tunl0)
    fe     10.91.0.10 ─┼─ router .1 | .1 ┼─ be2 10.92.0.12  (VIP on tunl0)
    VIP    10.91.0.100 (on the fe)       subnet b 10.92.0.0/24

The guests reach nothing but each other; they report on their serial consoles (markers), the host reads
them. The client: routing by URI, a 20 MiB download during which it asks the front end's guest (a tiny
listener there) to kill -9 tcpha-fe, then the download's size and digest; the front end's guest then
reports how many bytes its LAN interface sent meanwhile. Before that, TLS resumption across back ends
as in the namespace lab's demo: `openssl s_client` makes a session on be1 (SNI a.example) and resumes it
on be2 (SNI b.example), TLS 1.2 and 1.3; tcpha-be terminates TLS on both, sharing sessions through a
dc_client on each and dc_server on the router.

Slow (TCG guests; minutes): run by hand, `TCPHA_VM=1 python3 -m pytest -q tests/vm`; skipped otherwise,
and skipped with the reason where no box can be built (no debootstrap/QEMU: `scripts/install-deps --vm`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tcpha.lab.qemu import Guest, VmLab, box_dir

REPO = Path(__file__).resolve().parents[2]
VIP = "10.91.0.100"
BIG = 20 * 1024 * 1024
PY = "PYTHONPATH=/lab/repo /opt/tcpha-venv/bin/python3"
DC_SERVER_PORT = 9001          # dc_server on the router, the back ends' subnet side
DC_CLIENT_PORT = 9002          # dc_client on each back end's loopback

pytestmark = [pytest.mark.skipif(os.environ.get("TCPHA_VM") != "1", reason="VM lab: set TCPHA_VM=1 (slow)"),
              pytest.mark.skipif(os.geteuid() != 0, reason="VM lab: needs root")]


def _box() -> Path:
    missing = [t for t in ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4") if not shutil.which(t)]
    if missing:
        pytest.skip(f"VM lab: {', '.join(missing)} missing (scripts/install-deps --vm)")
    box = box_dir()
    if box is None:
        r = subprocess.run([str(REPO / "vagrant" / "build-box")], capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, r.stderr[-2000:]
        box = box_dir()
    assert box is not None
    return box


def _be(name: str, ip: str, key: str, cert: tuple[str, str]) -> Guest:
    conf = "\n".join([f"raddr = {ip}", f"uaddr = {ip}", f"vaddr = {VIP}", "port = 666",
                      "redirectaddr = 127.0.0.1", "redirectport = 8080", "authkey = /tmp/authkey",
                      "tunnel = ipip", "usefuse = 0", "rundir = /run/tcpha/be", "logfile = /tmp/be.log",
                      "grace = 1", "tlscert = /lab/cert.pem", "tlskey = /tmp/key.pem", "tlsports = 443",
                      f"sessioncache = IP:127.0.0.1:{DC_CLIENT_PORT}"]) + "\n"
    script = f"""
ip route add default via 10.92.0.1
printf %s {key} > /tmp/authkey; chmod 600 /tmp/authkey
install -m 600 /lab/key.pem /tmp/key.pem
{PY} -m tcpha.cli.dc_client -listen IP:127.0.0.1:{DC_CLIENT_PORT} -server IP:10.92.0.1:{DC_SERVER_PORT} &
mkdir -p /srv/img && head -c {BIG} /dev/urandom > /srv/big.bin && head -c 30000 /dev/urandom > /srv/img/a.jpg
echo '<p>{name}</p>' > /srv/index.html
sha256sum /srv/big.bin | sed 's/^/TCPHA-SHA /'
# on every address: the front end's health check connects to the application port too
{PY} -m tcpha.lab.httpapp --name {name} --root /srv --listen 0.0.0.0:8080 &
{PY} -m tcpha.be -c /lab/tcphabe.conf &
(tail -F /tmp/be.log 2>/dev/null | sed -u 's/^/TCPHA-BE-LOG /') &
for i in $(seq 1 120); do grep -q 'kernel state installed' /tmp/be.log 2>/dev/null && break; sleep 0.5; done
ip -br addr show tunl0 | sed 's/^/TCPHA-TUNL0 /'
echo TCPHA-BE-READY
sleep 100000
"""
    return Guest(name, [("b", f"{ip}/24")], script,
                 files={"tcphabe.conf": conf, "cert.pem": cert[0], "key.pem": cert[1]})


def _guests(key: str, cert: tuple[str, str]) -> list[Guest]:
    fe_conf = "\n".join(["raddr = 10.91.0.10", f"vaddr = {VIP}", "port = 80 443", "authkey = /tmp/authkey",
                         "tunnel = ipip", "steering = auto", "startservers = 1", "usefuse = 0",
                         "rundir = /run/tcpha/fe", "logfile = /tmp/fe.log", "peektimeout = 5",
                         # TCG guests answer in seconds, not milliseconds (defaults: a Pong within 1 s,
                         # Restored within 2 s)
                         "dtcinterval = 5", "healthtimeout = 5", "handofftimeout = 10",
                         "server = 10.92.0.11 666", "server = 10.92.0.12 666",
                         "rule = 10.92.0.11 sni:^a\\.", "rule = 10.92.0.12 sni:^b\\.",
                         "rule = 10.92.0.11 jpg$", "rule = 10.92.0.12 .*"]) + "\n"
    fe = f"""
ip route add 10.92.0.0/24 via 10.91.0.1
printf %s {key} > /tmp/authkey; chmod 600 /tmp/authkey
{PY} -m tcpha.fe -c /lab/tcphafe.conf &
FE=$!
(tail -F /tmp/fe.log 2>/dev/null | sed -u 's/^/TCPHA-FE-LOG /') &     # the front end's log on the console
echo TCPHA-FE-STARTED
# the client asks for the kill -9 (port 9999), then says it is done (port 9998)
{PY} /lab/wait_port.py 9999; TX0=$(cat /sys/class/net/eth0/statistics/tx_bytes)
kill -9 $FE; echo TCPHA-FE-KILLED
{PY} /lab/wait_port.py 9998; TX1=$(cat /sys/class/net/eth0/statistics/tx_bytes)
echo "TCPHA-FE-TX $((TX1 - TX0))"
sleep 100000
"""
    wait_port = ("import socket, sys\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                 "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(1); c, _ = s.accept(); c.close()\n")
    client = f"""
ip route add 10.92.0.0/24 via 10.91.0.1
{PY} /lab/client.py
sleep 100000
"""
    client_py = f"""
import hashlib, json, socket, subprocess, time, urllib.request
from tcpha.lab.tls_demo import parse_s_client
VIP = {VIP!r}
def get(path):
    with urllib.request.urlopen(f"http://{{VIP}}{{path}}", timeout=20) as r:
        return r.headers.get("X-Tcpha-Backend"), r.read()
# ready: both back ends in service (each is put in after its own health checks: be1's can come later
# than be2's, and a.jpg then falls through to be2)
deadline = time.monotonic() + 600
while True:
    try:
        if get("/index.html")[0] and get("/img/a.jpg")[0] == "be1": break
        why = "a.jpg not from be1 yet"
    except Exception as e:
        why = e
    if time.monotonic() > deadline: print("TCPHA-CLIENT-FAIL not ready:", why, flush=True); raise SystemExit(1)
    time.sleep(2)
result = {{"routes": {{p: get(p)[0] for p in ("/img/a.jpg", "/index.html")}}}}
def s_client(sni, version, sess):
    argv = ["openssl", "s_client", "-connect", VIP + ":443", "-ign_eof", "-tls" + version.replace(".", "_"),
            "-servername", sni, *sess]
    req = "GET /index.html HTTP/1.1\\r\\nHost: " + sni + "\\r\\nConnection: close\\r\\n\\r\\n"
    out = subprocess.run(argv, input=req, capture_output=True, text=True, timeout=120)
    r = parse_s_client(out.stdout + out.stderr, out.returncode)
    return [None if r.reused is None else ("Reused" if r.reused else "New"), r.backend]
result["tls"] = {{}}
for version in ("1.2", "1.3"):
    sess = "/tmp/session-" + version
    result["tls"][version] = [s_client("a.example", version, ["-sess_out", sess]),
                              s_client("b.example", version, ["-sess_in", sess])]
s = socket.create_connection((VIP, 80), timeout=60)
s.sendall(b"GET /big.bin HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
buf = b""
while b"\\r\\n\\r\\n" not in buf:
    buf += s.recv(65536)
head, _, body = buf.partition(b"\\r\\n\\r\\n")
h = hashlib.sha256(body); got = len(body); killed = False
while True:
    b = s.recv(1 << 20)
    if not b: break
    h.update(b); got += len(b)
    if not killed and got > 4 << 20:
        socket.create_connection(("10.91.0.10", 9999), timeout=20).close(); killed = True
def tell_fe(port):                        # the front end's guest listens once it got there (TCG: seconds)
    until = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("10.91.0.10", port), timeout=20).close(); return
        except OSError:
            if time.monotonic() > until: raise
            time.sleep(0.5)
tell_fe(9998)
result.update(status=head.split(b" ")[1].decode(), bytes=got, sha=h.hexdigest(), killed=killed,
              backend=[l.split(b":", 1)[1].strip().decode() for l in head.split(b"\\r\\n") if l.lower().startswith(b"x-tcpha-backend")])
print("TCPHA-CLIENT-RESULT", json.dumps(result), flush=True)
"""
    router = f"""
sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0 net.ipv4.conf.eth1.rp_filter=0
{PY} -m tcpha.cli.dc_server -listen IP:10.92.0.1:{DC_SERVER_PORT} &
echo TCPHA-ROUTER-READY
sleep 100000
"""
    return [
        Guest("router", [("a", "10.91.0.1/24"), ("b", "10.92.0.1/24")], router, memory=256),
        _be("be1", "10.92.0.11", key, cert),
        _be("be2", "10.92.0.12", key, cert),
        Guest("fe", [("a", "10.91.0.10/24")], fe, files={"tcphafe.conf": fe_conf, "wait_port.py": wait_port}),
        Guest("client", [("a", "10.91.0.2/24")], client, files={"client.py": client_py}),
    ]


@pytest.mark.timeout(1800)
def test_ipip_routed_mode_across_a_router(run_prefix, record_property, tmp_path):
    t0 = time.monotonic()
    box = _box()
    build_s = time.monotonic() - t0
    from tcpha.lab.tls_demo import make_cert
    cert_path, key_path = make_cert(tmp_path, vip=VIP)
    cert = (cert_path.read_text(), key_path.read_text())
    lab = VmLab(run_prefix, box, _guests(secrets.token_hex(32), cert), repo=REPO)
    print(lab.accel_line)
    try:
        lab.up()
        boot = {g: lab.wait_for(g, "TCPHA-NET-UP", 600) for g in lab.guests}
        for g in ("be1", "be2"):
            lab.wait_for(g, "TCPHA-BE-READY", 900)
        lab.wait_for("client", "TCPHA-CLIENT-RESULT", 900)
        lab.wait_for("fe", "TCPHA-FE-TX", 120)
        client = lab.console_text("client")
        result = json.loads(client.split("TCPHA-CLIENT-RESULT", 1)[1].splitlines()[0])
        fe_tx = int(re.search(r"TCPHA-FE-TX (\d+)", lab.console_text("fe")).group(1))
        be2_sha = re.search(r"TCPHA-SHA ([0-9a-f]{64})", lab.console_text("be2")).group(1)
        tunl0 = re.search(r"TCPHA-TUNL0 (.*)", lab.console_text("be1")).group(1)
        print(f"VM lab: box {build_s:.0f} s, boot to network {boot}, total {time.monotonic() - t0:.0f} s")
        record_property("boot_seconds", boot)
        assert result["routes"] == {"/img/a.jpg": "be1", "/index.html": "be2"}
        # a session made on be1 is resumed on be2, with either TLS version
        assert result["tls"] == {v: [["New", "be1"], ["Reused", "be2"]] for v in ("1.2", "1.3")}, result["tls"]
        assert result["killed"] and result["status"] == "200" and result["backend"] == ["be2"]
        assert result["bytes"] == BIG and result["sha"] == be2_sha
        assert fe_tx < 0.01 * BIG, f"the front end sent {fe_tx} bytes during a {BIG}-byte download"
        assert VIP in tunl0
    except BaseException:                       # pytest-timeout's Failed too: show what the guests did
        for g in lab.guests:
            print(f"--- {g} console tail ---\n" + "\n".join(lab.console_text(g).splitlines()[-15:]))
        raise
    finally:
        lab.down()
