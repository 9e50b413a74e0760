"""The embedded store's semantics (the original's) and the -persist log, in process."""

from __future__ import annotations

import os
import random

import pytest

from tcpha.distcache.codec import Status
from tcpha.distcache.persist import FILE_HEADER, SYNC, PersistentStore, encode_record, load_file
from tcpha.distcache.store import SessionStore


class Clock:
    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make(n=64, now=1_000_000):
    clock = Clock(now)
    return SessionStore(n, clock=clock), clock


def test_add_get_remove_has():
    s, _ = make()
    assert s.add(b"a", b"A", 1000) == Status.OK
    assert s.get(b"a") == b"A" and s.has(b"a") and len(s) == 1
    assert s.remove(b"a") is True
    assert s.remove(b"a") is False
    assert s.get(b"a") is None and not s.has(b"a") and len(s) == 0


def test_duplicate_add_is_101_and_old_entry_stays():
    s, clock = make()
    s.add(b"a", b"old", 1000)
    assert s.add(b"a", b"new", 999999) == Status.ADD_MATCHING_SESSION
    assert s.get(b"a") == b"old"
    assert s.expiry_of(b"a") == clock.now + 1000


def test_duplicate_of_expired_entry_is_accepted():
    s, clock = make()
    s.add(b"a", b"old", 10)
    clock.now += 11
    assert s.add(b"a", b"new", 10) == Status.OK
    assert s.get(b"a") == b"new"


def test_strict_expiry_valid_at_exact_instant():
    s, clock = make()
    s.add(b"a", b"A", 500)
    clock.now += 500
    assert s.get(b"a") == b"A"          # now == expiry: still valid
    clock.now += 1
    assert s.get(b"a") is None          # now > expiry: gone
    assert len(s) == 0


def test_zero_timeout_valid_only_at_that_instant():
    s, clock = make()
    assert s.add(b"a", b"A", 0) == Status.OK
    assert s.has(b"a")
    clock.now += 1
    assert not s.has(b"a")


def test_get_does_not_refresh():
    s, clock = make()
    s.add(b"a", b"A", 100)
    for _ in range(10):
        clock.now += 10
        assert s.get(b"a") == b"A"
    clock.now += 1
    assert s.get(b"a") is None


def test_eviction_removes_max1_sessions30_closest_to_expiry():
    n = 90                                   # 90 // 30 = 3 evicted per full ADD
    s, _ = make(n)
    order = list(range(n))
    random.Random(1).shuffle(order)
    for i in order:                          # expiry = now + 1000 + i, inserted in random order
        s.add(b"id%d" % i, b"x", 1000 + i)
    assert len(s) == n
    s.add(b"new", b"x", 5)                   # closest to expiry of all, but inserted after eviction
    assert len(s) == n - 3 + 1
    assert [i for i in range(n) if not s.has(b"id%d" % i)] == [0, 1, 2]
    assert s.has(b"new")
    assert s.evicted == 3


def test_eviction_small_cache_evicts_one():
    s, _ = make(29)                          # 29 // 30 == 0 -> max(1, 0) == 1
    for i in range(29):
        s.add(b"%d" % i, b"x", 100 + i)
    s.add(b"new", b"x", 1)
    assert len(s) == 29 and not s.has(b"0") and s.has(b"1")


def test_equal_expiries_evict_in_insertion_order():
    s, _ = make(30)
    for i in range(30):
        s.add(b"%d" % i, b"x", 1000)        # all the same expiry
    s.add(b"new", b"x", 1000)
    assert not s.has(b"0") and s.has(b"1") and s.has(b"new")


def test_expired_entries_make_room_before_eviction():
    s, clock = make(64)
    for i in range(64):
        s.add(b"%d" % i, b"x", 10 if i < 5 else 1000)
    clock.now += 11
    s.add(b"new", b"x", 1000)
    assert len(s) == 60                      # 5 expired, nothing evicted
    assert s.evicted == 0 and s.expired == 5


def test_removed_entries_do_not_confuse_eviction():
    s, _ = make(64)
    for i in range(64):
        s.add(b"%d" % i, b"x", 100 + i)
    assert s.remove(b"0") and s.remove(b"1")
    s.add(b"0", b"again", 10_000)            # same id re-added later: its old heap slot is stale
    s.add(b"a", b"x", 10_000)
    s.add(b"b", b"x", 10_000)                # full now -> evict 2 closest: "2" and "3"
    assert not s.has(b"2") and not s.has(b"3") and s.get(b"0") == b"again"
    assert len(s) == 63


def test_heap_stays_bounded_under_add_remove_churn():
    s, _ = make(1000)
    for i in range(20_000):
        s.add(b"%d" % i, b"x", 1_000_000)
        s.remove(b"%d" % i)
    assert len(s) == 0
    assert s.stats()["heap"] <= 2100


def test_randomised_against_a_model():
    rng = random.Random(7)
    s, clock = make(64)
    model: dict[bytes, tuple[int, int, bytes]] = {}
    seq = 0
    for _ in range(5000):
        clock.now += rng.randrange(0, 20)
        model = {k: v for k, v in model.items() if not clock.now > v[0]}
        sid = b"%d" % rng.randrange(100)
        op = rng.randrange(4)
        if op == 0:
            t = rng.randrange(0, 2000)
            if sid in model:
                assert s.add(sid, b"d", t) == Status.ADD_MATCHING_SESSION
            else:
                if len(model) >= 64:
                    for k, _ in sorted(model.items(), key=lambda kv: (kv[1][0], kv[1][1]))[:2]:
                        del model[k]
                seq += 1
                model[sid] = (clock.now + t, seq, b"d%d" % seq)
                assert s.add(sid, b"d%d" % seq, t) == Status.OK
        elif op == 1:
            assert s.get(sid) == (model[sid][2] if sid in model else None)
        elif op == 2:
            assert s.remove(sid) == (model.pop(sid, None) is not None)
        else:
            assert s.has(sid) == (sid in model)
        assert len(s) == len(model)


# --- persistence (in process; the kill -9 tests are in test_server.py) ------------------------------

def test_persist_round_trip_keeps_absolute_expiry(tmp_path):
    path = str(tmp_path / "cache.log")
    clock = Clock(5_000_000)
    p = PersistentStore(SessionStore(100, clock=clock), path, interval_ms=10, clock=clock)
    p.add(b"a", b"A" * 3000, 60_000)
    p.add(b"b", b"B", 60_000)
    p.add(b"c", b"C", 60_000)
    assert p.remove(b"b")
    p.flush()
    p.close()
    clock.now += 30_000                       # restarted 30 s later
    q = PersistentStore(SessionStore(100, clock=clock), path, clock=clock)
    try:
        assert q.get(b"a") == b"A" * 3000 and q.get(b"c") == b"C" and q.get(b"b") is None
        assert q.store.expiry_of(b"a") == 5_000_000 + 60_000
        assert q.report.loaded == 2 and q.report.damaged == 0
        clock.now = 5_060_001                 # original expiry passed: gone
        assert q.get(b"a") is None
    finally:
        q.close()


def test_persist_drops_sessions_expired_while_down(tmp_path):
    path = str(tmp_path / "cache.log")
    clock = Clock(1_000_000)
    p = PersistentStore(SessionStore(100, clock=clock), path, clock=clock)
    p.add(b"short", b"x", 100)
    p.add(b"long", b"y", 100_000)
    p.close()
    clock.now += 1000
    q = PersistentStore(SessionStore(100, clock=clock), path, clock=clock)
    try:
        assert not q.has(b"short") and q.has(b"long")
        assert q.report.expired == 1
    finally:
        q.close()


def test_persist_logs_evictions(tmp_path):
    path = str(tmp_path / "cache.log")
    clock = Clock()
    p = PersistentStore(SessionStore(64, clock=clock), path, clock=clock)
    for i in range(64):
        p.add(b"%d" % i, b"x", 1000 + i)
    p.add(b"late", b"x", 100_000)            # evicts "0" and "1"
    p.close()
    sessions, report = load_file(path)
    assert b"0" not in sessions and b"1" not in sessions and b"late" in sessions
    assert len(sessions) == 63


def test_damaged_file_is_skipped_entry_by_entry(tmp_path, caplog):
    path = tmp_path / "cache.log"
    exp = 10**13
    recs = [encode_record(1, b"id%d" % i, b"data%d" % i, exp) for i in range(10)]
    blob = bytearray(FILE_HEADER + b"".join(recs))
    # Damage record 3's data (CRC mismatch) and record 6's length field; cut the last one short.
    off3 = len(FILE_HEADER) + sum(map(len, recs[:3]))
    blob[off3 + len(recs[3]) - 1] ^= 0xFF
    off6 = len(FILE_HEADER) + sum(map(len, recs[:6]))
    blob[off6 + 4 + 4 + 1 + 8 + 1] = 0xFF   # data_len high byte: runs past the end
    blob = blob[:-3]
    path.write_bytes(bytes(blob))
    caplog.set_level("WARNING")
    p = PersistentStore(SessionStore(100), str(path))
    try:
        present = sorted(int(s[2:]) for s in (b"id%d" % i for i in range(10)) if p.has(s))
        assert present == [0, 1, 2, 4, 5, 7, 8]
        assert p.report.damaged == 3
        assert "skipped 3 damaged region(s)" in caplog.text
        assert os.path.exists(str(path) + ".damaged")
    finally:
        p.close()
    # The rewritten file is clean.
    sessions, report = load_file(str(path))
    assert report.damaged == 0 and len(sessions) == 7


def test_garbage_file_still_starts(tmp_path):
    path = tmp_path / "cache.log"
    path.write_bytes(os.urandom(5000) + SYNC + b"\x00" * 30)
    p = PersistentStore(SessionStore(100), str(path))
    try:
        assert len(p) == 0 and p.report.bad_header
        assert p.add(b"k", b"v", 10_000) == Status.OK
    finally:
        p.close()


def test_compaction_keeps_everything(tmp_path, monkeypatch):
    import tcpha.distcache.persist as persist
    monkeypatch.setattr(persist, "MIN_COMPACT_BYTES", 4096)
    path = str(tmp_path / "cache.log")
    p = PersistentStore(SessionStore(10_000), path, fsync=False)
    live = {}
    for round_ in range(30):
        for i in range(50):
            sid = b"%d-%d" % (round_, i)
            p.add(sid, b"v" * 50, 1_000_000)
            live[sid] = True
            if i % 2:
                p.remove(sid)
                del live[sid]
        p.flush()
        p.drain()          # writes done, any compaction finished and switched in
    assert p.compactions >= 1
    p.close()
    sessions, report = load_file(path)
    assert set(sessions) == set(live) and report.damaged == 0
    assert os.path.getsize(path) < 0.9 * 30 * 50 * 90      # well below the full history (~134 kB)
