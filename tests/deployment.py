"""tcpha deployed in a namespace lab of its own for the operations tests (tests/fe, tests/be, the soak):
the control directories under the lab's scratch directory (never /run/tcpha: tests run side by side).
The `prod` fixture (tests/conftest.py) gives a Prod."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field

from tcpha.lab.demo import LabDeployment


def fe_workers(prod) -> list[int]:
    """The pids of the front end's worker processes (the arbiter's children), sorted."""
    import psutil
    try:
        return sorted(c.pid for c in psutil.Process(prod.dep.fe_proc.pid).children())
    except psutil.NoSuchProcess:
        return []


class Prod:
    """A LabDeployment plus access to its control directories and sockets."""

    def __init__(self, lab):
        self.lab = lab
        self.dep = LabDeployment(lab)
        self.fe_rundir = str(lab.workdir / "run-fe")
        self.be_rundirs = {h: str(lab.workdir / f"run-{h}") for h in self.dep.backends}

    def rules(self, *templates: str) -> list[str]:
        return [t.format(be1=self.lab.ip("be1"), be2=self.lab.ip("be2"), fe=self.lab.ip("fe")) for t in templates]

    def start(self, fe: dict | None = None, be: dict | None = None, backends: list[str] | None = None) -> None:
        self.dep.start_origins()
        for host in backends if backends is not None else self.dep.backends:
            self.start_backend(host, **(be or {}))
        self.start_fe(**(fe or {}))

    def start_backend(self, host: str, **options):
        options.setdefault("rundir", self.be_rundirs[host])
        return self.dep.start_backend(host, **options)

    def start_fe(self, wait: bool = True, ready: str = "/whoami", **options):
        options.setdefault("rundir", self.fe_rundir)
        options.setdefault("dbglevel", 3)
        proc = self.dep.start_fe(wait=False, **options)
        if wait:
            self.dep.wait_fe_ready(path=ready)
        return proc

    # -- control directory through the daemon's mount namespace (ip netns exec gives each its own) --
    def sh(self, pid: int, script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(pid), "-m", "bash", "-c", script], capture_output=True,
                              text=True, timeout=20)

    def fe_cat(self, rel: str) -> str:
        r = self.sh(self.dep.fe_proc.pid, f"cat {self.fe_rundir}/{rel}")
        assert r.returncode == 0, r.stderr
        return r.stdout

    def fe_echo(self, rel: str, value: str) -> subprocess.CompletedProcess:
        return self.sh(self.dep.fe_proc.pid, f"echo {value} > {self.fe_rundir}/{rel}")

    def ctl(self, *args: str, rundir: str | None = None) -> subprocess.CompletedProcess:
        import sys
        return subprocess.run([sys.executable, "-m", "tcpha.cli.ctl", "--rundir", rundir or self.fe_rundir, *args],
                              capture_output=True, text=True, timeout=20)

    def ctl_json(self, path: str, rundir: str | None = None):
        """A control file's data, read over the control socket in this process (what `tcpha-ctl --json
        get` prints; tests of the command itself use ctl()). No interpreter start per poll, so a poll
        measures the daemon, not `python -m`."""
        from tcpha.cli.ctl import socket_for
        from tcpha.runtime.ctlsock import request
        reply = request(socket_for(rundir or self.fe_rundir), {"op": "read", "path": path})
        assert reply.get("ok"), reply.get("error")
        return reply["data"]

    def fe_log(self) -> str:
        return self.lab.log_path("fe", "tcpha-fe").read_text(errors="replace")

    def wait_fe_exit(self, timeout: float) -> int | None:
        p = self.dep.fe_proc
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class Load:
    """Requests in a loop from the client host until stopped; every failure is recorded with its time."""
    prod: Prod
    path: str = "/index.html"
    threads: int = 4
    timeout: float = 5.0
    ok: int = 0
    failures: list = field(default_factory=list)     # (monotonic time, what)
    backends: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "Load":
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.prod.dep.request(self.path, timeout=self.timeout)
                good = r.status == 200
                what = f"status {r.status}"
            except Exception as e:
                good, what, r = False, f"{type(e).__name__}: {e}", None
            with self._lock:
                if good:
                    self.ok += 1
                    self.backends[r.backend] = self.backends.get(r.backend, 0) + 1
                else:
                    self.failures.append((time.monotonic(), what))

    def stop(self) -> "Load":
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        return self

    def count(self) -> int:
        with self._lock:
            return self.ok + len(self.failures)
