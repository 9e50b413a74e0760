"""The operator's view of a running front end: one status document, its history, and the status page.

* ``StatusHistory``: a ring buffer of counter samples taken by the control plane once a second (the
  workers' merged metrics); rates (handoffs and refusals per second, per back end) and the chart of the
  last minutes come from it.
* ``build_status``: the status document, one JSON-ready dict. The ``status`` control file's data
  (``tcpha-ctl --json status``) and the page's ``/status.json`` are this same document.
* ``StatusHttpServer``: the HTTP endpoint on ``metrics = [ADDR:]PORT``: ``/metrics`` (Prometheus text),
  ``/`` and ``/status`` (the page: plain HTML, CSS and JavaScript from tcpha/fe/static, no CDN, no build),
  ``/status.json``, and with ``statsadmin = on`` ``POST /admin`` (drain / enable a back end).

Write mode authentication (``AdminAuth``): the page never sees the control channel's key. The operator
pastes the *admin token*, HMAC-SHA256(authkey, "tcpha statsadmin v1") in hex (``tcpha-keygen
--statsadmin-token KEYFILE`` prints it); each write asks ``GET /admin/nonce`` for a one-time nonce and
sends ``X-Tcpha-Auth: NONCE SIGNATURE`` with SIGNATURE = HMAC-SHA256(token, NONCE "\\n" METHOD "\\n" PATH
"\\n" BODY) in hex. No header: 401; a bad signature, an unknown, reused or expired nonce: 403; write mode
off: 403. Every write, done or refused, is logged with the peer's address.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Awaitable, Callable

from tcpha.loglevels import NOTICE

log = logging.getLogger("tcpha.fe.status")

HISTORY_SECONDS = 600                     # the chart and the rates look this far back
HANDOFF_OUTCOMES = ("handed_off", "passed", "local")
ADMIN_CONTEXT = b"tcpha statsadmin v1"
NONCE_LIFETIME = 120.0
MAX_NONCES = 256
MAX_BODY = 4096
STATIC_FILES = {"/": ("status.html", "text/html; charset=utf-8"),
                "/status": ("status.html", "text/html; charset=utf-8"),
                "/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
                "/static/status.css": ("status.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = ("Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
                    "img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; "
                    "base-uri 'none'\r\n"
                    "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nCache-Control: no-store\r\n")


# -- history and rates ---------------------------------------------------------------------------

@dataclass
class Sample:
    t: float                               # time.time()
    handoffs: dict[str, int]               # back end -> handed off (all outcomes that placed a connection)
    refused: dict[str, int]                # back end -> refusals
    rules: dict[str, int]                  # rule text -> connections it placed

    @property
    def total(self) -> int:
        return sum(self.handoffs.values())


def sample_of(merged: Any, t: float) -> Sample:
    """The counters of a merged WorkerMetrics that the page shows as rates."""
    handoffs: dict[str, int] = {}
    refused: dict[str, int] = {}
    rules: dict[str, int] = {}
    for (backend, rule, outcome), n in merged.handoffs.items():
        if outcome in HANDOFF_OUTCOMES:
            handoffs[backend] = handoffs.get(backend, 0) + n
            rules[rule] = rules.get(rule, 0) + n
        elif outcome == "refused":
            refused[backend] = refused.get(backend, 0) + n
    return Sample(t, handoffs, refused, rules)


class StatusHistory:
    """Samples of the counters, one a second, the last HISTORY_SECONDS of them."""

    def __init__(self, seconds: int = HISTORY_SECONDS):
        self.samples: deque[Sample] = deque(maxlen=seconds + 1)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    @property
    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def rates(self, window: int = 3) -> tuple[dict[str, float], dict[str, float], float]:
        """(handoffs/s per back end, refusals/s per back end, handoffs/s in all) over the last `window`
        sampling intervals."""
        if len(self.samples) < 2:
            return {}, {}, 0.0
        new = self.samples[-1]
        old = self.samples[max(0, len(self.samples) - 1 - window)]
        dt = max(new.t - old.t, 1e-3)

        def per_second(a: dict[str, int], b: dict[str, int]) -> dict[str, float]:
            return {k: round(max(v - b.get(k, 0), 0) / dt, 2) for k, v in a.items()}
        return (per_second(new.handoffs, old.handoffs), per_second(new.refused, old.refused),
                round(max(new.total - old.total, 0) / dt, 2))

    def series(self) -> list[list[float]]:
        """[[time, handoffs/s], ...] between consecutive samples (the page's chart)."""
        out: list[list[float]] = []
        prev: Sample | None = None
        for s in self.samples:
            if prev is not None and s.t > prev.t:
                out.append([round(s.t, 3), round(max(s.total - prev.total, 0) / (s.t - prev.t), 2)])
            prev = s
        return out


# -- the document ----------------------------------------------------------------------------------

def _session_cache(backends: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The back ends' TLS session cache counters summed: lookups of offered sessions and hits."""
    lookups = sum(int(b.get("session_lookups", 0)) for b in backends)
    hits = sum(int(b.get("session_hits", 0)) for b in backends)
    if not lookups:
        return None
    return {"lookups": lookups, "hits": hits, "hit_rate": hits / lookups}


def build_status(*, pid: int, started: float, config: Any, health: list[dict[str, Any]],
                 workers: list[dict[str, Any]], history: StatusHistory, rules: list[dict[str, str]],
                 steering_entries: int | None, dtcinterval: float, dbglevel: int,
                 now: float | None = None) -> dict[str, Any]:
    """The status document (no I/O): what `tcpha-ctl --json status` prints and the page polls.

    `workers`: one dict per live worker as its runtime link answers ``metrics`` (pid added);
    `rules`: {"target", "field", "pattern"} in match order (static, then registered)."""
    now = time.time() if now is None else now
    per_be, refused_rate, total_rate = history.rates()
    last = history.last
    flows: dict[str, int] = {}
    answers: list[dict[str, Any]] = []
    for w in workers:
        for name, n in w.get("flows_by_backend", {}).items():
            flows[name] = flows.get(name, 0) + int(n)
        answers.extend(w.get("answers", []))
    backends = []
    for h in health:
        name = h["name"]
        backends.append({**h, "since_seconds": round(max(now - h["since"], 0.0), 1),
                         "last_check_ago": (round(max(now - h["last_check"], 0.0), 1)
                                            if h.get("last_check") else None),
                         "handoffs": last.handoffs.get(name, 0) if last else 0,
                         "refused": last.refused.get(name, 0) if last else 0,
                         "handoffs_per_s": per_be.get(name, 0.0), "refused_per_s": refused_rate.get(name, 0.0),
                         "flows": flows.get(name, 0)})
    rule_rows = [{**r, "text": f"{r['field']}:{r['pattern']}",
                  "hits": last.rules.get(f"{r['field']}:{r['pattern']}", 0) if last else 0} for r in rules]
    return {
        "pid": pid, "uptime": round(now - started, 1), "time": round(now, 3),
        "vaddr": config.vaddr, "ports": list(config.ports), "raddr": config.raddr,
        "dtcinterval": dtcinterval, "dbglevel": dbglevel,
        "workers": sorted(int(w["pid"]) for w in workers),
        "worker_stats": [{"pid": int(w["pid"]), "accepted": int(w.get("accepted", 0)),
                          "dispatching": int(w.get("dispatching", 0)), "flows": int(w.get("flows", 0))}
                         for w in sorted(workers, key=lambda w: int(w["pid"]))],
        "backends": backends,
        "rules": rule_rows,
        "handoffs": last.total if last else 0,
        "handoffs_per_s": total_rate,
        "flows": sum(int(w.get("flows", 0)) for w in workers),
        "steering_entries": steering_entries,
        "answers": sorted(answers, key=lambda a: a.get("time", 0))[-10:],
        "history": history.series(),
        # TLS is terminated by the back ends; each reports its shared session cache's counters in its
        # health check's Pong. None until one has looked a session up.
        "tls_session_cache": _session_cache(backends),
        "statsadmin": config.statsadmin,
    }


# -- write mode ----------------------------------------------------------------------------------

def admin_token(key: bytes) -> str:
    """The credential an operator pastes into the page, derived from the control channel's key."""
    return hmac.new(key, ADMIN_CONTEXT, hashlib.sha256).hexdigest()


def sign(token: str, nonce: str, method: str, path: str, body: bytes) -> str:
    msg = f"{nonce}\n{method}\n{path}\n".encode() + body
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


class AdminRefused(Exception):
    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


@dataclass
class AdminAuth:
    """One-time nonces and signature checks for the page's write mode (sans-I/O). `key`: the authkey,
    None while write mode is off (read at each request: a reload turns it on or off)."""
    key: Callable[[], bytes | None]
    nonces: dict[str, float] = field(default_factory=dict)   # nonce -> time issued

    def nonce(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        self._expire(now)
        while len(self.nonces) >= MAX_NONCES:
            self.nonces.pop(next(iter(self.nonces)))
        n = secrets.token_hex(16)
        self.nonces[n] = now
        return n

    def _expire(self, now: float) -> None:
        for n in [n for n, t in self.nonces.items() if now - t > NONCE_LIFETIME]:
            del self.nonces[n]

    def check(self, header: str | None, method: str, path: str, body: bytes, now: float | None = None) -> None:
        """Raises AdminRefused (401 without credential, 403 with a bad one or with write mode off)."""
        now = time.monotonic() if now is None else now
        key = self.key()
        if key is None:
            raise AdminRefused(403, "write mode is off (statsadmin = off)")
        if not header:
            raise AdminRefused(401, "no credential (X-Tcpha-Auth)")
        parts = header.split()
        if len(parts) != 2:
            raise AdminRefused(403, "malformed X-Tcpha-Auth")
        nonce, signature = parts
        self._expire(now)
        if nonce not in self.nonces:
            raise AdminRefused(403, "unknown, used or expired nonce")
        del self.nonces[nonce]                                  # one use, good or bad
        want = sign(admin_token(key), nonce, method, path, body)
        if not hmac.compare_digest(want, signature.lower()):
            raise AdminRefused(403, "bad signature")


# -- HTTP ----------------------------------------------------------------------------------------

@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: str


def static_file(name: str) -> bytes:
    return resources.files("tcpha.fe").joinpath("static", name).read_bytes()


class StatusHttpServer:
    """The front end's HTTP endpoint (asyncio, in the control plane's loop)."""

    def __init__(self, addr: tuple[str, int], *, metrics: Callable[[], Awaitable[str]],
                 status: Callable[[], Awaitable[dict]], admin: Callable[[str, str, str], Any],
                 key: Callable[[], bytes | None]):
        self.addr = addr
        self.metrics = metrics
        self.status = status
        self.admin = admin                         # (backend, action, peer) -> None; raises ValueError
        self.auth = AdminAuth(key)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.addr[0], self.addr[1], reuse_address=True)
        log.info("status page on http://%s:%d/ (Prometheus: /metrics)%s", *self.addr,
                 ", write mode on" if self.auth.key() is not None else "")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _read(self, reader: asyncio.StreamReader, peer: str) -> HttpRequest | None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        lines = head.decode("latin-1").split("\r\n")
        words = lines[0].split()
        if len(words) != 3:
            return None
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return None
        if not 0 <= length <= MAX_BODY:
            return None
        body = await asyncio.wait_for(reader.readexactly(length), 5.0) if length else b""
        return HttpRequest(words[0], words[1].split("?", 1)[0], headers, body, peer)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_addr = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peer_addr[0]}:{peer_addr[1]}"
        try:
            try:
                req = await self._read(reader, peer)
            except asyncio.LimitOverrunError:
                req = None
            if req is None:
                status, ctype, body, head_only = "400 Bad Request", "text/plain", b"bad request\n", False
            else:
                head_only = req.method == "HEAD"
                status, ctype, body = await self.respond(req)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"{SECURITY_HEADERS}Connection: close\r\n\r\n".encode() + (b"" if head_only else body))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:
            log.exception("status page request failed")
        finally:
            writer.close()

    async def respond(self, req: HttpRequest) -> tuple[str, str, bytes]:
        if req.path.startswith("/admin"):
            return await self._admin(req)
        if req.method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if req.path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", (await self.metrics()).encode()
        if req.path == "/status.json":
            return "200 OK", "application/json", json.dumps(await self.status()).encode()
        if req.path == "/favicon.ico":
            return "204 No Content", "image/x-icon", b""
        if req.path in STATIC_FILES:
            name, ctype = STATIC_FILES[req.path]
            return "200 OK", ctype, static_file(name)
        return "404 Not Found", "text/plain", b"not found: try /, /status.json or /metrics\n"

    async def _admin(self, req: HttpRequest) -> tuple[str, str, bytes]:
        def answer(status: str, doc: dict) -> tuple[str, str, bytes]:
            return status, "application/json", json.dumps(doc).encode()
        if self.auth.key() is None:
            log.warning("status page: write refused from %s: write mode is off (statsadmin)", req.peer)
            return answer("403 Forbidden", {"ok": False, "error": "write mode is off (statsadmin = off)"})
        if req.path == "/admin/nonce" and req.method == "GET":
            return answer("200 OK", {"ok": True, "nonce": self.auth.nonce()})
        if req.path != "/admin" or req.method != "POST":
            return answer("405 Method Not Allowed", {"ok": False, "error": "POST /admin or GET /admin/nonce"})
        try:
            self.auth.check(req.headers.get("x-tcpha-auth"), req.method, req.path, req.body)
        except AdminRefused as e:
            log.warning("status page: write refused from %s: %s", req.peer, e)
            code = "401 Unauthorized" if e.status == 401 else "403 Forbidden"
            return answer(code, {"ok": False, "error": str(e)})
        try:
            doc = json.loads(req.body)
            backend, action = doc["backend"], doc["action"]
            if not isinstance(backend, str) or action not in ("drain", "enable"):
                raise ValueError("action must be drain or enable")
            # in a thread: the admin call waits until the workers have the change, which needs this loop
            await asyncio.get_running_loop().run_in_executor(None, self.admin, backend, action, req.peer)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("status page: write from %s refused: %s", req.peer, e)
            return answer("400 Bad Request", {"ok": False, "error": str(e)})
        log.log(NOTICE, "status page: %s from %s: back end %s", action, req.peer, backend)
        return answer("200 OK", {"ok": True})


def printable_head(data: bytes, limit: int = 512) -> str:
    """The start of a request head as text for the page (control bytes other than CR LF TAB shown as '.')."""
    text = data[:limit].decode("latin-1")
    return "".join(c if c in "\r\n\t" or 32 <= ord(c) < 127 else "." for c in text)


__all__ = ["StatusHistory", "Sample", "sample_of", "build_status", "admin_token", "sign", "AdminAuth",
           "AdminRefused", "StatusHttpServer", "printable_head"]
