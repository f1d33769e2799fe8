"""The daemon's metrics and health check, on an opt-in listener (`--metrics-listen`).

Owns what is measured, its exposition (Prometheus' text format at `/metrics`, a JSON
health report at `/healthz`) and the small HTTP server for both, which runs in the
daemon's nursery and dies with it.

Nothing here runs on the FUSE open path. The open handler only counts its own
latency in a list of integers (`SecretsOperations.open_latency`: one slot per
power-of-two bucket of nanoseconds, the total in the last) that a scrape turns into
a histogram. Decisions are counted from the audit records as the audit writer flushes
them (`AuditLog.observers`, in its worker thread); rotations from the runner's
outcomes (`RotationRunner.observers`); API requests by the server as it answers them
(`server.request_listeners`). The rest (queue depth, the age of each AWSCURRENT) is
read when scraped.

Secret names are labels here: anyone who can scrape sees them (never a value), which
is why the listener is loopback-only unless the operator says otherwise. Per-secret
series are kept to the first `MAX_SECRET_SERIES` names in sort order; rotations of
the secrets past that are counted under `secret="~other"` (no AWS name has a `~`).
"""

from __future__ import annotations

import errno
import functools
import http
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from secretfs.api import server
from secretfs.model import AWSCURRENT

log = logging.getLogger(__name__)

MAX_SECRET_SERIES = 1000
OTHER = "~other"
# (source, action, decision) series: the actions come from requests (a refused
# request's X-Amz-Target among them), so their number is bounded here too.
MAX_DECISION_SERIES = 500
# The open histogram's bounds: 2**10 ns (about 1 µs) to 2**34 ns (about 17 s).
OPEN_BUCKET_BITS = range(10, 35)
API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
               5.0, 10.0)

HEALTH_TIMEOUT = 2.0  # for the mount to answer a statfs
CLIENT_TIMEOUT = 10.0  # for a scraper to send its request and read the answer
MAX_CONNECTIONS = 16
MAX_HEAD = 8 << 10
MAX_BODY = 64 << 10


class Metrics:
    """What the daemon counts, and a Prometheus collector for the rest (read when
    scraped). The observer methods run in the audit writer's thread or the trio
    thread; a lock keeps their counts whole for a scrape in a worker thread."""

    def __init__(self, service, audit, operations, mountpoint: Path):
        self.service = service
        self.audit = audit
        self.operations = operations
        self.mountpoint = Path(mountpoint)
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str, str], int] = {}
        self._audit_written = 0
        self._audit_dropped = 0
        self._rotations: dict[tuple[str, str], int] = {}
        self._actions = service.AWS_ACTIONS | service.EXTENSION_ACTIONS
        self.registry = CollectorRegistry(auto_describe=False)
        self.api_latency = Histogram(
            "secretfs_api_request_duration_seconds",
            "API requests (control socket and network endpoint), from the request read "
            "whole to its answer ready, by action.",
            ["action"], buckets=API_BUCKETS, registry=self.registry)
        self.api_requests = Counter(
            "secretfs_api_requests", "API requests answered, by action and HTTP status.",
            ["action", "code"], registry=self.registry)
        self.registry.register(self)

    # --- observers ----------------------------------------------------------------

    def audited(self, events: list[dict]) -> None:
        """Records the audit writer has just written (its worker thread)."""
        with self._lock:
            decisions = self._decisions
            for event in events:
                self._audit_written += 1
                decision = event.get("decision")
                if decision is None or event.get("mutation"):
                    if event.get("eventName") == "AuditRecordsDropped":
                        self._audit_dropped += event.get("count", 0)
                    continue
                # An access(2) probe answers "may I?", it is no read.
                action = "access" if event.get("probe") else str(event.get("eventName"))
                key = (str(event.get("eventSource")), action, str(decision))
                if key not in decisions and len(decisions) >= MAX_DECISION_SERIES:
                    key = (key[0], OTHER, key[2])
                decisions[key] = decisions.get(key, 0) + 1

    def rotated(self, secret_id: int, finished: bool) -> None:
        """A rotation run ended: all four steps done, or one failed."""
        row = self.service.catalog.row(secret_id)
        name = row.name if row is not None else OTHER
        with self._lock:
            key = (name, "success" if finished else "failure")
            if key not in self._rotations and len(
                    {secret for secret, _ in self._rotations}) >= MAX_SECRET_SERIES:
                key = (OTHER, key[1])
            self._rotations[key] = self._rotations.get(key, 0) + 1

    def answered(self, target: str | None, status: int, seconds: float) -> None:
        """An API request answered (the trio thread)."""
        action = (target or "").rpartition(".")[2]
        if action not in self._actions:
            action = "unknown"  # a client's header: never a label as it came
        self.api_latency.labels(action).observe(seconds)
        self.api_requests.labels(action, str(status)).inc()

    # --- scraping -------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format; blocking (the catalog may load snapshots): a worker thread."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            decisions = dict(self._decisions)
            rotations = dict(self._rotations)
            written, dropped = self._audit_written, self._audit_dropped
        family = CounterMetricFamily(
            "secretfs_decisions",
            "Access decisions as audited, by source (fuse, unix-socket, https, http, "
            "rotation), action and decision. The mount's file opens are "
            'source="fuse",action="GetSecretValue"; access(2) probes are action="access".',
            labels=["source", "action", "decision"])
        for labels, count in sorted(decisions.items()):
            family.add_metric(list(labels), count)
        yield family
        yield self._open_histogram()
        family = CounterMetricFamily(
            "secretfs_rotations", "Rotation runs that finished (success) or stopped at a "
            "failing step (failure, retried with backoff), by secret.",
            labels=["secret", "result"])
        for labels, count in sorted(rotations.items()):
            family.add_metric(list(labels), count)
        yield family
        yield from self._secret_gauges()
        yield GaugeMetricFamily("secretfs_audit_queue_depth",
                                "Audit records queued and not yet written.",
                                value=self.audit.pending)
        yield GaugeMetricFamily("secretfs_audit_failing",
                                "1 while the audit log can't be written (records stay queued).",
                                value=int(self.audit.failing))
        yield CounterMetricFamily("secretfs_audit_records_written",
                                  "Audit records written since the daemon started.",
                                  value=written)
        yield CounterMetricFamily("secretfs_audit_records_dropped",
                                  "Audit records dropped because the queue was full.",
                                  value=dropped)

    def _open_histogram(self) -> Metric:
        counts = list(self.operations.open_latency)  # a copy: open() keeps counting
        total_ns = counts.pop()
        buckets, cumulative = [], 0
        for bits, count in enumerate(counts):
            cumulative += count
            if bits in OPEN_BUCKET_BITS:
                buckets.append((repr((1 << bits) / 1e9), cumulative))
        buckets.append(("+Inf", cumulative))
        return HistogramMetricFamily(
            "secretfs_fuse_open_duration_seconds",
            "Time the daemon spends in open() of a version or key file that it allows, "
            "from the request to the reply (bounds are powers of two nanoseconds).",
            buckets=buckets, sum_value=total_ns / 1e9)

    def _secret_gauges(self) -> Iterator[Metric]:
        catalog = self.service.catalog
        rows = (catalog.row(secret_id) for _, secret_id in catalog.live_below(""))
        live = sorted((row.name, row.secret_id) for row in rows if row is not None)
        yield GaugeMetricFamily("secretfs_secrets", "Secrets not scheduled for deletion.",
                                value=len(live))
        yield GaugeMetricFamily(
            "secretfs_secrets_unlisted",
            f"Secrets past the first {MAX_SECRET_SERIES} names: no per-secret series.",
            value=max(0, len(live) - MAX_SECRET_SERIES))
        age = GaugeMetricFamily(
            "secretfs_secret_current_age_seconds",
            "Seconds since the version labelled AWSCURRENT was created, by secret.",
            labels=["secret"])
        failing = GaugeMetricFamily(
            "secretfs_rotation_failing",
            "1 when a secret's rotation is stopped at a failing step (see DescribeSecret), "
            "0 for the other secrets with rotation on.", labels=["secret"])
        now = self.service.now()
        for name, secret_id in live[:MAX_SECRET_SERIES]:
            secret = catalog.get(secret_id)
            if secret is None:
                continue  # deleted since listed
            version = secret.versions.get(secret.labels.get(AWSCURRENT, ""))
            if version is not None:
                age.add_metric([name], max(0.0, (now - version.created).total_seconds()))
            rotation = secret.rotation or {}
            if rotation.get("Enabled") or rotation.get("Pending"):
                error = (rotation.get("Pending") or {}).get("Error")
                failing.add_metric([name], 1 if error else 0)
        yield age
        yield failing

    # --- health ---------------------------------------------------------------------

    async def health(self, gate: _Gate) -> tuple[bool, dict]:
        """Whether the daemon serves: the mount answers, the store opens and the audit
        log is being written. Each check says "ok" or what is wrong."""
        checks = {
            "mount": await self._mount_problem(gate.statfs),
            "store": await trio.to_thread.run_sync(self._store_problem, limiter=gate.limiter),
            "audit": self._audit_problem(),
        }
        healthy = all(problem is None for problem in checks.values())
        report = {"status": "ok" if healthy else "failing",
                  **{name: problem or "ok" for name, problem in checks.items()},
                  "auditQueue": self.audit.pending}
        return healthy, report

    async def _mount_problem(self, limiter: trio.CapacityLimiter) -> str | None:
        if not self.operations.mounted:
            return "not mounted"
        # statfs always reaches the daemon; from a worker thread, since this thread
        # is the one that answers it. A hung mount leaves that thread behind (the
        # limiter keeps it to one) until the mount goes away.
        with trio.move_on_after(HEALTH_TIMEOUT):
            try:
                await trio.to_thread.run_sync(os.statvfs, self.mountpoint,
                                              abandon_on_cancel=True, limiter=limiter)
            except OSError as error:
                return f"{self.mountpoint}: {error.strerror}"
            return None
        return f"{self.mountpoint} did not answer within {HEALTH_TIMEOUT:g} s"

    def _store_problem(self) -> str | None:
        try:
            with self.service.store.read() as reader:
                reader.find(name=OTHER)  # an indexed query on the secrets table
        except Exception as error:  # any store's error: the report says which
            return f"the store can't be read: {error}"
        return None

    def _audit_problem(self) -> str | None:
        directory = self.audit.directory
        if self.audit.failing:
            return (f"the audit log in {directory} can't be written "
                    f"({self.audit.pending} records queued)")
        if not os.access(directory, os.W_OK):
            return f"the audit log's directory {directory} is not writable"
        return None


# --- the listener ------------------------------------------------------------------

async def serve_metrics(metrics: Metrics, host: str, port: int, *, runner=None,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics and /healthz over plain HTTP until cancelled; starts with the
    bound addresses. Hears the audit writer, the rotation runner and the API server
    only while it serves."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        raise OSError(error.errno, f"--metrics-listen {host}:{port}: {error.strerror}") \
            from None
    metrics.audit.observers.append(metrics.audited)
    if runner is not None:
        runner.observers.append(metrics.rotated)
    server.request_listeners.append(metrics.answered)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners,
                                functools.partial(_serve_client, metrics, _Gate()), listeners)
            task_status.started([listener.socket.getsockname()[:2] for listener in listeners])
    finally:
        server.request_listeners.remove(metrics.answered)
        if runner is not None:
            runner.observers.remove(metrics.rotated)
        metrics.audit.observers.remove(metrics.audited)


class _Gate:
    """The listener's bounds: open connections, one scrape or store check at a time,
    and at most one thread waiting on the mount."""

    def __init__(self):
        self.connections = 0
        self.limiter = trio.CapacityLimiter(1)
        self.statfs = trio.CapacityLimiter(1)


async def _serve_client(metrics: Metrics, gate: _Gate, stream: trio.SocketStream) -> None:
    if gate.connections >= MAX_CONNECTIONS:
        await trio.aclose_forcefully(stream)
        return
    gate.connections += 1
    try:
        with trio.move_on_after(CLIENT_TIMEOUT):
            await _exchange(metrics, gate, stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except OSError as error:
        if error.errno not in (errno.ECONNRESET, errno.EPIPE):
            log.warning("metrics connection failed: %s", error)
    except Exception:
        # A failure here must never reach the daemon's nursery: it serves the mount.
        log.exception("metrics connection failed")
    finally:
        gate.connections -= 1
        await trio.aclose_forcefully(stream)


async def _exchange(metrics: Metrics, gate: _Gate, stream: trio.SocketStream) -> None:
    """One request, one answer, then the connection is closed."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    method = None
    try:
        request = await _next_event(conn, stream)
        if not isinstance(request, h11.Request):
            return
        received = 0
        while isinstance(event := await _next_event(conn, stream), h11.Data):
            received += len(event.data)
            if received > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", 413)
        method, target = request.method.decode("ascii"), request.target.decode("latin-1")
        try:
            status, headers, body = await _answer(metrics, gate, method, target.split("?")[0])
        except Exception:
            log.exception("answering %s %s failed", method, target.split("?")[0])
            status, headers, body = 500, _TEXT, b"internal error: see the daemon's log\n"
    except h11.RemoteProtocolError as error:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status, headers, body = error.error_status_hint, _TEXT, b"bad request\n"
    headers = [*headers, ("Content-Length", str(len(body))), ("Connection", "close")]
    data = conn.send(h11.Response(status_code=status, headers=headers,
                                  reason=http.HTTPStatus(status).phrase))
    if method != "HEAD":  # a HEAD answer has the GET's Content-Length but no body
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


_TEXT = [("Content-Type", "text/plain; charset=utf-8")]


async def _answer(metrics: Metrics, gate: _Gate, method: str, path: str
                  ) -> tuple[int, list[tuple[str, str]], bytes]:
    if path not in ("/metrics", "/healthz"):
        return 404, _TEXT, b"not found: this listener serves /metrics and /healthz\n"
    if method not in ("GET", "HEAD"):
        return 405, [*_TEXT, ("Allow", "GET, HEAD")], b"method not allowed\n"
    if path == "/metrics":
        body = await trio.to_thread.run_sync(metrics.exposition, limiter=gate.limiter)
        return 200, [("Content-Type", CONTENT_TYPE_LATEST)], body
    healthy, report = await metrics.health(gate)
    return (200 if healthy else 503, [("Content-Type", "application/json")],
            json.dumps(report).encode() + b"\n")


async def _next_event(conn: h11.Connection, stream: trio.SocketStream):
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(MAX_HEAD))
    return event
