"""The thin pyfuse3 adapter: inode numbers, handles, errno translation, invalidation.

Every rule lives in the service and every path decision in `layout`; this class
turns them into FUSE replies. A handler signals failure only by raising
`pyfuse3.FUSEError`; `_fuse_handler` maps domain errors to their errno in one
place and answers anything unexpected with EIO after logging it. Handlers answer from
memory; what memory lacks (a snapshot's first load, a cold value's read and
decryption) is read in a worker thread (`_load`, `read`), so the trio run (the API,
the change feed, the audit writer) never waits on a store round trip.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import time

import pyfuse3
import trio

from secretfs import templates
from secretfs.fs import layout as L
from secretfs.fs.layout import Layout, NotFound
from secretfs.identity import FUSE, Caller
from secretfs.model import Secret, SecretsManagerError
from secretfs.store import StoreError

log = logging.getLogger(__name__)

# Names and labels change rarely and every change is pushed to the kernel as an
# invalidation, so entries may be cached for a while; a version's content never
# changes, so its file may be cached much longer.
ENTRY_TIMEOUT = 60.0
IMMUTABLE_TIMEOUT = 300.0

# Nodes whose answers read a JSON value's key files.
_KEYED = (L.VERSION_KEYS, L.KEY)
_OPENABLE = (L.VERSION, L.KEY, L.TEMPLATE)
_LINKS = (L.LABEL, L.KEYLINK)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


def _fuse_error(handler: str, error: Exception) -> pyfuse3.FUSEError:
    """The errno a handler answers for what it raised (logged where it is the daemon's
    own failure)."""
    if isinstance(error, pyfuse3.FUSEError):
        return error
    if isinstance(error, NotFound):
        return pyfuse3.FUSEError(errno.ENOENT)
    if isinstance(error, StoreError):  # the store's own line: unreachable, corrupt, ...
        log.error("%s failed: %s", handler, error)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(error, SecretsManagerError):
        if error.errno == errno.EIO:
            log.error("%s failed: %s: %s", handler, error.code, error.message)
        return pyfuse3.FUSEError(error.errno)
    log.error("unexpected error in %s", handler, exc_info=error)
    return pyfuse3.FUSEError(errno.EIO)


def _fuse_handler(method):
    """A handler whose errors are answered by _fuse_error. The hot path's handlers
    (open, readlink, read) catch for themselves instead: one coroutine per request
    rather than two."""
    @functools.wraps(method)
    async def handler(self, *args):
        try:
            return await method(self, *args)
        except Exception as error:
            raise _fuse_error(method.__name__, error) from None
    return handler


class _OpenFile:
    __slots__ = ("node", "data")

    def __init__(self, node: L.Node):
        self.node = node
        self.data: bytes | None = None


class SecretsOperations(pyfuse3.Operations):
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, service, *, strict_names: bool = False):
        super().__init__()
        self.service = service
        self.layout = Layout(service)
        # strict-names: directories are never cached by the kernel, so every walk
        # asks the daemon, which answers each caller with what it may see.
        self.strict_names = strict_names
        # (policy generation, secret id) -> may_be_shared
        self._shared_cache: dict[tuple[int, int], bool] = {}
        self._inode_of: dict[L.Node, int] = {L.ROOT: pyfuse3.ROOT_INODE}
        self._node_of: dict[int, L.Node] = {pyfuse3.ROOT_INODE: L.ROOT}
        self._inode_counter = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._handle_counter = itertools.count(1)
        self._files: dict[int, _OpenFile] = {}
        # The hot path's memos, each entry valid while the catalog holds the snapshot it
        # was made from (every commit replaces the secret's snapshot): a file's node ->
        # (snapshot, its version's stages); a link's node -> (snapshot, its target). An
        # entry outdated by a commit keeps its old snapshot until the node is next used.
        self._file_memo: dict[L.Node, tuple[Secret, tuple[str, ...]]] = {}
        self._link_memo: dict[L.Node, tuple[Secret, bytes]] = {}
        self._dirs: dict[int, list[tuple[str, L.Node]]] = {}
        self._mount_time_ns = time.time_ns()
        # Set once the kernel is attached: invalidations before that have nothing to do.
        self.mounted = False
        # open()'s own latency, for secretfs/metrics.py: a count per bit length of the
        # nanoseconds (a power-of-two bucket), and the total in the last slot.
        self.open_latency = [0] * 65
        service.catalog.subscribe(self._invalidate)
        service.subscribe_policies(self._policies_changed)

    # --- inodes ------------------------------------------------------------------

    def _inode(self, node: L.Node) -> int:
        inode = self._inode_of.get(node)
        if inode is None:
            inode = next(self._inode_counter)
            self._inode_of[node] = inode
            self._node_of[inode] = node
        return inode

    def _node(self, inode: int) -> L.Node:
        node = self._node_of.get(inode)
        if node is None:
            raise NotFound
        return node

    def _entry(self, node: L.Node, attrs: L.Attributes | None = None) -> pyfuse3.EntryAttributes:
        attrs = attrs or self.layout.attributes(node)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._inode(node)
        entry.generation = 0
        entry.st_mode = attrs.mode
        if node[0] in L.FILES and not attrs.mode_tagged and self._shared(node[1]):
            # Group and other may read here because some policy may let a
            # non-root caller read it; each open() still decides for its caller.
            entry.st_mode |= 0o044
        entry.st_nlink = 2 if attrs.mode & 0o040000 else 1
        # The secret's presentation tags: shown, never enforced (no default_permissions).
        entry.st_uid = attrs.uid
        entry.st_gid = attrs.gid
        entry.st_size = attrs.size
        entry.st_blksize = 4096
        entry.st_blocks = (attrs.size + 511) // 512
        stamp = int(attrs.mtime.timestamp() * 1e9) if attrs.mtime else self._mount_time_ns
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = stamp
        timeout = IMMUTABLE_TIMEOUT if attrs.immutable else ENTRY_TIMEOUT
        if self.strict_names and node[0] in (L.DIR, L.TEMPLATE_DIR):
            timeout = 0.0
        entry.entry_timeout = timeout
        entry.attr_timeout = timeout
        return entry

    def _shared(self, secret_id: int) -> bool:
        key = (self.service.policy_generation, secret_id)
        shared = self._shared_cache.get(key)
        if shared is None:
            shared = self.service.may_be_shared(self.layout.secret(secret_id))
            self._shared_cache[key] = shared
        return shared

    @staticmethod
    def _caller(ctx) -> Caller:
        return Caller(ctx.uid, ctx.gid, ctx.pid, FUSE)

    # --- reading the store off the loop ----------------------------------------------

    def _secret_id_of(self, node: L.Node) -> int | None:
        """The secret whose snapshot answering about `node` reads, if any."""
        kind = node[0]
        if kind == L.DIR:
            return self.service.catalog.live_id_at(node[1])
        if kind == L.TEMPLATE_DIR:
            return None
        return node[1]

    def _in_memory(self, node: L.Node) -> bool:
        """Whether answering about `node` reads nothing from the store: the hot path's
        only cost, a dict lookup or two."""
        secret_id = self._secret_id_of(node)
        if secret_id is None:
            return True
        if not self.service.catalog.cached(secret_id):
            return False
        return node[0] not in _KEYED or self.layout.keys_cached(secret_id, node[2])

    async def _load(self, nodes=(), secret_ids=(), *, templates: bool = False) -> None:
        """Read, in a worker thread, what answering about these nodes and secrets needs
        and memory doesn't hold: snapshots the catalog loads on first use, a JSON value's
        key files (a decryption), the template index (every snapshot). A handler that
        waited on the store itself would stall the whole trio run."""
        catalog = self.service.catalog
        nodes = [node for node in nodes if not self._in_memory(node)]
        secret_ids = [secret_id for secret_id in secret_ids if not catalog.cached(secret_id)]
        templates = templates and not self.layout.templates_known
        if nodes or secret_ids or templates:
            await trio.to_thread.run_sync(self._read_store, nodes, secret_ids, templates)

    def _read_store(self, nodes, secret_ids, templates: bool) -> None:
        """_load's reads, in a worker thread. What is gone by now is left to the
        handler, which answers ENOENT."""
        catalog = self.service.catalog
        for secret_id in secret_ids:
            catalog.get(secret_id)
        for node in nodes:
            secret = catalog.get(self._secret_id_of(node))
            if node[0] in _KEYED and secret is not None:
                with contextlib.suppress(NotFound):
                    self.layout.keys_of(secret, node[2])
        if templates:
            self.layout.template_paths()

    async def _load_listing(self, node: L.Node) -> None:
        """What showing a directory to a caller other than root reads: every secret
        below it (is any visible to this caller?), or the template index."""
        if node[0] == L.DIR:
            await self._load(secret_ids=[secret_id for _, secret_id
                                         in self.service.catalog.live_below(node[1])])
        elif node[0] in (L.TEMPLATE_DIR, L.TEMPLATE):
            await self._load(templates=True)

    # --- names -----------------------------------------------------------------------

    @_fuse_handler
    async def lookup(self, parent_inode, name, ctx=None):
        parent, name = self._node(parent_inode), os.fsdecode(name)
        if parent[0] in (L.DIR, L.TEMPLATE_DIR):
            # A template's lookup reads the secret at the child's path, and a
            # directory's entry shows that secret's attributes.
            child = (L.DIR, f"{parent[1]}/{name}" if parent[1] else name)
            if not (self._in_memory(parent) and self._in_memory(child)):
                await self._load((parent, child))
        elif not self._in_memory(parent):
            await self._load((parent,))
        node = self.layout.lookup(parent, name)
        if not self._in_memory(node):
            await self._load((node,))
        if self.strict_names and ctx is not None and ctx.uid != 0:
            await self._load_listing(node)
            caller = self._caller(ctx)
            hidden = (node[0] == L.DIR and not self._visible(caller, node[1])) or (
                node[0] in (L.TEMPLATE_DIR, L.TEMPLATE) and node != L.TEMPLATES
                and not self._visible_template_entries(caller, [("", node)]))
            if hidden:
                raise NotFound  # hidden names don't exist, for this caller
        return self._entry(node)

    def _visible(self, caller: Caller, path: str) -> bool:
        """Whether a directory holds (or is) a secret this caller may see."""
        secret = self.layout.secret_at(path)
        if secret is not None and self.service.may_see(caller, secret):
            return True
        return any(self._sees(caller, secret_id)
                   for _, secret_id in self.service.catalog.live_below(path))

    def _sees(self, caller: Caller, secret_id: int) -> bool:
        secret = self.service.catalog.get(secret_id)
        return secret is not None and self.service.may_see(caller, secret)

    def _listing_secret(self, caller: Caller, node: L.Node) -> Secret | None:
        """The secret whose listing rights opening (or access(2) on) a directory
        decides, if any. A directory a caller sees only because of secrets below it
        that it may see is no decision about the secret it also is."""
        if node[0] in (L.VERSIONS, L.KEYS, L.BY_VERSION):
            return self.layout.secret(node[1])
        if node[0] != L.DIR:
            return None
        secret = self.layout.secret_at(node[1])
        if secret is None or self.service.may_see(caller, secret) \
                or not self._visible(caller, node[1]):
            return secret
        return None

    @_fuse_handler
    async def getattr(self, inode, ctx=None):
        node = self._node(inode)
        if not self._in_memory(node):
            await self._load((node,))
        return self._entry(node)

    async def readlink(self, inode, ctx):
        try:
            node = self._node(inode)
            memo = self._link_memo.get(node)
            if memo is not None and memo[0] is self.service.catalog.loaded(node[1]):
                return memo[1]
            return await self._readlink(node)
        except Exception as error:
            raise _fuse_error("readlink", error) from None

    async def _readlink(self, node: L.Node) -> bytes:
        if node[0] not in _LINKS:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if not self._in_memory(node):
            await self._load((node,))
        secret = self.layout.secret(node[1])
        target = os.fsencode(self.layout.link_target(secret, node))
        self._link_memo[node] = (secret, target)
        return target

    async def forget(self, inode_list):
        # Inodes stay allocated: a node keeps its number for the daemon's life,
        # which is what keeps a label's symlink inode stable across promotions.
        pass

    # --- directories -----------------------------------------------------------------

    @_fuse_handler
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        caller = self._caller(ctx)
        await self._load((node,), templates=node == L.ROOT or node[0] == L.TEMPLATE_DIR)
        if not caller.is_root:
            await self._load_listing(node)
        if node[0] == L.VERSION_KEYS:
            # A JSON value's key names are content: listing them is a read.
            secret, version_id = self.layout.version_of(node)
            self.service.authorize_read(caller, secret, version_id)
        else:
            secret = self._listing_secret(caller, node)
            if secret is not None:
                self.service.authorize_listing(caller, secret)
        entries = self.layout.children(node)
        if node[0] == L.DIR and not caller.is_root:
            entries = self._visible_entries(caller, node[1], entries)
        elif node[0] == L.TEMPLATE_DIR and not caller.is_root:
            entries = self._visible_template_entries(caller, entries)
        await self._load([entry for _, entry in entries])  # what readdir will show
        handle = next(self._handle_counter)
        self._dirs[handle] = entries
        return handle

    @_fuse_handler
    async def readdir(self, fh, start_id, token):
        entries = self._dirs[fh]
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            try:
                entry = self._entry(node)
            except NotFound:
                continue  # vanished since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, index + 1):
                break

    def _visible_entries(self, caller: Caller, path: str,
                         entries: list[tuple[str, L.Node]]) -> list[tuple[str, L.Node]]:
        """A directory's entries filtered to what this caller may describe or read."""
        catalog = self.service.catalog
        secret = self.layout.secret_at(path)
        own_visible = secret is not None and self.service.may_see(caller, secret)
        visible_children = set()
        prefix_length = len(path) + 1 if path else 0
        for below, secret_id in catalog.live_below(path):
            segment = below[prefix_length:].split("/", 1)[0]
            if segment not in visible_children and self._sees(caller, secret_id):
                visible_children.add(segment)
        return [(name, node) for name, node in entries
                if (node[0] == L.DIR and name in visible_children)
                or node == L.TEMPLATES
                or (node[0] != L.DIR and own_visible)]

    def _visible_template_entries(self, caller: Caller, entries: list[tuple[str, L.Node]]
                                  ) -> list[tuple[str, L.Node]]:
        """Templates this caller may see, and the directories holding one."""
        def sees(node: L.Node) -> bool:
            if node[0] == L.TEMPLATE:
                return self._sees(caller, node[1])
            return any(sees(child) for _, child in self.layout.template_children(node[1]))
        return [(name, node) for name, node in entries if sees(node)]

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # --- files -------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        started = time.perf_counter_ns()
        try:
            if flags & _WRITE_FLAGS:
                raise pyfuse3.FUSEError(errno.EROFS)
            node = self._node(inode)
            if node[0] not in _OPENABLE:
                raise pyfuse3.FUSEError(errno.EISDIR if node[0] != L.LABEL else errno.ELOOP)
            service = self.service
            if service.is_stale():
                # Cut off from a shared store past --max-staleness: what this host holds
                # may be another host's old value (the change feed logged why, once).
                raise pyfuse3.FUSEError(errno.EIO)
            memo = self._file_memo.get(node)
            if memo is None or memo[0] is not service.catalog.loaded(node[1]):
                if not self._in_memory(node):
                    await self._load((node,))
                if node[0] == L.TEMPLATE:
                    return await self._open_template(node, self._caller(ctx))
                secret, version_id = self.layout.version_of(node)
                memo = self._file_memo[node] = (secret, tuple(secret.stages_of(version_id)))
            secret, stages = memo
            service.authorize_read(self._caller(ctx), secret, node[2], stages=stages)
            service.record_access(secret, node[2])
        except Exception as error:
            raise _fuse_error("open", error) from None
        handle = next(self._handle_counter)
        self._files[handle] = _OpenFile(node)
        elapsed = time.perf_counter_ns() - started
        self.open_latency[elapsed.bit_length()] += 1
        self.open_latency[-1] += elapsed
        # A version never changes, so pages the kernel already holds stay valid.
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    async def _open_template(self, node: L.Node, caller: Caller) -> pyfuse3.FileInfo:
        """Render now, for this caller, off the FUSE loop; the whole file or an error."""
        template = self.layout.template(node)
        handle = _OpenFile(node)
        handle.data = await trio.to_thread.run_sync(
            templates.render, self.service, caller, template)
        fh = next(self._handle_counter)
        self._files[fh] = handle
        # Each open renders anew and the size isn't known before: no page cache, and
        # reads go to the daemon whatever st_size says.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        try:
            handle = self._files[fh]
            if handle.data is None:
                # A cold read: a store read and an unwrap, which with KMS is a network
                # round trip; off the loop, so the API and other handlers keep being served.
                handle.data = await trio.to_thread.run_sync(self.layout.content, handle.node)
        except Exception as error:
            raise _fuse_error("read", error) from None
        return handle.data[off:off + size]

    async def release(self, fh):
        self._files.pop(fh, None)

    @_fuse_handler
    async def access(self, inode, mode, ctx):
        """Answers as open() and opendir() would, so `test -r` tells the truth."""
        node = self._node(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not self._in_memory(node):
            await self._load((node,))
        self.layout.attributes(node)  # ENOENT if it no longer exists
        kind, caller = node[0], self._caller(ctx)
        if kind in L.FILES and mode & os.X_OK:
            return False
        if not mode & os.R_OK:
            return True
        if kind == L.TEMPLATE:
            rendered = await trio.to_thread.run_sync(
                functools.partial(templates.render, self.service, caller,
                                  self.layout.template(node), probe=True))
            return rendered is not None
        if kind in (L.VERSION, L.KEY, L.VERSION_KEYS):
            secret, version_id = self.layout.version_of(node)
            return self.service.authorize_read(caller, secret, version_id, probe=True)
        if not caller.is_root:
            await self._load_listing(node)
        secret = self._listing_secret(caller, node)
        if secret is not None:
            return self.service.authorize_listing(caller, secret, probe=True)
        return True

    async def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = stats.f_bfree = stats.f_bavail = 0
        stats.f_files = len(self.service.catalog)
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    # --- pushing changes to the kernel ------------------------------------------------

    def _policies_changed(self) -> None:
        """Mode bits follow the policies: forget the attributes of every file shown."""
        self._shared_cache = {}
        if not self.mounted:
            return
        self._invalidate_files(lambda node: True)

    def _invalidate_files(self, which) -> None:
        for node, inode in list(self._inode_of.items()):
            if node[0] in L.FILES and which(node):
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(inode, attr_only=True)

    def _invalidate(self, old: Secret | None, new: Secret | None) -> None:
        """Called after each commit, in the committing thread (never the FUSE loop)."""
        if not self.mounted:
            return
        entries, moved = self.layout.stale_entries(old, new)
        if self.layout.retagged(old, new):
            # Owner, group and mode may have changed: stat must show it at once.
            self._invalidate_files(lambda node: node[1] == old.secret_id)
        for parent, name in entries:
            inode = self._inode_of.get(parent)
            if inode is None:
                continue  # never shown to the kernel, so nothing cached
            # ENOENT: the kernel had no such entry cached, nothing to forget.
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_entry(inode, os.fsencode(name))
        for node in moved:
            inode = self._inode_of.get(node)
            if inode is None:
                continue
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(inode, attr_only=True)
            if node[0] != L.LABEL:
                continue
            # For inotify: the kernel reports no change made through FUSE, but an entry
            # forgotten as deleted gives IN_DELETE_SELF to watches on its inode (once
            # unused): the label's symlink (IN_DONT_FOLLOW) and the version it pointed to
            # (a watch through the link). Both names still resolve: a reader's next
            # lookup finds them anew, never ENOENT.
            version_id = old.labels[node[2]]
            for parent, name, child in (
                    ((L.DIR, old.path), node[2], inode),
                    ((L.VERSIONS, old.secret_id), version_id,
                     self._inode_of.get((L.VERSION, old.secret_id, version_id)))):
                parent_inode = self._inode_of.get(parent)
                if parent_inode is not None and child is not None:
                    with contextlib.suppress(OSError):
                        pyfuse3.invalidate_entry(parent_inode, os.fsencode(L.file_name(name)),
                                                 deleted=child)
