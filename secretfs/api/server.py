"""The API's HTTP/1.1 transport: trio and h11.

Owns the control socket (binding it with its permissions, reading SO_PEERCRED),
the accept loop with its connection limit, and each connection's keep-alive
request loop with its bounds (header and body size, read and write timeouts).
The protocol is protocol.py's. Who the caller is comes from an Authenticator
made per connection, so a TCP+TLS listener (SigV4) reuses serve_listener and
serve_connection with an authenticator of its own.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http
import logging
import os
import socket
import ssl
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h11
import trio

from secretfs import identity, model
from secretfs.api import protocol, sigv4
from secretfs.identity import Caller

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 64 * 1024
_BACKLOG = 128
# After refusing a request whose body is still arriving, keep reading (and
# dropping) it for a moment, so the client finishes sending and reads our
# answer instead of failing on a reset connection.
_LINGER_SECONDS, _LINGER_BYTES = 2.0, 4 << 20
# accept() fails with these when the process is out of descriptors or memory;
# the listener keeps going once some connections have closed.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost the daemon."""

    max_body: int = 1 << 20
    max_header: int = 16 << 10
    max_connections: int = 64
    # To receive one whole request (headers and body), to send one response,
    # and how long an idle keep-alive connection stays open.
    timeout: float = 30.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, read whole."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # names in lower case, as h11 gives them
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


# Who sent a request; runs in a worker thread and raises a SecretsManagerError
# to refuse it (a bad signature, say).
Authenticator = Callable[[Request], Caller]
# Made once per connection, from the connection's stream.
AuthenticatorFactory = Callable[[trio.abc.Stream], Authenticator]
# Hear (X-Amz-Target, HTTP status, seconds from the request read to its answer ready)
# for each request, in the trio thread: the daemon's metrics, when served.
request_listeners: list[Callable[[str | None, int, float], None]] = []


class HTTPError(model.SecretsManagerError):
    """A request refused at the HTTP layer, before it reaches the protocol."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def peer_credentials(sock: trio.socket.SocketType) -> Caller:
    """The caller at the other end of a Unix stream socket, as the kernel saw it connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(uid=uid, gid=gid, pid=pid, source=identity.UNIX_SOCKET)


def unix_peer_authenticator(stream: trio.abc.Stream, *,
                            sessions: identity.Sessions | None = None) -> Authenticator:
    """Every request on a Unix socket comes from the peer that connected it, unless it
    carries a rotation step's token: then it comes from that rotation's principal."""
    assert isinstance(stream, trio.SocketStream)
    caller = peer_credentials(stream.socket)

    def authenticate(request: Request) -> Caller:
        token = request.header(identity.ROTATION_TOKEN_HEADER)
        if token is None:
            return caller
        found = sessions.caller(token) if sessions is not None else None
        if found is None:
            raise model.UnrecognizedClientException(
                "The rotation token in the request belongs to no rotation step in progress.")
        return found

    return authenticate


async def serve_unix(
    service: protocol.Service,
    path: Path,
    *,
    limiter: trio.CapacityLimiter | None = None,
    limits: Limits = DEFAULT_LIMITS,
    sessions: identity.Sessions | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on a Unix socket at `path` (mode 0660) until cancelled."""
    sock = await _bind_unix(path)
    bound = os.stat(path)
    try:
        await serve_listener(service, trio.SocketListener(sock),
                             functools.partial(unix_peer_authenticator, sessions=sessions),
                             limiter=limiter, limits=limits, task_status=task_status)
    finally:
        with contextlib.suppress(FileNotFoundError):
            now = os.stat(path)
            # Leave the path alone if another daemon has bound it since.
            if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                path.unlink()
        sock.close()


def _peer_address(stream: trio.abc.Stream) -> str | None:
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(transport, trio.SocketStream):
        return None
    return transport.socket.getpeername()[0]


def signature_authenticator(service, *, source: str) -> AuthenticatorFactory:
    """Requests on the network are signed with Signature Version 4: the access key
    that signed one (a stored key, or a rotation step's) names its caller."""

    def for_connection(stream: trio.abc.Stream) -> Authenticator:
        address = _peer_address(stream)

        def authenticate(request: Request) -> Caller:
            callers: list[Caller] = []

            def secret_for(key_id: str) -> str | None:
                found = service.network_credentials(key_id, source=source, address=address)
                if found is None:
                    return None
                callers.append(found[1])
                return found[0]

            try:
                sigv4.verify(request.method, request.target, list(request.headers),
                             request.body, region=service.region, secret_for=secret_for)
            except model.SecretsManagerError as error:
                service.record_refused(request.header("x-amz-target"), error, source=source,
                                       address=address,
                                       access_key=sigv4.claimed_key(request.headers))
                raise
            return callers[0]

        return authenticate

    return for_connection


async def serve_network(
    service,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    limiter: trio.CapacityLimiter | None = None,
    limits: Limits = DEFAULT_LIMITS,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API over TCP — HTTPS with `ssl_context`, else plain HTTP, which the
    caller allows on loopback only — until cancelled. Starts with the bound addresses."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    source = identity.HTTPS if ssl_context is not None else identity.HTTP
    authenticator = signature_authenticator(service, source=source)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                wrapped: trio.abc.Listener = listener
                if ssl_context is not None:
                    wrapped = trio.SSLListener(listener, ssl_context, https_compatible=True)
                await nursery.start(functools.partial(
                    serve_listener, service, wrapped, authenticator, limiter=limiter,
                    limits=limits))
            task_status.started(bound)
    finally:
        for listener in listeners:
            await listener.aclose()


async def _bind_unix(path: Path) -> trio.socket.SocketType:
    await _refuse_live_socket(path)
    # Bound under a temporary name, given its mode, then renamed into place:
    # the socket is never reachable with the umask's permissions, and a stale
    # socket is replaced in one step.
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(temporary))
        os.chmod(temporary, 0o660)
        sock.listen(_BACKLOG)
        os.rename(temporary, path)
    except BaseException:
        sock.close()
        temporary.unlink(missing_ok=True)
        raise
    return sock


async def _refuse_live_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", os.fspath(path))
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            await probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            return  # left behind by a daemon that is gone
    raise OSError(errno.EADDRINUSE, f"another process is serving {path}")


async def serve_listener(
    service: protocol.Service,
    listener: trio.abc.Listener[trio.abc.Stream],
    authenticator_for: AuthenticatorFactory,
    *,
    limiter: trio.CapacityLimiter | None = None,
    limits: Limits = DEFAULT_LIMITS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections until cancelled, each served in its own task.

    Past `limits.max_connections` open connections a new one is closed at once:
    an overloaded daemon answers quickly with a closed connection rather than
    leaving clients in the backlog. The listener stays the caller's to close.
    """
    open_connections = 0

    async def serve_one(stream: trio.abc.Stream) -> None:
        nonlocal open_connections
        try:
            await serve_connection(service, stream, authenticator_for(stream),
                                   limiter=limiter, limits=limits)
        except Exception:
            # One connection's failure must not take the listener down with it.
            log.exception("API connection failed")
        finally:
            open_connections -= 1
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("API listener cannot accept: %s", os.strerror(error.errno))
                await trio.sleep(0.1)
                continue
            if open_connections >= limits.max_connections:
                log.warning("API refused a connection: %d connections open", open_connections)
                await trio.aclose_forcefully(stream)
                continue
            open_connections += 1
            nursery.start_soon(serve_one, stream)


async def serve_connection(
    service: protocol.Service,
    stream: trio.abc.Stream,
    authenticate: Authenticator,
    *,
    limiter: trio.CapacityLimiter | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Answer requests on one connection until the client closes it or a bound is hit."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header)
    try:
        while True:
            request = None
            # A client gets `timeout` to send a whole request: an idle
            # keep-alive connection and a slowloris are both cut off.
            with trio.move_on_after(limits.timeout):
                try:
                    request = await _receive_request(conn, stream, limits)
                except HTTPError as error:
                    await _refuse(conn, stream, error)
                    return
            if request is None:
                return
            started = time.perf_counter()
            # The service is synchronous (SQLite, crypto): off the event loop,
            # so the FUSE loop in the same trio run is never blocked.
            reply = await trio.to_thread.run_sync(
                _answer, service, authenticate, request, limiter=limiter)
            for listener in request_listeners:
                listener(request.header("x-amz-target"), reply.status,
                         time.perf_counter() - started)
            with trio.fail_after(limits.timeout):
                await stream.send_all(_reply_bytes(conn, reply))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass  # the client went away or stopped reading
    finally:
        with trio.move_on_after(limits.timeout):
            await stream.aclose()


async def _receive_request(conn: h11.Connection, stream: trio.abc.Stream,
                           limits: Limits) -> Request | None:
    """The next request on the connection, or None once the client has closed it."""
    try:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request)
        # h11 bounds a head still arriving; one that arrived whole is checked here.
        if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) \
                > limits.max_header:
            raise _head_too_large(limits)
        method, target = event.method.decode("ascii"), event.target.decode("latin-1")
        headers = tuple((name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in event.headers)
        if method != "POST":
            raise HTTPError(405, "MethodNotAllowedException",
                            f"The API accepts POST only, not {method}.")
        if target != "/":
            raise HTTPError(404, "NotFoundException",
                            f"The API is served at '/', not {target!r}.")
        length = next((int(value) for name, value in headers if name == "content-length"), 0)
        if length > limits.max_body:
            raise _too_large(limits)
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100)))
        body = bytearray()
        while isinstance(event := await _next_event(conn, stream), h11.Data):
            body += event.data
            if len(body) > limits.max_body:  # a chunked body has no Content-Length
                raise _too_large(limits)
        assert isinstance(event, h11.EndOfMessage)
    except h11.RemoteProtocolError as error:
        if error.error_status_hint == 431:
            raise _head_too_large(limits) from None
        raise HTTPError(error.error_status_hint, "BadRequestException",
                        f"Malformed HTTP request: {error}") from None
    return Request(method, target, headers, bytes(body))


def _head_too_large(limits: Limits) -> HTTPError:
    return HTTPError(431, "RequestHeaderFieldsTooLargeException",
                     f"The request head exceeds {limits.max_header} bytes.")


def _too_large(limits: Limits) -> HTTPError:
    return HTTPError(413, "RequestEntityTooLargeException",
                     f"The request body exceeds {limits.max_body} bytes.")


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
    return event


async def _refuse(conn: h11.Connection, stream: trio.abc.Stream, error: HTTPError) -> None:
    """Answer a request refused before its body was read, then end the connection."""
    # h11 lets a server answer from IDLE when the request itself was malformed.
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    await stream.send_all(_reply_bytes(conn, protocol.error_reply(error), close=True))
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    with trio.move_on_after(_LINGER_SECONDS):
        drained = 0
        while drained < _LINGER_BYTES and (data := await stream.receive_some(_RECEIVE_SIZE)):
            drained += len(data)


def _answer(service: protocol.Service, authenticate: Authenticator,
            request: Request) -> protocol.Reply:
    """Authenticate and answer one request; runs in a worker thread, never raises."""
    try:
        caller = authenticate(request)
    except model.SecretsManagerError as error:
        return protocol.error_reply(error)
    except Exception:
        log.exception("authenticating an API request failed")
        return protocol.error_reply(model.InternalServiceError())
    return protocol.handle(service, request.header("x-amz-target"), request.body, caller)


def _reply_bytes(conn: h11.Connection, reply: protocol.Reply, *, close: bool = False) -> bytes:
    headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
    if close:
        headers.append(("Connection", "close"))
    response = h11.Response(status_code=reply.status, headers=headers,
                            reason=http.HTTPStatus(reply.status).phrase)
    return b"".join((conn.send(response), conn.send(h11.Data(data=reply.body)),
                     conn.send(h11.EndOfMessage())))
