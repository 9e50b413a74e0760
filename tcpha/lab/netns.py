"""The namespace lab: builds a Topology out of network namespaces on one machine.

Layout (for prefix P):
  - one namespace per host, P-<host>, with `lo` up and one LAN interface `eth0` holding the host's address;
  - one switch namespace P-sw holding the bridge P-br; each host's eth0 is a veth whose other end
    (named after the host) is a port of that bridge. Nothing is created in the root namespace.
IPv6 is disabled in every lab namespace (no DAD, router solicitations or MLD noise on the wire, which
matters to tests that count bytes). The VIP is NOT configured: holding it is tcpha-fe's / tcpha-be's job.

Every process started through the lab (popen, start_http) is registered and killed by down(); down()
also kills any other process still living in one of the lab's namespaces, removes the namespaces
(which destroys the veths and the bridge with them) and the lab's scratch directory. It is idempotent
and also works after a partial up().
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket as _socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import psutil
from pyroute2 import IPRoute, netns as pr_netns

from .topology import Topology

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,5}$")
SWITCH = "sw"          # suffix of the switch namespace
LAN_IFNAME = "eth0"    # the LAN interface inside every host namespace
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class LabError(RuntimeError):
    """A lab operation that failed; str(e) is one clear line."""


@dataclass(frozen=True)
class LinkCounters:
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    # os.setns only exists from Python 3.12; we support 3.11, hence libc through ctypes.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn(*args, **kwargs) in a short-lived thread that has entered network namespace `name`.

    setns(CLONE_NEWNET) changes only the calling thread, so the rest of the process is unaffected.
    Sockets keep the namespace they were created in, and /proc/sys/net opened there belongs to it.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            error.append(LabError(f"network namespace {name} does not exist"))
            return
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                result.append(fn(*args, **kwargs))
            except BaseException as e:  # handed to the caller's thread
                error.append(e)
            finally:
                _setns(home)
        except BaseException as e:
            error.append(e)
        finally:
            os.close(target)
            os.close(home)

    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _sysctl_path(key: str) -> str:
    key = key.strip()
    if key.startswith("/proc/sys/"):
        return key
    if "/" in key:
        return "/proc/sys/" + key.lstrip("/")
    return "/proc/sys/" + key.replace(".", "/")


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_sysctl(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _ns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(names: list[str]) -> dict[int, str]:
    """pid -> namespace name, for every process living in one of the named namespaces."""
    inodes = {ino: n for n in names if (ino := _ns_inode(n)) is not None}
    found: dict[int, str] = {}
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        name = inodes.get((st.st_dev, st.st_ino))
        if name is not None:
            found[int(entry)] = name
    return found


def _kill_pids(pids: list[int], grace: float = 2.0) -> None:
    """SIGTERM, wait up to `grace` seconds for them to go, then SIGKILL the rest."""
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    # A zombie child of ours counts as gone: reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listens(pid: int, port: int) -> bool:
    """Does process `pid` or a descendant hold a TCP socket listening on `port`?

    Hand-written on /proc because psutil matches a process's sockets against the *caller's* namespace
    tables (/proc/net/tcp), and the lab's processes live in other namespaces: /proc/PID/net/tcp is the
    table of PID's own namespace.
    """
    try:
        root = psutil.Process(pid)
        pids = [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.Error:
        return False
    for p in pids:
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
        if not inodes:
            continue
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{p}/net/{table}") as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        # local_address is HEXIP:HEXPORT, st 0A is LISTEN, field 9 the inode
                        if (fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port
                                and fields[9] in inodes):
                            return True
            except (OSError, StopIteration, IndexError, ValueError):
                continue
    return False


def lab_namespaces(prefix: str) -> list[str]:
    """Every existing namespace that belongs to a lab with this prefix."""
    return sorted(n for n in pr_netns.listnetns() if n.startswith(prefix + "-"))


def remove_prefix(prefix: str, *, root_objects: bool = False) -> list[str]:
    """Remove whatever a lab with this prefix left (processes, namespaces); returns what was removed.

    With root_objects, also links and nftables tables in the root namespace whose names start with
    the prefix (what a test that worked outside a lab might have left).
    """
    names = lab_namespaces(prefix)
    _kill_pids(list(pids_in_netns(names)))
    for n in names:
        with contextlib.suppress(OSError):
            pr_netns.remove(n)
    removed = list(names)
    # the lab's scratch directory (NamespaceLab.workdir): a lab kept without a state file (tcpha-lab demo
    # --keep) is only known by its prefix
    for d in Path(tempfile.gettempdir()).glob(f"tcpha-lab-{prefix}-*"):
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"dir {d}")
    if root_objects:
        removed += _remove_root_links(prefix) + _remove_root_nft_tables(prefix)
    return removed


def _remove_root_links(prefix: str) -> list[str]:
    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME") or ""
            if name.startswith(prefix):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=link["index"])
                    removed.append(f"link {name}")
    return removed


def _remove_root_nft_tables(prefix: str) -> list[str]:
    try:
        # lazy: optional here (the nftables binding is a system package): without it there is nothing to remove
        import nftables
    except ImportError:
        return []
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, _ = nft.cmd("list tables")
    if rc != 0 or not out:
        return []
    removed = []
    for item in json.loads(out).get("nftables", []):
        t = item.get("table")
        if t and t.get("name", "").startswith(prefix):
            if nft.cmd(f"delete table {t['family']} {t['name']}")[0] == 0:
                removed.append(f"nft table {t['family']} {t['name']}")
    return removed


class NamespaceLab:
    """A Topology built from network namespaces. See the module docstring for the layout."""

    def __init__(self, topology: Topology, prefix: str, *, workdir: str | None = None):
        if not PREFIX_RE.match(prefix):
            raise LabError(f"lab prefix {prefix!r}: use 1-6 lower-case letters/digits starting with a letter")
        if SWITCH in topology.names():
            raise LabError(f"host name {SWITCH!r} is reserved for the lab switch")
        self.topology = topology
        self.prefix = prefix
        self.bridge = f"{prefix}-br"
        self.switch_netns = f"{prefix}-{SWITCH}"
        self._workdir = workdir
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._cleanups: list[Callable[[], None]] = []
        self._macs: dict[str, str] = {}
        self._lock = threading.Lock()
        self.is_up = False
        # the relay and steering of tcpha daemons deployed here (tcpha.lab.deploy.DataPath); None: from
        # the environment (set by the test fixtures that run a suite over each data path)
        self.datapath: Any = None

    # -- names ---------------------------------------------------------------------------------
    def netns(self, host: str) -> str:
        self.topology.host(host)  # KeyError for unknown hosts
        return f"{self.prefix}-{host}"

    def namespaces(self) -> list[str]:
        return [self.switch_netns] + [self.netns(h) for h in self.topology.names()]

    def ifname(self, host: str) -> str:
        self.topology.host(host)
        return LAN_IFNAME

    def ip(self, host: str) -> str:
        return self.topology.host(host).lan_ip

    @property
    def vip(self) -> str:
        return self.topology.vip

    @property
    def hosts(self) -> list[str]:
        return self.topology.names()

    @property
    def workdir(self) -> Path:
        """A scratch directory owned by the lab (configs, document roots, logs); removed by down()."""
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix=f"tcpha-lab-{self.prefix}-")
        return Path(self._workdir)

    # -- building --------------------------------------------------------------------------------
    def up(self) -> None:
        """Build the lab. On any failure, everything already built is removed and LabError raised."""
        existing = [n for n in self.namespaces() if _ns_inode(n) is not None]
        if existing:
            raise LabError(f"lab {self.prefix} already exists (namespace {existing[0]}); "
                           f"run: tcpha-lab down {self.prefix}")
        try:
            self._build()
        except BaseException as e:
            try:
                self.down()
            except Exception as cleanup_error:  # keep the original error; say the cleanup failed
                log.error("lab %s: cleanup after failed up() failed: %s", self.prefix, cleanup_error)
            if isinstance(e, (LabError, KeyboardInterrupt)):
                raise
            raise LabError(f"lab {self.prefix}: up failed: {e}") from e
        self.is_up = True

    def _build(self) -> None:
        prefixlen = self.topology.prefixlen
        for name in self.namespaces():
            pr_netns.create(name)
            self._quiet_ipv6(name)
        with IPRoute(netns=self.switch_netns) as sw:
            sw.link("set", index=sw.link_lookup(ifname="lo")[0], state="up")
            # STP off and no forward delay: ports forward as soon as they are up.
            sw.link("add", ifname=self.bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
            br = sw.link_lookup(ifname=self.bridge)[0]
            sw.link("set", index=br, state="up")
            for h in self.topology.hosts:
                self._attach_host(sw, br, h.name, h.lan_ip, prefixlen)

    def _attach_host(self, sw: IPRoute, br: int, host: str, lan_ip: str, prefixlen: int) -> None:
        ns = self.netns(host)
        # The veth is created in the switch namespace with its peer born directly in the host's
        # namespace under its final name; the switch end is named after the host.
        sw.link("add", ifname=host, kind="veth", peer={"ifname": LAN_IFNAME, "net_ns_fd": ns})
        port = sw.link_lookup(ifname=host)[0]
        sw.link("set", index=port, master=br, state="up")
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            idx = ipr.link_lookup(ifname=LAN_IFNAME)[0]
            ipr.addr("add", index=idx, address=lan_ip, prefixlen=prefixlen)
            ipr.link("set", index=idx, state="up")
            link = ipr.get_links(idx)[0]
            self._macs[host] = link.get("IFLA_ADDRESS")

    def _quiet_ipv6(self, name: str) -> None:
        def body() -> None:
            for key in ("net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"):
                path = "/proc/sys/" + key
                if os.path.exists(path):  # absent when the kernel runs without IPv6
                    _write_sysctl(path, "1")
        in_netns(name, body)

    def down(self) -> None:
        """Remove everything the lab made: processes, namespaces (with their links), scratch files.

        Idempotent, and safe after a partial up().
        """
        with self._lock:
            procs, self._procs = self._procs, []
            cleanups, self._cleanups = self._cleanups, []
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception as e:
                log.warning("lab %s: cleanup step failed: %s", self.prefix, e)
        self._stop_processes([p for _, p in procs])
        names = sorted(set(self.namespaces()) | set(lab_namespaces(self.prefix)))
        _kill_pids(list(pids_in_netns(names)))
        errors = []
        for name in names:
            if _ns_inode(name) is None and not os.path.exists(os.path.join(NETNS_DIR, name)):
                continue
            try:
                pr_netns.remove(name)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    errors.append(f"{name}: {e}")
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._macs.clear()
        self.is_up = False
        if errors:
            raise LabError(f"lab {self.prefix}: could not remove namespace {'; '.join(errors)}")

    def __enter__(self) -> "NamespaceLab":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- processes -------------------------------------------------------------------------------
    def command(self, host: str, argv: list[str]) -> list[str]:
        """The argv that runs `argv` inside host's namespace (ip netns exec also gives it its own /sys)."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of strings, not a shell string")
        return ["ip", "netns", "exec", self.netns(host), *map(str, argv)]

    def popen(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start argv in host's namespace. The process is registered: down() kills it (and its group)."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.command(host, argv), **kw)
        with self._lock:
            self._procs.append((host, p))
        return p

    def run(self, host: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run argv in host's namespace to completion (subprocess.run semantics; check=False default)."""
        return subprocess.run(self.command(host, argv), **kw)

    def spawn(self, host: str, argv: list[str], *, name: str | None = None,
              ready_tcp: tuple[str, int] | None = None, ready_path: str | Path | None = None,
              timeout: float = 10.0, **kw: Any) -> subprocess.Popen:
        """Start a long-running service in host's namespace and wait until it is ready.

        stdout+stderr go to workdir/logs/HOST-NAME.log (see log_path). Ready means: a TCP connect from
        host to ready_tcp succeeds and/or ready_path exists. If the process exits or is not ready
        within `timeout`, it is stopped and LabError carries the tail of its log.
        """
        name = name or Path(str(argv[0])).name
        log_file = self.log_path(host, name)
        with open(log_file, "ab") as out:
            p = self.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        deadline = time.monotonic() + timeout
        while True:
            if p.poll() is not None:
                self.stop(p)
                raise LabError(f"{host}: {name} exited with status {p.returncode} before it was ready: "
                               f"{self.log_tail(host, name)}")
            ok = ready_path is None or os.path.exists(ready_path)
            if ok and ready_tcp is not None:
                # The port must be held by this process (or its children), not by some other
                # server that happens to listen there, and a connection must succeed.
                ok = _listens(p.pid, ready_tcp[1])
                if ok:
                    try:
                        self.connect(host, ready_tcp[0], ready_tcp[1], timeout=0.5).close()
                    except OSError:
                        ok = False
            if ok:
                return p
            if time.monotonic() > deadline:
                self.stop(p)
                raise LabError(f"{host}: {name} not ready within {timeout:g}s: {self.log_tail(host, name)}")
            time.sleep(0.02)

    def log_path(self, host: str, name: str) -> Path:
        d = self.workdir / "logs"
        d.mkdir(exist_ok=True)
        return d / f"{host}-{name}.log"

    def log_tail(self, host: str, name: str, lines: int = 5) -> str:
        try:
            text = self.log_path(host, name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def processes(self) -> list[tuple[str, subprocess.Popen]]:
        """(host, Popen) of every process started through this lab object that is still registered."""
        with self._lock:
            return list(self._procs)

    def stop(self, proc: subprocess.Popen, grace: float = 3.0) -> int | None:
        """Stop one registered process (SIGTERM to its group, SIGKILL after `grace`); returns its status."""
        with self._lock:
            self._procs = [(h, p) for h, p in self._procs if p is not proc]
        self._stop_processes([proc], grace)
        return proc.returncode

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run fn at down(), before processes are stopped (last added runs first)."""
        with self._lock:
            self._cleanups.append(fn)

    @staticmethod
    def _stop_processes(procs: list[subprocess.Popen], grace: float = 3.0) -> None:
        live = [p for p in procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        for p in procs:  # the group may outlive its leader
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)

    # -- in-namespace operations from this process --------------------------------------------------
    def socket(self, host: str, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM,
               proto: int = 0) -> _socket.socket:
        """A socket created inside host's namespace (it stays there whatever thread uses it later)."""
        return in_netns(self.netns(host), _socket.socket, family, type, proto)

    def call(self, host: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call fn in a thread that is inside host's namespace (for short netlink/sysfs/procfs work)."""
        return in_netns(self.netns(host), fn, *args, **kwargs)

    def sysctl(self, host: str, key: str, value: str | int | None = None) -> str:
        """Read (value None) or write a sysctl in host's namespace; key 'net.ipv4.x' or 'net/ipv4/x'.

        Returns the value read back after writing.
        """
        path = _sysctl_path(key)

        def body() -> str:
            if value is not None:
                _write_sysctl(path, str(value))
            return _read_sysctl(path)
        try:
            return in_netns(self.netns(host), body)
        except FileNotFoundError:
            raise LabError(f"sysctl {key}: no such key in {host}'s namespace") from None

    def ipr(self, host: str) -> IPRoute:
        """An IPRoute bound to host's namespace (close it, or use it as a context manager)."""
        return IPRoute(netns=self.netns(host))

    def mac(self, host: str, ifname: str | None = None) -> str:
        """MAC address of host's LAN interface (or of `ifname` in host's namespace)."""
        if ifname is None and host in self._macs:
            return self._macs[host]
        name = ifname or self.ifname(host)
        with self.ipr(host) as ipr:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                raise LabError(f"{host}: no interface {name}")
            mac = ipr.get_links(idx[0])[0].get("IFLA_ADDRESS")
        if ifname is None:
            self._macs[host] = mac
        return mac

    def counters(self, host: str, ifname: str | None = None) -> LinkCounters:
        """Byte/packet counters of host's LAN interface (or `ifname`) in host's namespace.

        Read from /proc/thread-self/net/dev by a thread inside the namespace: the kernel's own
        per-namespace table, ~1 ms, where pyroute2's IPRoute(netns=...) forks a helper (~50 ms) and
        would skew tests that sample counters around a transfer.
        """
        name = ifname or self.ifname(host)
        table = in_netns(self.netns(host), _read_text, "/proc/thread-self/net/dev")
        for line in table.splitlines()[2:]:
            iface, _, data = line.partition(":")
            if iface.strip() == name:
                f = data.split()
                # receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes packets ...
                return LinkCounters(rx_bytes=int(f[0]), rx_packets=int(f[1]),
                                    tx_bytes=int(f[8]), tx_packets=int(f[9]))
        raise LabError(f"{host}: no interface {name}")

    def addresses(self, host: str) -> list[str]:
        """Every IPv4 address configured in host's namespace, as 'ADDR/LEN@IFNAME'."""
        out = []
        with self.ipr(host) as ipr:
            names = {l["index"]: l.get("IFLA_IFNAME") for l in ipr.get_links()}
            for a in ipr.get_addr(family=_socket.AF_INET):
                out.append(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}@{names.get(a['index'], '?')}")
        return out

    def connect(self, host: str, addr: str, port: int, timeout: float = 5.0) -> _socket.socket:
        """A TCP connection from host to addr:port (blocking socket with `timeout`)."""
        s = self.socket(host)
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
        except BaseException:
            s.close()
            raise
        return s

    def wait_tcp(self, host: str, addr: str, port: int, timeout: float = 10.0) -> None:
        """Wait until a TCP connect from host to addr:port succeeds (polling with a deadline)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.connect(host, addr, port, timeout=max(0.1, deadline - time.monotonic())).close()
                return
            except OSError as e:
                last = e
                time.sleep(0.02)
        raise LabError(f"{host}: {addr}:{port} not reachable within {timeout:g}s ({last})")

    # -- state, for the CLI ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"prefix": self.prefix, "topology": self.topology.to_dict(),
                "workdir": self._workdir, "bridge": self.bridge, "switch_netns": self.switch_netns,
                "namespaces": {h: self.netns(h) for h in self.hosts},
                "pids": [p.pid for _, p in self.processes() if p.poll() is None]}

    @classmethod
    def from_state(cls, data: dict) -> "NamespaceLab":
        lab = cls(Topology.from_dict(data["topology"]), data["prefix"], workdir=data.get("workdir"))
        lab.is_up = all(_ns_inode(n) is not None for n in lab.namespaces())
        return lab

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "NamespaceLab":
        return cls.from_state(json.loads(Path(path).read_text()))
