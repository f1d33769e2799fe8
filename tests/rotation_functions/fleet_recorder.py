"""aws_style's rotation function, run by whichever host of a fleet holds the rotation,
recording each step it starts as one line "HOST STEP TOKEN" in STEP_LOG (HOST is the
directory holding the daemon's state directory: a or b in tests/_fleet.py), then
taking STEP_SECONDS (if set) before it does the step's work, so that hosts overlap.

At HOLD_AT, the first run of that step (the one that finds no HOLD_FILE) writes
"HOST PID" to HOLD_FILE and waits until RELEASE_FILE exists (at most two minutes, then
it fails), so a test can act while a step is in progress, e.g. SIGKILL that host. A
later run of the step goes straight on. Settings come from the secret's
secretfs:rotation:* tags, as every rotation function's do."""

import os
import time
from pathlib import Path

from aws_style import lambda_handler as rotate

HOLD_LIMIT = 120.0


def lambda_handler(event, context):
    host = Path(os.environ["SECRETFS_STATE_DIR"]).parent.name
    step, token = event["Step"], event["ClientRequestToken"]
    with open(os.environ["STEP_LOG"], "a") as log:
        log.write(f"{host} {step} {token}\n")
    time.sleep(float(os.environ.get("STEP_SECONDS", "0")))
    if step == os.environ.get("HOLD_AT"):
        hold(host)
    rotate(event, context)


def hold(host):
    held = Path(os.environ["HOLD_FILE"])
    try:
        with open(held, "x") as file:
            file.write(f"{host} {os.getpid()}\n")
    except FileExistsError:
        return  # the step run again, by the host that took the rotation over
    release = Path(os.environ["RELEASE_FILE"])
    deadline = time.monotonic() + HOLD_LIMIT
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("nobody released the held step")
        time.sleep(0.05)
