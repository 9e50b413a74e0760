"""PostedOperations: ADD/REMOVE written without waiting for the answer, answers read later."""

from __future__ import annotations

import select
import socket
import time

import pytest

from tcpha.distcache.client import PERSISTENT, DistcacheClient, DistcacheError
from tcpha.tls.sharing import MAX_UNANSWERED, PostedOperations

from .conftest import wait_for


def _answers(posted: PostedOperations, results: list, count: int) -> list:
    def done():
        posted.poll()
        return len(results) >= count
    wait_for(done, 10, f"{count} answers")
    return results


def test_posted_adds_and_removes_are_answered_in_order(dc_server):
    address, _ = dc_server()
    posted = PostedOperations(address, timeout=1.0)
    results: list = []
    try:
        posted.add(b"id-1", b"session one", 60000, results.append)
        posted.add(b"id-1", b"again", 60000, results.append)       # [101] already stored: refused
        posted.add(b"id-2", b"session two", 60000, results.append)
        posted.remove(b"id-2", results.append)
        posted.remove(b"id-absent", results.append)
        assert _answers(posted, results, 5) == [True, False, True, True, False]
        assert posted.unanswered() == 0
        with DistcacheClient(address, PERSISTENT, 1.0) as check:
            assert check.get(b"id-1") == b"session one" and check.get(b"id-2") is None
    finally:
        posted.close()


def test_a_restarted_cache_is_reconnected_to_before_the_next_post(dc_server, procs):
    address, proc = dc_server()
    posted = PostedOperations(address, timeout=1.0)
    results: list = []
    try:
        posted.add(b"before", b"x" * 100, 60000, results.append)
        _answers(posted, results, 1)
        procs.stop(proc)
        address, _ = dc_server(address)
        # The closed connection is noticed (EOF) before sending: this ADD reaches the new server.
        posted.add(b"after", b"y" * 100, 60000, results.append)
        assert _answers(posted, results, 2) == [True, True]
        with DistcacheClient(address, PERSISTENT, 1.0) as check:
            assert check.get(b"after") == b"y" * 100
    finally:
        posted.close()


def test_a_cache_that_never_answers_fails_once_an_answer_is_overdue():
    black = socket.create_server(("127.0.0.1", 0), backlog=4)   # accepts (backlog), never reads
    timeout = 0.2
    posted = PostedOperations("IP:127.0.0.1:%d" % black.getsockname()[1], timeout=timeout)
    try:
        posted.add(b"first", b"z" * 100, 60000)
        posted.add(b"second", b"z" * 100, 60000)      # the first answer is not overdue yet: no error,
        assert posted.unanswered() == 2               # and nothing waited for (a waited ADD would raise)
        time.sleep(timeout * 1.5)                     # the time without an answer is what is tested
        with pytest.raises(DistcacheError, match="no answer within"):
            posted.add(b"third", b"z" * 100, 60000)
        assert posted.unanswered() == 0               # the connection was dropped
    finally:
        posted.close()
        black.close()


def test_a_cache_that_never_reads_fails_by_the_cap_or_the_full_buffer():
    black = socket.create_server(("127.0.0.1", 0), backlog=4)
    posted = PostedOperations("IP:127.0.0.1:%d" % black.getsockname()[1], timeout=0.5)
    try:
        with pytest.raises(DistcacheError, match="without an answer|does not read|no answer within"):
            for i in range(MAX_UNANSWERED + 1):
                posted.add(b"id-%d" % i, b"z" * 1000, 60000)
    finally:
        posted.close()
        black.close()


def test_nothing_listening_raises_at_once(tmp_path):
    posted = PostedOperations(f"UNIX:{tmp_path}/nothing", timeout=1.0)
    with pytest.raises(DistcacheError, match="cannot connect"):
        posted.add(b"id", b"data", 60000)


def test_after_fork_the_child_posts_on_its_own_connection(dc_server):
    import os

    address, _ = dc_server()
    posted = PostedOperations(address, timeout=1.0)
    results: list = []
    try:
        posted.add(b"parent-1", b"p" * 50, 60000, results.append)
        pid = os.fork()
        if pid == 0:                                    # child: post, wait for its own answer
            code = 1
            try:
                mine: list = []
                posted.add(b"child", b"c" * 50, 60000, mine.append)
                while not mine and select.select([posted._sock], [], [], 5)[0]:   # the answer arriving
                    posted.poll()
                code = 0 if mine == [True] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's connection was not disturbed by the child closing its copy.
        posted.add(b"parent-2", b"p" * 50, 60000, results.append)
        assert _answers(posted, results, 2) == [True, True]
        with DistcacheClient(address, PERSISTENT, 1.0) as check:
            assert check.get(b"child") == b"c" * 50
    finally:
        posted.close()


def test_posted_and_pooled_operations_over_tls(dc_server, procs, certs, tmp_path):
    """DistcacheSessions (the shim's cache) with tls=: the gets and the posted adds/removes go over
    TLS to a dc_server -tls-cert, also after the cache restarted; another CA is a cache that is down."""
    from tcpha.distcache.tls import ClientTls, TlsOptions
    from tcpha.lab.tls_demo import make_cert
    from tcpha.tls.sharing import DistcacheSessions

    tls_args = ("-tls-cert", certs.cert, "-tls-key", certs.key)
    address, proc = dc_server(f"UNIX:{tmp_path}/tls-scache", tls_args)
    tls = ClientTls(TlsOptions(cafile=certs.cert))
    cache = DistcacheSessions(address, 1.0, tls=tls)
    results: list = []
    try:
        cache.posted.add(b"posted-id", b"posted session", 60000, results.append)
        assert _answers(cache.posted, results, 1) == [True]
        assert cache.get(b"posted-id") == b"posted session"
        assert cache.add(b"pooled-id", b"pooled session", 60000)
        procs.stop(proc)
        dc_server(address, tls_args)
        # The closed connection is noticed (EOF, without close_notify) before sending.
        cache.posted.add(b"after", b"y" * 100, 60000, results.append)
        assert _answers(cache.posted, results, 2) == [True, True]
        assert cache.get(b"after") == b"y" * 100
    finally:
        cache.posted.close()
    other_dir = tmp_path / "other-ca"
    other_dir.mkdir()
    other_cert, _ = make_cert(other_dir, names=["localhost"], vip="127.0.0.1")
    stranger = DistcacheSessions(address, 1.0, tls=ClientTls(TlsOptions(cafile=str(other_cert))))
    with pytest.raises(DistcacheError, match="certificate verify failed"):
        stranger.posted.add(b"never", b"x", 60000)
    with pytest.raises(DistcacheError, match="certificate verify failed"):
        stranger.get(b"after")
    # Plaintext to the TLS listener: nothing.
    with pytest.raises(DistcacheError):
        DistcacheSessions(address, 1.0).get(b"after")
