"""Running a short piece of kernel-facing work inside another network namespace.

The daemons run inside their namespace already (`ip netns exec`) and pass netns=None. Tests drive several
namespaces from one root process: they pass netns=NAME, and the work runs in a short-lived thread that has
entered that namespace with setns(2) (which changes only the calling thread). Sockets, netlink sockets and
/proc/sys/net files opened there keep belonging to that namespace whichever thread uses them later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    # os.setns exists only from Python 3.12; we support 3.11.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter_netns(netns: str) -> None:
    """Move the calling thread into network namespace `netns` for good."""
    try:
        target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"network namespace {netns} does not exist") from None
    try:
        _setns(target)
    finally:
        os.close(target)


def call_in_netns(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), inside network namespace `netns` (None: right here, in the caller's)."""
    if netns is None:
        return fn(*args, **kwargs)
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            # The thread dies right after, so it never needs to go back to its original namespace.
            enter_netns(netns)
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
