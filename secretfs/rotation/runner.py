"""The rotation runner: wakes for the next due secret and runs AWS's four steps.

createSecret, setSecret, testSecret and finishSecret run in order, each once;
every outcome is persisted by the service before the next step starts, so after
a crash or restart a rotation resumes at the step it reached, with the same
ClientRequestToken. A failing step leaves AWSCURRENT alone, AWSPENDING on the
new version, the error recorded, and a retry scheduled with backoff.

The runner sleeps until the earliest due time the store reports (an indexed
query, not a walk over all secrets) or until woken (a RotateSecret call).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from secretfs.identity import rotator_caller
from secretfs.rotation.rotators import Rotator, rotator_for

log = logging.getLogger(__name__)

STEPS = ("createSecret", "setSecret", "testSecret", "finishSecret")
IDLE_WAKE = 3600.0  # re-check at least this often, should a wake-up be missed


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
        # Hear (secret id, finished) as each rotation run ends: all four steps done, or
        # stopped by a failure (to be retried). The daemon's metrics count them.
        self.observers: list[Callable[[int, bool], None]] = []

    def wake(self) -> None:
        """Something changed (RotateSecret): look for due rotations now."""
        self._wake.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            for secret_id in await self._thread(self.service.rotations_due):
                try:
                    await self.rotate(secret_id)
                except Exception:  # one secret's trouble must not stop the others
                    log.exception("rotation of secret %d failed", secret_id)
            due = await self._thread(self.service.next_rotation_due)
            delay = IDLE_WAKE if due is None else (due - self.service.now()).total_seconds()
            with trio.move_on_after(min(max(delay, 0.0), IDLE_WAKE)):
                await self._wake.wait()

    async def rotate(self, secret_id: int) -> bool:
        """Run the open rotation of one secret to its end; True when it finished."""
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
