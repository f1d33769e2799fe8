"""Backups of a state directory, and restoring one into a new state directory.

A backup is one tar file, left uncompressed because nothing in it is plaintext (and so
that `grep` on it can prove as much):

- `manifest.json`: the format, when and from which state directory, that state's
  config.json (its region and account id are part of every ARN, and each value's
  ciphertext is bound to its ARN), the store snapshot's SHA-256 and counts, and the
  key file sealed under a passphrase.
- `secrets.db`: a snapshot of the SQLite store, made with SQLite's online backup API
  in one step, that is in one read transaction: consistent while the daemon keeps
  writing (in WAL mode a reader doesn't block the writer). Values stay as the store
  keeps them, envelope-encrypted under the master keys.

The master keys (keys.json) go in only sealed: AES-256-GCM under a key derived with
scrypt from the operator's passphrase, with the rest of the manifest (the snapshot's
hash included) as associated data, so the passphrase also authenticates the whole
backup. A passphrase rather than the master key itself, because a backup must open
on a host that has lost everything, and because keys.json may hold several master
keys (`create-key`). A key file already sealed by the systemd credential (see
crypto/local.py) is carried as it is: the restored daemon then needs that credential.

Not in a backup: the audit log (the old host's history, with a hash chain of its own:
archive audit/ as it is), the HTTPS endpoint's CA and server key (a restore makes a
new CA, as `init` does), the daemon's log and socket.

A restore checks everything (format, passphrase, hash, SQLite's integrity check) before
it writes; it builds the state in a directory beside the target and renames it into
place. It refuses a directory that isn't empty unless forced, and always one that a
daemon is serving.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secretfs.crypto.envelope import encode_fields
from secretfs.crypto.local import sealed_by_credential
from secretfs.crypto.passphrase import (
    SCRYPT,
    PassphraseError,
    derive_key,
    new_kdf,
    read_passphrase,
)
from secretfs.files import fsync_directory
from secretfs.state import StateDir

FORMAT, FORMAT_VERSION = "secretfs-backup", 1
MANIFEST, DATABASE = "manifest.json", "secrets.db"
# scrypt at 128 MiB and about half a second: what one restore costs, and what each
# guess at the passphrase costs an attacker holding the file.
_KDF = SCRYPT
_AAD_TAG = "secretfs/backup/v1"
_NONCE_SIZE = 12
_COPY_CHUNK = 1 << 20
# Snapshots taken again when the key file changed meanwhile (see create_backup).
_KEY_FILE_ATTEMPTS = 3


class BackupError(Exception):
    """A backup can't be made or restored; str() is one line, and nothing was changed."""


# --- backup -------------------------------------------------------------------------

def create_backup(state_dir: Path, out: Path, passphrase: bytes) -> dict:
    """Write a backup of `state_dir` to `out` (a new file, 0600); its summary."""
    state, out = StateDir(Path(state_dir)), Path(out)
    try:
        config = state.read_config()
    except (FileNotFoundError, ValueError) as error:
        raise BackupError(str(error)) from None
    if out.exists():
        raise BackupError(f"{out} already exists")
    work = Path(tempfile.mkdtemp(prefix=".secretfs-backup-", dir=out.parent))
    try:
        snapshot = work / DATABASE
        # The key file must hold every key version the snapshot's data keys name: one
        # read before the snapshot and found unchanged after it does. A change between
        # (a rotate-key adds a version, a retire drops one) takes the snapshot again.
        for _ in range(_KEY_FILE_ATTEMPTS):
            keys = _read(state.keys)
            counts = _snapshot(_sqlite_database(state, config), snapshot)
            if _read(state.keys) == keys:
                break
            snapshot.unlink()
        else:
            raise BackupError(f"{state.keys} kept changing during the backup (master keys "
                              "being rotated?): run it again")
        manifest = {
            "Format": FORMAT, "Version": FORMAT_VERSION,
            "Created": datetime.now(UTC).isoformat(), "StateDir": str(state.root),
            "Config": config,
            "Database": {"Name": DATABASE, "Sha256": _sha256(snapshot), **counts},
            "KeysSealedByCredential": _sealed_by_credential(keys),
        }
        manifest["Keys"] = _seal_keys(keys, passphrase, manifest)
        _write_archive(out, manifest, snapshot)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _sqlite_database(state: StateDir, config: dict) -> Path:
    """The SQLite file config.json names (StoreUrl), else the state directory's."""
    url = config.get("StoreUrl")
    if config.get("Store", "sqlite") != "sqlite" or (url and not url.startswith("sqlite://")):
        raise BackupError(f"{state.root} keeps its secrets in {config.get('Store')}: back "
                          "that database up with its own tools (values there are encrypted "
                          "too); this backs up SQLite stores")
    return Path(url.removeprefix("sqlite://")) if url else state.database


def _snapshot(database: Path, target: Path) -> dict:
    """Copy the live store with SQLite's backup API, then make the copy one
    self-contained file (no WAL) and check it."""
    try:
        source = sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise BackupError(f"{database}: {error}") from None
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)  # pages=-1: the whole store in one step
            copy.execute("PRAGMA journal_mode=DELETE")
            _check_integrity(copy, database)
            secrets, versions = copy.execute(
                "SELECT (SELECT count(*) FROM secrets), (SELECT count(*) FROM versions)"
            ).fetchone()
        finally:
            copy.close()
    except sqlite3.Error as error:
        raise BackupError(f"{database}: {error}") from None
    finally:
        source.close()
    return {"Secrets": secrets, "Versions": versions}


def _check_integrity(connection: sqlite3.Connection, where: Path) -> None:
    verdict = connection.execute("PRAGMA integrity_check").fetchone()[0]
    if verdict != "ok":
        raise BackupError(f"{where}: SQLite's integrity check fails: {verdict}")


def _sealed_by_credential(keys: bytes) -> bool:
    try:
        return sealed_by_credential(keys)
    except ValueError:
        raise BackupError("keys.json is not a key file (not a JSON object)") from None


def _associated_data(manifest: dict) -> bytes:
    rest = {key: value for key, value in manifest.items() if key != "Keys"}
    return encode_fields(_AAD_TAG, json.dumps(rest, sort_keys=True, separators=(",", ":")))


def _derive(passphrase: bytes, kdf: object) -> AESGCM:
    try:
        return AESGCM(derive_key(passphrase, kdf))
    except PassphraseError as error:
        raise BackupError(f"the backup's sealed keys: {error}") from None


def _seal_keys(keys: bytes, passphrase: bytes, manifest: dict) -> dict:
    kdf, nonce = new_kdf(_KDF), os.urandom(_NONCE_SIZE)
    sealed = _derive(passphrase, kdf).encrypt(nonce, keys, _associated_data(manifest))
    return {"Kdf": kdf, "Nonce": _b64(nonce), "Ciphertext": _b64(sealed)}


def _write_archive(out: Path, manifest: dict, snapshot: Path) -> None:
    """Write beside `out`, then link into place: `out` appears whole or not at all, and
    a file created there meanwhile is not overwritten."""
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as archive:
                body = (json.dumps(manifest, indent=2) + "\n").encode()
                archive.addfile(_member(MANIFEST, len(body)), io.BytesIO(body))
                with open(snapshot, "rb") as data:
                    archive.addfile(_member(DATABASE, snapshot.stat().st_size), data)
            file.flush()
            os.fsync(file.fileno())
        os.link(partial, out)
    except FileExistsError:
        raise BackupError(f"{out} already exists") from None
    finally:
        partial.unlink(missing_ok=True)
    fsync_directory(out.parent)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    return info


# --- restore ------------------------------------------------------------------------

def restore_backup(backup: Path, state_dir: Path, passphrase: bytes, *, force: bool = False,
                   tls_hostnames: tuple[str, ...] = ()) -> dict:
    """Make `state_dir` the state the backup holds; the backup's manifest."""
    from secretfs import tls

    target = StateDir(Path(state_dir))
    try:
        tls.subject_alternative_names(tls_hostnames)
    except ValueError as error:
        raise BackupError(f"invalid TLS host name: {error}") from None
    _check_target(target, force=force)
    target.root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.root.name}.restore-",
                                    dir=target.root.parent))
    try:
        manifest, keys = _open_backup(Path(backup), passphrase, staging / DATABASE)
        _write_new(staging / "keys.json", keys)
        # The restored store is the state directory's own file, wherever it was before.
        config = {key: value for key, value in manifest["Config"].items() if key != "StoreUrl"}
        StateDir(staging).write_config(config)
        if not target.root.exists():
            tls.create_authority(staging / "tls", hostnames=tls_hostnames)
            os.rename(staging, target.root)
            fsync_directory(target.root.parent)
        else:
            with _daemon_lock(target):
                _check_target(target, force=force)
                _replace_state(target, staging, tls_hostnames)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _check_target(state: StateDir, *, force: bool) -> None:
    root = state.root
    if not root.exists():
        return
    if not root.is_dir():
        raise BackupError(f"{root} is not a directory")
    if all(entry.name == state.lock.name for entry in root.iterdir()):
        return  # empty, but for the lock taken to restore into it
    if not state.exists():
        raise BackupError(f"{root} is not empty and not a secretfs state directory: "
                          "restore into a new --state-dir")
    if not force:
        raise BackupError(f"{root} already holds a secretfs state: restore into a new "
                          "--state-dir, or stop its daemon and add --force to replace its "
                          "secrets, keys and config")


@contextlib.contextmanager
def _daemon_lock(state: StateDir) -> Iterator[None]:
    """The lock a running daemon holds on its state directory: held while files are
    replaced, so no daemon serves (or starts on) a half-restored state."""
    handle = open(state.lock, "a+")  # noqa: SIM115 - closed below, after the restore
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"a secretfs daemon is serving {state.root}: stop it "
                              "('secretfs umount') before restoring into it") from None
        yield
    finally:
        handle.close()


def _replace_state(target: StateDir, staging: Path, tls_hostnames: tuple[str, ...]) -> None:
    from secretfs import tls

    # A WAL left beside the old store would be replayed into the new one.
    for leftover in ("secrets.db-wal", "secrets.db-shm", "secrets.db-journal"):
        (target.root / leftover).unlink(missing_ok=True)
    os.replace(staging / DATABASE, target.database)
    os.replace(staging / "keys.json", target.keys)
    os.replace(staging / "config.json", target.config)  # last: it marks a state directory
    if not target.tls_dir.exists():
        tls.create_authority(target.tls_dir, hostnames=tls_hostnames)
    os.chmod(target.root, 0o700)
    fsync_directory(target.root)


def _open_backup(path: Path, passphrase: bytes, database: Path) -> tuple[dict, bytes]:
    """The manifest and the key file, with the store snapshot written to `database`;
    BackupError unless the backup is whole and the passphrase opens it."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            manifest = json.loads(_member_bytes(archive, MANIFEST))
            if not isinstance(manifest, dict) or manifest.get("Format") != FORMAT:
                raise BackupError(f"{path}: not a secretfs backup")
            if manifest.get("Version") != FORMAT_VERSION:
                raise BackupError(f"{path}: backup format version {manifest.get('Version')} "
                                  f"(this secretfs reads version {FORMAT_VERSION})")
            digest = _extract(archive, DATABASE, database)
    except (OSError, tarfile.TarError, ValueError, KeyError) as error:
        raise BackupError(f"{path}: not a readable secretfs backup "
                          f"({_one_line(error)})") from None
    keys = _open_keys(manifest, passphrase, path)
    if digest != manifest["Database"]["Sha256"]:
        raise BackupError(f"{path}: the store in it doesn't match its manifest (damaged?)")
    try:
        with contextlib.closing(sqlite3.connect(database)) as connection:
            _check_integrity(connection, path)
    except sqlite3.Error as error:
        raise BackupError(f"{path}: its store doesn't open: {error}") from None
    return manifest, keys


def _member_bytes(archive: tarfile.TarFile, name: str) -> bytes:
    stream = archive.extractfile(archive.getmember(name))
    if stream is None:
        raise BackupError(f"{archive.name}: {name} is not a file")
    return stream.read()


def _extract(archive: tarfile.TarFile, name: str, target: Path) -> str:
    """Copy one member (never extractall: a member's name decides nothing here)."""
    stream = archive.extractfile(archive.getmember(name))
    if stream is None:
        raise BackupError(f"{archive.name}: {name} is not a file")
    digest = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        while chunk := stream.read(_COPY_CHUNK):
            digest.update(chunk)
            file.write(chunk)
        file.flush()
        os.fsync(file.fileno())
    return digest.hexdigest()


def _open_keys(manifest: dict, passphrase: bytes, path: Path) -> bytes:
    try:
        sealed = manifest["Keys"]
        kdf = sealed["Kdf"]
        aead = _derive(passphrase, kdf)
        return aead.decrypt(base64.b64decode(sealed["Nonce"]),
                            base64.b64decode(sealed["Ciphertext"]),
                            _associated_data(manifest))
    except InvalidTag:
        raise BackupError(f"{path}: wrong passphrase, or the backup was altered") from None
    except (KeyError, TypeError, ValueError):
        raise BackupError(f"{path}: its sealed keys are malformed") from None


# --- files --------------------------------------------------------------------------

def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise BackupError(f"{path}: {error.strerror or error}") from None


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --- the command line ---------------------------------------------------------------

def add_parsers(verbs, add_state_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    passphrase_help = ("Read the passphrase from this file's first line ('-': stdin); "
                       "without it, it is asked on the terminal.")
    sub = verbs.add_parser(
        "backup", allow_abbrev=False,
        help="Write a consistent backup of the state (values stay encrypted).",
        description="Snapshot the store while the daemon runs, with the master keys "
                    "sealed under a passphrase; restore needs the file and the passphrase.")
    sub.add_argument("out", type=Path, metavar="OUT", help="The backup file to create.")
    sub.add_argument("--passphrase-file", metavar="FILE", help=passphrase_help)
    add_state_dir(sub)
    sub.set_defaults(run=_run_backup)

    sub = verbs.add_parser(
        "restore", allow_abbrev=False,
        help="Restore a backup into a new (or, with --force, a stopped) state directory.",
        description="Recreate a state directory from a backup: store, keys and config, "
                    "and a new local CA for the HTTPS endpoint.")
    sub.add_argument("backup", type=Path, metavar="BACKUP")
    sub.add_argument("--passphrase-file", metavar="FILE", help=passphrase_help)
    sub.add_argument("--force", action="store_true",
                     help="Replace the store, keys and config of an existing state "
                          "directory whose daemon is stopped.")
    sub.add_argument("--tls-hostname", action="append", default=[], metavar="NAME",
                     dest="tls_hostnames",
                     help="Another name for the new HTTPS certificate (as for init).")
    add_state_dir(sub)
    sub.set_defaults(run=_run_restore)


def _passphrase(args: argparse.Namespace, *, confirm: bool) -> bytes:
    try:
        return read_passphrase(args.passphrase_file, prompt="Backup passphrase: ",
                               confirm=confirm)
    except PassphraseError as error:
        raise BackupError(str(error)) from None


def _run_backup(args: argparse.Namespace) -> int:
    from secretfs.cli import EXIT_FAILURE, EXIT_OK
    from secretfs.migrate import fail
    from secretfs.state import resolve_state_dir

    state_dir = resolve_state_dir(args.state_dir)
    try:
        manifest = create_backup(state_dir, args.out, _passphrase(args, confirm=True))
    except BackupError as error:
        return fail(str(error), EXIT_FAILURE)
    counts = manifest["Database"]
    print(f"backup of {state_dir} written to {args.out}: {counts['Secrets']} secrets, "
          f"{counts['Versions']} versions; its master keys are sealed under the passphrase, "
          "which restore needs")
    return EXIT_OK


def _run_restore(args: argparse.Namespace) -> int:
    from secretfs.cli import EXIT_FAILURE, EXIT_OK
    from secretfs.migrate import fail
    from secretfs.state import resolve_state_dir

    state_dir = resolve_state_dir(args.state_dir)
    try:
        manifest = restore_backup(args.backup, state_dir, _passphrase(args, confirm=False),
                                  force=args.force, tls_hostnames=tuple(args.tls_hostnames))
    except BackupError as error:
        return fail(str(error), EXIT_FAILURE)
    counts = manifest["Database"]
    credential = (" (its keys need the systemd credential secretfs-master-key)"
                  if manifest.get("KeysSealedByCredential") else
                  " (its keys need the key file's passphrase, as before)"
                  if manifest["Config"].get("KeyProvider") == "passphrase" else "")
    print(f"restored {counts['Secrets']} secrets ({counts['Versions']} versions) from "
          f"{args.backup} into {state_dir}{credential}; start it with 'secretfs mount'")
    return EXIT_OK
