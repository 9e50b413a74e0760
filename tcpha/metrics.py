"""Prometheus metrics: counters kept by each front-end worker, merged and exposed by the control plane.

Hand-written text exposition (format 0.0.4) rather than prometheus_client: the front end is an
arbiter with forked workers, and prometheus_client's multiprocess mode needs a shared directory of
mmap files per process, cleaned up by hand when a worker dies, and cannot do callback gauges (back-end
health, active flows live in the arbiter). Here each worker keeps plain counters (``WorkerMetrics``),
the control plane asks every worker for them on a scrape (they are summed; a dead worker's counts
are kept in ``retired`` so that counters never go backwards), and ``exposition`` writes the text.

Off by default; ``metrics = PORT`` binds 127.0.0.1:PORT, ``metrics = ADDR:PORT`` an address of choice;
``GET /metrics`` there is served by the front end's HTTP endpoint (tcpha.fe.status), next to its status page.
"""

from __future__ import annotations

import asyncio
import logging
import re
from bisect import bisect_left
from typing import Any, Callable, Iterable

log = logging.getLogger("tcpha.metrics")

# Handoff latency: accept -> back end restored (or socket passed). Seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class WorkerMetrics:
    """Counters of one worker process (plain data; ``to_dict``/``merge`` move them between processes)."""

    def __init__(self) -> None:
        self.handoffs: dict[tuple[str, str, str], int] = {}     # (backend, rule, outcome) -> n
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.control_errors: dict[str, int] = {}                 # backend -> n
        self.answered: dict[int, int] = {}                       # status written by the FE -> n

    def handoff(self, backend: str, rule: str, outcome: str, seconds: float | None = None) -> None:
        key = (backend, rule, outcome)
        self.handoffs[key] = self.handoffs.get(key, 0) + 1
        if seconds is not None:
            self.latency_sum += seconds
            self.latency_count += 1
            i = bisect_left(LATENCY_BUCKETS, seconds)      # first bound >= seconds
            if i < len(self.buckets):
                self.buckets[i] += 1

    def control_error(self, backend: str) -> None:
        self.control_errors[backend] = self.control_errors.get(backend, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"handoffs": [[b, r, o, n] for (b, r, o), n in self.handoffs.items()],
                "buckets": list(self.buckets), "latency_sum": self.latency_sum,
                "latency_count": self.latency_count,
                "control_errors": dict(self.control_errors),
                "answered": {str(k): v for k, v in self.answered.items()}}

    @classmethod
    def merge(cls, parts: Iterable[dict[str, Any]]) -> "WorkerMetrics":
        total = cls()
        for p in parts:
            for b, r, o, n in p.get("handoffs", []):
                total.handoffs[(b, r, o)] = total.handoffs.get((b, r, o), 0) + int(n)
            for i, n in enumerate(p.get("buckets", [])[:len(LATENCY_BUCKETS)]):
                total.buckets[i] += int(n)
            total.latency_sum += float(p.get("latency_sum", 0))
            total.latency_count += int(p.get("latency_count", 0))
            for b, n in p.get("control_errors", {}).items():
                total.control_errors[b] = total.control_errors.get(b, 0) + int(n)
            for s, n in p.get("answered", {}).items():
                total.answered[int(s)] = total.answered.get(int(s), 0) + int(n)
        return total


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: Any) -> str:
    if not kv:
        return ""
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in kv.items()) + "}"


def exposition(m: WorkerMetrics, *, health: list[dict[str, Any]], active_flows: int, dispatching: int,
               workers: int, probe_errors: dict[str, int] | None = None, prefix: str = "tcpha_fe") -> str:
    """The text a scrape returns."""
    out: list[str] = []

    def family(name: str, kind: str, doc: str) -> None:
        out.append(f"# HELP {prefix}_{name} {doc}")
        out.append(f"# TYPE {prefix}_{name} {kind}")

    family("handoffs_total", "counter", "Connections dispatched, by back end, matching rule and outcome.")
    for (b, r, o), n in sorted(m.handoffs.items()):
        out.append(f"{prefix}_handoffs_total{_labels(backend=b, rule=r, outcome=o)} {n}")
    family("handoff_latency_seconds", "histogram", "Accept to back end restored (or socket passed).")
    acc = 0
    for bound, n in zip(LATENCY_BUCKETS, m.buckets):
        acc += n
        out.append(f'{prefix}_handoff_latency_seconds_bucket{{le="{bound:g}"}} {acc}')
    out.append(f'{prefix}_handoff_latency_seconds_bucket{{le="+Inf"}} {m.latency_count}')
    out.append(f"{prefix}_handoff_latency_seconds_sum {m.latency_sum:.6f}")
    out.append(f"{prefix}_handoff_latency_seconds_count {m.latency_count}")
    family("responses_total", "counter", "Answers written by the front end itself, by HTTP status.")
    for status, n in sorted(m.answered.items()):
        out.append(f"{prefix}_responses_total{_labels(status=status)} {n}")
    family("backend_up", "gauge", "1 when the back end passes its health checks.")
    for h in health:
        out.append(f"{prefix}_backend_up{_labels(backend=h['name'])} {1 if h['up'] else 0}")
    family("backend_accepting", "gauge", "1 when the back end takes new connections (up, weight > 0, not draining).")
    for h in health:
        out.append(f"{prefix}_backend_accepting{_labels(backend=h['name'])} {1 if h['status'] == 'up' else 0}")
    family("backend_weight", "gauge", "Configured or operator-set weight.")
    for h in health:
        out.append(f"{prefix}_backend_weight{_labels(backend=h['name'])} {h['weight']}")
    family("health_checks_failed_total", "counter", "Failed health checks per back end.")
    for h in health:
        out.append(f"{prefix}_health_checks_failed_total{_labels(backend=h['name'])} {h['failures']}")
    family("active_flows", "gauge", "Handed-off flows with a steering entry (ended flows leave within their report).")
    out.append(f"{prefix}_active_flows {active_flows}")
    family("dispatching", "gauge", "Connections being read and dispatched right now.")
    out.append(f"{prefix}_dispatching {dispatching}")
    family("workers", "gauge", "Worker processes.")
    out.append(f"{prefix}_workers {workers}")
    family("control_errors_total", "counter", "Control-channel errors (bad MAC, replay, malformed) per back end.")
    errors = dict(m.control_errors)
    for b, n in (probe_errors or {}).items():
        errors[b] = errors.get(b, 0) + n
    for b, n in sorted(errors.items()):
        out.append(f"{prefix}_control_errors_total{_labels(backend=b)} {n}")
    return "\n".join(out) + "\n"


class MetricsServer:
    """GET /metrics on addr:port (asyncio, in the control plane's loop). `render` may be a coroutine.

    The back end's endpoint (`metrics` in tcphabe.conf); the front end serves /metrics from its status
    page's server (tcpha.fe.status.StatusHttpServer)."""

    def __init__(self, addr: tuple[str, int], render: Callable[[], Any]):
        self.addr = addr
        self.render = render
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.addr[0], self.addr[1], reuse_address=True)
        log.info("metrics on http://%s:%d/metrics", *self.addr)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            line = head.split(b"\r\n", 1)[0].split()
            if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif line[1].split(b"?")[0] not in (b"/metrics", b"/"):
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            else:
                text = self.render()
                if asyncio.iscoroutine(text):
                    text = await text
                status, body, ctype = "200 OK", text.encode(), "text/plain; version=0.0.4; charset=utf-8"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (body if line[:1] != [b"HEAD"] else b""))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()



def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A small parser of the text format (for tests and tcpha-ctl): {(name, labels): value}."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = sample.match(line)
        if m is None:
            raise ValueError(f"bad sample line {line!r}")
        labels = tuple(label.findall(m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def backend_exposition(*, handoffs: int, refused: int, fdpassed: int, control_errors: int, relayed: int,
                       front_ends: int, registered: bool | None, appsource_fallbacks: int = 0,
                       tls: Any = None, prefix: str = "tcpha_be") -> str:
    """The text a scrape of tcpha-be's ``metrics`` endpoint returns (one process: its own counters).
    `tls`: the TLS termination's counters (tcpha.be.tls.TlsStats), when the back end terminates TLS."""
    rows = [
        ("handoffs_total", "counter", "Handed-off connections restored here.", handoffs),
        ("handoffs_refused_total", "counter", "Handoffs refused (busy, stopping, bad state, application down).",
         refused),
        ("fdpassed_total", "counter", "Connections passed by a front end on this host (unixpath).", fdpassed),
        ("control_errors_total", "counter", "Control-channel errors (bad MAC, replay, malformed).", control_errors),
        ("relayed_connections", "gauge", "Connections being relayed to the application now.", relayed),
        ("control_connections", "gauge", "Control connections from front ends now.", front_ends),
        ("appsource_fallbacks_total", "counter", "Transparent application connections made from this host's "
         "address (the client's port was in use towards the application).", appsource_fallbacks),
    ]
    if registered is not None:
        rows.append(("registered", "gauge", "1 when the dregister registration is accepted by the front end.",
                     int(registered)))
    if tls is not None:
        rows += [
            ("tls_handshakes_total", "counter", "TLS handshakes completed here.", tls.handshakes),
            ("tls_resumed_total", "counter", "TLS handshakes that resumed a session (from the shared cache).",
             tls.resumed),
            ("tls_handshake_failures_total", "counter", "TLS handshakes that failed.", tls.failed),
            ("tls_session_store_waits_total", "counter", "Handshakes whose last flight waited for the session "
             "cache to store their new session.", tls.store_waits),
            ("tls_session_store_unconfirmed_total", "counter", "Of those, flights sent after the wait's limit "
             "without the cache's answer.", tls.store_unconfirmed),
        ]
    out: list[str] = []
    for name, kind, doc, value in rows:
        out += [f"# HELP {prefix}_{name} {doc}", f"# TYPE {prefix}_{name} {kind}", f"{prefix}_{name} {value}"]
    return "\n".join(out) + "\n"
