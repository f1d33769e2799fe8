"""The in-memory read model of the store: names, ARNs, the directory tree, snapshots.

Every lookup on the filesystem's hot path is a dict access here. The index of
all secrets (id, name, path, ARN) is loaded at start; a secret's full snapshot
(versions, labels, tags; never a value) is loaded on first use. The service
calls `refresh(secret_id)` after each commit, and listeners (the filesystem)
hear `(old, new)` for every change, outside the lock, so they may block on the
kernel without stalling readers. A first `get` reads the store: the filesystem asks
`cached` first and makes such a read from a worker thread, never on its loop. A
snapshot, once loaded, stays (refresh replaces it), and refresh loads a secret's
snapshot before indexing it, so only the secrets indexed at start are ever missing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from secretfs.model import Secret
from secretfs.store import SecretRow

Listener = Callable[[Secret | None, Secret | None], None]


def _ancestry(path: str) -> list[tuple[str, str]]:
    """(parent directory, child segment) pairs from the root down to `path`."""
    segments = path.split("/")
    return [("/".join(segments[:depth]), segments[depth]) for depth in range(len(segments))]


class Catalog:
    def __init__(self, store):
        self._store = store
        self._lock = threading.Lock()
        self._rows: dict[int, SecretRow] = {}
        self._by_name: dict[str, int] = {}
        self._by_arn: dict[str, int] = {}
        self._live_by_path: dict[str, int] = {}
        # directory path -> child segment -> number of live secrets at or below it
        self._tree: dict[str, dict[str, int]] = {"": {}}
        self._sorted_children: dict[str, list[str]] = {}
        self._snapshots: dict[int, Secret] = {}
        self._listeners: list[Listener] = []
        with store.read() as reader:
            for row in reader.rows():
                self._index(row)

    # --- queries (lock-free: each is one atomic dict operation) ---------------

    def id_by_name(self, name: str) -> int | None:
        return self._by_name.get(name)

    def id_by_arn(self, arn: str) -> int | None:
        return self._by_arn.get(arn)

    def live_id_at(self, path: str) -> int | None:
        """The secret whose directory is `path`, unless scheduled for deletion."""
        return self._live_by_path.get(path)

    def is_directory(self, path: str) -> bool:
        return path in self._tree or path in self._live_by_path

    def children(self, path: str) -> list[str]:
        """Child segments of a directory, sorted, for stable readdir offsets."""
        cached = self._sorted_children.get(path)
        if cached is None:
            with self._lock:  # writers mutate the tree under the lock
                cached = sorted(self._tree.get(path, ()))
                self._sorted_children[path] = cached
        return cached

    def live_below(self, path: str) -> list[tuple[str, int]]:
        """(path, id) of every live secret strictly below a directory: O(secrets)."""
        prefix = f"{path}/" if path else ""
        with self._lock:
            items = list(self._live_by_path.items())
        return [(found, secret_id) for found, secret_id in items if found.startswith(prefix)
                and found != path]

    def has_child(self, path: str, segment: str) -> bool:
        return segment in self._tree.get(path, ())

    def row(self, secret_id: int) -> SecretRow | None:
        return self._rows.get(secret_id)

    def __len__(self) -> int:
        return len(self._rows)

    def cached(self, secret_id: int) -> bool:
        """Whether get(secret_id) answers from memory, without a store read: its
        snapshot is loaded, or the catalog knows no such secret."""
        return secret_id in self._snapshots or secret_id not in self._rows

    def loaded(self, secret_id: int) -> Secret | None:
        """The secret's snapshot if it is in memory; never reads the store."""
        return self._snapshots.get(secret_id)

    def get(self, secret_id: int) -> Secret | None:
        snapshot = self._snapshots.get(secret_id)
        if snapshot is not None or secret_id not in self._rows:
            return snapshot
        with self._lock:
            # Loading under the lock orders this load against refresh(): a
            # snapshot read before a commit can never overwrite a newer one.
            snapshot = self._snapshots.get(secret_id)
            if snapshot is None:
                with self._store.read() as reader:
                    snapshot = reader.load(secret_id)
                if snapshot is not None:
                    self._snapshots[secret_id] = snapshot
            return snapshot

    # --- changes --------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def refresh(self, secret_id: int) -> Secret | None:
        """Reload one secret after a commit, update the indexes, tell listeners."""
        with self._lock:
            old = self._snapshots.get(secret_id)
            with self._store.read() as reader:
                new = reader.load(secret_id)
            row = None if new is None else SecretRow(
                new.secret_id, new.name, new.path, new.arn,
                new.deleted and new.deleted.timestamp())
            if new is None:
                self._snapshots.pop(secret_id, None)
            else:
                self._snapshots[secret_id] = new
            # Most commits (a value, a label move) leave the index row as it was;
            # touching it then would let a concurrent lookup miss a live secret.
            if row != self._rows.get(secret_id):
                self._unindex(secret_id)
                if row is not None:
                    self._index(row)
        for listener in self._listeners:
            listener(old, new)
        return new

    def reload(self, secret_id: int | None = None) -> list[str]:
        """Re-read what another process may have committed to the store: one secret, or
        every secret this catalog shows or the store holds. Listeners hear each one as
        after a commit. Returns the names of the secrets that changed, sorted. A secret
        whose snapshot was never loaded, and whose row is unchanged, has nothing stale."""
        if secret_id is not None:
            ids = [secret_id]
        else:
            with self._store.read() as reader:
                stored = {row.secret_id: row for row in reader.rows()}
            with self._lock:
                ids = sorted({found for found, row in stored.items()
                              if row != self._rows.get(found) or found in self._snapshots}
                             | (self._rows.keys() - stored.keys()))
        changed = []
        for found in ids:
            old, old_row = self._snapshots.get(found), self._rows.get(found)
            new = self.refresh(found)
            if new != old or self._rows.get(found) != old_row:
                changed.append((new or old or old_row).name)
        return sorted(changed)

    def _index(self, row: SecretRow) -> None:
        self._rows[row.secret_id] = row
        self._by_name[row.name] = row.secret_id
        self._by_arn[row.arn] = row.secret_id
        if row.deleted is None:
            self._live_by_path[row.path] = row.secret_id
            for parent, segment in _ancestry(row.path):
                children = self._tree.setdefault(parent, {})
                if segment not in children:
                    self._sorted_children.pop(parent, None)
                children[segment] = children.get(segment, 0) + 1

    def _unindex(self, secret_id: int) -> None:
        row = self._rows.pop(secret_id, None)
        if row is None:
            return
        self._by_name.pop(row.name, None)
        self._by_arn.pop(row.arn, None)
        if row.deleted is None:
            self._live_by_path.pop(row.path, None)
            for parent, segment in _ancestry(row.path):
                children = self._tree[parent]
                children[segment] -= 1
                if not children[segment]:
                    del children[segment]
                    self._sorted_children.pop(parent, None)
                    if parent and not children:
                        del self._tree[parent]
