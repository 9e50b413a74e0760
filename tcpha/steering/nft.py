"""A thin, namespace-aware handle on libnftables (the `nftables` module from pip-nftables).

One libnftables context per handle. For another namespace (tests driving several from one process), every
call runs on a worker thread that stays inside that namespace: libnftables opens its nfnetlink socket when
the context is created but also looks up interface names with fresh netlink queries of the calling
thread's namespace, so the whole call must run there. Commands are nft's text syntax, built only
from values validated by the callers (addresses through ipaddress, ports as ints, MACs by regex).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

import nftables

from .netns import enter_netns

log = logging.getLogger(__name__)


class NftError(RuntimeError):
    """An nft command failed; str(e) is one line with nft's own message."""

    def __init__(self, message: str, *, missing: bool = False, exists: bool = False):
        super().__init__(message)
        self.missing = missing  # the object or element does not exist (ENOENT)
        self.exists = exists  # it already exists with other contents (EEXIST/EBUSY)


class Nft:
    """Run nft commands in one network namespace (None: the caller's). Thread-safe."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._lock = threading.Lock()
        self._worker: _NetnsWorker | None = None
        if netns is None:
            self._ctx = self._new_context()
        else:
            self._worker = _NetnsWorker(netns)
            self._ctx = self._worker.call(self._new_context)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def _cmd(self, text: str) -> tuple[int, str, str]:
        if self._worker is None:
            return self._ctx.cmd(text)
        return self._worker.call(self._ctx.cmd, text)

    @staticmethod
    def _new_context() -> nftables.Nftables:
        ctx = nftables.Nftables()
        ctx.set_json_output(True)
        ctx.set_handle_output(False)
        return ctx

    def run(self, commands: str) -> str:
        """Run one or more newline-separated commands as one transaction; returns nft's output."""
        with self._lock:
            rc, output, error = self._cmd(commands)
        if rc != 0:
            message = " ".join(line.strip() for line in error.splitlines() if line.strip() and not line.strip().startswith("^"))
            missing = "No such file or directory" in error
            exists = "File exists" in error or "Device or resource busy" in error
            raise NftError(f"nft: {message or 'command failed'}", missing=missing, exists=exists)
        return output

    def list_json(self, what: str, *, terse: bool = False) -> list[dict[str, Any]]:
        """`list WHAT` as a list of nft JSON objects (metainfo dropped). terse: without set elements."""
        with self._lock:
            self._ctx.set_terse_output(terse)
            try:
                rc, output, error = self._cmd(f"list {what}")
            finally:
                self._ctx.set_terse_output(False)
        if rc != 0:
            raise NftError(f"nft: list {what}: {error.strip().splitlines()[0] if error.strip() else 'failed'}",
                           missing="No such file or directory" in error)
        if not output.strip():
            return []
        return [o for o in json.loads(output).get("nftables", []) if "metainfo" not in o]

    def list_text(self, what: str, *, terse: bool = False) -> str:
        """`list WHAT` in nft's own text syntax (what JSON in nft 1.0.x leaves out, e.g. a chain's device).

        terse: without set elements in the output.
        """
        with self._lock:
            self._ctx.set_json_output(False)
            self._ctx.set_terse_output(terse)
            try:
                rc, output, error = self._cmd(f"list {what}")
            finally:
                self._ctx.set_json_output(True)
                self._ctx.set_terse_output(False)
        if rc != 0:
            raise NftError(f"nft: list {what}: {error.strip().splitlines()[0] if error.strip() else 'failed'}",
                           missing="No such file or directory" in error)
        return output

    def table_exists(self, family: str, table: str) -> bool:
        # `list tables` reads no sets or elements (listing the table itself fetches every element).
        return any(o["table"].get("name") == table for o in self.list_json(f"tables {family}") if "table" in o)


class _NetnsWorker:
    """A daemon thread living in one network namespace, running the calls handed to it in order."""

    def __init__(self, netns: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        ready: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, args=(netns, ready), name=f"nft-{netns}", daemon=True)
        self._thread.start()
        error = ready.get()
        if error is not None:
            raise error

    def _loop(self, netns: str, ready: queue.SimpleQueue) -> None:
        try:
            enter_netns(netns)
        except BaseException as exc:
            ready.put(exc)
            return
        ready.put(None)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, reply = job
            try:
                reply.put((True, fn(*args)))
            except BaseException as exc:
                reply.put((False, exc))

    def call(self, fn, *args):
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs.put((fn, args, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._jobs.put(None)
