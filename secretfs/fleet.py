"""How a host of a fleet hears the other hosts' commits, and how long it may serve
what it knew without hearing them.

Hosts sharing a PostgreSQL store each serve from memory: the catalog's snapshots and
the parsed policies. PostgreSQL tells every listening session of each commit (see
store/postgres.py, "change notifications"); a daemon's ChangeFeed holds one such
session and, for each notification another process caused, reads again what it names
(`service.reload` of that secret, or the policies). That pushes the change to the
kernel exactly as a commit of the daemon's own does, so a promotion through host A
shows through host B's mount milliseconds after A answered (tests/test_fleet.py, 20
promotions, both daemons and PostgreSQL on one busy 2-core machine: median 2 to 11 ms,
worst 6 to 23 ms over four runs; the notification leaves at commit, and B re-reads one
secret). Access keys need nothing: they are read from the store at each request.

Staleness. A host cut off from the server keeps serving what it knew, for at most
`max_staleness` seconds counted from the last moment it is sure to have heard of every
commit. The feed pings its session every `heartbeat` (a third of the bound, at most
5 s): a ping answered proves every commit made before it delivered, and the feed
applies those before it moves that moment on. Past the bound `stale()` is true, opens
of secret files answer EIO and the API's reads ServiceUnavailable, until the feed is
back and has read everything again. The bound is counted from the last proof, not from
when a loss is noticed, so a server that vanished silently (no FIN; TCP keepalives
notice it in about 11 s) is bounded just as tightly. Mutations need the server anyway
and fail on their own (StoreError, ServiceUnavailable on the API).

Reconnecting. On a lost session the feed connects again with a short capped backoff
(0.1 s, doubling to 3 s), LISTENs, and only then reads everything again
(`service.reload()`): what was committed while it was away is in that read, and what
is committed after the LISTEN is heard, so nothing falls between the two.

The feed is one thread of its own: psycopg blocks, and only that thread ever touches
the listening session. The trio loop only starts it and tells it to stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import trio

from secretfs.store import StoreError

log = logging.getLogger(__name__)

# 60 s rides out what a PostgreSQL restart or a failover to a standby usually takes
# (tens of seconds), so readers don't see EIO for a blip, while a partitioned host
# stops serving a value rotated elsewhere within a minute: AWS's own clients cache a
# value for longer (the caching client's default is an hour), and a rotation keeps the
# previous value valid (AWSPREVIOUS) until the next one.
DEFAULT_MAX_STALENESS = 60.0
# The bound must leave room for a ping or two: a bound below this is refused.
MIN_STALENESS = 1.0
HEARTBEAT = 5.0
FIRST_RETRY, LAST_RETRY = 0.1, 3.0


def change_feed(service, *, max_staleness: float) -> ChangeFeed | None:
    """The feed of a store that other hosts write too; None for one only this host
    writes (SQLite), whose daemon learns of every commit by making it."""
    if not service.store.shared:
        return None
    return ChangeFeed(service, max_staleness=max_staleness)


class ChangeFeed:
    def __init__(self, service, *, max_staleness: float,
                 clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.store = service.store
        self.max_staleness = max_staleness
        self.heartbeat = min(HEARTBEAT, max_staleness / 3)
        self._clock = clock
        # The service read the catalog and the policies from the store just now.
        self._fresh_as_of = clock()
        self._fresh_date = service.now().timestamp()
        self.connected = False
        self.application_name: str | None = None
        self.connected_date: float | None = None
        self.disconnected_date: float | None = None
        self.last_resync_date: float | None = None
        self.last_error: str | None = None
        self.changes_heard = 0
        self.reconnects = 0
        self._warned_stale = False
        self._stop = threading.Event()
        self._first_attempt = threading.Event()

    # --- what the daemon asks ---------------------------------------------------------

    def stale(self) -> bool:
        """Whether this host may have missed other hosts' commits for longer than it may
        serve what it knew. One clock read: it is asked on every open()."""
        return self._clock() - self._fresh_as_of > self.max_staleness

    def describe(self) -> dict:
        """For `secretfs status`."""
        stale = self.stale()
        state = "connected" if self.connected else (
            "reconnecting" if self.connected_date is not None else "connecting")
        return {"State": state,
                "ApplicationName": self.application_name,
                "MaxStalenessSeconds": self.max_staleness,
                "ConnectedDate": self.connected_date,
                "DisconnectedDate": self.disconnected_date,
                "LastResyncDate": self.last_resync_date,
                "CurrentAsOfDate": self._fresh_date,
                "Stale": stale,
                "StaleSinceDate": self._fresh_date + self.max_staleness if stale else None,
                "ChangesHeard": self.changes_heard, "Reconnects": self.reconnects,
                "LastError": self.last_error}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Follow the store until cancelled; started once the first session is up and
        read (or has failed: the daemon serves what it read at start meanwhile)."""
        thread = threading.Thread(target=self._follow_store, name="secretfs-feed",
                                  daemon=True)
        thread.start()
        try:
            await trio.to_thread.run_sync(self._first_attempt.wait, abandon_on_cancel=True)
            task_status.started()
            await trio.sleep_forever()
        finally:
            # The thread sees it within a heartbeat and closes its session itself.
            self._stop.set()

    # --- the feed's thread -------------------------------------------------------------

    def _follow_store(self) -> None:
        retry = FIRST_RETRY
        while not self._stop.is_set():
            try:
                listener = self.store.listen()
            except Exception as error:
                self._lost(error)
            else:
                try:
                    self._resync(listener)
                    self._first_attempt.set()
                    retry = FIRST_RETRY
                    while not self._stop.is_set():
                        self._follow(listener)
                except Exception as error:
                    self._lost(error)
                finally:
                    listener.close()
            self._first_attempt.set()
            self._warn_if_stale()
            if self._stop.wait(retry):
                return
            retry = min(retry * 2, LAST_RETRY)

    def _resync(self, listener) -> None:
        as_of, date = self._clock(), self.service.now().timestamp()
        changed = self.service.reload()
        if not self.connected:
            self.reconnects += self.connected_date is not None
            self.connected, self.connected_date = True, date
            self.disconnected_date = self.last_error = None
        self.application_name = listener.application_name
        self.last_resync_date = date
        log.info("change feed: listening to %s; read the store again, %d secrets changed",
                 self.store.where, len(changed))
        self._fresh(as_of, date)

    def _follow(self, listener) -> None:
        """Wait up to a heartbeat for notifications, then prove the session with a
        ping; apply what came, and move the moment this host is current as of."""
        changes = listener.changes(self.heartbeat)
        as_of, date = self._clock(), self.service.now().timestamp()
        listener.ping()
        changes += listener.changes(0)  # any that arrived during the ping
        self._apply(changes)
        self._fresh(as_of, date)

    def _apply(self, changes) -> None:
        own = self.store.origin
        secret_ids, policies = set(), False
        for change in changes:
            if change is None:  # a notification this secretfs doesn't know
                self.service.reload()
                return
            if change.origin == own:
                continue  # this daemon's commit: refreshed when it was made
            self.changes_heard += 1
            if change.kind == "secret":
                secret_ids.add(change.secret_id)
            elif change.kind == "policies":
                policies = True
        for secret_id in sorted(secret_ids):
            self.service.reload(secret_id, policies=False)
        if policies:
            self.service.reload_policies()

    def _fresh(self, as_of: float, date: float) -> None:
        self._fresh_as_of, self._fresh_date = as_of, date
        if self._warned_stale:
            self._warned_stale = False
            log.info("change feed: current again; secret files open again")

    def _lost(self, error: Exception) -> None:
        reason = " ".join(str(error).split()) or type(error).__name__
        first = self.connected or self.last_error is None
        if self.connected:
            self.connected = False
            self.disconnected_date = self.service.now().timestamp()
        self.last_error = reason
        if not isinstance(error, StoreError):
            log.exception("change feed: unexpected error; connecting again")
        elif first:
            log.warning("change feed: %s; serving what this host knows for at most %g s",
                        reason, self.max_staleness)
        else:
            log.debug("change feed: still no session: %s", reason)

    def _warn_if_stale(self) -> None:
        if self.stale() and not self._warned_stale:
            self._warned_stale = True
            log.warning("change feed: nothing heard from %s for over %g s; secret files "
                        "answer EIO and API reads ServiceUnavailable until it is back",
                        self.store.where, self.max_staleness)
