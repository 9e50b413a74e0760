"""The front end's master process: kernel state, listening sockets, and the workers (gunicorn-style).

The arbiter
1. finds the LAN interface (`interface`, else the one holding `raddr`, else the route to `vaddr`),
2. installs the VIP on it and the flow-steering table (FlowSteering.install adopts what a crashed
   predecessor left under the same table name: its handed-off flows keep working throughout),
3. opens the listening sockets on vaddr:port(s), or takes over those of a running predecessor
   (seamless upgrade, tcpha.fe.upgrade), and starts the runtime (tcpha.fe.runtime: control files,
   health checks, metrics, the links to the workers),
4. forks `startservers` workers that inherit the listening sockets, replaces a worker that dies, and
5. on SIGTERM/SIGINT stops the workers (they stop accepting and finish what they are dispatching),
   waits until the handed-off flows are gone or `grace` has passed, and removes the kernel state.

The worker pool is dynamic: `startservers` workers at start; then once a second the arbiter asks every
worker over its runtime link how many connections it is dispatching, and starts one more worker when
fewer than `minspareservers` are idle (32 workers at most) or stops an idle one when more than
`maxspareservers` are (never the last one), one step per second (tcpha.fe.pool.SparePolicy decides;
docs/operations.md, "Workers and limits"). Without the runtime (control directory unavailable) the pool
stays as started. With `startservers = 1` there is no arbiter: the one worker runs in this process.

Signals, as gunicorn's Arbiter: the handler of a signal in SIGNALS only queues it and wakes the main
loop, which runs `handle_<name>` (SIG_NAMES) once per tick for each queued signal: SIGTERM and SIGINT
stop, SIGHUP reloads the config file (tcpha.fe.reload), SIGCHLD reaps and replaces dead workers.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import socket
import time
from typing import Any, Callable

from pyroute2 import IPRoute

from tcpha.fe.pool import SparePolicy
from tcpha.fe.runtime import start_runtime
from tcpha.fe.upgrade import take_over
from tcpha.fe.worker import Worker
from tcpha.loglevels import NOTICE
from tcpha.repair import IP_FREEBIND
from tcpha.service import STOP_SIGNALS
from tcpha.steering import VipAddress, interface_holding, make_flow_steering

log = logging.getLogger("tcpha.fe")

NFT_TABLE = "tcpha_fe"
RESPAWN_MIN_INTERVAL = 1.0
DEFER_ACCEPT = 2        # seconds the kernel holds a connection that has sent nothing yet

# The signals the arbiter handles, in the order a tick handles them; SIG_NAMES[sig] names the handler
# (SIGHUP -> FrontEnd.handle_hup). A worker restores their default (SIGHUP: ignored).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
BIND_TRIES, BIND_WAIT = 5, 0.5          # a listening port in use: tried again, as nginx does (5 x 500 ms)
SIG_NAMES = {sig: sig.name[3:].lower() for sig in SIGNALS}


def lan_interface(config: Any) -> str:
    """The interface named by `interface`, else the one holding raddr, else the one routing to vaddr."""
    name = config.interface
    if name and name != "auto":
        return name
    raddr = config.raddr
    if raddr and raddr != "0.0.0.0":
        return interface_holding(raddr)
    with IPRoute() as ipr:
        routes = ipr.route("get", dst=config.vaddr)
        index = routes[0].get_attr("RTA_OIF") if routes else None
        if index is None:
            raise RuntimeError(f"no interface for vaddr {config.vaddr}: set 'interface = NAME'")
        return ipr.get_links(index)[0].get_attr("IFLA_IFNAME")


def listen_sockets(vip: str, ports: list[int], backlog: int, *, bind_tries: int = BIND_TRIES,
                   bind_wait: float = BIND_WAIT) -> list[tuple[socket.socket, int]]:
    out = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Accept only once the client's first bytes are in (as nginx 'deferred', HAProxy
        # 'defer-accept'): the first peek then finds the request head, with no wait for readability.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
        for attempt in range(1, bind_tries + 1):
            try:
                s.bind((vip, port))
                break
            except OSError as e:
                # As nginx does: a port still held a moment after a crash (a worker of a front end killed
                # with kill -9, closing its listeners as it notices) is tried again before giving up.
                if e.errno == errno.EADDRINUSE and attempt < bind_tries:
                    log.warning("listening on %s:%d: %s; trying again in %g s", vip, port, e.strerror, bind_wait)
                    time.sleep(bind_wait)
                    continue
                s.close()
                for other, _ in out:
                    other.close()
                raise RuntimeError(f"cannot listen on {vip}:{port}: {e.strerror}") from None
        s.listen(backlog)
        s.setblocking(False)
        out.append((s, port))
    return out


class FrontEnd:
    def __init__(self, config: Any, *, table: str = NFT_TABLE):
        self.config = config
        self.table = table
        self.ifname: str = ""
        self.vip_address: Any = None
        self.steering: Any = None
        self.listeners: list[tuple[socket.socket, int]] = []
        self.workers: dict[int, int] = {}          # pid -> worker number
        self._wakeup_r = -1
        self.sig_queue: list[int] = []  # signals received, not yet handled (FrontEnd.queue_signal)
        self.stopping = False           # SIGTERM/SIGINT or a handover: the main loop ends
        self._last_spawn: dict[int, float] = {}    # worker number -> when it was last started
        self.notify: Callable[[str], None] = lambda state: None
        self.runtime: Any = None        # tcpha.fe.runtime: control files, health checks, metrics
        self.handed_over = False        # seamless upgrade: a successor owns the kernel state now
        self._retiring: set[int] = set()
        self._in_process_worker: Any = None    # startservers = 1: the Worker run in this process

    # -- kernel state ----------------------------------------------------------------------------
    def make_steering(self) -> Any:
        return make_flow_steering(self.config.steering, table=self.table, ifname=self.ifname,
                                  vip=self.config.vaddr, ports=list(self.config.ports),
                                  flow_timeout=self.config.flowtimeout,
                                  tunnel=self.config.tunnel)

    def install(self) -> None:
        self.ifname = lan_interface(self.config)
        self.steering = self.make_steering()        # before the VIP: refuses what this kernel cannot do
        self.vip_address = VipAddress(self.config.vaddr, self.ifname)
        self.vip_address.add()
        self.steering.install()
        if getattr(self.steering, "adopted", False):
            log.log(NOTICE, "kernel state adopted from a predecessor: VIP %s on %s, steering table %s with "
                    "%d handed-off flows", self.config.vaddr, self.ifname, self.table, self._entries())
        else:
            log.log(NOTICE, "kernel state installed: VIP %s on %s, steering table %s", self.config.vaddr,
                    self.ifname, self.table)

    def _entries(self) -> int:
        try:
            return int(self.steering.entries())
        except Exception:
            return -1

    def remove(self) -> None:
        for what, obj in (("steering table", self.steering), ("VIP", self.vip_address)):
            if obj is None:
                continue
            try:
                obj.remove()
            except Exception as e:
                log.error("removing the %s failed: %s", what, e)
        self.steering = None
        self.vip_address = None
        log.log(NOTICE, "kernel state removed")

    # -- running ---------------------------------------------------------------------------------
    def run(self) -> int:
        # A stop asked while we start (systemd stopping a service it has just started) is queued from
        # here on, not the default action, which would leave the VIP and the steering table on the host.
        self.install_signal_handlers()
        takeover = None
        try:
            takeover = take_over(self.config)   # a running predecessor's listening sockets (upgrade)
            self.install()
            backlog = max(1024, self.config.maxclients * 4)
            self.listeners = (takeover.listeners if takeover is not None
                              else listen_sockets(self.config.vaddr, list(self.config.ports), backlog))
        except Exception as e:
            log.critical("cannot start: %s", e)
            if takeover is None:
                self.remove()
            return 1
        # The control socket changes hands at once; the predecessor releases its control directory
        # once it has exited.
        self.runtime = start_runtime(self, predecessor=takeover,
                                     wait_free=(self.config.grace + 10) if takeover is not None else 0)
        try:
            if self._stop_queued():
                log.log(NOTICE, "stop asked while starting: stopping before any worker starts")
            elif self.config.startservers <= 1:
                self._run_single()
            else:
                self._run_arbiter()
        finally:
            self.notify("STOPPING=1")
            if self.runtime is not None:
                self.runtime.stop()
            for s, _ in self.listeners:
                s.close()
            if self.handed_over:
                log.log(NOTICE, "handed over to a new tcpha-fe: kernel state left to it")
            else:
                self.remove()
        return 0

    def _make_worker(self, number: int, steering: Any) -> Any:
        return Worker(self.config, self.listeners, steering, ifname=self.ifname, name=f"worker {number}")

    def _run_single(self) -> None:
        worker = self._make_worker(0, self.steering)
        self._in_process_worker = worker      # a stop signal before its loop takes the signals over
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)           # no arbiter loop to reap for
        worker.on_ready = lambda: self.notify("READY=1")
        if self.runtime is not None:
            ours, theirs = self.runtime.worker_socketpair()
            worker.runtime_sock = theirs
            self.runtime.attach_worker(os.getpid(), ours)
            signal.signal(signal.SIGHUP, lambda signum, frame: self.handle_hup())
        else:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        worker.run()

    # -- arbiter ---------------------------------------------------------------------------------
    def _run_arbiter(self) -> None:
        n = self.config.startservers
        for number in range(n):
            self._spawn(number)
        self.notify("READY=1")
        log.info("arbiter %d: %d workers", os.getpid(), n)
        while not self.stopping:
            self.tick()
        self.stop_workers()

    def install_signal_handlers(self) -> None:
        """Each signal of SIGNALS only queues itself and wakes the main loop (signal.set_wakeup_fd);
        the loop runs its handler (`handle_hup`, ...) outside the signal's context."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup_r = r
        signal.set_wakeup_fd(w)
        for sig in SIGNALS:
            signal.signal(sig, self.queue_signal)

    def queue_signal(self, signum: int, frame: Any) -> None:
        self.sig_queue.append(signum)
        if signum in STOP_SIGNALS and self._in_process_worker is not None:
            self._in_process_worker.stop()      # startservers = 1: the worker is this process

    def _stop_queued(self) -> bool:
        return any(sig in STOP_SIGNALS for sig in self.sig_queue)

    def tick(self) -> None:
        """One turn of the main loop: wait for a signal (1 s at most), run the queued signals' handlers,
        reap and replace dead workers, and resize the pool (tcpha.fe.pool) when no signal is waiting."""
        try:
            select.select([self._wakeup_r], [], [], 1.0)
        except InterruptedError:
            pass
        try:
            os.read(self._wakeup_r, 512)
        except BlockingIOError:
            pass
        self.handle_signals()
        if self.stopping:
            return
        self.reap_workers()         # every tick, not only on SIGCHLD: one lost among others costs nothing
        if self.handed_over:
            self.stopping = True
            return
        if self.runtime is not None and not self.sig_queue:
            self._adjust_pool()

    def handle_signals(self) -> None:
        """Run the handler of each signal queued since the last tick, once however often it came, in
        the order of SIGNALS: a stop first, and nothing after it (no reload or respawn in vain)."""
        queued, self.sig_queue = set(self.sig_queue), []
        for sig in SIGNALS:
            if sig in queued and not self.stopping:
                handler = getattr(self, f"handle_{SIG_NAMES[sig]}")
                handler()

    def handle_term(self) -> None:
        """SIGTERM: stop. The workers stop accepting and finish what they dispatch, then wait for their
        handed-off flows (`grace` at most); the kernel state is removed (not after a handover)."""
        self.stopping = True

    def handle_int(self) -> None:
        """SIGINT (Ctrl-C): as SIGTERM."""
        self.stopping = True

    def handle_hup(self) -> None:
        """SIGHUP: reload the config file (tcpha.fe.reload), in the control plane's thread."""
        if self.runtime is not None:
            self.runtime.reload()
        else:
            log.warning("SIGHUP: no runtime (control directory unavailable); configuration unchanged")

    def handle_chld(self) -> None:
        """SIGCHLD: a worker exited: reap it, and start a new one in its place."""
        self.reap_workers()

    def reap_workers(self) -> None:
        """Reap the workers that exited; replace each (at most once per RESPAWN_MIN_INTERVAL per worker
        number) unless it was a surplus one the pool stopped or the front end was handed over."""
        for pid, number, status in self._reap():
            if self.handed_over:
                # A seamless upgrade asked the workers to stop: their exits are expected, and a
                # replacement would accept on the listening sockets the successor now owns.
                log.info("worker %d (pid %d) stopped (%s): handed over", number, pid, status)
                continue
            if pid in self._retiring:
                self._retiring.discard(pid)
                log.log(NOTICE, "worker %d (pid %d) stopped (%s): surplus idle worker", number, pid, status)
                continue
            log.error("worker %d (pid %d) exited (%s); starting a new one", number, pid, status)
            wait = self._last_spawn.get(number, 0) + RESPAWN_MIN_INTERVAL - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_spawn[number] = time.monotonic()
            self._spawn(number)

    def stop_workers(self) -> None:
        """Tell every worker to stop, wait `grace` (+5 s) for them to exit, then kill what is left."""
        # After a handover, workers the takeover request did not reach (one being started at that
        # moment) must not wait for the handed-off flows either: SIGUSR2 (see Worker.serve).
        stop_signal = signal.SIGUSR2 if self.handed_over else signal.SIGTERM
        log.info("arbiter: stopping %d workers", len(self.workers))
        for pid in list(self.workers):
            try:
                os.kill(pid, stop_signal)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.config.grace + 5
        while self.workers and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)
        for pid in list(self.workers):
            log.error("worker pid %d did not stop; killed", pid)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.workers.clear()

    def _adjust_pool(self) -> None:
        """Keep idle workers between minspareservers and maxspareservers (tcpha.fe.pool), one step a tick."""
        try:
            busy = self.runtime.busy_per_worker()
        except Exception as e:
            log.debug("worker pool: no answer from the workers: %s", e)
            return
        # A worker whose link is not attached yet (just started) counts as idle, as Apache's prefork counts
        # a starting child: it is about to accept. Counting only those that answered would start spares at
        # the first tick, before the first workers were linked. A linked worker that did not answer in
        # time (a busy machine) leaves the pool as it is for this tick: no decision on half the picture.
        linked = self.runtime.linked_workers()
        current = [pid for pid in self.workers if pid not in self._retiring]
        silent = [pid for pid in current if pid in linked and pid not in busy]
        if silent:
            log.debug("worker pool: no answer from worker(s) %s in time; unchanged", silent)
            return
        busy = {pid: busy.get(pid, 0) for pid in current}
        policy = SparePolicy(self.config.minspareservers, self.config.maxspareservers)
        step = policy.decide(list(busy.values()))
        idle = sum(1 for n in busy.values() if n == 0)
        if step > 0:
            number = max(self.workers.values(), default=-1) + 1
            log.log(NOTICE, "worker pool: %d of %d workers idle (< minspareservers %d): starting worker %d",
                    idle, len(busy), policy.minspare, number)
            self._spawn(number)
        elif step < 0:
            pid = max(p for p, n in busy.items() if n == 0)
            log.log(NOTICE, "worker pool: %d of %d workers idle (> maxspareservers %d): stopping worker %d (pid %d)",
                    idle, len(busy), policy.maxspare, self.workers[pid], pid)
            self._retiring.add(pid)
            if not self.runtime.stop_worker(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _reap(self) -> list[tuple[int, int, str]]:
        out = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            number = self.workers.pop(pid, None)
            if number is None:
                continue
            if self.runtime is not None:
                self.runtime.detach_worker(pid)
            if os.WIFSIGNALED(status):
                desc = f"signal {signal.Signals(os.WTERMSIG(status)).name}"
            else:
                desc = f"status {os.WEXITSTATUS(status)}"
            out.append((pid, number, desc))
        return out

    def _spawn(self, number: int) -> None:
        if self.handed_over:        # set by the control plane's thread, possibly while we decided
            log.info("worker %d not started: handed over to a new tcpha-fe", number)
            return
        pair = self.runtime.worker_socketpair() if self.runtime is not None else None
        arbiter = os.getpid()
        config = self.config            # the one the worker runs with (a reload may replace it meanwhile)
        pid = os.fork()
        if pid:
            self.workers[pid] = number
            if pair is not None:
                pair[1].close()
                self.runtime.attach_worker(pid, pair[0], config)
            return
        # -- child ------------------------------------------------------------------------------
        code = 0
        try:
            signal.set_wakeup_fd(-1)
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)     # reloads go through the arbiter
            _die_with_parent()
            keep = [s.fileno() for s, _ in self.listeners] + ([pair[1].fileno()] if pair is not None else [])
            drop_inherited_descriptors(keep)
            self.config = config        # exactly the one attach_worker was told of
            worker = self._make_worker(number, self.make_steering_for_worker())
            worker.arbiter_pid = arbiter
            if pair is not None:
                pair[0].close()
                worker.runtime_sock = pair[1]
            worker.run()
        except BaseException:
            log.exception("worker %d failed", number)
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def make_steering_for_worker(self) -> Any:
        """A steering handle in the worker process for the table the arbiter installed (the
        per-flow operations need no install: they name the table's set and map)."""
        return self.make_steering()


def drop_inherited_descriptors(keep: list[int]) -> None:
    """In a freshly forked worker: let go of every descriptor of the arbiter's but stdio, the log file,
    and `keep` (the listening sockets, the worker's runtime link).

    A fork copies them all, and CLOEXEC does not apply without an exec: the control socket's listener,
    the FUSE device, the metrics and registration listeners, the other workers' links. A worker that
    kept them would keep the control socket connectable (a new front end would wait there for an
    answer) and the FUSE mount alive after the arbiter's death. Each is replaced by /dev/null rather
    than closed, so that no number the arbiter's objects hold is reused by the worker's own sockets.
    """
    keep_set = {0, 1, 2, *keep}
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            keep_set.add(stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep_set or fd == null:
                continue
            try:
                os.fstat(fd)            # the listing's own descriptor is closed by now
            except OSError:
                continue
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass            # the descriptor of the listdir itself, already closed
    finally:
        os.close(null)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a worker whose arbiter died (kill -9) is told with SIGTERM; it notices that its
    parent changed and stops at once, without waiting for handed-off flows (Worker._on_stop_signal)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:  # pragma: no cover
        pass
