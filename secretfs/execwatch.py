"""Which executable a process runs, without reading /proc/<pid>/exe on every open.

Every file open's audit record (and any policy condition on the executable) names
the program that opened it, read from `/proc/<pid>/exe`: inside the FUSE loop that
readlink costs about as much as the rest of an open together. `Executables` remembers
a pid's executable and forgets it the moment the process execs or exits, which the
kernel's process events connector (NETLINK_CONNECTOR, CN_IDX_PROC) reports: each event
is queued on our socket inside the exec or exit itself, before the new program runs a
single instruction, so draining the socket before a lookup never misses an exec that
precedes the open being answered. What breaks that promise turns the memory off:

- events lost to a full socket buffer (ENOBUFS): everything remembered is forgotten;
- no connector (no CAP_NET_ADMIN, as under systemd/secretfs.service, which doesn't
  grant it; a network or pid namespace other than the host's; a kernel without it):
  `watch()` says so and every lookup reads /proc, as before. `watch()` proves the
  connector on an exec of its own before trusting it.

A remembered executable is also kept at most `TTL` seconds, so nothing lives long on
this alone. Kernels since 6.6 deliver only exec and exit events to this socket; older
ones deliver every process event, which are read and ignored.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import subprocess
import threading
import time

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
_FORGETTING = frozenset({PROC_EVENT_EXEC, PROC_EVENT_EXIT})
NLMSG_DONE = 3
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, port
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
# proc_event after both headers: what, cpu, timestamp, then the pid and tgid of the
# exec'ing or exiting task (first in both event structs).
_EVENT = struct.Struct("=IIQii")
_EVENT_AT = _NLMSG_HEADER.size + _CN_MSG.size
RECEIVE_BUFFER = 4 << 20
CAP_NET_ADMIN = 12


def _listen_request() -> bytes:
    """PROC_CN_MCAST_LISTEN, with the event filter (exec and exit only) on kernels that
    read one (6.6 and later; older ones refuse a message of that size)."""
    release = os.uname().release.split(".")
    try:
        filtered = (int(release[0]), int(release[1].split("-")[0])) >= (6, 6)
    except (IndexError, ValueError):
        filtered = False
    payload = (struct.pack("=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_EXEC | PROC_EVENT_EXIT)
               if filtered else struct.pack("=I", PROC_CN_MCAST_LISTEN))
    message = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(message), NLMSG_DONE, 0, 0, 0) + message


class Executables:
    """pid -> executable path, exact while the connector is watched (see the module)."""

    TTL = 1.0

    def __init__(self):
        self._connector: socket.socket | None = None
        self._ready: select.poll | None = None  # polls the connector
        self._known: dict[int, tuple[str | None, float]] = {}
        self._lock = threading.Lock()

    def watch(self, timeout: float = 1.0) -> bool:
        """Remember executables from now on, if the process events connector can be
        had and proves itself (see `_connect`); whether it could."""
        connector = _connect(timeout)
        if connector is not None:
            with self._lock:
                self.close()
                self._known.clear()
                self._connector = connector
                self._ready = select.poll()
                self._ready.register(connector.fileno(), select.POLLIN)
        return connector is not None

    @property
    def watching(self) -> bool:
        return self._connector is not None

    def exe(self, pid: int) -> str | None:
        if self._connector is None:
            return _readlink(pid)
        with self._lock:
            self._drain()
            found = self._known.get(pid)
            now = time.monotonic()
            if found is not None and now - found[1] < self.TTL:
                return found[0]
            exe = _readlink(pid)
            if len(self._known) >= 4096:
                self._known.clear()
            self._known[pid] = (exe, now)
            return exe

    def _drain(self) -> None:
        """Forget every process that exec'd or exited since the last call. Asks poll()
        first: an empty socket is the common case, and a refused recv() costs three
        times as much."""
        connector, known, ready = self._connector, self._known, self._ready.poll
        while ready(0):
            try:
                data = connector.recv(256)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                known.clear()  # events were lost: nothing remembered can be trusted
                continue
            event = _event(data)
            if event is not None and event[0] in _FORGETTING:
                known.pop(event[1], None)
                known.pop(event[2], None)

    def close(self) -> None:
        if self._connector is not None:
            self._connector.close()
            self._connector = None


def _event(data: bytes) -> tuple[int, int, int] | None:
    """(what, pid, tgid) of one connector message; None for one too short to hold them."""
    if len(data) < _EVENT_AT + _EVENT.size:
        return None
    what, _, _, pid, tgid = _EVENT.unpack_from(data, _EVENT_AT)
    return what, pid, tgid


def _readlink(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


# The daemon's: Identity reads executables through it.
EXECUTABLES = Executables()


def _connect(timeout: float) -> socket.socket | None:
    """The process events connector, listening and non-blocking; None when it can't be
    had or doesn't report this process's own exec of /bin/true with the pid this
    process sees (another pid namespace)."""
    if not _has_net_admin():
        log.info("no CAP_NET_ADMIN for the process events connector: reading /proc per open")
        return None
    try:
        connector = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError as error:
        log.info("process events connector unavailable (%s): reading /proc per open",
                 error.strerror or error)
        return None
    try:
        with contextlib.suppress(OSError):
            connector.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)  # SO_RCVBUFFORCE
        connector.bind((0, CN_IDX_PROC))
        connector.send(_listen_request())
        child = subprocess.Popen(["/bin/true"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        child.wait()
        if not _sees_exec_of(connector, child.pid, timeout):
            log.info("process events connector shows no exec of ours: reading /proc per open")
            connector.close()
            return None
        connector.setblocking(False)
        return connector
    except OSError as error:
        log.info("process events connector unusable (%s): reading /proc per open",
                 error.strerror or error)
        connector.close()
        return None


def _has_net_admin() -> bool:
    """Whether this process may listen: the kernel ignores the request of one that may
    not, which would leave watch() waiting out its timeout for nothing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def _sees_exec_of(connector: socket.socket, pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        connector.settimeout(left)
        try:
            data = connector.recv(256)
        except TimeoutError:
            return False
        event = _event(data)
        if event is not None and event[:2] == (PROC_EVENT_EXEC, pid):
            return True
    return False
