"""tcpha.sniff.framing: where requests and responses end on a keep-alive connection, at every byte boundary,
and when the planner lets a connection move (only with every response before it complete)."""

from __future__ import annotations

import random

import pytest

from tcpha.sniff.framing import (UNFRAMED, BadRequest, ChunkedBody, FramingError, Plan, RehandoffPlanner, Request,
                                 RequestEnd, RequestStream, Response, ResponseEnd, ResponseFraming, Unframeable)


def framing(*methods: bytes) -> ResponseFraming:
    f = ResponseFraming(max_head=1024)
    for m in methods or (b"GET",):
        f.request_sent(m)
    return f


def feed_bytewise(f, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        events += f.receive_data(data[i:i + 1])
    return events


def feed_split(f, data: bytes, rng: random.Random) -> list:
    events, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, 40)
        events += f.receive_data(data[pos:pos + n])
        pos += n
    return events


def kinds(events) -> list:
    return [(type(e).__name__, getattr(e, "status", None)) for e in events]


# -- responses, RFC 9112 §6.3 ---------------------------------------------------------------------------

CL = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=value\r\nhello\r\n"
           b"A\r\n0123456789\r\n"
           b"0\r\nX-Checksum: abc\r\n\r\n")


@pytest.mark.parametrize("raw", [CL, CHUNKED], ids=["content-length", "chunked"])
def test_response_ends_where_its_framing_says_at_every_split(raw):
    whole = framing()
    events = whole.receive_data(raw)
    assert kinds(events) == [("Response", 200), ("ResponseEnd", 200)]
    assert whole.at_boundary and whole.responses == 1
    bytewise = framing()
    assert kinds(feed_bytewise(bytewise, raw)) == kinds(events) and bytewise.at_boundary
    # the last byte is what completes it
    short = framing()
    assert kinds(short.receive_data(raw[:-1])) == [("Response", 200)] and not short.at_boundary


def test_response_head_fields():
    response = framing().receive_data(CL)[0]
    assert isinstance(response, Response)
    assert (response.body, response.length, response.keep_alive, response.head_len) == (
        "length", 5, True, len(CL) - 5)


def test_content_length_zero_ends_with_the_head():
    f = framing()
    assert kinds(f.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) == [
        ("Response", 200), ("ResponseEnd", 200)]
    assert f.at_boundary


@pytest.mark.parametrize("method,status", [(b"HEAD", 200), (b"GET", 204), (b"GET", 304)])
def test_no_body_for_head_204_304_even_with_content_length(method, status):
    # §6.3 ¶1: the Content-Length of a HEAD or 304 response describes the body it would have had.
    f = framing(method, b"GET")
    raw = f"HTTP/1.1 {status} X\r\nContent-Length: 1234\r\n\r\n".encode()
    events = f.receive_data(raw + CL)
    assert kinds(events) == [("Response", status), ("ResponseEnd", status), ("Response", 200), ("ResponseEnd", 200)]
    assert events[0].body == "none" and f.at_boundary


def test_interim_1xx_then_the_final_response():
    f = framing(b"POST")
    events = f.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert kinds(events) == [("Response", 100), ("ResponseEnd", 100)] and events[1].interim
    assert not f.at_boundary and f.outstanding == 1       # RFC 9110 §15.2: the final one still to come
    f.receive_data(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
    assert not f.at_boundary
    assert kinds(f.receive_data(CL))[-1] == ("ResponseEnd", 200) and f.at_boundary


def test_transfer_encoding_overrides_content_length():
    f = framing()
    raw = CHUNKED.replace(b"chunked\r\n", b"chunked\r\nContent-Length: 3\r\n", 1)
    assert kinds(f.receive_data(raw)) == [("Response", 200), ("ResponseEnd", 200)] and f.at_boundary


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",          # §6.3 ¶8: neither field
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",            # §6.3 ¶4: final coding not chunked
])
def test_close_delimited_ends_at_the_close_and_never_at_a_boundary(head):
    f = framing(b"GET", b"GET")
    events = f.receive_data(head + b"a body that goes on" * 100)
    assert kinds(events) == [("Response", 200)] and events[0].body == "close"
    assert kinds(f.receive_eof()) == [("ResponseEnd", 200)]
    assert not f.at_boundary                              # the connection is over: nothing may move


@pytest.mark.parametrize("head,keep", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Upgrade-Insecure\r\nContent-Length: 2\r\n\r\n", True),
])
def test_a_response_after_which_the_server_closes_is_no_boundary(head, keep):
    f = framing()
    events = f.receive_data(head + b"ok")
    assert events[0].keep_alive is keep and kinds(events)[-1] == ("ResponseEnd", 200)
    assert f.at_boundary is keep


@pytest.mark.parametrize("method,head,why", [
    (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "tunnel"),
    (b"CONNECT", b"HTTP/1.1 200 Connection established\r\n\r\n", "tunnel"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n", "invalid Content-Length"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting"),
    (b"GET", b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", "malformed header"),
    (b"GET", b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
    (b"GET", b"HTTP/2.0 200 OK\r\n\r\n", "HTTP/2.0"),
    (b"GET", b"\x16\x03\x01\x00\x05hello\r\n\r\n", "malformed status line"),
])
def test_what_cannot_be_framed_says_why_once_and_stays_unframed(method, head, why):
    f = framing(method)
    events = f.receive_data(head)
    assert isinstance(events[-1], Unframeable) and why in events[-1].reason
    assert f.failed and not f.at_boundary
    assert f.receive_data(CL) == [] and not f.at_boundary


def test_identical_repeated_content_lengths_are_one_length():
    f = framing()
    events = f.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc")
    assert kinds(events) == [("Response", 200), ("ResponseEnd", 200)]


def test_a_response_to_no_request_is_not_framed():
    f = ResponseFraming()
    assert isinstance(f.receive_data(CL)[-1], Unframeable)


def test_a_head_longer_than_the_limit_is_not_framed():
    f = framing()
    events = f.receive_data(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000)
    assert isinstance(events[-1], Unframeable) and "longer than 1024" in events[-1].reason


def test_the_application_closing_mid_response():
    f = framing()
    f.receive_data(CL[:-2])
    assert isinstance(f.receive_eof()[-1], Unframeable)
    idle = framing()
    idle.receive_data(CL)
    assert idle.receive_eof() == [] and idle.at_boundary   # between responses: just the end


@pytest.mark.parametrize("body", [b"5\r\nhello\r\nzz\r\n", b"5\r\nhelloX\r\n", b"-1\r\n", b"\r\n", b"12345678901234567\r\n"])
def test_malformed_chunks(body):
    f = framing()
    events = f.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert isinstance(events[-1], Unframeable)


def test_chunks_with_bare_lf_line_ends():
    # §2.2: a recipient MAY recognize a single LF as a line terminator
    f = framing()
    raw = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n"
    assert kinds(f.receive_data(raw)) == [("Response", 200), ("ResponseEnd", 200)] and f.at_boundary


def test_pipelined_responses_in_one_piece_and_split_anywhere():
    raw = CL + CHUNKED + b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n" + CL
    methods = (b"GET",) * 4
    expected = [("Response", 200), ("ResponseEnd", 200)] * 2 + [("Response", 304), ("ResponseEnd", 304),
                                                                 ("Response", 200), ("ResponseEnd", 200)]
    assert kinds(framing(*methods).receive_data(raw)) == expected
    rng = random.Random(11)
    for _ in range(200):
        f = framing(*methods)
        assert kinds(feed_split(f, raw, rng)) == expected and f.at_boundary and f.responses == 4
    f = framing(*methods)
    assert kinds(feed_bytewise(f, raw)) == expected


def test_opaque_body_bytes_can_be_skipped_unseen():
    # The relay may move a Content-Length body or a chunk's data without showing it (splice).
    f = framing(b"GET", b"GET")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
    f.receive_data(head + b"x" * 10)
    assert f.opaque == 1000000 - 10
    assert f.skip(500000) == [] and f.opaque == 500000 - 10
    assert kinds(f.skip(f.opaque)) == [("ResponseEnd", 200)]
    f.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\nab")
    assert f.opaque == 0x10000 - 2
    f.skip(f.opaque)
    assert kinds(f.receive_data(b"\r\n0\r\n\r\n")) == [("ResponseEnd", 200)] and f.at_boundary
    with pytest.raises(ValueError):
        f.skip(1)


def test_chunked_body_alone():
    body = ChunkedBody()
    data = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n"
    assert body.feed(data) == data.index(b"GET") and body.done
    with pytest.raises(FramingError):
        ChunkedBody().feed(b"x" * 5000)


# -- requests -------------------------------------------------------------------------------------------

GET_A = b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\npayload"
POST_CHUNKED = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
GET_JPG = b"\r\nGET /a.jpg HTTP/1.1\r\nHost: a\r\n\r\n"


def test_requests_found_with_their_offsets_at_every_split():
    stream = GET_A + POST + POST_CHUNKED + GET_JPG
    whole = RequestStream().receive_data(stream)
    starts = [e.start for e in whole if isinstance(e, Request)]
    ends = [e.offset for e in whole if isinstance(e, RequestEnd)]
    a, b, c = len(GET_A), len(GET_A) + len(POST), len(GET_A) + len(POST) + len(POST_CHUNKED)
    assert starts == [0, a, b, c] and ends == [a, b, c, len(stream)]
    assert [e.head.path for e in whole if isinstance(e, Request)] == [b"/index.html", b"/up", b"/up", b"/a.jpg"]
    rng = random.Random(7)
    for _ in range(200):
        rs = RequestStream()
        assert feed_split(rs, stream, rng) == whole and rs.between_requests


def test_a_partial_head_says_where_it_starts():
    rs = RequestStream()
    rs.receive_data(GET_A + b"GET /b")
    assert rs.head_start == len(GET_A) and not rs.between_requests
    rs.receive_data(b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rs.head_start is None and rs.between_requests


def test_a_bad_request_head_ends_the_framing():
    rs = RequestStream()
    events = rs.receive_data(GET_A + b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + GET_A)
    assert isinstance(events[-1], BadRequest) and events[-1].start == len(GET_A) and events[-1].status == 400
    assert rs.receive_data(GET_A) == []


# -- the planner ----------------------------------------------------------------------------------------

def jpg_elsewhere(head) -> bool:
    return not head.path.endswith(b".jpg")


def test_requests_that_stay_pass_through_and_nothing_moves():
    p = RehandoffPlanner(jpg_elsewhere)
    plan = p.client_data(GET_A + POST)
    assert plan.to_app == GET_A + POST and not plan.move
    assert not p.app_data(CL).move and not p.app_data(CL).move
    assert p.reading_client and not p.holding


def test_pipelined_request_for_elsewhere_waits_for_the_response_boundary():
    p = RehandoffPlanner(jpg_elsewhere)
    plan = p.client_data(GET_A + GET_JPG + GET_A)
    assert plan.to_app == GET_A and not plan.move          # the jpg and all after it held
    assert p.holding and not p.reading_client
    assert not p.client_data(b"more").move                 # read before reading stopped: held too
    assert not p.app_data(CL[:-1]).move                    # the index.html response not complete yet
    plan = p.app_data(CL[-1:])
    assert plan.move and plan.held == GET_JPG + GET_A + b"more" and plan.to_app == b""


def test_a_request_arriving_while_the_response_is_still_being_sent():
    p = RehandoffPlanner(jpg_elsewhere)
    assert p.client_data(GET_A).to_app == GET_A
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    assert not p.app_data(big + b"x" * 1000).move
    plan = p.client_data(GET_JPG)
    assert plan.to_app == b"" and not plan.move and p.holding
    assert not p.app_skipped(50000).move                   # spliced unseen
    plan = p.app_data(b"x" * (100000 - 51000))
    assert plan.move and plan.held == GET_JPG


def test_the_first_request_for_elsewhere_moves_at_once():
    p = RehandoffPlanner(jpg_elsewhere)
    p.client_data(GET_A)
    p.app_data(CL)
    plan = p.client_data(GET_JPG)
    assert plan.move and plan.held == GET_JPG and plan.to_app == b""


def test_a_head_split_across_reads_is_not_passed_before_it_is_decided():
    p = RehandoffPlanner(jpg_elsewhere)
    assert p.client_data(GET_A + GET_JPG[:12]).to_app == GET_A
    assert p.client_data(GET_JPG[12:20]).to_app == b""
    p.app_data(CL)
    plan = p.client_data(GET_JPG[20:])
    assert plan.move and plan.held == GET_JPG
    # the same for a head that stays: passed whole once complete
    p = RehandoffPlanner(jpg_elsewhere)
    assert p.client_data(GET_A[:10]).to_app == b""
    assert p.client_data(GET_A[10:]).to_app == GET_A


def test_a_request_body_is_passed_with_its_request():
    p = RehandoffPlanner(jpg_elsewhere)
    out = b"".join(p.client_data(POST[i:i + 5]).to_app for i in range(0, len(POST), 5))
    assert out == POST and p.responses.outstanding == 1


def test_an_unframeable_response_pins_the_connection_and_drops_what_was_held():
    """A request held for elsewhere never reaches this application: with no response boundary to move at,
    it is dropped and the connection ends with the response."""
    p = RehandoffPlanner(jpg_elsewhere)
    p.client_data(GET_A + GET_JPG)
    plan = p.app_data(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
    assert plan.pinned and "Content-Length" in plan.pinned and plan.to_app == b"" and not plan.move
    assert plan.drop and not p.reading_client
    assert p.client_data(GET_JPG).to_app == b""           # read before reading stopped: dropped too


def test_an_unframeable_response_with_nothing_held_pins_the_connection():
    p = RehandoffPlanner(jpg_elsewhere)
    p.client_data(GET_A)
    plan = p.app_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert plan.pinned and plan.drop is None and p.reading_client
    later = p.client_data(b"\x81\x05hello")                # a tunnel: unframed, to the application
    assert later.to_app == b"\x81\x05hello" and later.pinned is None and not later.move   # said once


def test_a_bad_request_is_refused_at_the_boundary_and_nothing_after_it_passes():
    """A head the front end would answer 400 (here a percent-encoded slash, which nginx would decode into a
    path the rules never saw) is not given to the application, nor anything pipelined after it."""
    p = RehandoffPlanner(jpg_elsewhere)
    bad = b"GET /a%2Fb HTTP/1.1\r\nHost: a\r\n\r\n"
    plan = p.client_data(GET_A + bad + GET_A)
    assert plan.to_app == GET_A and not plan.refuse and not p.reading_client
    assert p.client_data(GET_A).to_app == b""
    plan = p.app_data(CL)                                  # the response before it is complete
    assert plan.refuse == 400 and not plan.move and plan.to_app == b""
    # with nothing outstanding, at once
    p = RehandoffPlanner(jpg_elsewhere)
    plan = p.client_data(b"GET / HTTP/1.1\r\n\r\n")     # no Host
    assert plan.refuse == 400 and plan.to_app == b""


def test_head_requests_do_not_wait_for_a_body():
    p = RehandoffPlanner(jpg_elsewhere)
    p.client_data(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n" + GET_JPG)
    plan = p.app_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    assert plan.move and plan.held == GET_JPG


def test_a_close_delimited_response_never_moves():
    p = RehandoffPlanner(jpg_elsewhere)
    p.client_data(GET_A + GET_JPG)
    assert not p.app_data(b"HTTP/1.1 200 OK\r\n\r\nbody").move
    assert not p.app_eof().move and not p.moved


def test_random_pipelines_match_their_whole_form():
    """Any mix of requests, split anywhere on both sides: what reaches the application is the prefix before the
    first request for elsewhere, and the move comes exactly when the last response before it completes."""
    rng = random.Random(2026)
    pieces = [GET_A, POST, POST_CHUNKED, b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n"]
    for _ in range(300):
        reqs = [rng.choice(pieces) for _ in range(rng.randint(0, 4))]
        tail = [GET_JPG] + [rng.choice(pieces + [GET_JPG]) for _ in range(rng.randint(0, 2))]
        client = b"".join(reqs + tail)
        responses = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" if r.startswith(b"HEAD")
                             else CHUNKED if r is POST_CHUNKED else CL for r in reqs)
        p = RehandoffPlanner(jpg_elsewhere)
        to_app, held, moves = b"", b"", 0
        pos = 0
        while pos < len(client):
            n = rng.randint(1, 30)
            plan = p.client_data(client[pos:pos + n])
            pos += n
            to_app += plan.to_app
            moves += plan.move
            held += plan.held
        assert to_app == b"".join(reqs)
        rpos = 0
        while rpos < len(responses):
            assert moves == 0
            n = rng.randint(1, 30)
            plan = p.app_data(responses[rpos:rpos + n])
            rpos += n
            moves += plan.move
            held += plan.held
        assert moves == 1 and held == b"".join(tail)


def test_app_opaque_is_what_may_be_spliced_unseen():
    """A relay that splices app_opaque bytes and shows the rest ends each response where app_data would."""
    p = RehandoffPlanner(jpg_elsewhere)
    p.client_data(GET_A + GET_A + GET_A)
    assert p.app_opaque == 0                                      # a head is due: show it
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n"
    p.app_data(head + b"x" * 100)
    assert p.app_opaque == 9900
    p.app_skipped(9900)
    assert p.app_opaque == 0 and p.responses.responses == 1       # ended by the skip: the next head is shown
    p.app_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n")
    assert p.app_opaque == 0x1000 and p.responses.in_chunked
    p.app_skipped(0x1000)
    assert p.app_opaque == 0                                      # the CRLF and the next size line are shown
    p.app_data(b"\r\n0\r\n\r\n")
    assert p.responses.responses == 2 and p.app_opaque == 0 and not p.responses.in_chunked
    p.app_data(b"HTTP/1.0 200 OK\r\n\r\n")                        # close-delimited: the rest of the stream
    assert p.app_opaque == UNFRAMED
    assert p.app_skipped(12345) == Plan()
    p.app_eof()
    assert p.responses.responses == 3


def test_app_opaque_when_pinned_or_moved():
    pinned = RehandoffPlanner(jpg_elsewhere)
    pinned.client_data(GET_A)
    assert pinned.app_data(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").pinned
    assert pinned.app_opaque == UNFRAMED and pinned.app_skipped(1 << 20) == Plan()
    moved = RehandoffPlanner(jpg_elsewhere)
    moved.client_data(GET_A + GET_JPG)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
    moved.app_data(head)
    assert moved.app_opaque == 5000
    assert moved.app_skipped(5000).move
    assert moved.app_opaque == 0                                  # after the move anything is looked at
    with pytest.raises(ValueError):
        RehandoffPlanner(jpg_elsewhere).responses.skip(1)         # nothing opaque: skipping is a bug
