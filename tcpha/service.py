"""What the daemons (tcpha-fe, tcpha-be, dc_server, dc_client, dc_snoop) share as services: logging,
sd_notify, daemonizing, the pidfile, privilege drop, socket-file ownership, descriptors, the event loop.

Library code (a reload applying a new logfile, say) uses these too; the command-line start-up that calls
them (options, config file, exit statuses) is tcpha/cli/service.py."""

from __future__ import annotations

# Everything is imported here, at start: after drop_privileges() the interpreter's own files may no longer
# be readable (a Python under /root, say), so a lazy import there would fail.
import grp
import logging
import os
import pwd
import resource
import signal
import socket
import sys

from tcpha.loglevels import dbglevel_to_logging
from tcpha.logrepeat import install as install_repeat_filter

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)     # what stops a daemon cleanly (systemd, Ctrl-C)

try:
    import uvloop
except ImportError:  # optional
    uvloop = None


def setup_logging(dbglevel: int, logfile: str | None, name: str) -> None:
    """dbglevel 0-6 onto logging levels (tcpha.loglevels.dbglevel_to_logging); stderr or a file."""
    level = dbglevel_to_logging(dbglevel)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if logfile and logfile != "-":
        handler: logging.Handler = logging.FileHandler(logfile)
        fmt = f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        # journald adds the time and the unit (systemd sets $JOURNAL_STREAM when stderr goes to it):
        # keep the line short there; anywhere else (a terminal, a redirect) the time is needed.
        stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
        fmt = f"{stamp}{name}[%(process)d] %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    # A flood of one kind of warning (thousands of slow clients' 408s) is collapsed: a burst per
    # interval, then "(N similar suppressed ...)" on the next line of its kind (tcpha/logrepeat.py).
    install_repeat_filter(handler)
    root.addHandler(handler)
    root.setLevel(level)
    # Library chatter (pyroute2 dumps whole netlink messages at DEBUG) stays out of our debug levels.
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def sd_notify(state: str) -> bool:
    """Tell systemd our state (READY=1, STOPPING=1, ...) when started with Type=notify.

    The protocol is one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET ('@' = abstract
    namespace); a few lines of stdlib, no libsystemd needed.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def daemonize() -> None:
    """Classic double fork: detach from the terminal and the session; stdio to /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


class PidFile:
    """Writes our pid; refuses to start when a live process holds the file; removed at exit."""

    def __init__(self, path: str):
        self.path = path
        self.pid = 0

    def acquire(self) -> None:
        try:
            with open(self.path) as f:
                old = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            old = 0
        if old and old != os.getpid():
            try:
                os.kill(old, 0)
            except ProcessLookupError:
                pass
            except PermissionError:
                raise RuntimeError(f"pidfile {self.path}: process {old} is running")
            else:
                raise RuntimeError(f"pidfile {self.path}: process {old} is running")
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.path)
        self.pid = os.getpid()

    def release(self) -> None:
        if self.pid != os.getpid():
            return                               # a forked worker: the arbiter owns the file
        try:
            with open(self.path) as f:
                if int(f.read().strip() or 0) != self.pid:
                    return
            os.unlink(self.path)
        except (OSError, ValueError):
            pass


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a busy front end holds many sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft


def drop_privileges(user: str) -> None:
    """Become USER (a name or a numeric uid), with its groups; raises KeyError or OSError."""
    pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    os.setgroups([])
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


def set_socket_attributes(path: str, owner: str | None, group: str | None, perms: int | None) -> None:
    """distcache's -sockowner/-sockgroup/-sockperms on a UNIX socket file; failures only warn (as the
    original does)."""
    if owner is not None or group is not None:
        try:
            uid = gid = -1
            if owner is not None:
                uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
            if group is not None:
                gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            os.chown(path, uid, gid)
        except (KeyError, OSError) as exc:
            sys.stderr.write(f"Warning, couldn't set ownership of '{path}': "
                             f"{getattr(exc, 'strerror', None) or 'no such user or group'}\n")
    if perms is not None:
        try:
            os.chmod(path, perms)
        except OSError as exc:
            sys.stderr.write(f"Warning, couldn't set permissions of '{path}': {exc.strerror}\n")


def event_loop_factory():
    """uvloop's loop when installed (about twice the requests per second of the distcache servers),
    else None: asyncio's default."""
    return uvloop.new_event_loop if uvloop is not None else None
