"""Who is asking: the caller of a filesystem request or an API call.

The FUSE request context and the Unix socket's SO_PEERCRED give uid, gid and
pid. Everything else a policy may ask about — user and group names, the
supplementary groups, the executable, the cgroup and the systemd unit — is
read from /proc lazily, only when a loaded policy mentions it, and cached per
(pid, process start time) so a recycled pid never inherits an identity.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

FUSE = "fuse"
UNIX_SOCKET = "unix-socket"
HTTPS = "https"
INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int
    source: str
    # Set by network transports: the access key and the client's address.
    access_key: str | None = None
    address: str | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0


# The daemon's own background work (deletion purges, later rotation) acts as this.
SYSTEM = Caller(uid=0, gid=0, pid=0, source=INTERNAL)


def _unit_of(cgroup: str | None) -> str | None:
    """The systemd unit a cgroup path names: its innermost .service or .scope."""
    if not cgroup:
        return None
    for segment in reversed(cgroup.split("/")):
        if segment.endswith((".service", ".scope", ".socket", ".mount", ".swap")):
            return segment
    return None


@dataclass(eq=False)
class Identity:
    """A caller with the attributes policies ask for, each resolved on first use."""

    caller: Caller

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

    @cached_property
    def user(self) -> str | None:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return None

    @cached_property
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

    @cached_property
    def groups(self) -> frozenset[str]:
        names = set()
        for gid in self.gids:
            with contextlib.suppress(KeyError):
                names.add(grp.getgrgid(gid).gr_name)
        return frozenset(names)

    @cached_property
    def exe(self) -> str | None:
        if self.pid <= 0:
            return None
        try:
            return os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return None

    @cached_property
    def cgroup(self) -> str | None:
        text = self._proc("cgroup")
        if not text:
            return None
        for line in text.splitlines():
            if line.startswith("0::"):  # the cgroup v2 hierarchy
                return line[3:]
        return text.splitlines()[0].split(":", 2)[-1]

    @cached_property
    def unit(self) -> str | None:
        return _unit_of(self.cgroup)

    def _proc(self, name: str) -> str | None:
        if self.pid <= 0:
            return None
        try:
            with open(f"/proc/{self.pid}/{name}") as handle:
                return handle.read()
        except OSError:
            return None

    def describe(self) -> dict:
        """The identity for an audit record (resolves every attribute)."""
        return {"uid": self.uid, "gid": self.gid, "user": self.user, "pid": self.pid,
                "exe": self.exe, "unit": self.unit}


def _start_time(pid: int) -> int | None:
    # On every open of the hot path: raw os calls cost half of open().read().
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return int(stat.rpartition(b")")[2].split()[19])


class IdentityCache:
    """Identities per (pid, start time, uid, gid): a recycled pid is a new process."""

    def __init__(self, size: int = 4096):
        self._size = size
        self._entries: OrderedDict[tuple, Identity] = OrderedDict()
        self._lock = threading.Lock()

    def identify(self, caller: Caller) -> Identity:
        if caller.pid <= 0:
            return Identity(caller)
        key = (caller.pid, _start_time(caller.pid), caller.uid, caller.gid, caller.source,
               caller.access_key, caller.address)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
            found = Identity(caller)
            self._entries[key] = found
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
            return found
