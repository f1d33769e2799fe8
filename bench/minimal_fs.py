"""The floor for a hot read: a minimal pyfuse3 filesystem serving secretfs's layout.

    python bench/minimal_fs.py MOUNTPOINT NAME VERSION_ID VALUE_FILE

serves `<NAME>/AWSCURRENT -> versions/<VERSION_ID>` and the version file from
memory, with no policy, audit or store, but with what secretfs mounts with: the
same mount options, reader tasks, entry/attribute timeouts, modes and
`keep_cache` (imported from secretfs, so the floor follows any change there).
Prints READY once mounted; SIGTERM or SIGINT unmount.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import pyfuse3
import trio

from secretfs.daemon import FUSE_READER_TASKS, MOUNT_OPTIONS
from secretfs.fs.layout import DIR_MODE, FILE_MODE, LINK_MODE
from secretfs.fs.ops import ENTRY_TIMEOUT, IMMUTABLE_TIMEOUT


class MinimalOperations(pyfuse3.Operations):
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, name: str, version_id: str, value: bytes):
        super().__init__()
        # inode -> (mode, {child name: inode} | symlink target | file bytes)
        self.nodes: dict[int, tuple[int, object]] = {pyfuse3.ROOT_INODE: (DIR_MODE, {})}
        secret_dir = pyfuse3.ROOT_INODE
        for segment in (s for s in name.split("/") if s):
            secret_dir = self._add(secret_dir, segment, DIR_MODE, {})
        self._add(secret_dir, "AWSCURRENT", LINK_MODE, f"versions/{version_id}".encode())
        versions = self._add(secret_dir, "versions", DIR_MODE, {})
        self._add(versions, version_id, FILE_MODE, value)

    def _add(self, parent: int, name: str, mode: int, payload) -> int:
        inode = len(self.nodes) + 1
        self.nodes[inode] = (mode, payload)
        self.nodes[parent][1][name.encode()] = inode
        return inode

    def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        mode, payload = self.nodes[inode]
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_mode = mode
        entry.st_nlink = 2 if mode == DIR_MODE else 1
        entry.st_size = 0 if mode == DIR_MODE else len(payload)
        entry.st_blksize = 4096
        entry.st_blocks = (entry.st_size + 511) // 512
        timeout = IMMUTABLE_TIMEOUT if mode == FILE_MODE else ENTRY_TIMEOUT
        entry.entry_timeout = entry.attr_timeout = timeout
        return entry

    async def lookup(self, parent_inode, name, ctx=None):
        children = self.nodes[parent_inode][1]
        if not isinstance(children, dict) or name not in children:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(children[name])

    async def getattr(self, inode, ctx=None):
        return self._entry(inode)

    async def readlink(self, inode, ctx):
        return self.nodes[inode][1]

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        children = list(self.nodes[fh][1].items())
        for index in range(start_id, len(children)):
            name, inode = children[index]
            if not pyfuse3.readdir_reply(token, name, self._entry(inode), index + 1):
                break

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return self.nodes[fh][1][off:off + size]


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main(min_tasks=1, max_tasks=FUSE_READER_TASKS)
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    mountpoint, name, version_id, value_file = argv
    with open(value_file, "rb") as handle:
        value = handle.read()
    pyfuse3.init(MinimalOperations(name, version_id, value), mountpoint, set(MOUNT_OPTIONS))
    try:
        os.write(sys.stdout.fileno(), b"READY\n")
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
