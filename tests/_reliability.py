"""What the reliability tests (tests/test_reliability*.py) share: the daemon's API client
and a few calls through it, reads through the mount, killing a daemon, the checks that a
store and its audit log are intact, and the watch for plaintext on disk.

conftest registers this module for assertion rewriting, so the tests import from it.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import Daemon

from secretfs import audit
from secretfs.api.client import Client
from secretfs.state import StateDir

AWSCURRENT = "AWSCURRENT"


# --- the API ----------------------------------------------------------------------

def api_client(daemon: Daemon) -> Client:
    """The daemon's control socket: much faster than the CLI for many calls."""
    return Client(StateDir(daemon.state_dir).socket, timeout=30.0)


def value_member(value: str | bytes) -> dict:
    return {"SecretBinary": value} if isinstance(value, bytes) else {"SecretString": value}


def encoded(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def create_secret(client: Client, name: str, value: str | bytes, **extra) -> str:
    return client.call("CreateSecret", {"Name": name, **value_member(value), **extra})[
        "VersionId"]


def put_value(client: Client, name: str, value: str | bytes, *,
              stages: list[str] | None = None, token: str | None = None) -> str:
    params = {"SecretId": name, **value_member(value)}
    if stages is not None:
        params["VersionStages"] = stages
    if token is not None:
        params["ClientRequestToken"] = token
    return client.call("PutSecretValue", params)["VersionId"]


def promote(client: Client, name: str, to: str, current: str) -> None:
    client.call("UpdateSecretVersionStage", {
        "SecretId": name, "VersionStage": AWSCURRENT, "MoveToVersionId": to,
        "RemoveFromVersionId": current})


def api_value(client: Client, name: str, **selector: str) -> bytes:
    answer = client.call("GetSecretValue", {"SecretId": name, **selector})
    return answer["SecretBinary"] if "SecretBinary" in answer else answer[
        "SecretString"].encode("utf-8")


def stages_of(client: Client, name: str) -> dict[str, list[str]]:
    return client.call("DescribeSecret", {"SecretId": name})["VersionIdsToStages"]


def current_version(client: Client, name: str) -> list[str]:
    """The versions AWSCURRENT is on (exactly one, for a secret with a value)."""
    return [vid for vid, stages in stages_of(client, name).items() if AWSCURRENT in stages]


def all_version_ids(client: Client, name: str) -> set[str]:
    ids: set[str] = set()
    params = {"SecretId": name, "IncludeDeprecated": True}
    while True:
        page = client.call("ListSecretVersionIds", params)
        ids |= {version["VersionId"] for version in page["Versions"]}
        if not page.get("NextToken"):
            return ids
        params["NextToken"] = page["NextToken"]


# --- README's names-as-directories rules, written out independently ---------------------

def path_of(name: str) -> str:
    """A secret's directory: its name's '/'-separated segments without empty ones."""
    return "/".join(segment for segment in name.split("/") if segment)


def entry_name(label: str) -> str:
    """A label (or JSON key) as a file name: '%', '/' and a leading '.' percent-encoded."""
    encoded = label.replace("%", "%25").replace("/", "%2F")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


# --- the mount ------------------------------------------------------------------------

def read_file(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def read_errno(path: Path) -> int | None:
    """The errno reading a whole file fails with, or None if it reads."""
    try:
        read_file(path)
    except OSError as error:
        return error.errno
    return None


def distinct_values(sizes: list[int], rng) -> list[str]:
    """Distinctive values of the given sizes whose fifth characters differ, so none is a
    prefix of another: a short read can never pass for a complete other version."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return [f"sfs-{chr(ord('A') + index)}" + "".join(
        rng.choice(alphabet) for _ in range(size - 5)) for index, size in enumerate(sizes)]


# --- daemons and reader processes ---------------------------------------------------------

def new_daemon(state_parent: Path, mount_parent: Path) -> Daemon:
    """A daemon with a fresh state directory in `state_parent`, not started yet."""
    mountpoint = mount_parent / "secrets"
    mountpoint.mkdir()
    daemon = Daemon(state_dir=state_parent / "state", mountpoint=mountpoint)
    daemon.cli("init", "--state-dir", str(daemon.state_dir))
    return daemon


def start_readers(script: str, count: int, *args: str) -> list[subprocess.Popen]:
    """Reader processes running `script`, which prints "ready" once it has read, and a
    JSON summary as its last line when the test stops it."""
    return [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(count)]


def wait_ready(readers: list[subprocess.Popen]) -> None:
    for reader in readers:
        assert reader.stdout.readline().strip() == b"ready", reader.stderr.read()


def stop_readers(readers: list[subprocess.Popen], stop: Path) -> list[dict]:
    """Tell the readers to stop (the file `stop` appears); their summaries."""
    stop.touch()
    outputs = [reader.communicate(timeout=60) for reader in readers]
    results = []
    for reader, (out, err) in zip(readers, outputs, strict=True):
        assert reader.returncode == 0, err.decode(errors="replace")
        results.append(json.loads(out.decode().splitlines()[-1]))
    return results


# --- crashes ----------------------------------------------------------------------------

def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of `pid` has exited (so its /dev/fuse descriptor is closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            # A killed leader turns zombie while its other threads are still exiting.
            threads = len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return
        if state == "Z" and threads == 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"daemon pid {pid} still running {timeout} s after SIGKILL")


def kill_daemon(daemon: Daemon) -> int:
    """SIGKILL the daemon and wait until it is gone; returns its pid."""
    pid = daemon.pid()
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    return pid


def assert_stale(mountpoint: Path) -> None:
    # statfs always reaches the daemon; stat of the mount's root may be answered from the
    # kernel's attribute cache without asking anyone.
    with pytest.raises(OSError) as stale:
        os.statvfs(mountpoint)
    # ECONNABORTED for a request the kernel aborted as the connection went away.
    assert stale.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert os.path.ismount(mountpoint)


# --- the store and the audit log are intact ---------------------------------------------

def dump_database(database: Path) -> dict[str, list[tuple]]:
    """Every row of every table, in a stable order."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        dump = {}
        for table in tables:
            width = len(db.execute(f"SELECT * FROM {table} LIMIT 0").description)
            order = ", ".join(str(index) for index in range(1, width + 1))
            dump[table] = db.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
        return dump
    finally:
        db.close()


def store_problems(database: Path) -> list[str]:
    """What SQLite's own checks find wrong with the store (nothing, when it is intact)."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        problems = [row[0] for row in db.execute("PRAGMA integrity_check") if row[0] != "ok"]
        problems += [f"foreign key: {row}" for row in db.execute("PRAGMA foreign_key_check")]
        return problems
    finally:
        db.close()


def assert_intact(state_dir: Path) -> None:
    """The store passes SQLite's checks and the audit log's chain verifies."""
    state = StateDir(state_dir)
    assert store_problems(state.database) == []
    verified = audit.verify(state.audit_dir)
    assert verified.ok, verified.problem


# --- plaintext on disk ------------------------------------------------------------------

def needles(value: str | bytes) -> dict[str, bytes]:
    raw = encoded(value)
    return {"raw": raw, "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode(),
            "base64": base64.b64encode(raw), "base64url": base64.urlsafe_b64encode(raw)}


# Distinctive values start with this; any encoding of one then starts with one of these
# (the first three bytes as raw text, hex or base64).
TOKEN_PREFIX = "sfs-"
_STARTS = re.compile(b"sfs-|7366|c2Zz")
_PROBE = 32  # the first bytes of an encoded value, which index it


def plaintext_in(files: Iterable[Path], values: list[str | bytes]) -> list[str]:
    """Which values (by index, never the value) appear in which files, in any encoding
    of `needles`. Values starting with TOKEN_PREFIX are found through an index, so
    thousands of them cost one pass per file."""
    indexed: dict[bytes, list[tuple[int, str, bytes]]] = {}
    others: list[tuple[int, str, bytes]] = []
    for index, value in enumerate(values):
        distinctive = encoded(value).startswith(TOKEN_PREFIX.encode())
        for form, needle in needles(value).items():
            if distinctive and len(needle) >= _PROBE:
                indexed.setdefault(needle[:_PROBE], []).append((index, form, needle))
            else:
                others.append((index, form, needle))
    found = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue  # a socket, or gone meanwhile
        hits = set()
        if indexed:
            for start in (match.start() for match in _STARTS.finditer(data)):
                for index, form, needle in indexed.get(data[start:start + _PROBE], ()):
                    if data.startswith(needle, start):
                        hits.add((index, form))
        hits |= {(index, form) for index, form, needle in others if needle in data}
        found += [f"value {index} ({form}) in {path}" for index, form in sorted(hits)]
    return found


def files_below(*roots: Path) -> list[Path]:
    return [path for root in roots if root.exists()
            for path in sorted(root.rglob("*")) if path.is_file()]


class PlaintextWatch:
    """The values the reliability tests stored and the state directories they used.

    Tests make their values with `token()` (distinctive, so a scan means something) or
    add them; each state directory is watched, and none of its files may ever hold a
    value: checked by a test where a directory is about to go away, and for all of them
    at the end of the session.
    """

    def __init__(self) -> None:
        self.values: list[str | bytes] = []
        self.roots: list[Path] = []

    def token(self, kind: str = "v", nbytes: int = 16) -> str:
        value = f"{TOKEN_PREFIX}{kind}-{secrets.token_hex(nbytes)}"
        self.values.append(value)
        return value

    def add(self, *values: str | bytes) -> None:
        self.values.extend(values)

    def watch(self, root: Path) -> Path:
        if root not in self.roots:
            self.roots.append(root)
        return root

    def findings(self, *roots: Path) -> list[str]:
        return plaintext_in(files_below(*(roots or self.roots)), self.values)
