"""The few answers the front end writes itself: a bad or slow request head, or no back end for it."""

from __future__ import annotations

REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
}

_EXPLAIN = {
    400: "The request could not be read.",
    408: "The request head did not arrive in time.",
    414: "The request URI is too long.",
    431: "The request head is too large.",
    503: "No server is available for this request.",
}

_CACHE: dict[int, bytes] = {}


def error_response(status: int) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    cached = _CACHE.get(status)
    if cached is not None:
        return cached
    reason = REASONS.get(status, "Error")
    body = f"<html><body><h1>{status} {reason}</h1>\n<p>{_EXPLAIN.get(status, reason)}</p></body></html>\n"
    head = (f"HTTP/1.1 {status} {reason}\r\nServer: tcpha-fe\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-cache\r\n\r\n")
    data = (head + body).encode("ascii")
    _CACHE[status] = data
    return data
