"""Who is asking: the caller of a filesystem request or an API call.

The FUSE request context and the Unix socket's SO_PEERCRED give uid, gid and
pid. Everything else a policy may ask about — user and group names, the
supplementary groups, the executable, the cgroup and the systemd unit — is
read from /proc lazily, only when a loaded policy (or the audit record) asks for
it, and afresh for every request a policy decides: a process may exec another
program or move to another cgroup without changing its pid, and a recycled pid
must never inherit an identity. The one shortcut is the unit an audit record
names, remembered briefly per process (see `_Units`).
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import os
import pwd
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from secretfs.execwatch import EXECUTABLES, Executables

FUSE = "fuse"
UNIX_SOCKET = "unix-socket"
HTTPS = "https"
HTTP = "http"  # plain HTTP, on loopback only
INTERNAL = "internal"
ROTATION = "rotation"


class Caller(NamedTuple):
    """Who asked, as the transport knows it. A tuple, not a frozen dataclass: one is
    made per file open, and a frozen dataclass costs four times as much to build."""

    uid: int
    gid: int
    pid: int
    source: str
    # Set by network transports: the access key and the client's address.
    access_key: str | None = None
    address: str | None = None
    # A rotator at work: the rotator's name (its principal is `rotator:<name>`) and the
    # ARN of the secret it is rotating. A rotator has no Unix identity of its own.
    rotator: str | None = None
    scope: str | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0 and self.rotator is None


def rotator_caller(rotator: str, secret_arn: str) -> Caller:
    """The principal a rotator acts as while it rotates one secret."""
    return Caller(uid=-1, gid=-1, pid=0, source=ROTATION, rotator=rotator, scope=secret_arn)


# The header (and environment variable) a rotator run as its own process uses to
# call the API back as its rotation's principal rather than as its Unix uid.
ROTATION_TOKEN_HEADER = "X-Secretfs-Rotation-Token"
ROTATION_TOKEN_ENV = "SECRETFS_ROTATION_TOKEN"


def rotation_access_key(token: str) -> tuple[str, str]:
    """The access key pair a rotation step's token gives its rotator for the network
    endpoint: the id is derived from the token, the secret is the token."""
    digest = hashlib.sha256(token.encode()).digest()[:10]
    return "ASRT" + base64.b32encode(digest).decode(), token


class Sessions:
    """Bearer tokens that stand for a caller while a piece of work runs: the token of
    a rotation step is handed to the rotator's process (the event's RotationToken,
    and as an access key pair for the network endpoint), and vanishes when the step
    ends. Nothing is written down."""

    def __init__(self):
        self._callers: dict[str, Caller] = {}
        self._tokens_by_key: dict[str, str] = {}

    @contextlib.contextmanager
    def issued(self, caller: Caller) -> Iterator[str]:
        token = secrets.token_urlsafe(32)
        key_id, _ = rotation_access_key(token)
        self._callers[token] = caller
        self._tokens_by_key[key_id] = token
        try:
            yield token
        finally:
            self._tokens_by_key.pop(key_id, None)
            self._callers.pop(token, None)

    def caller(self, token: str) -> Caller | None:
        return self._callers.get(token)

    def access_key(self, key_id: str) -> tuple[str, Caller] | None:
        """(secret, caller) of a step's access key while the step runs."""
        token = self._tokens_by_key.get(key_id)
        caller = self._callers.get(token) if token is not None else None
        return (token, caller) if caller is not None else None


# The daemon's own background work (deletion purges, later rotation) acts as this.
SYSTEM = Caller(uid=0, gid=0, pid=0, source=INTERNAL)


class _lazy:  # noqa: N801 - used as a decorator, like functools.cached_property
    """Computed on first use, then a plain attribute of the instance. Unlike
    functools.cached_property on Python 3.11 it takes no lock: an Identity lives in
    one request, and this is the filesystem's hot path."""

    def __init__(self, compute):
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)
        return value


def _unit_of(cgroup: str | None) -> str | None:
    """The systemd unit a cgroup path names: its innermost .service or .scope."""
    if not cgroup:
        return None
    for segment in reversed(cgroup.split("/")):
        if segment.endswith((".service", ".scope", ".socket", ".mount", ".swap")):
            return segment
    return None


class _Names:
    """uid -> user and gid -> group names, remembered for a few seconds: the passwd and
    group databases are read through NSS, and an account may be deleted and its id
    given to another name, so nothing is remembered for long."""

    TTL = 5.0

    def __init__(self):
        self._users: dict[int, tuple[float, str | None]] = {}
        self._groups: dict[int, tuple[float, str | None]] = {}

    def user(self, uid: int) -> str | None:
        return self._lookup(self._users, uid, lambda: pwd.getpwuid(uid).pw_name)

    def group(self, gid: int) -> str | None:
        return self._lookup(self._groups, gid, lambda: grp.getgrgid(gid).gr_name)

    def _lookup(self, table: dict, key: int, resolve) -> str | None:
        now = time.monotonic()
        found = table.get(key)
        if found is not None and now - found[0] < self.TTL:
            return found[1]
        try:
            name = resolve()
        except KeyError:
            name = None
        if len(table) > 4096:
            table.clear()
        table[key] = (now, name)
        return name


_NAMES = _Names()


class _Units:
    """pid -> (exe, unit, when read) for audit records only.

    /proc/<pid>/cgroup is the dearest read of a file open (its text names every
    hierarchy on a cgroup-v1 host), and a process asking again and again is the
    common case. A remembered unit is used only while the process still runs the
    same executable and for at most TTL seconds: exec and, in practice, a move to
    another cgroup (runtimes move a process before they exec its program) change
    the executable, and a pid is not handed out again within a second. Policies
    never use this: a condition on the unit reads /proc afresh."""

    TTL = 1.0

    def __init__(self):
        self._seen: dict[int, tuple[str | None, str | None, float]] = {}

    def unit(self, who: Identity) -> str | None:
        now = time.monotonic()
        exe = who.exe
        found = self._seen.get(who.pid)
        if found is not None and found[0] == exe and now - found[2] < self.TTL:
            return found[1]
        unit = who.unit
        self.remember(who.pid, exe, unit, now)
        return unit

    def remember(self, pid: int, exe: str | None, unit: str | None,
                 now: float | None = None) -> None:
        if len(self._seen) > 4096:
            self._seen.clear()
        self._seen[pid] = (exe, unit, time.monotonic() if now is None else now)


_UNITS = _Units()


class _Described:
    """(pid, uid, gid) -> (exe, when, items): an audit record's identity of a process,
    made again when the process runs another executable (read on every open) or
    after _Units.TTL, so its unit and user name are never older than their own
    caches allow. A process opening files again and again is the hot path's case."""

    def __init__(self):
        self._seen: dict[tuple[int, int, int], tuple[str | None, float, tuple]] = {}

    def items(self, who: Identity) -> tuple[tuple[str, object], ...]:
        caller = who.caller
        key = (caller.pid, caller.uid, caller.gid)
        exe = who.exe
        now = time.monotonic()
        found = self._seen.get(key)
        if found is not None and found[0] == exe and now - found[1] < _Units.TTL:
            return found[2]
        items = (("uid", caller.uid), ("gid", caller.gid), ("user", who.user),
                 ("pid", caller.pid), ("exe", exe), ("unit", who.units.unit(who)))
        if len(self._seen) > 4096:
            self._seen.clear()
        self._seen[key] = (exe, now, items)
        return items


_DESCRIBED = _Described()


@dataclass(eq=False)
class Identity:
    """A caller with the attributes policies ask for, each resolved on first use."""

    caller: Caller
    names: _Names = _NAMES
    units: _Units = _UNITS
    described_processes: _Described = _DESCRIBED
    executables: Executables = EXECUTABLES

    @property
    def uid(self) -> int:
        return self.caller.uid

    @property
    def gid(self) -> int:
        return self.caller.gid

    @property
    def pid(self) -> int:
        return self.caller.pid

    @property
    def source(self) -> str:
        return self.caller.source

    @_lazy
    def user(self) -> str | None:
        return self.names.user(self.uid)

    @_lazy
    def gids(self) -> frozenset[int]:
        """Primary and supplementary groups: the process's own, else the user's."""
        groups = {self.gid}
        status = self._proc("status")
        if status is not None:
            for line in status.splitlines():
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    return frozenset(groups)
        if self.user is not None:
            with contextlib.suppress(KeyError, OSError):
                groups.update(os.getgrouplist(self.user, self.gid))
        return frozenset(groups)

    @_lazy
    def groups(self) -> frozenset[str]:
        names = (self.names.group(gid) for gid in self.gids)
        return frozenset(name for name in names if name is not None)

    @_lazy
    def exe(self) -> str | None:
        if self.pid <= 0:
            return None
        return self.executables.exe(self.pid)

    @_lazy
    def cgroup(self) -> str | None:
        text = self._proc("cgroup")
        if not text:
            return None
        # The cgroup v2 hierarchy's line, "0::<path>", else the first line's path.
        if text.startswith("0::"):
            rest = text[3:]
        else:
            found = text.find("\n0::")
            rest = text[found + 4:] if found >= 0 else text.split(":", 2)[-1]
        return rest.split("\n", 1)[0]

    @_lazy
    def unit(self) -> str | None:
        return _unit_of(self.cgroup)

    def _proc(self, name: str) -> str | None:
        # Raw os calls: this runs on the hot path, where open().read() costs twice as much.
        if self.pid <= 0:
            return None
        try:
            fd = os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return os.read(fd, 65536).decode("utf-8", "surrogateescape")
        except OSError:
            return None
        finally:
            os.close(fd)

    def describe(self) -> dict:
        """The identity for an audit record (resolves every attribute)."""
        return dict(self.described())

    def described(self) -> tuple[tuple[str, object], ...]:
        """describe()'s items as a tuple: hashable, so the audit log can encode a
        record repeated by the same process once (`AuditLog.record_keyed`)."""
        caller = self.caller
        if caller.rotator is not None:
            return (("rotator", caller.rotator),)
        pid = caller.pid
        if pid <= 0:
            unit = None
        elif "unit" in self.__dict__:  # a policy asked: read afresh for this request
            unit = self.unit
            self.units.remember(pid, self.exe, unit)
        else:
            return self.described_processes.items(self)
        return (("uid", caller.uid), ("gid", caller.gid), ("user", self.user), ("pid", pid),
                ("exe", self.exe), ("unit", unit))
