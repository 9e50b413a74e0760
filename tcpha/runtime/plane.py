"""The control plane of a daemon: a thread with its own asyncio loop serving the control directory
(FUSE, in a second thread), the control socket, and the metrics endpoint, without ever blocking the
daemon's own loop or the arbiter's signal loop.

    plane = ControlPlane(rundir="/run/tcpha/fe", tree=tree, name="tcpha-fe")
    plane.start()                 # mounts rundir, binds the control socket
    plane.run(coro)               # run a coroutine in the plane's loop from any thread (blocking)
    plane.stop()

Layout: with FUSE the directory itself is the mount; the socket cannot live inside a FUSE mount, so
it is bound next to it (``RUNDIR.ctl.sock``) and the mount shows ``ctl.sock`` as a symlink to it.
Without FUSE (no /dev/fuse, or pyfuse3 missing, or the mount refused) the directory is a real one holding
the socket and files mirrored by tcpha.runtime.mirror (invalid writes reverted and logged).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from typing import Any, Awaitable, Callable

from tcpha.runtime.ctlsock import ControlSocketServer, process_alive, request
from tcpha.runtime.fusefs import FuseMount, detach_stale_mount, fuse_available
from tcpha.runtime.mirror import MirrorDirectory
from tcpha.runtime.tree import ControlTree
from tcpha.loglevels import NOTICE

log = logging.getLogger("tcpha.runtime")


def socket_path(rundir: str) -> str:
    return rundir.rstrip("/") + ".ctl.sock"


def daemon_alive(rundir: str) -> bool:
    """True when a live daemon answers on this control directory's socket."""
    for path in (socket_path(rundir), os.path.join(rundir, "ctl.sock")):
        try:
            request(path, {"op": "list"}, timeout=1.0)
            return True
        except (OSError, ValueError):
            continue
    return False


class ControlPlane:
    def __init__(self, *, rundir: str, tree: ControlTree, name: str, use_fuse: bool = True,
                 extra_ops: dict[str, Callable[..., Awaitable[dict]]] | None = None):
        self.rundir = rundir.rstrip("/") or "/"
        self.tree = tree
        self.name = name
        self.use_fuse = use_fuse
        self.extra_ops = extra_ops or {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.mode = "none"                   # 'fuse' | 'mirror'
        self.sock_path = ""
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._fuse: Any = None
        self._mirror: Any = None
        self._ctl: ControlSocketServer | None = None
        self._startup: list[Callable[[], Awaitable[None]]] = []
        self._shutdown: list[Callable[[], Awaitable[None]]] = []
        self._closing = threading.Event()
        self._serve_lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------------
    def on_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        """A coroutine function run in the plane's loop at start (health prober, metrics server...)."""
        self._startup.append(fn)

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._shutdown.append(fn)

    def start(self, *, wait_free: float = 0.0, predecessor_pid: int = 0, control_socket: Any = None) -> None:
        """Start the loop thread (worker links work from here on), then the control socket, the
        directory and the on_start steps.

        When a live daemon still serves this rundir and `wait_free` > 0 (a seamless upgrade: the
        predecessor is stopping), that second part happens in the background once it has left, so
        the caller can start serving clients at once instead of leaving them in the accept queue for
        as long as the predecessor takes to stop. When it does not leave in time (or at once when
        `wait_free` is 0), only the loop runs (mode 'none'): health checks, metrics and worker links
        work, the directory and socket do not.

        Given the predecessor's pid and the control socket already renamed over the predecessor's
        (`control_socket`, a tcpha.runtime.ctlsock.PreparedSocket installed during the takeover, before
        the predecessor began to stop), that socket is served at once: there is no moment without a
        control socket; the directory follows once that pid has exited."""
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-control", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("control plane did not start")
        if wait_free > 0 and predecessor_pid and control_socket is not None:
            try:
                self.run(self._serve_socket_at(control_socket.path, control_socket), timeout=15.0)
                log.log(NOTICE, "control socket %s taken over from pid %d; the control directory %s follows once "
                        "it has stopped", control_socket.path, predecessor_pid, self.rundir)
            except (OSError, TimeoutError) as e:
                control_socket.discard()         # refused at once rather than left unanswered
                log.warning("control socket %s: %s; served once pid %d has stopped", control_socket.path, e,
                            predecessor_pid)
            threading.Thread(target=self._serve_when_free, args=(wait_free, predecessor_pid),
                             name=f"{self.name}-control-wait", daemon=True).start()
            return
        if wait_free > 0 and daemon_alive(self.rundir):
            log.log(NOTICE, "control directory %s: still served by the daemon being replaced; taken over "
                    "once it has stopped", self.rundir)
            threading.Thread(target=self._serve_when_free, args=(wait_free, 0), name=f"{self.name}-control-wait",
                             daemon=True).start()
            return
        self._serve(in_use=daemon_alive(self.rundir))

    async def _serve_socket_at(self, path: str, installed: Any = None) -> None:
        ctl = ControlSocketServer(self.tree, path, self.extra_ops)
        await ctl.start(installed)
        self._ctl = ctl

    def _predecessor_gone(self, pid: int) -> bool:
        return not process_alive(pid) if pid else not daemon_alive(self.rundir)

    def _serve_when_free(self, wait_free: float, pid: int) -> None:
        deadline = time.monotonic() + wait_free
        while not self._predecessor_gone(pid) and time.monotonic() < deadline:
            if self._closing.wait(0.05):
                return
        with self._serve_lock:
            if self._closing.is_set():
                return
            try:
                self._serve(in_use=not self._predecessor_gone(pid))
            except Exception as e:       # never take the daemon down: it serves clients without this
                log.error("control directory %s: %s: running without control files", self.rundir, e)

    def _serve(self, *, in_use: bool) -> None:
        why_not: str | None = None
        if in_use:
            # Health checks, metrics and the workers' links still run (in the plane's loop); only
            # the directory and the socket are missing. One line says so.
            log.error("control directory %s is served by another running daemon: running without control "
                      "files and control socket (set rundir)", self.rundir)
            self.mode = "none"
        else:
            detach_stale_mount(self.rundir)
            why_not = fuse_available() if self.use_fuse else None
            if why_not is not None:
                why_not = f"FUSE unavailable ({why_not})"
            elif not self.use_fuse:
                why_not = "FUSE off (usefuse = 0)"
            self.mode = "fuse" if why_not is None else "mirror"
            self.sock_path = socket_path(self.rundir) if self.mode == "fuse" else os.path.join(self.rundir, "ctl.sock")
            try:
                os.makedirs(os.path.dirname(self.sock_path) or "/", exist_ok=True)
            except OSError as e:
                log.error("control directory %s: %s: running without control files", self.rundir, e)
                self.mode = "none"
        self.run(self._bring_up(), timeout=15.0)
        if self.mode == "fuse":
            self._fuse = FuseMount(self.tree, self.rundir, links={"ctl.sock": self.sock_path}, fsname=self.name)
            try:
                self._fuse.start()
            except Exception as e:
                log.warning("control directory %s: FUSE mount failed (%s); using a plain directory", self.rundir, e)
                self._fuse = None
                self.mode = "mirror"
        if self.mode == "mirror":
            if why_not is not None:
                log.log(NOTICE, "control directory %s: %s; plain files, invalid writes "
                        "are reverted and logged", self.rundir, why_not)
            try:
                self._mirror = MirrorDirectory(self.tree, self.rundir)
                self._mirror.start()
            except OSError as e:
                log.error("control directory %s: %s: running without control files", self.rundir, e)
                self._mirror = None
            if self.sock_path != os.path.join(self.rundir, "ctl.sock"):
                old = self.sock_path
                self.sock_path = os.path.join(self.rundir, "ctl.sock")
                self.run(self._rebind(old))
        if self.mode != "none":
            log.log(NOTICE, "control directory %s (%s), control socket %s", self.rundir, self.mode, self.sock_path)

    async def _rebind(self, old: str) -> None:
        """Serve the control socket at sock_path (the new one first, then the old one goes)."""
        previous = self._ctl
        self._ctl = None
        await self._serve_socket_at(self.sock_path)
        if previous is not None:
            await previous.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        self._ready.set()
        await self._stopped.wait()
        for fn in self._shutdown:
            try:
                await fn()
            except Exception as e:
                log.error("%s: control plane stop step failed: %s", self.name, e)
        if self._ctl is not None:
            await self._ctl.close()

    async def _bring_up(self) -> None:
        """The control socket (unless mode 'none') and the on_start steps, in the plane's loop."""
        early = self._ctl           # the socket taken over from a predecessor, if any (start)
        if self.mode != "none" and (early is None or early.path != self.sock_path or not early.owns_path()):
            self._ctl = None
            try:
                await self._serve_socket_at(self.sock_path)
            except OSError as e:
                log.error("control socket %s: %s", self.sock_path, e.strerror or e)
                self._ctl = early
            else:
                if early is not None:
                    await early.close()
        for fn in self._startup:
            try:
                await fn()
            except Exception as e:
                log.error("%s: control plane start-up step failed: %s", self.name, e)

    def run(self, coro: Awaitable[Any], timeout: float = 5.0) -> Any:
        """Run a coroutine in the plane's loop and wait for its result (from another thread)."""
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError("control plane did not answer in time") from None

    def in_loop_thread(self) -> bool:
        """True when called from the plane's own loop, where `run` would wait on itself."""
        return self._thread is not None and threading.current_thread() is self._thread

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self._closing.set()
        with self._serve_lock:           # not while a deferred start (see start) is mounting
            pass
        if self._fuse is not None:
            try:
                self._fuse.stop()
            except Exception as e:
                log.error("control directory %s: unmount failed: %s", self.rundir, e)
            self._fuse = None
        if self._mirror is not None:
            self._mirror.stop()
            self._mirror = None
        if self.loop is not None and self._stopped is not None and self._thread is not None:
            try:
                self.loop.call_soon_threadsafe(self._stopped.set)
            except RuntimeError:
                pass
            self._thread.join(5)
        self._thread = None
