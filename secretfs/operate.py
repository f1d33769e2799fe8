"""The verbs that ask a running daemon about itself: `status`, `refresh` and `wait`.

`status` and `refresh` call the extension actions secretfs.GetStatus and
secretfs.Refresh (root's unless a policy says otherwise) and print a short summary,
or the answer as JSON with `--output json`. `wait` polls DescribeSecret until a label
is on another version, for programs that can't watch the mount with inotify; a
long-poll action would hold one of the API's few worker threads per waiter.

Exit codes are the other client verbs': 0, 1 (no daemon), 252 (usage), 254 (an
error answer); `wait` exits 124 when its --timeout passes, as timeout(1) does. Errors
are printed here, as one line, rather than raised as cli.py's: run as `python -m
secretfs.cli`, that module's classes are __main__'s, not secretfs.cli's.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

# Not cli.CommandError: under `python -m secretfs.cli` this module's secretfs.cli is
# a second copy of __main__, whose except clauses would not know its class.
from secretfs.cli import EXIT_FAILURE, EXIT_OK, _one_line, service_error
from secretfs.model import AWSCURRENT, SecretsManagerError
from secretfs.state import StateDir, resolve_state_dir

# timeout(1)'s exit code; the others are cli.py's (the AWS CLI's).
EXIT_TIMEOUT = 124
WAIT_INTERVAL = 1.0


def add_parsers(verbs, add_state_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    sub = verbs.add_parser(
        "status", allow_abbrev=False,
        help="Show the daemon's mount, store, key provider, rotations, audit log and hooks.",
        description="Ask the running daemon how it is: its mount point, pid and uptime, "
                    "the store, the key provider, rotations due and failing, the audit "
                    "log's queue and last write, the HTTPS endpoint and the change hooks.")
    _add_output(sub, add_state_dir)
    sub.set_defaults(run=_run_status)

    sub = verbs.add_parser(
        "refresh", allow_abbrev=False,
        help="Re-read secrets and policies from the store, and the hooks from hooks.d.",
        description="Make the daemon re-read what another process changed in the store "
                    "(every secret, or SECRET alone) and the policies, push each change "
                    "to the kernel as after its own commits, read hooks.d again and "
                    "re-check every hook.")
    sub.add_argument("secret_id", nargs="?", metavar="SECRET",
                     help="Only this secret (a name or ARN).")
    _add_output(sub, add_state_dir)
    sub.set_defaults(run=_run_refresh)

    sub = verbs.add_parser(
        "wait", allow_abbrev=False,
        help="Wait until a staging label moves to another version; print that version.",
        description="Return once the label (AWSCURRENT unless --stage) of SECRET is on "
                    "another version than --version-id (by default, the one it is on "
                    "now), printing the new version id (an empty line if the label was "
                    "removed). Polls DescribeSecret; exits 124 once --timeout passes.")
    sub.add_argument("secret_id", metavar="SECRET", help="The secret's name or ARN.")
    sub.add_argument("--stage", default=AWSCURRENT, help="The label to watch (default: "
                                                         "AWSCURRENT).")
    sub.add_argument("--version-id", help="Wait until the label is on another version than "
                                          "this one (the one you read).")
    sub.add_argument("--timeout", type=_seconds(0.0), metavar="SECONDS",
                     help="Give up after this long, with exit status 124.")
    sub.add_argument("--interval", type=_seconds(0.05), default=WAIT_INTERVAL, metavar="SECONDS",
                     help=f"Poll this often (default: {WAIT_INTERVAL:g}; each poll is one "
                          "DescribeSecret, audited).")
    add_state_dir(sub)
    sub.set_defaults(run=_run_wait)


def _add_output(sub: argparse.ArgumentParser, add_state_dir) -> None:
    add_state_dir(sub)
    sub.add_argument("--output", choices=("text", "json"), default="text",
                     help="A summary for people (default), or the daemon's answer as JSON.")


def _seconds(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not minimum <= value < 1e9:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds from {minimum:g}, got {text!r}")
        return value
    return parse


def _ask(args: argparse.Namespace, action: str, params: dict, *, extension: bool = True
         ) -> dict:
    from secretfs.api.client import Client

    socket = StateDir(resolve_state_dir(args.state_dir)).socket
    return Client(socket).call(action, params, extension=extension)


def _asking(action: str):
    """A verb whose errors are one line: no daemon (1), or an error answer to `action`
    (254)."""
    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def verb(args: argparse.Namespace) -> int:
            from secretfs.api.client import ClientConnectionError

            try:
                return run(args)
            except ClientConnectionError as error:
                print(_one_line(str(error)), file=sys.stderr)
                return EXIT_FAILURE
            except SecretsManagerError as error:
                return service_error(action, error)
        return verb
    return decorate


def _json(response: dict) -> str:
    from secretfs.cli import OutputOptions, format_response

    return format_response(response, OutputOptions())


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, UTC).astimezone().isoformat(timespec="seconds")


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


# --- status ------------------------------------------------------------------------

@_asking("GetStatus")
def _run_status(args: argparse.Namespace) -> int:
    status = _ask(args, "GetStatus", {})
    if args.output == "json":
        sys.stdout.write(_json(status))
    else:
        sys.stdout.write("".join(line + "\n" for line in status_lines(status)))
    return EXIT_OK


def status_lines(status: dict) -> list[str]:
    mount, store, keys = status["Mount"], status["Store"], status["KeyProvider"]
    rotations, audit = status["Rotations"], status["Audit"]
    writable = {True: "READ-ONLY", False: "writable"}.get(store.get("ReadOnly"), "")
    lines = [
        f"mount         {mount['MountPoint']}  pid {mount['Pid']}  up "
        f"{_duration(mount['UptimeSeconds'])}"
        + ("  strict names" if mount["StrictNames"] else "")
        + ("" if mount.get("ExecutablesWatched", True) else "  (reading /proc per open)"),
        f"endpoint      {mount.get('Endpoint') or 'none (Unix socket only)'}",
        f"store         {store['Kind']} {store['Location']}  schema {store['SchemaVersion']}  "
        f"{store['Secrets']} secrets"
        + (f" ({store['ScheduledForDeletion']} scheduled for deletion)"
           if store["ScheduledForDeletion"] else "") + (f"  {writable}" if writable else ""),
        f"key provider  {keys['Kind']}: {keys['Source']} {keys['Path']}  {keys['Keys']} keys",
    ]
    if "Unknown" in rotations:  # the store is unreachable
        lines.append(f"rotations     unknown: {rotations['Unknown']}")
    else:
        lines.append(f"rotations     {rotations['Scheduled']} scheduled  "
                     f"{len(rotations['Due'])} due  {len(rotations['Failing'])} failing  "
                     f"next due {_when(rotations.get('NextDueDate'))}")
        lines += [f"  due         {name}" for name in rotations["Due"]]
        lines += [f"  failing     {failure['Name']}: {failure['Error']} (attempt "
                  f"{failure['Attempts']}, retry {_when(failure.get('RetryDate'))})"
                  for failure in rotations["Failing"]]
    lines.append(f"audit         {audit['Directory']}  {audit['Queued']} queued  last write "
                 f"{_when(audit.get('LastWriteDate'))}  "
                 + ("FAILING: records wait in memory" if audit["Failing"] else "ok"))
    lines.append(f"hooks         {len(status['Hooks'])} configured")
    for hook in status["Hooks"]:
        watched = (f"secret {hook['Secret']}" if "Secret" in hook
                   else f"template {hook['Template']}")
        last = ("never run" if hook.get("LastRunDate") is None else
                f"last run {_when(hook['LastRunDate'])}: "
                + (hook.get("LastError") or "exit 0"))
        lines.append(f"  {hook['Name']}  {watched}  {' '.join(hook['Command'])}  "
                     f"{hook['Runs']} runs, {hook['Failures']} failed, {last}"
                     + ("  (running)" if hook["Running"] else ""))
    lines += [f"  refused     {problem}" for problem in status["HookProblems"]]
    feed = status.get("ChangeFeed")
    if feed is not None:
        lines.append(
            f"change feed   {feed['State']}  last resync {_when(feed.get('LastResyncDate'))}"
            f"  max staleness {feed['MaxStalenessSeconds']:g} s  "
            + (f"STALE since {_when(feed['StaleSinceDate'])}: secret files answer EIO"
               if feed["Stale"] else "current")
            + (f"  ({feed['LastError']})" if feed.get("LastError") else ""))
    return lines


# --- refresh -----------------------------------------------------------------------

@_asking("Refresh")
def _run_refresh(args: argparse.Namespace) -> int:
    params = {} if args.secret_id is None else {"SecretId": args.secret_id}
    result = _ask(args, "Refresh", params)
    if args.output == "json":
        sys.stdout.write(_json(result))
        return EXIT_OK
    what = ("every secret" if result["Refreshed"] == "*" else result["Refreshed"])
    changed = ", ".join(result["Changed"]) or "nothing"
    print(f"refreshed {what} ({result['Secrets']} in all) and the policies; changed: "
          f"{changed}")
    started = f" (new: {', '.join(result['HooksStarted'])})" if result["HooksStarted"] else ""
    print(f"hooks: {result['Hooks']} configured{started}, each re-checked")
    for problem in result["HookProblems"]:
        print(f"hook refused: {problem}")
    return EXIT_OK


# --- wait --------------------------------------------------------------------------

def _version_under(args: argparse.Namespace) -> str | None:
    described = _ask(args, "DescribeSecret", {"SecretId": args.secret_id}, extension=False)
    for version_id, stages in (described.get("VersionIdsToStages") or {}).items():
        if args.stage in stages:
            return version_id
    return None


def _pause(args: argparse.Namespace, deadline: float | None) -> bool:
    """Sleep one interval, or until the deadline; False once the deadline has passed."""
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0:
        return False
    time.sleep(args.interval if left is None else min(args.interval, left))
    return True


@_asking("DescribeSecret")
def _run_wait(args: argparse.Namespace) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    baseline, waiting = args.version_id, True
    if baseline is None:
        baseline = _version_under(args)
        waiting = _pause(args, deadline)
    while waiting:
        current = _version_under(args)
        if current != baseline:
            print(current or "", flush=True)
            return EXIT_OK
        waiting = _pause(args, deadline)
    print(f"secretfs wait: {args.secret_id} {args.stage} is still on "
          f"{baseline or 'no version'} after {args.timeout:g} s", file=sys.stderr)
    return EXIT_TIMEOUT
