"""Test-only: the real daemon, whose rotators stop for good right after one step.

    python tests/_pausing_daemon.py STEP MARKER secretfs.daemon --mountpoint M ...

Once the rotator's STEP has returned (its work done, its outcome not yet recorded), it
creates MARKER and blocks, so a test can SIGKILL the daemon exactly at that step's end.
Everything after `secretfs.daemon` is the daemon's own command line, which therefore
still reads `secretfs.daemon --mountpoint M`: conftest's Daemon finds (and its teardown
kills) this process as it finds the real one.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from secretfs import daemon
from secretfs.rotation import rotators

step, marker = sys.argv[1], Path(sys.argv[2])
real_rotator_for = rotators.rotator_for


class Pausing:
    def __init__(self, rotator):
        self.rotator = rotator

    def run(self, event: dict, client) -> None:
        self.rotator.run(event, client)
        if event["Step"] == step:
            marker.touch()
            threading.Event().wait()  # until SIGKILL


def pausing_rotator_for(name: str, **options):
    return Pausing(real_rotator_for(name, **options))


# daemon.serve imports rotator_for when it starts serving.
rotators.rotator_for = pausing_rotator_for
sys.exit(daemon.main(sys.argv[4:]))
