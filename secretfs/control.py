"""What `secretfs status` and `secretfs refresh` ask of a running daemon.

The service answers the extension actions secretfs.GetStatus and secretfs.Refresh
(root's alone unless a policy grants `secretfs:GetStatus` / `secretfs:Refresh`) by
asking this object, which the daemon builds once it serves: it knows the mount, the
endpoint, the audit log and the hooks, which the service doesn't. Both run in the
API's worker threads; the hooks, which live in the trio run, are reached through
trio.from_thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from secretfs.execwatch import EXECUTABLES
from secretfs.state import StateDir
from secretfs.store import StoreError


class Control:
    def __init__(self, service, *, mountpoint: Path, state: StateDir, audit, hooks,
                 endpoint: str | None, strict_names: bool):
        self.service = service
        self.mountpoint = Path(mountpoint)
        self.state = state
        self.audit = audit
        self.hooks = hooks
        self.endpoint = endpoint
        self.strict_names = strict_names
        self.started = service.now().timestamp()
        self._started = time.monotonic()
        self._token = trio.lowlevel.current_trio_token()
        self.last_audit_write: float | None = None
        audit.observers.append(self._audit_written)

    def _audit_written(self, events: list[dict]) -> None:
        self.last_audit_write = self.service.now().timestamp()

    # --- secretfs status -------------------------------------------------------------

    def status(self, *, audit_queued: int) -> dict:
        """`audit_queued`: the audit records waiting to be written when the request came."""
        service = self.service
        live = len(service.catalog.live_below(""))
        return {
            "Mount": {"MountPoint": str(self.mountpoint), "Pid": os.getpid(),
                      "StartedDate": self.started,
                      "UptimeSeconds": int(time.monotonic() - self._started),
                      "StrictNames": self.strict_names, "Endpoint": self.endpoint,
                      # Callers' executables: from the kernel's process events, else read
                      # from /proc at every open (secretfs/execwatch.py).
                      "ExecutablesWatched": EXECUTABLES.watching},
            "Store": {**self._store(), "Secrets": live,
                      "ScheduledForDeletion": len(service.catalog) - live},
            "KeyProvider": service.keys.status(),  # each provider's own (KMS: no KMS call)
            "Rotations": self._rotations(),
            "Audit": {"Directory": str(self.audit.directory), "Queued": audit_queued,
                      "LastWriteDate": self.last_audit_write, "Failing": self.audit.failing},
            "Hooks": trio.from_thread.run_sync(self.hooks.describe, trio_token=self._token),
            "HookProblems": list(self.hooks.problems),
            # A shared store's: how current this host is (secretfs/fleet.py).
            **({"ChangeFeed": service.feed.describe()} if service.feed is not None else {}),
        }

    def _rotations(self) -> dict:
        """The rotation index is the store's: unknown while the store is unreachable,
        when status matters most (see "ChangeFeed")."""
        try:
            return self.service.rotation_summary()
        except StoreError as error:
            return {"Unknown": str(error)}

    def _store(self) -> dict:
        from secretfs.store.sqlite import SCHEMA_VERSION

        store = self.service.store
        # Every store is brought up to the current schema when it is opened.
        found = {"SchemaVersion": SCHEMA_VERSION}
        path = getattr(store, "path", None)
        if path is None:  # PostgreSQL: where it is, without a password
            return {"Kind": "postgresql", "Location": getattr(store, "where", "?"), **found}
        try:
            read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY) \
                or not os.access(path, os.W_OK)
        except OSError:
            read_only = True
        return {"Kind": "sqlite", "Location": str(path), "ReadOnly": read_only, **found}

    # --- secretfs refresh ------------------------------------------------------------

    def refresh(self, secret_id: int | None) -> dict:
        """Re-read the store (one secret, or every one) and the policies: each change is
        pushed to the kernel as after a commit of this daemon's, and heard by the hooks,
        which are then read again from hooks.d and re-checked."""
        changed = self.service.reload(secret_id)
        hooks = trio.from_thread.run(self.hooks.reload, trio_token=self._token)
        row = None if secret_id is None else self.service.catalog.row(secret_id)
        scope = row.name if row is not None else "*" if secret_id is None or not changed \
            else changed[0]
        return {"Refreshed": scope,
                "Secrets": len(self.service.catalog) if secret_id is None else 1,
                "Changed": changed, "Hooks": hooks["Hooks"],
                "HooksStarted": hooks["Started"], "HookProblems": hooks["Rejected"]}
