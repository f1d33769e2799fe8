"""The rotation runner: wakes for the next due secret and runs AWS's four steps.

createSecret, setSecret, testSecret and finishSecret run in order, each once;
every outcome is persisted by the service before the next step starts, so after
a crash or restart a rotation resumes at the step it reached, with the same
ClientRequestToken. A failing step leaves AWSCURRENT alone, AWSPENDING on the
new version, the error recorded, and a retry scheduled with backoff.

The runner sleeps until the earliest due time the store reports (an indexed
query, not a walk over all secrets) or until woken (a RotateSecret call).

In a fleet (several daemons on one PostgreSQL store) every host runs a runner, and
each secret's rotation runs on one of them: the one that holds the store's lease on
the secret (`store.lease`), taken before the rotation is opened and held across all
its steps. A host that finds the lease held elsewhere leaves the secret alone for
LEASE_POLL seconds and asks again; when the holder dies its lease ends with its
database connection, and the next host to ask resumes the rotation at the step the
store records, with the same token. Under the lease, `open_rotation` decides afresh
whether the rotation is still due, since the holder may have just finished it. Nothing
tells a runner of a rotation another host started or left behind, so on a shared
store it looks every FLEET_POLL seconds rather than every IDLE_WAKE.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from secretfs.identity import rotator_caller
from secretfs.rotation.rotators import Rotator, rotator_for
from secretfs.store import StoreError

log = logging.getLogger(__name__)

STEPS = ("createSecret", "setSecret", "testSecret", "finishSecret")
IDLE_WAKE = 3600.0  # re-check at least this often, should a wake-up be missed
FLEET_POLL = 5.0  # on a store other hosts share: re-check this often
# A secret just looked at (its lease held by another host, its rotation failed to open,
# or done) is looked at again no sooner than this, unless the runner is woken: a secret
# that stays due can't make the runner spin.
LEASE_POLL = 3.0


class RotationRunner:
    def __init__(self, service, *, rotators: Callable[[str], Rotator] = rotator_for,
                 limiter: trio.CapacityLimiter | None = None, in_thread=None):
        self.service = service
        self._rotators = rotators
        self._limiter = limiter or trio.CapacityLimiter(1)
        # Blocking work (the store, a rotator) runs in a worker thread; a test on
        # trio's autojump clock runs it inline, so simulated time can't leap ahead
        # while a thread works.
        self._in_thread = in_thread or trio.to_thread.run_sync
        self._wake = trio.Event()
        self._idle = FLEET_POLL if service.store.shared else IDLE_WAKE
        # Secret id -> the trio time before which it isn't looked at again.
        self._resting: dict[int, float] = {}
        # Hear (secret id, finished) as each rotation run ends: all four steps done, or
        # stopped by a failure (to be retried). The daemon's metrics count them.
        self.observers: list[Callable[[int, bool], None]] = []

    def wake(self) -> None:
        """Something changed (RotateSecret): look for due rotations now."""
        self._resting.clear()
        self._wake.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            await self._rotate_due()
            with trio.move_on_after(await self._until_next()):
                await self._wake.wait()

    async def _rotate_due(self) -> None:
        now = trio.current_time()
        self._resting = {key: until for key, until in self._resting.items() if until > now}
        for secret_id in await self._thread(self.service.rotations_due):
            if secret_id in self._resting:
                continue
            try:
                await self.rotate(secret_id)
            except Exception:  # one secret's trouble must not stop the others
                log.exception("rotation of secret %d failed", secret_id)
            self._resting[secret_id] = trio.current_time() + LEASE_POLL

    async def _until_next(self) -> float:
        """Seconds until the next look: the earliest due time, or, while what is due
        rests (another host holds its lease), the end of the first rest."""
        due = await self._thread(self.service.next_rotation_due)
        delay = self._idle if due is None else (due - self.service.now()).total_seconds()
        if delay <= 0 and self._resting:
            delay = min(self._resting.values()) - trio.current_time()
        return min(max(delay, 0.0), self._idle)

    async def rotate(self, secret_id: int) -> bool:
        """Run the open rotation of one secret to its end, if this host holds the
        secret's lease; True when it finished."""
        async with self._lease(secret_id) as held:
            if held:
                return await self._rotate_leased(secret_id)
        return False

    @asynccontextmanager
    async def _lease(self, secret_id: int) -> AsyncIterator[bool]:
        """Whether this host holds the secret's lease; False when another host does or
        the store can't say (a rotation is run by one host or by none)."""
        lease = self.service.rotation_lease(secret_id)
        try:
            held = await self._thread(lease.__enter__)
        except StoreError as error:
            log.warning("can't ask for the rotation lease on secret %d: %s", secret_id, error)
            yield False
            return
        if not held:
            log.debug("secret %d rotates on another host", secret_id)
        try:
            yield held
        finally:
            with trio.CancelScope(shield=True):  # a daemon stopping lets the lease go too
                await self._thread(lease.__exit__, None, None, None)

    async def _rotate_leased(self, secret_id: int) -> bool:
        try:
            opened = await self._thread(self.service.open_rotation, secret_id)
        except Exception:
            log.exception("can't open a rotation for secret %d", secret_id)
            self._ended(secret_id, False)
            return False
        if opened is None:
            return False
        token, done = opened["Token"], opened["Step"]
        secret_arn = self.service.catalog.row(secret_id).arn
        remaining = STEPS[STEPS.index(done) + 1:] if done in STEPS else STEPS
        # The rotator acts as its own principal, not as the daemon: policies apply.
        caller = rotator_caller(opened["Rotator"], secret_arn)

        def client(action: str, params: dict) -> dict:
            return self.service.call(action, params, caller)

        for step in remaining:
            try:
                # A rotator that can't be had (one this host doesn't run) fails its
                # step like any other failure: recorded, retried, the daemon unharmed.
                rotator = self._rotators(opened["Rotator"])
                # A rotator in its own process calls back with the step's token.
                with self.service.sessions.issued(caller) as rotation_token:
                    event = {"Step": step, "SecretId": secret_arn,
                             "ClientRequestToken": token, "RotationToken": rotation_token}
                    await self._thread(rotator.run, event, client)
            except Exception as error:  # a rotator's failure, not ours: record, retry later
                log.warning("rotation of %s failed at %s: %s", secret_arn, step, error)
                await self._thread(self.service.record_rotation_step, secret_id, token, step,
                                   f"{type(error).__name__}: {error}")
                self._ended(secret_id, False)
                return False
            await self._thread(self.service.record_rotation_step, secret_id, token, step)
        log.info("rotated %s (version %s)", secret_arn, token)
        self._ended(secret_id, True)
        return True

    def _ended(self, secret_id: int, finished: bool) -> None:
        for observer in self.observers:
            observer(secret_id, finished)

    async def _thread(self, function, *args):
        return await self._in_thread(function, *args, limiter=self._limiter)
