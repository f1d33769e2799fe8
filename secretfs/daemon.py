"""The daemon: one trio run holding the FUSE mount, the control socket and housekeeping.

`mount()` without foreground starts the daemon as a detached child and returns
only once the child reports ready (mount and socket up) or fails; with
foreground it serves in this process until unmounted or signalled, which is
what systemd supervises. SIGTERM/SIGINT unmount cleanly; a stale mount left by
a crashed daemon ("Transport endpoint is not connected") is cleared at start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import trio

from secretfs.options import DEFAULT_OPTIONS, MountOptions, OptionsError
from secretfs.state import StateDir

log = logging.getLogger("secretfs")

RUN_DIR = Path("/run/secretfs")
HOUSEKEEPING_INTERVAL = 5.0
# The FUSE handlers answer from memory and await a worker thread only for what memory
# lacks (a first snapshot, a cold value): extra reader tasks would overlap just those
# rare waits, and cost wake-ups on every request (every idle reader wakes on each).
# One task is measurably faster; while it waits, the rest of the trio run (the API,
# the change feed, the audit writer) goes on.
FUSE_READER_TASKS = 1
READY_TIMEOUT = 30.0
MOUNT_OPTIONS = ("fsname=secretfs", "subtype=secretfs", "allow_other", "ro", "nosuid",
                 "nodev", "noexec")


class DaemonError(Exception):
    """The daemon could not start, or a mount could not be undone; one line for the CLI."""


# --- the state directory ---------------------------------------------------------------

KEY_PROVIDERS = ("local", "passphrase", "kms")


def init_state(state_dir: Path, *, region: str, account_id: str,
               tls_hostnames: tuple[str, ...] = (), sealed: bool = False,
               store_url: str | None = None, join: bool = False,
               keys_from: Path | None = None, key_provider: str = "local",
               kms_key_id: str | None = None, kms_endpoint_url: str | None = None,
               kms_region: str | None = None, passphrase: bytes | None = None) -> dict:
    """Create the SQLite store and the local master key file (both 0600, root's), and
    the HTTPS endpoint's local CA and server certificate (also naming `tls_hostnames`).
    `sealed`: the key file never holds the master key; the summary's "MasterKey" is the
    content of the systemd credential the daemon will need (see crypto/local.py).
    `store_url`: another store (see secretfs.store), created first and recorded in
    config.json without its password.
    `join`: another host of a fleet: the store at `store_url` exists already; its region
    and account id are this host's, and the master keys are a copy of the first host's
    key file, `keys_from`.
    `key_provider` "kms": no key file; master keys are AWS KMS keys, `kms_key_id` the
    default one (a joining host may leave it to the store's), reached at
    `kms_endpoint_url` in `kms_region` (else the usual AWS chain's). The key must be
    usable now: nothing is created otherwise.
    `key_provider` "passphrase": the key file's material is sealed under `passphrase`
    (a joining host's copy of the fleet's key file must open with it)."""
    from secretfs import tls
    from secretfs.crypto import LocalKeyProvider
    from secretfs.store import StoreError, create_store, store_kind

    state = StateDir(Path(state_dir))
    if state.exists():
        raise FileExistsError(f"{state.root} is already a secretfs state directory")
    try:
        tls.subject_alternative_names(tls_hostnames)  # refused before anything is created
    except ValueError as error:
        raise DaemonError(f"invalid TLS host name: {error}") from None
    kms = _kms_settings(key_provider, kms_key_id=kms_key_id, endpoint_url=kms_endpoint_url,
                        region=kms_region, sealed=sealed, keys_from=keys_from)
    if (key_provider == "passphrase") != (passphrase is not None):
        raise DaemonError("a passphrase goes with --key-provider passphrase, which needs one")
    if passphrase is not None and sealed:
        raise DaemonError("--master-key-from-credential is for the local key provider: with "
                          "passphrase, the passphrase seals the key file")
    if join and (store_url is None or (keys_from is None and kms is None)):
        raise DaemonError("joining a fleet takes the shared store's URL (--store) and a "
                          "copy of its key file (--keys-from), or --key-provider kms")
    if kms is not None and not join:
        if kms["KmsKeyId"] is None:
            raise DaemonError("--key-provider kms needs --kms-key-id: the KMS key that "
                              "protects secrets by default")
        keys = _kms_provider(kms, region)  # refused before anything is created
    url = store_url or state.store_url({})
    try:
        kind = store_kind(url)
    except StoreError as error:
        raise DaemonError(str(error)) from None
    key_file = _read_key_file(keys_from) if join and kms is None else None
    old_umask = os.umask(0o077)
    try:
        state.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state.root, 0o700)
        store = None
        try:  # first: a store that can't be created leaves nothing to undo
            if join:
                store, recorded_url = _join_store(url, state)
                region = _store_setting(store, "region", region)
                account_id = _store_setting(store, "account_id", account_id)
                _check_fleet_provider(store, key_provider, kms)
            else:
                store, recorded_url = create_store(url, password_file=state.store_password_file)
                with store.write() as writer:
                    writer.set_meta("region", region)
                    writer.set_meta("account_id", account_id)
                    writer.set_meta("key_provider", key_provider)
                    if kms is not None:
                        writer.set_meta("kms_key_id", kms["KmsKeyId"])
        except StoreError as error:
            raise DaemonError(str(error)) from None
        finally:
            if store is not None:
                store.close()
        if kms is not None:
            if join:
                keys = _kms_provider(kms, region)
        elif key_file is None:
            keys = LocalKeyProvider.create(state.keys, region=region, account_id=account_id,
                                           sealed=sealed, passphrase=passphrase)
        else:
            keys = _install_key_file(key_file, state, region=region, account_id=account_id,
                                     passphrase=passphrase)
        tls.create_authority(state.tls_dir, hostnames=tls_hostnames)
        state.write_config({
            "Region": region, "AccountId": account_id, "Store": kind,
            **({"StoreUrl": recorded_url} if store_url else {}),
            "KeyProvider": key_provider, **({k: v for k, v in kms.items() if v} if kms else {}),
            "Created": datetime.now(UTC).isoformat(),
        })
    finally:
        os.umask(old_umask)
    return {"StateDir": str(state.root), "Region": region, "AccountId": account_id,
            "Store": recorded_url if store_url else str(state.database),
            "KeyProvider": key_provider,
            **({"KeyFile": str(state.keys)} if kms is None else {}),
            **({"DefaultKey": keys.key_arn(keys.resolve(None))} if keys is not None else {}),
            "CaBundle": str(state.ca_certificate),
            "ServerCertificate": str(state.server_certificate),
            **({"MasterKey": keys.master_key()} if sealed else {})}


def _kms_settings(key_provider: str, *, kms_key_id: str | None, endpoint_url: str | None,
                  region: str | None, sealed: bool, keys_from: Path | None) -> dict | None:
    """config.json's KMS settings for `init`, None for the local provider; refuses flags
    that belong to the other provider."""
    if key_provider not in KEY_PROVIDERS:
        raise DaemonError(f"unknown key provider {key_provider!r}: choose "
                          f"{' or '.join(KEY_PROVIDERS)}")
    if key_provider != "kms":
        if kms_key_id or endpoint_url or region:
            raise DaemonError("--kms-key-id, --kms-endpoint-url and --kms-region go with "
                              "--key-provider kms")
        return None
    if sealed or keys_from is not None:
        raise DaemonError("--master-key-from-credential and --keys-from are for the local "
                          "key provider: with kms, KMS keeps the master keys")
    return {"KmsKeyId": kms_key_id, "KmsEndpointUrl": endpoint_url, "KmsRegion": region}


def _check_fleet_provider(store, key_provider: str, kms: dict | None) -> None:
    """A joining host uses the fleet's key provider, and its default KMS key unless told."""
    used = _store_setting(store, "key_provider", "local")
    if used != key_provider:
        raise DaemonError(f"the fleet's store is sealed by the {used} key provider: join "
                          f"with --key-provider {used}")
    if kms is not None and kms["KmsKeyId"] is None:
        kms["KmsKeyId"] = _store_setting(store, "kms_key_id", None)
        if kms["KmsKeyId"] is None:
            raise DaemonError("the fleet's store names no default KMS key: give --kms-key-id")


def _kms_provider(settings: dict, region: str):
    """The KMS provider `init` records, its default key checked usable. The KMS region
    recorded is the one used: the flag's, else the AWS chain's, else secretfs's."""
    from secretfs.crypto.kms import chain_region
    from secretfs.model import SecretsManagerError

    settings["KmsRegion"] = settings.get("KmsRegion") or chain_region() or region
    keys = _kms_keys(settings)
    try:
        keys.resolve(None)
    except SecretsManagerError as error:
        raise DaemonError(f"KMS key {settings['KmsKeyId']}: {error.message}") from None
    return keys


def _join_store(url: str, state: StateDir):
    """Open the fleet's existing store; its password goes to this host's pgpass."""
    from secretfs.store import open_store, store_kind

    if store_kind(url) != "postgresql":
        raise DaemonError("only a PostgreSQL store is shared by a fleet (--join)")
    from secretfs.store.postgres import record_password

    recorded, written = record_password(url, state.store_password_file)
    try:
        return open_store(recorded), recorded
    except BaseException:
        if written:
            state.store_password_file.unlink(missing_ok=True)
        raise


def _store_setting(store, key: str, default: str) -> str:
    with store.read() as reader:
        return reader.meta(key) or default


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise DaemonError(f"can't read the key file to join with: {error}") from None


def _install_key_file(content: bytes, state: StateDir, *, region: str, account_id: str,
                      passphrase: bytes | None = None):
    """This host's copy of the fleet's key file, checked to open before it is kept.
    A key file sealed by a systemd credential is kept as it is; the daemon opens it."""
    from secretfs.crypto import LocalKeyProvider
    from secretfs.crypto.local import sealed_by_credential
    from secretfs.files import write_new_file

    write_new_file(state.keys, content)
    try:
        if passphrase is None and sealed_by_credential(content):
            return None
        return LocalKeyProvider.load(state.keys, region=region, account_id=account_id,
                                     passphrase=passphrase)
    except ValueError as error:
        state.keys.unlink()
        raise DaemonError(f"the key file to join with is unusable: {error}") from None


def _master_key_credential() -> bytes | None:
    """The master key systemd passed as the credential secretfs-master-key, if it did."""
    from secretfs.crypto.local import credential_path, read_credential

    path = credential_path()
    if path is None:
        return None
    try:
        return read_credential(path)
    except (OSError, ValueError) as error:
        raise DaemonError(f"can't read the master key credential: {error}") from None


def key_provider(config: dict, state: StateDir, *, passphrase: bytes | None = None):
    """The key provider config.json names ("KeyProvider"; "local" when absent).
    "passphrase" is the local provider with its key file sealed under `passphrase`
    (else the systemd credential secretfs-passphrase's)."""
    kind = config.get("KeyProvider", "local")
    if kind in ("local", "passphrase"):
        from secretfs.crypto import LocalKeyProvider

        if kind == "passphrase" and passphrase is None:
            passphrase = daemon_passphrase(state, ask=False)
        try:
            keys = LocalKeyProvider.load(state.keys, region=config["Region"],
                                         account_id=config["AccountId"],
                                         credential=_master_key_credential()
                                         if kind == "local" else None,
                                         passphrase=passphrase if kind == "passphrase"
                                         else None)
        except ValueError as error:
            raise DaemonError(str(error)) from None
        if keys.sealed:
            log.info("%s holds its key material sealed; opened with the %s", state.keys,
                     keys.status()["Source"])
        return keys
    if kind == "kms":
        return _kms_keys(config)
    raise DaemonError(f"{state.config}: unknown KeyProvider {kind!r} (expected "
                      f"{' or '.join(KEY_PROVIDERS)})")


def _kms_keys(config: dict):
    """The KMS provider config.json's KmsKeyId, KmsEndpointUrl and KmsRegion describe."""
    from secretfs.crypto.kms import KmsKeyProvider

    try:
        return KmsKeyProvider(default_key=config.get("KmsKeyId"),
                              endpoint_url=config.get("KmsEndpointUrl"),
                              region=config.get("KmsRegion"))
    except ValueError as error:
        raise DaemonError(f"the KMS key provider: {error}") from None


# Wrapped keys tried per master key at start, newest first; the first that unwraps
# proves the key. More than one, so that one altered row (which must cost only its own
# value, see the README) can't keep the whole mount from starting.
KEY_CHECK_SAMPLES = 3


def check_key_material(store, keys) -> None:
    """At start: the default master key, and every master key the store's versions and
    access keys are wrapped under, must be usable. A key is proven by unwrapping one of
    the data keys last wrapped under it; a key the provider doesn't know, can't use, or
    can't open any of those with fails the start naming the key: a host with another
    state directory's key file, a fleet host joined with the wrong one, a KMS key
    disabled or out of reach. KMS unreachable fails here too: with KMS, every value a
    fresh daemon could serve needs it (see the README)."""
    from secretfs.access_keys import wrapping_context
    from secretfs.crypto.envelope import encryption_context
    from secretfs.model import DecryptionFailure, SecretsManagerError
    from secretfs.store import StoreError

    try:
        with store.read() as reader:
            samples = [(key_id, encryption_context(arn, version_id), wrapped)
                       for key_id, arn, version_id, wrapped
                       in reader.version_key_samples(KEY_CHECK_SAMPLES)]
            samples += [(key_id, wrapping_context(access_key_id), wrapped)
                        for key_id, access_key_id, wrapped
                        in reader.access_key_samples(KEY_CHECK_SAMPLES)]
    except StoreError as error:
        raise DaemonError(str(error)) from None
    by_key: dict[str, list[tuple[dict, bytes]]] = {}
    for key_id, context, wrapped in samples:
        by_key.setdefault(key_id, []).append((context, wrapped))
    key_ref = getattr(keys, "default_key", None) or "default"
    try:
        keys.resolve(None)
        for key_ref, wrapped_keys in by_key.items():
            keys.resolve(key_ref)
            failure = None
            for context, wrapped in wrapped_keys:
                try:
                    data_key = keys.unwrap(key_ref, wrapped, context)
                except DecryptionFailure as error:  # this row, or the key: try another
                    failure = failure or error
                    continue
                if isinstance(data_key, bytearray):
                    data_key[:] = bytes(len(data_key))
                break
            else:
                raise failure
    except SecretsManagerError as error:
        raise DaemonError(f"key {key_ref}: {error.message} (wrong key file? missing KMS "
                          "permission?)") from None


def daemon_passphrase(state: StateDir, passphrase_file: str | None = None, *,
                      ask: bool = True) -> bytes | None:
    """The passphrase that opens the key file of a state directory whose KeyProvider is
    "passphrase" (None for the others): from `passphrase_file`, else the systemd
    credential secretfs-passphrase, else (with `ask`) the terminal. Asked before the
    daemon detaches, which then gets it through an inherited pipe, never argv."""
    from secretfs.crypto.passphrase import PassphraseError, read_passphrase

    try:
        kind = state.read_config().get("KeyProvider", "local")
    except (OSError, ValueError) as error:
        raise DaemonError(str(error)) from None
    if kind != "passphrase":
        if passphrase_file:
            raise DaemonError(f"--passphrase-file is for the passphrase key provider; "
                              f"{state.root} uses {kind}")
        return None
    try:
        if not ask and not passphrase_file:
            from secretfs.crypto.passphrase import CREDENTIAL_NAME, credential_path

            if credential_path(CREDENTIAL_NAME) is None:
                raise PassphraseError(f"give it as the systemd credential {CREDENTIAL_NAME}")
        return read_passphrase(passphrase_file, prompt=f"Passphrase of {state.keys}: ",
                               confirm=False, credential=True)
    except PassphraseError as error:
        raise DaemonError(f"key file {state.keys} is sealed under a passphrase: "
                          f"{error}") from None


def open_service(state: StateDir, *, audit=None, passphrase: bytes | None = None):
    from secretfs.policy import Authorizer
    from secretfs.service import SecretsManagerService
    from secretfs.store import StoreError, open_store

    config = state.read_config()
    region, account_id = config["Region"], config["AccountId"]
    keys = key_provider(config, state, passphrase=passphrase)
    try:
        store = open_store(state.store_url(config))
    except StoreError as error:
        raise DaemonError(str(error)) from None
    try:
        check_key_material(store, keys)
    except BaseException:
        store.close()
        raise
    return SecretsManagerService(store, keys, region=region, account_id=account_id,
                                 authorizer=Authorizer(audit=audit))


# --- process hygiene -------------------------------------------------------------------

def harden_process() -> None:
    """No core dumps and no ptrace-readable memory: the daemon holds plaintext. The
    core size limit is 0, the process is not dumpable, and should something still
    dump it, /proc/self/coredump_filter asks for no memory mappings at all."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError), open("/proc/self/coredump_filter", "w") as dump_filter:
        dump_filter.write("0")
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_dumpable = 4
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))


_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4


def lock_memory() -> bool:
    """mlockall, so plaintext never reaches swap. Pages are locked as they are first
    touched (MCL_ONFAULT): idle thread stacks and arenas stay unpopulated. Refused
    (EPERM without CAP_IPC_LOCK, ENOMEM past RLIMIT_MEMLOCK) it is a warning, not an
    error: the daemon serves unlocked rather than not at all."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _MCL_CURRENT | _MCL_FUTURE
    result = libc.mlockall(flags | _MCL_ONFAULT)
    if result != 0 and ctypes.get_errno() == errno.EINVAL:  # a kernel before 4.4
        result = libc.mlockall(flags)
    if result != 0:
        log.warning("--lock-memory: mlockall failed (%s); serving with memory that may be "
                    "swapped out (grant CAP_IPC_LOCK or raise LimitMEMLOCK=)",
                    os.strerror(ctypes.get_errno()))
        return False
    return True


def _lock_state(state: StateDir):
    handle = open(state.lock, "a+")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DaemonError(f"another secretfs daemon is already serving {state.root}") from None
    return handle


def _is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


# What a FUSE mount whose daemon died answers (ECONNABORTED while its last
# threads are still exiting).
_STALE_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}


def _is_stale(path: Path) -> bool:
    """A FUSE mount whose daemon is gone. statfs always reaches the daemon, while
    stat may be answered from the kernel's attribute cache for a while."""
    try:
        os.statvfs(path)
    except OSError as error:
        return error.errno in _STALE_ERRNOS
    return False


def _prepare_mountpoint(mountpoint: Path) -> None:
    if _is_stale(mountpoint):
        log.warning("clearing a stale mount at %s left by a daemon that died", mountpoint)
        _fusermount(mountpoint, lazy=True)
    try:
        os.stat(mountpoint)
    except OSError as error:
        if error.errno == errno.ENOENT:
            raise DaemonError(f"mountpoint {mountpoint} does not exist") from None
        raise DaemonError(f"mountpoint {mountpoint}: {error.strerror}") from None
    if _is_mountpoint(mountpoint):
        raise DaemonError(f"{mountpoint} is already a mountpoint")
    if not mountpoint.is_dir():
        raise DaemonError(f"mountpoint {mountpoint} is not a directory")


def _fusermount(mountpoint: Path, *, lazy: bool) -> None:
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 and os.geteuid() == 0:
        command = ["umount", *(["-l"] if lazy else []), str(mountpoint)]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise DaemonError(f"can't unmount {mountpoint}: {reason}")


def _running(pid: int) -> bool:
    """Whether any thread of a process is still alive: the main thread may already be a
    zombie while the others are still exiting (and holding /dev/fuse)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            status = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except OSError:
            continue
        if status.rpartition(")")[2].split()[0] not in ("Z", "X"):
            return True
    return False


def _registry_file(mountpoint: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:16]
    return RUN_DIR / f"{digest}.json"


# --- serving ---------------------------------------------------------------------------

async def serve(mountpoint: Path, state: StateDir, *, ready: Callable[[], None],
                options: MountOptions = DEFAULT_OPTIONS,
                passphrase: bytes | None = None) -> None:
    import pyfuse3

    from secretfs.api.server import serve_network, serve_unix
    from secretfs.audit import AuditError, AuditLog
    from secretfs.control import Control
    from secretfs.execwatch import EXECUTABLES
    from secretfs.fleet import change_feed
    from secretfs.fs.ops import SecretsOperations
    from secretfs.hooks import HookManager
    from secretfs.rotation.rotators import rotator_for
    from secretfs.rotation.runner import RotationRunner

    mountpoint = mountpoint.resolve()
    state = StateDir(state.root.resolve())
    # Hold no directory busy, and let nothing resolve relative to where we started.
    os.chdir("/")
    lock = _lock_state(state)
    try:
        try:
            audit = AuditLog(state.audit_dir)
        except AuditError as error:
            raise DaemonError(str(error)) from None
        options = options.with_config(state.read_config())
        if options.lock_memory:  # before any key or secret is in memory
            lock_memory()
        # The store's index, the policies and the start check (an unwrap per key, with
        # KMS a network call each) are blocking reads: in a worker thread, as all others.
        service = await trio.to_thread.run_sync(functools.partial(
            open_service, state, audit=audit, passphrase=passphrase))
        # Each open names the caller's executable: learnt from the kernel's process
        # events where it offers them, rather than read from /proc at every open.
        await trio.to_thread.run_sync(EXECUTABLES.watch)
        endpoint, ssl_context = _endpoint(state, options)
        try:
            metrics_endpoint = options.metrics_endpoint()
            max_staleness = options.staleness_bound()
        except OptionsError as error:
            raise DaemonError(str(error)) from None
        service.feed = change_feed(service, max_staleness=max_staleness)
        _prepare_mountpoint(mountpoint)
        operations = SecretsOperations(service, strict_names=options.strict_names)
        # Computed before the mount exists: touching the mountpoint between
        # init() and main() would wait forever for a reply nobody sends.
        registry = _registry_file(mountpoint)
        fuse_options = set(MOUNT_OPTIONS)
        if options.debug:
            fuse_options.add("debug")
        try:
            pyfuse3.init(operations, str(mountpoint), fuse_options)
        except RuntimeError as error:
            raise DaemonError(f"can't mount {mountpoint}: {error}") from None
        operations.mounted = True
        try:
            async with trio.open_nursery() as nursery:
                async def run_fuse():
                    await pyfuse3.main(min_tasks=1, max_tasks=FUSE_READER_TASKS)
                    nursery.cancel_scope.cancel()  # unmounted from outside

                nursery.start_soon(run_fuse)
                await nursery.start(audit.run)
                if service.feed is not None:
                    await nursery.start(service.feed.run)
                limiter = trio.CapacityLimiter(8)
                await nursery.start(functools.partial(
                    serve_unix, service, state.socket, limiter=limiter,
                    sessions=service.sessions))
                nursery.start_soon(_housekeeping, service)
                endpoint_url = None
                if endpoint is not None:
                    bound = await nursery.start(functools.partial(
                        serve_network, service, *endpoint, ssl_context=ssl_context,
                        limiter=limiter))
                    endpoint_url = _url(bound[0], https=ssl_context is not None)
                    log.info("serving the API at %s", endpoint_url)
                runner = RotationRunner(service, rotators=functools.partial(
                    rotator_for, state_dir=str(state.root), region=service.region,
                    endpoint=endpoint_url, ca_bundle=_ca_bundle(state, options)))
                service.rotation_listeners.append(_waker(runner))
                if metrics_endpoint is not None:
                    from secretfs.metrics import Metrics, serve_metrics

                    bound = await nursery.start(functools.partial(
                        serve_metrics, Metrics(service, audit, operations, mountpoint),
                        *metrics_endpoint, runner=runner))
                    log.info("serving metrics and health at %s", _url(bound[0], https=False))
                await nursery.start(runner.run)
                hooks = HookManager(service, directory=state.hooks_dir, mountpoint=mountpoint,
                                    state_dir=state.root)
                await nursery.start(hooks.run)
                service.control = Control(service, mountpoint=mountpoint, state=state,
                                          audit=audit, hooks=hooks, endpoint=endpoint_url,
                                          strict_names=options.strict_names)
                nursery.start_soon(_stop_on_signal, pyfuse3)
                with contextlib.suppress(OSError):
                    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
                    registry.write_text(json.dumps({
                        "pid": os.getpid(), "mountpoint": str(mountpoint),
                        "state_dir": str(state.root)}))
                log.info("serving %s from %s (pid %d)", mountpoint, state.root, os.getpid())
                ready()
        finally:
            operations.mounted = False
            with contextlib.suppress(OSError):
                registry.unlink()
            with contextlib.suppress(OSError):
                state.socket.unlink()
            # A re-encryption stops after its batch; run again, it resumes.
            await trio.to_thread.run_sync(service.rekeying.stop)
            try:
                await trio.to_thread.run_sync(service.flush_accesses)
            except Exception:
                # A read-only or full store must not keep the mount (or the audit
                # log's last records) from being closed: access dates are only dates.
                log.exception("the last access dates could not be recorded")
            pyfuse3.close(unmount=True)
            try:
                audit.close()
            except (AuditError, OSError):
                log.exception("the last audit records could not be written")
            log.info("unmounted %s", mountpoint)
    finally:
        lock.close()


def _endpoint(state: StateDir, options: MountOptions):
    """(host, port) of the network endpoint and its TLS context, or (None, None)."""
    try:
        endpoint = options.endpoint()
    except OptionsError as error:
        raise DaemonError(str(error)) from None
    if endpoint is None or options.plain_http:
        return endpoint, None
    from secretfs import tls

    if bool(options.tls_certificate) != bool(options.tls_key):
        raise DaemonError("--tls-cert and --tls-key go together")
    try:
        return endpoint, tls.server_context(
            Path(options.tls_certificate or state.server_certificate),
            Path(options.tls_key or state.server_key))
    except tls.TLSConfigError as error:
        raise DaemonError(str(error)) from None


def _ca_bundle(state: StateDir, options: MountOptions) -> str | None:
    """What a client on this host trusts the endpoint with: the local CA, unless the
    certificate is the operator's own (then the system's trust store decides)."""
    if options.plain_http or options.tls_certificate:
        return None
    return str(state.ca_certificate)


def _url(address: tuple[str, int], *, https: bool) -> str:
    """The endpoint's URL as a client on this host reaches it."""
    host, port = address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if https else 'http'}://{host}:{port}"


def _waker(runner) -> Callable[[], None]:
    """A RotateSecret (in a worker thread) wakes the runner in the trio loop."""
    token = trio.lowlevel.current_trio_token()

    def wake() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(runner.wake, trio_token=token)

    return wake


async def _stop_on_signal(pyfuse3) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _housekeeping(service) -> None:
    """Record access dates and purge secrets whose recovery window has ended."""
    from secretfs.store import StoreError

    failing = False
    while True:
        try:
            await trio.to_thread.run_sync(service.flush_accesses)
            due = await trio.to_thread.run_sync(service.next_deletion)
            if due is not None and due <= service.now():
                purged = await trio.to_thread.run_sync(service.purge_expired)
                log.info("purged %d secrets past their recovery window", purged)
            failing = False
        except StoreError as error:  # the store's own line (unreachable, full): once
            if not failing:
                log.warning("housekeeping: %s; retrying", error)
            failing = True
        except Exception:
            log.exception("housekeeping failed; retrying")
        await trio.sleep(HOUSEKEEPING_INTERVAL)


def _notify_systemd(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def _configure_logging(options: MountOptions, state: StateDir) -> None:
    from secretfs import logs

    with contextlib.suppress(OSError, ValueError):  # serve() reports a bad state directory
        options = options.with_config(state.read_config())
    logs.configure(debug=options.debug, log_format=options.log_format)


def run_foreground(mountpoint: Path, state: StateDir, *,
                   options: MountOptions = DEFAULT_OPTIONS,
                   ready_fd: int | None = None, passphrase: bytes | None = None) -> None:
    """Serve until unmounted; report readiness on `ready_fd` and to systemd."""
    _configure_logging(options, state)
    harden_process()

    def ready() -> None:
        _notify_systemd("READY=1")
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)

    try:
        trio.run(functools.partial(serve, mountpoint, state, ready=ready, options=options,
                                   passphrase=passphrase))
    except Exception as error:
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if ready_fd is not None:
            reason = str(error) if isinstance(error, DaemonError) else (
                f"{type(error).__name__}: {error}")
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"ERROR {reason}\n".encode())
        raise


def mount(mountpoint: Path, state_dir: Path, *, foreground: bool,
          options: MountOptions = DEFAULT_OPTIONS, passphrase_file: str | None = None) -> None:
    state = StateDir(Path(state_dir))
    if not state.exists():
        raise DaemonError(f"{state.root} is not a secretfs state directory (run 'secretfs init')")
    mountpoint = Path(mountpoint)
    passphrase = daemon_passphrase(state, passphrase_file)
    if foreground:
        run_foreground(mountpoint, state, options=options, passphrase=passphrase)
        return
    read_end, write_end = os.pipe()
    inherited, passphrase_args = [write_end], []
    if passphrase is not None:
        # The child reads it from a pipe it inherits: argv and the environment are
        # readable in /proc. It fits the pipe's buffer, so this write never blocks.
        passphrase_read, passphrase_write = os.pipe()
        os.write(passphrase_write, passphrase)
        os.close(passphrase_write)
        inherited.append(passphrase_read)
        passphrase_args = ["--passphrase-fd", str(passphrase_read)]
    try:
        with open(state.log, "ab") as log_file:
            os.chmod(state.log, 0o600)
            child = subprocess.Popen(
                [sys.executable, "-m", "secretfs.daemon", "--mountpoint", str(mountpoint),
                 "--state-dir", str(state.root), "--ready-fd", str(write_end),
                 *passphrase_args, *options.argv()],
                pass_fds=inherited, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=log_file, start_new_session=True)
    finally:
        for fd in inherited:
            os.close(fd)
    with os.fdopen(read_end, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "READY":
        return
    if line.startswith("ERROR "):
        raise DaemonError(line[len("ERROR "):])
    try:
        code = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    raise DaemonError(f"the daemon exited before it was ready (status {code}); see {state.log}")


def unmount(mountpoint: Path, *, lazy: bool = False, timeout: float = 10.0) -> None:
    """Unmount and wait for the daemon serving it to exit."""
    # The daemon registered the resolved path (non-strict: a stale mount resolves too).
    mountpoint = Path(os.path.realpath(mountpoint))
    registry = _registry_file(mountpoint)
    pid = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = json.loads(registry.read_text())["pid"]
    if not _is_mountpoint(mountpoint) and not _is_stale(mountpoint):
        raise DaemonError(f"{mountpoint} is not mounted")
    device = None
    with contextlib.suppress(OSError):
        device = os.stat(mountpoint).st_dev
    _fusermount(mountpoint, lazy=lazy)
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.02)
    holders = _mounted_elsewhere(device) if device is not None else []
    if holders:
        raise DaemonError(
            f"unmounted {mountpoint}, but daemon pid {pid} has not exited: its filesystem "
            f"is still mounted in {len(holders)} other mount namespace(s) (bind mounts, "
            f"e.g. a container's; held by pid {', '.join(map(str, holders[:5]))}); stop "
            f"those, or 'kill {pid}' to end it for all of them")
    raise DaemonError(f"unmounted {mountpoint}, but daemon pid {pid} has not exited")


def _mounted_elsewhere(device: int) -> list[int]:
    """One process per mount namespace that still has a mount of `device` (a FUSE
    connection's st_dev), this one's excluded."""
    wanted = f" {os.major(device)}:{os.minor(device)} "
    seen = set()
    with contextlib.suppress(OSError):
        seen.add(os.stat("/proc/self/ns/mnt").st_ino)
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            namespace = os.stat(f"/proc/{entry}/ns/mnt").st_ino
            if namespace in seen:
                continue
            seen.add(namespace)
            with open(f"/proc/{entry}/mountinfo") as mounts:
                if any(wanted in line for line in mounts):
                    holders.append(int(entry))
        except OSError:
            continue
    return sorted(holders)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secretfs.daemon")
    parser.add_argument("--mountpoint", required=True, type=Path)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--passphrase-fd", type=int,
                        help="Read the key file's passphrase from this inherited pipe.")
    MountOptions.add_arguments(parser)
    args = parser.parse_args(argv)
    passphrase = None
    if args.passphrase_fd is not None:
        with os.fdopen(args.passphrase_fd, "rb") as pipe:
            passphrase = pipe.read()
    try:
        run_foreground(args.mountpoint, StateDir(args.state_dir),
                       options=MountOptions.from_args(args), ready_fd=args.ready_fd,
                       passphrase=passphrase)
    except DaemonError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
