"""``dc_server -persist FILE``: sessions that survive restarts and ``kill -9``.

The original C server keeps sessions in memory only; this is an extension.

File format (all integers big-endian)::

    b"TCPHA-DCPERSIST1\\n"                        file header (17 bytes)
    then records:
    b"DCR1" | crc32 u32 | type u8 | expiry_ms u64 | id_len u8 | data_len u32 | id | data

``type`` is 1 (add) or 2 (remove, no data, expiry 0); ``expiry_ms`` is the
absolute wall-clock expiry, so a reloaded session keeps its original expiry;
the CRC covers type..data.  The 4-byte sync word lets the loader skip a damaged
record and find the next one: damage is reported (one warning line with a
count) and skipped entry by entry; the server always starts.

Durability policy:

* every acknowledged ADD/REMOVE (and every eviction, logged as a remove) is
  appended to an in-memory buffer; every ``interval_ms`` (``-persist-interval``,
  default 1000) the buffer is handed to a writer thread that ``write()``s it to
  the file; a third thread then ``fdatasync()``s it, so that a slow disk never
  delays the next interval's write.  A session acknowledged more than one
  interval before a ``kill -9`` is therefore in the kernel (the write is done)
  and on disk soon after (the sync); a power loss can lose the last interval
  plus the sync time.
* on a clean stop (SIGTERM, SIGINT, -killable signals) the buffer is written and
  synced before exit.
* compaction: when the log has grown to twice its size after the last
  compaction (and at least 1 MiB), a snapshot of the live sessions is written to
  ``FILE.tmp`` by a second thread while appends go on to the old log; the records
  appended meanwhile are then added to the new file, which is fsynced and
  renamed over the old one (and the directory fsynced).  A crash at any point
  leaves either the complete old log or the complete new one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import struct
import threading
import zlib
from typing import Callable

from .codec import MAX_DATA_LEN, MAX_ID_LEN, Status
from .store import SEQ_BITS, SessionStore, wall_ms

__all__ = ["PersistentStore", "load_file", "LoadReport", "FILE_HEADER"]

log = logging.getLogger("tcpha.distcache.persist")

FILE_HEADER = b"TCPHA-DCPERSIST1\n"
SYNC = b"DCR1"
_REC = struct.Struct(">4sIBQBI")     # sync, crc, type, expiry, id_len, data_len
_BODY = struct.Struct(">BQBI")       # the CRC-covered fixed part
REC_ADD = 1
REC_REMOVE = 2
MIN_COMPACT_BYTES = 1 << 20


def encode_record(rtype: int, session_id: bytes, data: bytes, expiry_ms: int) -> bytes:
    body = _BODY.pack(rtype, expiry_ms, len(session_id), len(data)) + session_id + data
    return SYNC + struct.pack(">I", zlib.crc32(body)) + body


class LoadReport:
    __slots__ = ("records", "damaged", "loaded", "expired", "bad_header", "error")

    def __init__(self) -> None:
        self.records = 0       # valid records read
        self.damaged = 0       # damaged regions skipped
        self.loaded = 0        # sessions put into the store
        self.expired = 0       # sessions already expired at load time
        self.bad_header = False
        self.error: str | None = None


def load_file(path: str) -> tuple[dict[bytes, tuple[int, bytes]], LoadReport]:
    """Read a persist file: id -> (expiry_ms, data) in log order, plus a report.
    Never raises for damaged content; a missing file is an empty result."""
    report = LoadReport()
    sessions: dict[bytes, tuple[int, bytes]] = {}
    try:
        with open(path, "rb") as fp:
            blob = fp.read()
    except FileNotFoundError:
        return sessions, report
    except OSError as exc:
        report.error = exc.strerror
        return sessions, report
    n = len(blob)
    if blob.startswith(FILE_HEADER):
        pos = len(FILE_HEADER)
    else:
        if n:
            report.bad_header = True
        pos = 0
    in_damage = False
    fixed = _REC.size
    while pos < n:
        ok = False
        if blob.startswith(SYNC, pos) and n - pos >= fixed:
            _, crc, rtype, expiry, id_len, data_len = _REC.unpack_from(blob, pos)
            end = pos + fixed + id_len + data_len
            if (rtype in (REC_ADD, REC_REMOVE) and 0 < id_len <= MAX_ID_LEN
                    and data_len <= MAX_DATA_LEN and end <= n
                    and zlib.crc32(memoryview(blob)[pos + 8:end]) == crc):
                ok = True
                sid = blob[pos + fixed:pos + fixed + id_len]
                if rtype == REC_ADD:
                    sessions.pop(sid, None)  # a later add of the same id wins
                    sessions[sid] = (expiry, blob[pos + fixed + id_len:end])
                else:
                    sessions.pop(sid, None)
                report.records += 1
                pos = end
                in_damage = False
        if not ok:
            if not in_damage:
                report.damaged += 1
                in_damage = True
            nxt = blob.find(SYNC, pos + 1)
            pos = n if nxt < 0 else nxt
    return sessions, report


class PersistentStore:
    """A SessionStore whose acknowledged changes are appended to a log file.

    Same interface as SessionStore (is_async False). Call :meth:`flush` every
    interval (the server does), :meth:`close` on a clean stop.
    """

    is_async = False

    def __init__(self, store: SessionStore, path: str, *, interval_ms: int = 1000,
                 fsync: bool = True, clock: Callable[[], int] = wall_ms) -> None:
        self.store = store
        self.path = path
        self.interval_ms = interval_ms
        self.fsync = fsync
        self._clock = clock
        self._buf: list[bytes] = []
        self._tail: list[bytes] | None = None   # records appended during a compaction
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dc-persist")
        self._compactor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dc-compact")
        self._syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dc-sync")
        self._sync_pending = False
        self._compacting: concurrent.futures.Future | None = None
        self._switching: concurrent.futures.Future | None = None
        self.compactions = 0
        self._lock = threading.Lock()       # guards _fd/_file_bytes between the two threads
        self._fd = -1
        self._file_bytes = 0
        self._base_bytes = 0
        self.report = self._load()
        store.on_evict = self._evicted

    # -- startup ---------------------------------------------------------------

    def _load(self) -> LoadReport:
        sessions, report = load_file(self.path)
        if report.error:
            # Not damage but an unusable path (permissions, a directory...): starting empty would
            # overwrite sessions we could not read, so this one is an error.
            raise OSError(f"cannot read it: {report.error}")
        if report.bad_header:
            log.warning("Warning, persist file '%s' has a damaged header; reading what records remain",
                        self.path)
        if report.damaged:
            log.warning("Warning, persist file '%s': skipped %d damaged region(s), kept %d good record(s)",
                        self.path, report.damaged, report.records)
        now = self._clock()
        # Insert in expiry order (ties: log order) so eviction on reload, if the
        # file holds more than -sessions entries, drops those closest to expiry.
        items = sorted(sessions.items(), key=lambda kv: kv[1][0])
        for sid, (expiry, data) in items:
            if self.store.add_absolute(sid, data, expiry) == Status.OK:
                report.loaded += 1
            elif expiry < now:
                report.expired += 1
        if report.loaded or report.records:
            log.info("Info, loaded %d session(s) from '%s' (%d already expired)",
                     report.loaded, self.path, report.expired)
        if report.damaged or report.bad_header:
            keep = self.path + ".damaged"
            try:
                os.replace(self.path, keep)
                log.warning("Warning, kept the damaged persist file as '%s'", keep)
            except OSError as exc:
                log.warning("Warning, cannot keep a copy of the damaged file: %s", exc.strerror)
        # Start from a clean compacted file.
        self._write_snapshot_sync()
        return report

    def _write_snapshot_sync(self) -> None:
        snapshot = list(self.store.entries())
        size = _write_snapshot(self.path, snapshot, [], self.fsync)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._file_bytes = self._base_bytes = size

    # -- the store interface -------------------------------------------------

    def add(self, session_id: bytes, data: bytes, timeout_ms: int) -> Status:
        status = self.store.add(session_id, data, timeout_ms)
        if status == Status.OK:
            self._append(encode_record(REC_ADD, session_id, data, self.store.expiry_of(session_id)))
        return status

    def get(self, session_id: bytes) -> bytes | None:
        return self.store.get(session_id)

    def remove(self, session_id: bytes) -> bool:
        if self.store.remove(session_id):
            self._append(encode_record(REC_REMOVE, session_id, b"", 0))
            return True
        return False

    def has(self, session_id: bytes) -> bool:
        return self.store.has(session_id)

    def expire(self, now: int | None = None) -> None:
        self.store.expire(now)

    def __len__(self) -> int:
        return len(self.store)

    def stats(self) -> dict[str, int]:
        stats = self.store.stats()
        stats["persist_bytes"] = self._file_bytes
        return stats

    def _evicted(self, ids: list[bytes]) -> None:
        for sid in ids:
            self._append(encode_record(REC_REMOVE, sid, b"", 0))

    def _append(self, record: bytes) -> None:
        self._buf.append(record)
        if self._tail is not None:
            self._tail.append(record)

    # -- writing -----------------------------------------------------------------

    def flush(self) -> None:
        """Hand the buffered records to the writer thread (called every interval)."""
        if self._buf:
            chunk = b"".join(self._buf)
            self._buf = []
            self._writer.submit(self._write_chunk, chunk)
        self._maybe_compact()

    def _write_chunk(self, chunk: bytes) -> None:
        """Writer thread: append; the fdatasync runs in a third thread so that a slow disk
        never delays the next interval's write (the kill -9 guarantee needs only the write)."""
        try:
            with self._lock:
                fd = self._fd
                _write_all(fd, chunk)
                self._file_bytes += len(chunk)
                if self.fsync and not self._sync_pending:
                    self._sync_pending = True
                    self._syncer.submit(self._sync, os.dup(fd))
        except OSError as exc:
            log.error("Error, writing persist file '%s' failed: %s", self.path, exc.strerror)

    def _sync(self, dfd: int) -> None:
        try:
            with self._lock:
                self._sync_pending = False   # a write after this point schedules its own sync
            os.fdatasync(dfd)
        except OSError as exc:
            log.error("Error, syncing persist file '%s' failed: %s", self.path, exc.strerror)
        finally:
            os.close(dfd)

    def _maybe_compact(self) -> None:
        if self._compacting is not None:
            if self._compacting.done():
                tail, self._tail = self._tail or [], None
                fut, self._compacting = self._compacting, None
                try:
                    tmp_fd = fut.result()
                except OSError as exc:
                    log.error("Error, compacting persist file '%s' failed: %s", self.path, exc.strerror)
                    return
                self._switching = self._writer.submit(self._switch, tmp_fd, b"".join(tail))
            return
        if self._switching is not None:
            if not self._switching.done():
                return          # one compaction at a time, until its file is in place
            self._switching = None
        if self._file_bytes >= max(MIN_COMPACT_BYTES, 2 * self._base_bytes):
            snapshot = self.store.snapshot()      # O(n) list copy only; encoding is in the thread
            self._tail = []
            self._compacting = self._compactor.submit(self._compact, snapshot)

    def _compact(self, snapshot: list[tuple[int, bytes, bytes]]) -> int:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            parts = [FILE_HEADER]
            for key, sid, data in snapshot:
                parts.append(encode_record(REC_ADD, sid, data, key >> SEQ_BITS))
                if len(parts) >= 4096:
                    _write_all(fd, b"".join(parts))
                    parts = []
            _write_all(fd, b"".join(parts))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _switch(self, tmp_fd: int, tail: bytes) -> None:
        """Writer thread: finish the compacted file and put it in place of the log."""
        tmp = self.path + ".tmp"
        try:
            _write_all(tmp_fd, tail)
            os.fsync(tmp_fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path)
            size = os.fstat(tmp_fd).st_size
            with self._lock:
                old, self._fd = self._fd, tmp_fd
                self._file_bytes = self._base_bytes = size
            os.close(old)
            self.compactions += 1
        except OSError as exc:
            log.error("Error, compacting persist file '%s' failed: %s", self.path, exc.strerror)
            os.close(tmp_fd)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until what was handed to the threads is done; finish a compaction (tests, tools)."""
        for _ in range(4):
            self._writer.submit(lambda: None).result(timeout)
            if self._compacting is not None:
                self._compacting.result(timeout)
            elif self._switching is None or self._switching.done():
                break
            self.flush()
        self._writer.submit(lambda: None).result(timeout)

    def close(self) -> None:
        """Clean stop: write and sync everything."""
        if self._compacting is not None:
            self._compacting.cancel()
            try:
                fd = self._compacting.result()
                os.close(fd)
            except BaseException:
                pass
            self._compacting = None
            self._tail = None
        if self._buf:
            chunk = b"".join(self._buf)
            self._buf = []
            self._writer.submit(self._write_chunk, chunk)
        self._writer.shutdown(wait=True)
        self._compactor.shutdown(wait=True)
        self._syncer.shutdown(wait=True)
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: str) -> None:
    dfd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_snapshot(path: str, snapshot, tail: list[bytes], fsync: bool) -> int:
    tmp = path + ".tmp"
    parts = [FILE_HEADER]
    parts.extend(encode_record(REC_ADD, sid, data, expiry) for expiry, sid, data in snapshot)
    parts.extend(tail)
    blob = b"".join(parts)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, blob)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path)
    return len(blob)
