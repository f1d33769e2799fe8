"""Who is asking: the caller of a filesystem request or an API call.

The FUSE request context and the Unix socket's SO_PEERCRED both give uid, gid
and pid; richer attributes (names, groups, executable, cgroup) are resolved by
the policy layer only when a loaded policy needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

FUSE = "fuse"
UNIX_SOCKET = "unix-socket"
INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int
    source: str

    @property
    def is_root(self) -> bool:
        return self.uid == 0


# The daemon's own background work (deletion purges, later rotation) acts as this.
SYSTEM = Caller(uid=0, gid=0, pid=0, source=INTERNAL)
