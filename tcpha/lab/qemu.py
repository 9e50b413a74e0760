"""The VM lab on plain QEMU: guests booted from the box vagrant/build-box makes, on bridges inside one
network namespace of the run's prefix, so that removing that namespace removes every bridge and tap.

- Accelerator: KVM when /dev/kvm is there and the CPU shows vmx/svm (a hypervisor that runs a stock
  kernel); else TCG (this project's machines: /dev/kvm there is PVM, which boots only PVM-built kernels).
  `accelerator()` returns the choice and the one line that says why.
- Each guest: the box's qcow2 as the backing file of a per-guest overlay (the box stays untouched), the
  box's kernel and initrd booted directly, and a second, read-only disk (ext4 made with mkfs.ext4 -d, no
  loop device) holding `boot.sh`, run by the box's tcpha-lab.service, and whatever files the lab puts
  there (the repository). Its console goes to a file; `boot.sh` prints markers there, which is how the
  host learns what happened inside (guests reach nothing but each other).
- Networks: one bridge per subnet in the namespace P-vm; one tap per guest NIC (P<guest><n>), made by
  QEMU in that namespace (qemu runs under `ip netns exec`).

`VmLab.down()` kills the QEMU processes, removes the namespace and the scratch directory; it is
idempotent and runs after a failed `up()` too. Guests are for function: timings from TCG guests are not
performance figures.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns as pr_netns

__all__ = ["Guest", "VmLab", "VmLabError", "accelerator", "box_dir"]

PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,5}$")
KERNEL_CMDLINE = ("root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 net.ifnames=0 "
                  "systemd.mask=networking.service systemd.mask=ssh.service systemd.mask=apt-daily.timer "
                  "systemd.mask=apt-daily-upgrade.timer systemd.mask=e2scrub_reap.service")


class VmLabError(RuntimeError):
    """A VM lab operation that failed; str(e) is one line."""


def accelerator() -> tuple[str, str]:
    """('kvm' | 'tcg', the one line that says which and why)."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    has_virt = bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M))
    if os.path.exists("/dev/kvm") and has_virt:
        return "kvm", "VM lab: KVM (/dev/kvm, and the CPU has vmx/svm)"
    if os.path.exists("/dev/kvm"):
        return "tcg", ("VM lab: QEMU TCG (/dev/kvm is here but the CPU shows no vmx/svm: a paravirtual KVM "
                       "such as PVM, which cannot boot a stock kernel)")
    return "tcg", "VM lab: QEMU TCG (no /dev/kvm)"


def box_dir() -> Path | None:
    """The cached box for the current inputs (vagrant/build-box), or None when it is not built."""
    script = Path(__file__).resolve().parents[2] / "vagrant" / "build-box"
    r = subprocess.run([str(script)], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return None
    d = Path(r.stdout.strip().splitlines()[-1])
    return d if (d / "done").exists() else None


@dataclass
class Guest:
    name: str                                   # 1-5 lower-case letters/digits
    nics: list[tuple[str, str]]                 # (network name, "ADDR/LEN") per NIC: eth0, eth1, ...
    script: str = ""                            # shell run at the end of boot.sh (the guest's role)
    memory: int = 384                           # MiB
    files: dict[str, str] = field(default_factory=dict)   # extra files on the lab disk: name -> text


class VmLab:
    def __init__(self, prefix: str, box: Path, guests: list[Guest], *, repo: Path | None = None):
        if not PREFIX_RE.match(prefix):
            raise VmLabError(f"VM lab prefix {prefix!r}: 1-6 lower-case letters/digits, a letter first")
        self.prefix = prefix
        self.box = Path(box)
        self.guests = {g.name: g for g in guests}
        self.repo = repo
        self.netns = f"{prefix}-vm"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"tcpha-vm-{prefix}-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.accel, self.accel_line = accelerator()
        self.started: dict[str, float] = {}

    # -- building ----------------------------------------------------------------------------------
    def console(self, name: str) -> Path:
        return self.workdir / f"{name}.console"

    def _lab_disk(self, g: Guest) -> Path:
        root = self.workdir / f"{g.name}-disk"
        root.mkdir()
        lines = ["#!/bin/sh", "exec 2>&1", "echo TCPHA-BOOTED $(cut -d' ' -f1 /proc/uptime)",
                 "sysctl -qw net.ipv6.conf.all.disable_ipv6=1", "ip link set lo up"]
        for i, (_net, addr) in enumerate(g.nics):
            lines += [f"ip link set eth{i} up", f"ip addr add {addr} dev eth{i}"]
        lines += ["echo TCPHA-NET-UP", g.script, "echo TCPHA-DONE $?"]
        (root / "boot.sh").write_text("\n".join(lines) + "\n")
        for rel, text in g.files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        if self.repo is not None:
            dest = root / "repo"
            dest.mkdir()
            for part in ("tcpha", "pyproject.toml"):
                src = self.repo / part
                if src.is_dir():
                    shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, dest / part)
        img = self.workdir / f"{g.name}-lab.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(img), "64M"], check=True,
                       capture_output=True)
        return img

    def up(self) -> None:
        """Create the networks and start every guest (not waiting for them: see wait_for)."""
        try:
            pr_netns.create(self.netns)
            nets = sorted({net for g in self.guests.values() for net, _ in g.nics})
            with IPRoute(netns=self.netns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for net in nets:
                    ipr.link("add", ifname=f"br-{net}", kind="bridge", br_stp_state=0, br_forward_delay=0)
                    ipr.link("set", index=ipr.link_lookup(ifname=f"br-{net}")[0], state="up")
            for g in self.guests.values():
                self._start(g)
        except BaseException:
            self.down()
            raise

    def _start(self, g: Guest) -> None:
        overlay = self.workdir / f"{g.name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(self.box / "box.img"), str(overlay)], check=True, capture_output=True)
        disk = self._lab_disk(g)
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
            ["-accel", "tcg,thread=multi,tb-size=64", "-cpu", "qemu64"]
        argv = ["qemu-system-x86_64", *accel, "-m", str(g.memory), "-smp", "1", "-nographic",
                "-nodefaults", "-no-user-config", "-serial", f"file:{self.console(g.name)}",
                "-kernel", str(self.box / "vmlinuz"), "-initrd", str(self.box / "initrd.img"),
                "-append", KERNEL_CMDLINE,
                "-drive", f"file={overlay},if=virtio,format=qcow2",
                "-drive", f"file={disk},if=virtio,format=raw,readonly=on"]
        for i, (net, _addr) in enumerate(g.nics):
            tap = f"{self.prefix}{g.name}{i}"[:15]
            mac = "52:54:00:%02x:%02x:%02x" % (len(self.started) + 1, i, sum(map(ord, g.name)) % 256)
            argv += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=n{i},mac={mac}"]
        log = open(self.workdir / f"{g.name}.qemu.log", "wb")
        self.procs[g.name] = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True)
        self.started[g.name] = time.monotonic()
        # the taps appear once QEMU has opened them: put each on its bridge
        deadline = time.monotonic() + 30
        with IPRoute(netns=self.netns) as ipr:
            for i, (net, _addr) in enumerate(g.nics):
                tap = f"{self.prefix}{g.name}{i}"[:15]
                while not ipr.link_lookup(ifname=tap):
                    if self.procs[g.name].poll() is not None or time.monotonic() > deadline:
                        raise VmLabError(f"guest {g.name}: QEMU did not start: {self.qemu_log(g.name)}")
                    time.sleep(0.05)
                ipr.link("set", index=ipr.link_lookup(ifname=tap)[0],
                         master=ipr.link_lookup(ifname=f"br-{net}")[0], state="up")

    def qemu_log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return " | ".join((self.workdir / f"{name}.qemu.log").read_text(errors="replace").split("\n")[-4:])
        return "(no log)"

    def console_text(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return self.console(name).read_text(errors="replace")
        return ""

    def wait_for(self, name: str, marker: str, timeout: float) -> float:
        """Seconds from the guest's start until `marker` appeared on its console; VmLabError on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.console_text(name):
                return time.monotonic() - self.started[name]
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise VmLabError(f"guest {name}: QEMU exited ({proc.returncode}): {self.qemu_log(name)}")
            time.sleep(0.5)       # a console file written by another process: polled
        tail = " | ".join(self.console_text(name).strip().splitlines()[-5:])
        raise VmLabError(f"guest {name}: no {marker!r} within {timeout:g}s; console: {tail}")

    # -- removing ------------------------------------------------------------------------------------
    def down(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(10)
        self.procs.clear()
        with contextlib.suppress(OSError):
            pr_netns.remove(self.netns)
        shutil.rmtree(self.workdir, ignore_errors=True)
