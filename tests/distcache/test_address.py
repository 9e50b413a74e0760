"""libnal address syntax, its listen/connect rules, and the IPv6 extension."""

from __future__ import annotations

import os
import socket

import pytest

from tcpha.distcache.address import (UNIX_PATH_MAX, AddressError, connect_socket, listen_socket,
                                     parse_address)


@pytest.mark.parametrize("text,kind,host,port,path,fds,v6", [
    ("IP:127.0.0.1:9001", "ip", "127.0.0.1", 9001, None, (), False),
    ("IPv4:localhost:1", "ip", "localhost", 1, None, (), False),
    ("IP:9001", "ip", None, 9001, None, (), False),
    ("IP::9001", "ip", None, 9001, None, (), False),
    ("IP:host:65535", "ip", "host", 65535, None, (), False),
    ("UNIX:/tmp/scache", "unix", None, None, "/tmp/scache", (), False),
    ("FD:3", "fd", None, None, None, (3,), False),
    ("FD:3:4", "fd", None, None, None, (3, 4), False),
    ("IP:[::1]:80", "ip", "::1", 80, None, (), True),
    ("IPv6:[fe80::1%lo]:80", "ip", "fe80::1%lo", 80, None, (), True),
    ("IPv6:::1:80", "ip", "::1", 80, None, (), True),
    ("IPv6:80", "ip", None, 80, None, (), True),
])
def test_parse(text, kind, host, port, path, fds, v6):
    a = parse_address(text)
    assert (a.kind, a.host, a.port, a.path, a.fds, a.ipv6, a.text) == (kind, host, port, path, fds, v6, text)


@pytest.mark.parametrize("text,fragment", [
    ("", "empty address"),
    ("nothing", "expected IP:host:port"),
    ("ip:1.2.3.4:80", "unknown prefix 'ip'"),          # prefixes are case-sensitive
    ("unix:/tmp/x", "unknown prefix 'unix'"),
    ("IP:host:65536", "out of range"),
    ("IP:host:80x", "not a number"),
    ("IP:host:", "not a number"),
    ("IP:", "not a number"),
    ("IP:host:-1", "not a number"),
    ("IP:::1:80", "brackets"),
    ("IP:[::1]80", "[ipv6-address]:port"),
    ("IP:[nothost]:80", "not an IPv6 address"),
    ("IPv4:[::1]:80", "IPv4: cannot"),
    ("UNIX:", "empty UNIX socket path"),
    ("UNIX:/" + "a" * UNIX_PATH_MAX, "the limit is 107"),
    ("FD:x", "not a number"),
    ("FD:1:2:3", "FD:n or FD:read:write"),
])
def test_parse_errors_are_one_line(text, fragment):
    with pytest.raises(AddressError) as info:
        parse_address(text)
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg


def test_longest_unix_path_accepted(tmp_path):
    base = str(tmp_path) + "/"
    path = base + "s" * (UNIX_PATH_MAX - len(base.encode()))
    assert len(path.encode()) == UNIX_PATH_MAX
    assert parse_address("UNIX:" + path).path == path


def test_unix_listen_connect_and_stale_socket(tmp_path):
    path = str(tmp_path / "s")
    addr = parse_address("UNIX:" + path)
    lsock = listen_socket(addr)
    try:
        with pytest.raises(AddressError, match="another process is listening"):
            listen_socket(addr)
        c = connect_socket(addr, timeout=2)
        c.close()
    finally:
        lsock.close()
    # The file is left behind by a "dead" server: replaced, not refused.
    assert os.path.exists(path)
    again = listen_socket(addr)
    again.close()


def test_unix_listen_refuses_non_socket(tmp_path):
    f = tmp_path / "plain"
    f.write_text("x")
    with pytest.raises(AddressError, match="not a socket"):
        listen_socket(parse_address(f"UNIX:{f}"))


def test_ip_listen_only_cannot_connect():
    with pytest.raises(AddressError, match="listen-only"):
        connect_socket(parse_address("IP:9001"))
    with pytest.raises(AddressError, match="listen-only"):
        connect_socket(parse_address("IP::9001"))


def test_ip_listen_and_connect_loopback():
    lsock = listen_socket(parse_address("IP:127.0.0.1:0"))
    try:
        port = lsock.getsockname()[1]
        c = connect_socket(parse_address(f"IP:127.0.0.1:{port}"), timeout=2)
        assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        c.close()
        with pytest.raises(AddressError, match="Address already in use"):
            listen_socket(parse_address(f"IP:127.0.0.1:{port}"))
    finally:
        lsock.close()


def test_ipv6_loopback():
    # Linux machines like CI's have ::1 on lo; its absence is a set-up fault worth seeing, not a skip.
    assert socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"), "no IPv6 on this host's loopback"
    lsock = listen_socket(parse_address("IP:[::1]:0"))
    try:
        assert lsock.family == socket.AF_INET6
        port = lsock.getsockname()[1]
        c = connect_socket(parse_address(f"IPv6:[::1]:{port}"), timeout=2)
        c.close()
    finally:
        lsock.close()


def test_fd_listen():
    pre = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    pre.bind(("127.0.0.1", 0))
    port = pre.getsockname()[1]
    fd = pre.detach()
    sock = listen_socket(parse_address(f"FD:{fd}"))
    try:
        c = connect_socket(parse_address(f"IP:127.0.0.1:{port}"), timeout=2)
        conn, _ = sock.accept()
        conn.close()
        c.close()
    finally:
        sock.close()
    with pytest.raises(AddressError, match="FD:r:w"):
        listen_socket(parse_address("FD:3:4"))


def test_connect_refused_is_oserror(tmp_path):
    with pytest.raises(OSError):
        connect_socket(parse_address(f"UNIX:{tmp_path}/nobody"), timeout=1)
