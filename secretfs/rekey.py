"""Master-key rotation: a new version of a master key, the re-encryption that moves the
stored data keys under it, and the retirement of versions nothing uses any more.

`rotate-key` gives a master key (the default key unless named) new material, its next
version; the key id, ARN and aliases stay, and new data keys are wrapped under the new
version at once. `re-encrypt` moves the data keys already stored, each version's and each
access key's, to the newest version of the key they belong under (a version: its
secret's KmsKeyId, so a secret whose KmsKeyId changed moves to that key too): unwrap
under the old, wrap under the new, with the same encryption context. Values are never
decrypted or re-encrypted: only their wrapped data keys change.

The re-encryption runs in the daemon, in a worker thread of its own, a few rows per
store transaction, each row rewritten only if it still holds the wrapped key that was
read (compare-and-swap), so a concurrent write is never undone, and every row holds, at
every instant, a wrapped key that unwraps. Stopped anywhere (a crash, SIGKILL, umount),
it resumes by being run again: rows already moved are told by their wrapped key's
header, without unwrapping anything.

`rotate-key --retire-unused` drops the old versions' material from the key file, and
refuses while any stored data key still names one of them. The check and the drop happen
inside one store write transaction, which every write (and so every wrap of a data key
that gets stored) waits for. Retiring is never automatic at the end of a re-encryption:
it can't be undone, and in a fleet each host must first have been given the new key file
(until then, another host still wraps under the version it knows).

KMS rotates its keys itself, behind the same key id: with the KMS provider, `rotate-key`
says so, and `re-encrypt` only moves data keys to a secret's new KmsKeyId.

The verbs: `rotate-key`, `re-encrypt` (a progress bar on a terminal, progress lines
otherwise, polling the extension action GetReEncryptStatus; `--no-wait` only starts it).
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from secretfs.access_keys import wrapping_context
from secretfs.crypto import KeyProvider, RotatingKeyProvider
from secretfs.crypto.envelope import encryption_context
from secretfs.model import InvalidRequestException, SecretsManagerError

log = logging.getLogger("secretfs")

# Rows per transaction: each one holds the store's write lock for a few rows' worth of
# compare-and-swap updates (the unwrapping and wrapping happen before, outside it).
BATCH_ROWS = 16
# Rows per page when the retire check reads every data key of a key.
_SCAN_ROWS = 1000
_FAILURES_SHOWN = 20
POLL_INTERVAL = 0.5

RUNNING, COMPLETE, STOPPED, FAILED = "Running", "Complete", "Stopped", "Failed"


def _kms_rotates(key_ref: str | None) -> InvalidRequestException:
    what = f"KMS key {key_ref}" if key_ref else "The default KMS key"
    return InvalidRequestException(
        f"{what} is rotated by AWS KMS itself (automatic key rotation, behind the same key "
        "id); secretfs holds no key material to rotate.")


class Rekeying:
    """Rotation of master keys, and the daemon's one re-encryption job at a time.

    `on_moved` hears the ids of secrets whose versions moved to another master key (the
    service refreshes what it shows of them)."""

    def __init__(self, store, keys: KeyProvider, *,
                 on_moved: Callable[[set[int]], None] = lambda ids: None):
        self.store = store
        self.keys = keys
        self._on_moved = on_moved
        self._lock = threading.Lock()  # the job and its progress
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._progress: dict | None = None

    # --- rotate and retire ------------------------------------------------------------

    def rotate(self, key_ref: str | None) -> dict:
        if not isinstance(self.keys, RotatingKeyProvider):
            raise _kms_rotates(key_ref)
        described = self.keys.rotate_key(self.keys.resolve(key_ref))
        log.info("master key %s rotated: version %d wraps new data keys",
                 described["KeyId"], described["KeyVersion"])
        # Other hosts of a fleet wrap and unwrap with their own copy of the key file.
        return {**described, "SharedStore": bool(getattr(self.store, "shared", False))}

    def retire(self, key_ref: str | None) -> dict:
        """Drop the old versions of a key once no stored data key is wrapped under them."""
        keys = self.keys
        if not isinstance(keys, RotatingKeyProvider):
            raise _kms_rotates(key_ref)
        key_id = keys.resolve(key_ref)
        # In the write transaction: a data key wrapped under an old version and stored
        # after the check would be one nothing could unwrap any more.
        with self.store.write() as writer:
            current = keys.key_version(key_id)
            in_use = collections.Counter(
                keys.wrapped_version(key_id, wrapped)
                for owner, wrapped in _wrapped_keys(writer, _SCAN_ROWS) if owner == key_id)
            old = {version: count for version, count in in_use.items() if version != current}
            if old:
                versions = ", ".join(str(v) for v in sorted(old, key=lambda v: v or 0))
                raise InvalidRequestException(
                    f"{sum(old.values())} stored data keys are still wrapped under version(s) "
                    f"{versions} of KMS key {key_id}: run 'secretfs re-encrypt' first.")
            retired = keys.retire_old_versions(key_id)
        if retired:
            log.info("master key %s: version(s) %s retired", key_id,
                     ", ".join(map(str, retired)))
        return {"KeyId": key_id, "Arn": keys.key_arn(key_id), "KeyVersion": current,
                "RetiredKeyVersions": retired}

    # --- re-encrypt --------------------------------------------------------------------

    def start(self, key_ref: str | None) -> dict:
        """Start re-encrypting (every key's data keys, or one key's), or, if that job
        is running already, answer its progress."""
        scope = None if key_ref is None else self.keys.resolve(key_ref)
        with self._lock:
            if self._progress is not None and self._progress["State"] == RUNNING:
                running = self._progress["KeyId"]
                if running != scope:
                    raise InvalidRequestException(
                        f"A re-encryption of {_scope(running)} is running; wait until it "
                        "ends ('secretfs re-encrypt' follows it).")
                return _answer(self._progress)
            with self.store.read() as reader:
                total = reader.wrapped_key_count()
            self._progress = {"State": RUNNING, "KeyId": scope, "DataKeys": total,
                              "Examined": 0, "Moved": 0, "Failed": 0, "Failures": [],
                              "StartedDate": _now(), "EndedDate": None}
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(scope,),
                                            name="secretfs-re-encrypt", daemon=True)
            self._thread.start()
            log.info("re-encrypting the data keys of %s", _scope(scope))
            return _answer(self._progress)

    def status(self) -> dict:
        with self._lock:
            if self._progress is None:
                return {"State": "NotStarted"}
            return _answer(self._progress)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a running job after its current batch (at daemon shutdown)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self, scope: str | None) -> None:
        tally: collections.Counter = collections.Counter()
        try:
            finished = self._walk(scope, tally)
        except Exception as error:
            log.exception("re-encryption failed; run it again to resume")
            self._end(FAILED, tally, error=" ".join(str(error).split()))
            return
        self._end(COMPLETE if finished else STOPPED, tally)

    def _end(self, state: str, tally: collections.Counter, error: str | None = None) -> None:
        with self._lock:
            progress = self._progress
            progress.update(State=state, EndedDate=_now(), KeyVersions=[
                {"KeyId": key_id, "KeyVersion": version, "DataKeys": count}
                for (key_id, version), count in sorted(
                    tally.items(), key=lambda item: (item[0][0], item[0][1] or 0))])
            if error is not None:
                progress["Error"] = error
            if state == COMPLETE:
                progress["RetirableKeyVersions"] = self._retirable(progress["KeyId"], tally)
        log.info("re-encryption %s: %d data keys examined, %d moved, %d failed",
                 state.lower(), progress["Examined"], progress["Moved"], progress["Failed"])

    def _retirable(self, scope: str | None, tally: collections.Counter) -> list[dict]:
        """Old versions still in the key file that no data key examined names."""
        keys = self.keys
        if not isinstance(keys, RotatingKeyProvider):
            return []
        found = []
        for described in keys.list_keys():
            if scope not in (None, described["KeyId"]):
                continue
            unused = [version for version in described["PreviousKeyVersions"]
                      if not tally[(described["KeyId"], version)]]
            if unused:
                found.append({"KeyId": described["KeyId"], "KeyVersions": unused})
        return found

    def _walk(self, scope: str | None, tally: collections.Counter) -> bool:
        """Move every row in scope; False if stopped first."""
        targets = _Targets(self.keys)
        after_version: tuple[int, str] | None = None
        while not self._stop.is_set():
            with self.store.read() as reader:
                rows = reader.wrapped_versions(after_version, BATCH_ROWS)
            if not rows:
                break
            after_version = rows[-1][:2]
            self._batch([_Row(secret_id, version_id, key_id, wrapped,
                              encryption_context(arn, version_id), targets.of(kms_key_id),
                              f"secret {arn} version {version_id}")
                         for secret_id, version_id, arn, kms_key_id, key_id, wrapped in rows],
                        scope, tally)
        after_key: str | None = None
        while not self._stop.is_set():
            with self.store.read() as reader:
                rows = reader.wrapped_access_keys(after_key, BATCH_ROWS)
            if not rows:
                return True
            after_key = rows[-1][0]
            self._batch([_Row(None, access_key_id, key_id, wrapped,
                              wrapping_context(access_key_id), targets.of(None),
                              f"access key {access_key_id}")
                         for access_key_id, key_id, wrapped in rows], scope, tally)
        return False

    def _batch(self, rows: list[_Row], scope: str | None,
               tally: collections.Counter) -> None:
        moves, failures = [], []
        for row in rows:
            if scope is not None and scope not in (row.key_id, row.target):
                continue
            try:
                if isinstance(row.target, SecretsManagerError):
                    raise row.target
                if self._current(row.key_id, row.wrapped, row.target):
                    tally[(row.key_id, self._version(row.key_id, row.wrapped))] += 1
                    continue
                moves.append((row, self._rewrap(row)))
            except SecretsManagerError as error:
                tally[(row.key_id, self._version(row.key_id, row.wrapped))] += 1
                failures.append(f"{row.what}: {' '.join(str(error.message).split())}")
        moved, rekeyed = 0, set()
        if moves:
            with self.store.write() as writer:
                for row, wrapped in moves:
                    if row.secret_id is None:
                        done = writer.rewrap_access_key(row.version_id, row.wrapped, wrapped,
                                                        row.target)
                    else:
                        done = writer.rewrap_version(row.secret_id, row.version_id,
                                                     row.wrapped, wrapped, row.target)
                    if done:
                        moved += 1
                        tally[(row.target, self._version(row.target, wrapped))] += 1
                        if row.secret_id is not None and row.key_id != row.target:
                            rekeyed.add(row.secret_id)
        if rekeyed:
            self._on_moved(rekeyed)
        with self._lock:
            progress = self._progress
            progress["Examined"] += len(rows)
            progress["Moved"] += moved
            progress["Failed"] += len(failures)
            room = _FAILURES_SHOWN - len(progress["Failures"])
            progress["Failures"] += failures[:max(room, 0)]

    def _current(self, key_id: str, wrapped: bytes, target: str) -> bool:
        if key_id != target:
            return False
        keys = self.keys
        return not isinstance(keys, RotatingKeyProvider) or \
            keys.wrapped_version(key_id, wrapped) == keys.key_version(key_id)

    def _version(self, key_id: str, wrapped: bytes) -> int | None:
        keys = self.keys
        return keys.wrapped_version(key_id, wrapped) \
            if isinstance(keys, RotatingKeyProvider) else None

    def _rewrap(self, row: _Row) -> bytes:
        data_key = self.keys.unwrap(row.key_id, row.wrapped, row.context)
        try:
            return self.keys.wrap(row.target, data_key, row.context)
        finally:
            if isinstance(data_key, bytearray):
                data_key[:] = bytes(len(data_key))


@dataclass(frozen=True, slots=True)
class _Row:
    """One stored data key as the walk sees it: where it is, what it is bound to, and the
    key it belongs under (or why that key can't be named)."""

    secret_id: int | None  # None: an access key's
    version_id: str  # the version id, or the access key id
    key_id: str
    wrapped: bytes = field(repr=False)
    context: dict[str, str]
    target: str | SecretsManagerError
    what: str  # how messages name it


class _Targets:
    """The key id a KmsKeyId (None: the default key) resolves to, asked once per job (a
    KMS provider asks KMS); a reference that no longer resolves gives its error."""

    def __init__(self, keys: KeyProvider):
        self._keys = keys
        self._found: dict[str | None, str | SecretsManagerError] = {}

    def of(self, key_ref: str | None):
        if key_ref not in self._found:
            try:
                self._found[key_ref] = self._keys.resolve(key_ref)
            except SecretsManagerError as error:
                self._found[key_ref] = error
        return self._found[key_ref]


def _wrapped_keys(reader, page: int) -> Iterator[tuple[str, bytes]]:
    """(key id, wrapped key) of every stored data key, a page at a time."""
    after_version = None
    while rows := reader.wrapped_versions(after_version, page):
        after_version = rows[-1][:2]
        yield from ((row[4], row[5]) for row in rows)
    after_key = None
    while rows := reader.wrapped_access_keys(after_key, page):
        after_key = rows[-1][0]
        yield from ((key_id, wrapped) for _, key_id, wrapped in rows)


def _answer(progress: dict) -> dict:
    """A copy of the progress for an answer: without the members that have no value
    (no KeyId: every key's; no EndedDate: still running)."""
    return {name: list(item) if isinstance(item, list) else item
            for name, item in progress.items() if item is not None}


def _scope(key_id: str | None) -> str:
    return "every master key" if key_id is None else f"KMS key {key_id}"


def _now() -> float:
    return datetime.now(UTC).timestamp()


# --- the command line ---------------------------------------------------------------

def add_parsers(verbs, add_state_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    from secretfs.operate import _add_output

    key_help = ("The master key: its id, ARN, alias or alias ARN (default: the default "
                "key, alias/aws/secretsmanager).")
    sub = verbs.add_parser(
        "rotate-key", allow_abbrev=False,
        help="Give a master key new material; new data keys are wrapped under it at once.",
        description="Make a new version of a master key (new material; its id, ARN and "
                    "aliases stay): every data key wrapped from now on uses it, and older "
                    "versions keep unwrapping what they wrapped. Then 'secretfs "
                    "re-encrypt' moves the stored data keys to it, and 'secretfs rotate-key "
                    "--retire-unused' drops the old versions from the key file.")
    sub.add_argument("--key-id", metavar="KEY", help=key_help)
    sub.add_argument("--retire-unused", action="store_true",
                     help="Instead of rotating, drop the key's old versions from the key "
                          "file; refused while any stored data key is wrapped under one.")
    _add_output(sub, add_state_dir)
    sub.set_defaults(run=_run_rotate_key)

    sub = verbs.add_parser(
        "re-encrypt", allow_abbrev=False,
        help="Move every stored data key to the newest version of its master key.",
        description="Have the daemon re-wrap the data key of every secret version and "
                    "access key under the newest version of the master key it belongs "
                    "under (the secret's KmsKeyId, or the default key). Values are not "
                    "decrypted. Runs in the daemon a few rows at a time and can be "
                    "interrupted: run it again to resume. Shows its progress until it "
                    "ends.")
    sub.add_argument("--key-id", metavar="KEY",
                     help="Only the data keys under this master key, or that belong under "
                          "it (default: every key's).")
    sub.add_argument("--no-wait", action="store_true",
                     help="Start it and return; 'secretfs re-encrypt' follows it later.")
    _add_output(sub, add_state_dir)
    sub.set_defaults(run=_run_re_encrypt)


def _key_params(args: argparse.Namespace) -> dict:
    return {} if args.key_id is None else {"KeyId": args.key_id}


def _run_rotate_key(args: argparse.Namespace) -> int:
    from secretfs.operate import _asking

    action = "RetireKeyVersions" if args.retire_unused else "RotateKey"
    return _asking(action)(_rotate_key)(args)


def _rotate_key(args: argparse.Namespace) -> int:
    from secretfs.cli import EXIT_OK
    from secretfs.operate import _ask, _json

    if args.retire_unused:
        result = _ask(args, "RetireKeyVersions", _key_params(args))
        if args.output == "json":
            sys.stdout.write(_json(result))
        elif result["RetiredKeyVersions"]:
            print(f"KMS key {result['KeyId']}: version(s) "
                  f"{', '.join(map(str, result['RetiredKeyVersions']))} retired, their "
                  f"material is gone from the key file; version {result['KeyVersion']} "
                  "remains")
        else:
            print(f"KMS key {result['KeyId']}: no old version to retire (version "
                  f"{result['KeyVersion']} is its only one)")
        return EXIT_OK
    result = _ask(args, "RotateKey", _key_params(args))
    if args.output == "json":
        sys.stdout.write(_json(result))
        return EXIT_OK
    aliases = f" ({', '.join(result['Aliases'])})" if result["Aliases"] else ""
    previous = ", ".join(map(str, result["PreviousKeyVersions"]))
    print(f"KMS key {result['KeyId']}{aliases}: version {result['KeyVersion']} wraps new data "
          f"keys from now on; 'secretfs re-encrypt' moves those under version(s) {previous}")
    if result.get("SharedStore"):
        print("this store is shared: copy keys.json to every other host of the fleet and "
              "restart its daemon, which can't read what this one wraps until then")
    return EXIT_OK


def _run_re_encrypt(args: argparse.Namespace) -> int:
    from secretfs.cli import EXIT_INTERRUPTED
    from secretfs.operate import _asking

    try:
        return _asking("ReEncrypt")(_re_encrypt)(args)
    except KeyboardInterrupt:
        print("\nsecretfs re-encrypt: stopped watching; the re-encryption goes on in the "
              "daemon ('secretfs re-encrypt' follows it again)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _re_encrypt(args: argparse.Namespace) -> int:
    from secretfs.cli import EXIT_FAILURE, EXIT_OK
    from secretfs.operate import _ask, _json

    progress = _ask(args, "ReEncrypt", _key_params(args))
    if args.no_wait:
        if args.output == "json":
            sys.stdout.write(_json(progress))
        else:
            print(f"re-encrypting {_scope(progress.get('KeyId'))} in the daemon: "
                  f"{progress['DataKeys']} data keys to examine; 'secretfs re-encrypt' "
                  "follows it")
        return EXIT_OK
    show = _Progress(sys.stderr)
    while progress["State"] == RUNNING:
        show(progress)
        time.sleep(POLL_INTERVAL)
        progress = _ask(args, "GetReEncryptStatus", {})
    show.done(progress)
    if args.output == "json":
        sys.stdout.write(_json(progress))
    else:
        sys.stdout.write("".join(line + "\n" for line in summary_lines(progress)))
    return EXIT_OK if progress["State"] == COMPLETE and not progress["Failed"] \
        else EXIT_FAILURE


def summary_lines(progress: dict) -> list[str]:
    state = progress["State"]
    lines = [f"re-encryption of {_scope(progress.get('KeyId'))}: {state.lower()}: "
             f"{progress['Examined']} of {progress['DataKeys']} data keys examined, "
             f"{progress['Moved']} moved, {progress['Failed']} failed"]
    if progress.get("Error"):
        lines.append(f"error: {progress['Error']}")
    lines += [f"failed: {failure}" for failure in progress["Failures"]]
    if progress["Failed"] > len(progress["Failures"]):
        lines.append(f"(and {progress['Failed'] - len(progress['Failures'])} more failures; "
                     "see the daemon's log)")
    if state in (STOPPED, FAILED):
        lines.append("run 'secretfs re-encrypt' again to resume")
    for found in progress.get("RetirableKeyVersions", []):
        lines.append(f"KMS key {found['KeyId']}: version(s) "
                     f"{', '.join(map(str, found['KeyVersions']))} no longer used; "
                     f"'secretfs rotate-key --retire-unused --key-id {found['KeyId']}' "
                     "drops them")
    return lines


class _Progress:
    """A bar redrawn in place on a terminal; elsewhere a line whenever it moved."""

    WIDTH = 30

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.shown: tuple | None = None

    def __call__(self, progress: dict) -> None:
        done, total = progress["Examined"], progress["DataKeys"]
        if (done, progress["Moved"]) == self.shown:
            return
        self.shown = (done, progress["Moved"])
        text = f"{done}/{total} data keys examined, {progress['Moved']} moved" + (
            f", {progress['Failed']} failed" if progress["Failed"] else "")
        if self.tty:
            filled = self.WIDTH * min(done, total) // max(total, 1)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.out.write(f"\r[{bar}] {100 * min(done, total) // max(total, 1):3d}%  {text}")
        else:
            self.out.write(f"re-encrypt: {text}\n")
        self.out.flush()

    def done(self, progress: dict) -> None:
        self(progress)
        if self.tty and self.shown is not None:
            self.out.write("\n")
            self.out.flush()
