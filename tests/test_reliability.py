"""Reliability of the real daemon on a real mount: the invariants under stress and failure.

Each test drives a daemon started through the real CLI (conftest's `daemon`) and
pins one of ARCHITECTURE.md's invariants where it is most likely to break:
promotions racing readers (3), crashes and restarts (durability), plaintext on
disk (1), tampered rows, bad input (7) and a full disk. Mutations go through the
control socket with `Client` where speed matters; the store is only ever opened
directly to look at it, or to tamper with it while the daemon is stopped.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import Daemon, force_unmount

from secretfs import model
from secretfs.api.client import Client, ClientConnectionError, UnixHTTPConnection
from secretfs.state import StateDir

pytestmark = [pytest.mark.mount]

AWSCURRENT = "AWSCURRENT"


# --- helpers -----------------------------------------------------------------------

def _client(daemon: Daemon) -> Client:
    return Client(StateDir(daemon.state_dir).socket, timeout=30.0)


def _value_member(value: str | bytes) -> dict:
    return {"SecretBinary": value} if isinstance(value, bytes) else {"SecretString": value}


def _encoded(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def _create(client: Client, name: str, value: str | bytes) -> str:
    return client.call("CreateSecret", {"Name": name, **_value_member(value)})["VersionId"]


def _put(client: Client, name: str, value: str | bytes, *, stages: list[str] | None = None,
         token: str | None = None) -> str:
    params = {"SecretId": name, **_value_member(value)}
    if stages is not None:
        params["VersionStages"] = stages
    if token is not None:
        params["ClientRequestToken"] = token
    return client.call("PutSecretValue", params)["VersionId"]


def _promote(client: Client, name: str, to: str, current: str) -> None:
    client.call("UpdateSecretVersionStage", {
        "SecretId": name, "VersionStage": AWSCURRENT, "MoveToVersionId": to,
        "RemoveFromVersionId": current})


def _read(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _read_errno(path: Path) -> int | None:
    """The errno reading a whole file fails with, or None if it reads."""
    try:
        _read(path)
    except OSError as error:
        return error.errno
    return None


def _api_value(client: Client, name: str, **selector: str) -> bytes:
    answer = client.call("GetSecretValue", {"SecretId": name, **selector})
    return answer["SecretBinary"] if "SecretBinary" in answer else answer[
        "SecretString"].encode("utf-8")


def _stages(client: Client, name: str) -> dict[str, list[str]]:
    return client.call("DescribeSecret", {"SecretId": name})["VersionIdsToStages"]


def _all_version_ids(client: Client, name: str) -> set[str]:
    ids: set[str] = set()
    params = {"SecretId": name, "IncludeDeprecated": True}
    while True:
        page = client.call("ListSecretVersionIds", params)
        ids |= {version["VersionId"] for version in page["Versions"]}
        if not page.get("NextToken"):
            return ids
        params["NextToken"] = page["NextToken"]


def _dump(database: Path) -> dict[str, list[tuple]]:
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


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
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


def _kill(daemon: Daemon) -> int:
    """SIGKILL the daemon and wait until it is gone; returns its pid."""
    pid = daemon.pid()
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    return pid


def _assert_stale(mountpoint: Path) -> None:
    # statfs always reaches the daemon; stat of the mount's root may be answered from the
    # kernel's attribute cache without asking anyone.
    with pytest.raises(OSError) as stale:
        os.statvfs(mountpoint)
    # ECONNABORTED for a request the kernel aborted as the connection went away.
    assert stale.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert os.path.ismount(mountpoint)


def _distinct_values(sizes: list[int], rng: random.Random) -> list[str]:
    """Values of the given sizes whose first characters differ, so none is a prefix of
    another: a short read can never pass for a complete other version."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return [chr(ord("A") + index) + "".join(rng.choice(alphabet) for _ in range(size - 1))
            for index, size in enumerate(sizes)]


# --- 1. promotions racing readers ------------------------------------------------------

# A reader process: re-opens and reads each file in a tight loop until the stop
# file appears; every read must be one complete known version.
_READER = r"""
import errno, hashlib, json, os, sys
os.nice(5)  # readers yield the CPU to the daemon, so promotions keep their pace
config = json.load(open(sys.argv[1]))
stop = config["stop"]
known = {path: {bytes.fromhex(value): index for index, value in enumerate(values)}
         for path, values in config["files"].items()}
reads = 0
errors = {}
bad = []
seen = {path: set() for path in known}
first = True
while first or not os.path.exists(stop):
    for path, values in known.items():
        try:
            with open(path, "rb", buffering=0) as file:
                data = file.read()
        except OSError as error:
            key = f"{path}: {errno.errorcode.get(error.errno, repr(error))}"
            errors[key] = errors.get(key, 0) + 1
            continue
        reads += 1
        index = values.get(data)
        if index is None:
            if len(bad) < 10:
                bad.append({"path": path, "length": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()[:16]})
        else:
            seen[path].add(index)
    if first:
        first = False
        print("ready", flush=True)
print(json.dumps({"reads": reads, "errors": errors, "bad": bad,
                  "seen": {path: sorted(indices) for path, indices in seen.items()}}))
"""

HAMMER_READERS = 4
HAMMER_PROMOTIONS = 400  # per secret


@pytest.mark.slow
def test_promotions_are_atomic_for_concurrent_readers(daemon, tmp_path):
    rng = random.Random()
    client = _client(daemon)
    sizes = [10, 300, 4000, 9000, 20000]

    # A plain secret, set up through the CLI: five versions, four on labels of their own.
    plain = _distinct_values(sizes, rng)
    plain_ids = []
    for index, value in enumerate(plain):
        source = tmp_path / f"plain{index}"
        source.write_text(value)
        if index == 0:
            answer = daemon.call("create-secret", "--name", "hammer/plain",
                                 "--secret-string", f"file://{source}")
        else:
            answer = daemon.call("put-secret-value", "--secret-id", "hammer/plain",
                                 "--secret-string", f"file://{source}",
                                 "--version-stages", f"L{index}")
        plain_ids.append(answer["VersionId"])

    # A JSON secret whose `password` key has a different length in each version.
    passwords = _distinct_values(sizes, rng)
    documents = [json.dumps({"password": password, "n": index})
                 for index, password in enumerate(passwords)]
    json_ids = [_create(client, "hammer/json", documents[0])]
    json_ids += [_put(client, "hammer/json", document, stages=[f"L{index}"])
                 for index, document in enumerate(documents[1:], 1)]
    assert _stages(client, "hammer/plain")[plain_ids[0]] == [AWSCURRENT]

    files = {
        str(daemon.path("hammer", "plain", AWSCURRENT)): [v.encode().hex() for v in plain],
        str(daemon.path("hammer", "json", AWSCURRENT)): [d.encode().hex() for d in documents],
        str(daemon.path("hammer", "json", "keys", AWSCURRENT, "password")):
            [p.encode().hex() for p in passwords],
    }
    stop = tmp_path / "stop"
    config = tmp_path / "reader.json"
    config.write_text(json.dumps({"stop": str(stop), "files": files}))
    pid = daemon.pid()

    readers = [subprocess.Popen([sys.executable, "-c", _READER, str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(HAMMER_READERS)]
    try:
        for reader in readers:
            assert reader.stdout.readline().strip() == b"ready", reader.stderr.read()
        current = {"hammer/plain": 0, "hammer/json": 0}
        ids = {"hammer/plain": plain_ids, "hammer/json": json_ids}
        promotions = 0
        started = time.monotonic()
        for _ in range(HAMMER_PROMOTIONS):
            for name in current:
                target = rng.choice([i for i in range(len(sizes)) if i != current[name]])
                _promote(client, name, ids[name][target], ids[name][current[name]])
                current[name] = target
                promotions += 1
        elapsed = time.monotonic() - started
    finally:
        stop.touch()
        outputs = [reader.communicate(timeout=60) for reader in readers]

    results = []
    for reader, (out, err) in zip(readers, outputs, strict=True):
        assert reader.returncode == 0, err.decode(errors="replace")
        results.append(json.loads(out.decode().splitlines()[-1]))
    reads = sum(result["reads"] for result in results)
    summary = (f"{reads} reads by {HAMMER_READERS} readers during {promotions} promotions "
               f"in {elapsed:.1f} s")
    errors = [result["errors"] for result in results if result["errors"]]
    bad = [item for result in results for item in result["bad"]]
    assert not errors, f"{summary}: read errors {errors}"
    assert not bad, f"{summary}: reads that are no complete known version: {bad}"
    for number, result in enumerate(results):
        for path, seen in result["seen"].items():
            assert len(seen) > 1, f"{summary}: reader {number} only ever saw {seen} of {path}"
    assert os.path.ismount(daemon.mountpoint)
    assert daemon.pid() == pid
    print(summary)  # shown with -s: the figures of this run


# --- 2. a promotion is visible as soon as the call returns -----------------------------

def test_promotion_is_visible_when_the_call_returns(daemon):
    client = _client(daemon)
    rng = random.Random()
    values = [json.dumps({"user": f"u{index}", "password": f"p{index}-{uuid.uuid4()}"})
              for index in range(3)]
    ids = [_create(client, "visible", values[0])]
    ids += [_put(client, "visible", value, stages=[f"L{index}"])
            for index, value in enumerate(values[1:], 1)]
    label = daemon.path("visible", AWSCURRENT)
    key_link = daemon.path("visible", "keys", AWSCURRENT)
    current = 0
    # Warm every cache the kernel has, so a stale one would show.
    assert _read(label) == values[0].encode()
    for round_ in range(200):
        target = rng.choice([index for index in range(3) if index != current])
        _promote(client, "visible", ids[target], ids[current])
        current = target
        assert os.readlink(label) == f"versions/{ids[target]}", f"round {round_}"
        assert _read(label) == values[target].encode(), f"round {round_}"
        assert os.readlink(key_link) == f".by-version/{ids[target]}", f"round {round_}"
        assert _read(key_link / "password") == json.loads(values[target])["password"].encode()


# --- 3. durability across restarts and crashes ---------------------------------------

def test_values_versions_and_labels_survive_a_restart(daemon):
    client = _client(daemon)
    first = _create(client, "keep/string", "first value")
    second = _put(client, "keep/string", "second value")
    staged = _put(client, "keep/string", "staged value", stages=["STAGED", "OTHER"])
    binary_value = os.urandom(64)
    binary = _create(client, "keep/binary", binary_value)
    document = json.dumps({"user": "admin", "port": 5432})
    _create(client, "keep/json", document)
    _create(client, "keep/deleted", "scheduled for deletion")
    client.call("DeleteSecret", {"SecretId": "keep/deleted", "RecoveryWindowInDays": 7})
    names = ["keep/string", "keep/binary", "keep/json", "keep/deleted"]
    before = {name: client.call("DescribeSecret", {"SecretId": name}) for name in names}
    versions_before = {name: _all_version_ids(client, name) for name in names}

    daemon.stop()
    daemon.start()

    for name in names:
        after = client.call("DescribeSecret", {"SecretId": name})
        for member in ("ARN", "Name", "VersionIdsToStages", "CreatedDate", "DeletedDate"):
            assert after.get(member) == before[name].get(member), (name, member)
        assert _all_version_ids(client, name) == versions_before[name]
    assert _stages(client, "keep/string") == {
        second: [AWSCURRENT], first: ["AWSPREVIOUS"], staged: ["OTHER", "STAGED"]}
    values = {first: b"first value", second: b"second value", staged: b"staged value"}
    for version_id, value in values.items():
        assert _read(daemon.path("keep", "string", "versions", version_id)) == value
        assert _api_value(client, "keep/string", VersionId=version_id) == value
    assert os.readlink(daemon.path("keep", "string", AWSCURRENT)) == f"versions/{second}"
    assert _read(daemon.path("keep", "string", "STAGED")) == b"staged value"
    assert _read(daemon.path("keep", "binary", AWSCURRENT)) == binary_value
    assert _api_value(client, "keep/binary", VersionId=binary) == binary_value
    assert _read(daemon.path("keep", "json", "keys", AWSCURRENT, "user")) == b"admin"
    assert _read(daemon.path("keep", "json", "keys", AWSCURRENT, "port")) == b"5432"
    assert not daemon.path("keep", "deleted").exists()


class _Writer(threading.Thread):
    """Puts new versions one after another until the daemon stops answering."""

    def __init__(self, client: Client, name: str):
        super().__init__(daemon=True)
        self.client, self.name = client, name
        self.attempted: dict[str, str] = {}  # token -> value, recorded before each call
        self.acknowledged: list[str] = []  # tokens whose call returned successfully
        self.ended_by: Exception | None = None

    def run(self) -> None:
        number = 0
        while True:
            token = str(uuid.uuid4())
            value = f"{self.name} write {number} {token}"
            self.attempted[token] = value
            try:
                version_id = _put(self.client, self.name, value, token=token)
            except Exception as error:  # reported by the test
                self.ended_by = error
                return
            assert version_id == token
            self.acknowledged.append(token)
            number += 1


@pytest.mark.slow
def test_every_acknowledged_write_survives_a_sigkill(daemon):
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    client = _client(daemon)
    for round_ in range(5):
        name = f"crash/{round_}"
        where = f"seed {seed}, round {round_}"
        _create(client, name, f"{name} initial")
        writer = _Writer(client, name)
        writer.start()
        deadline = time.monotonic() + 20
        while len(writer.acknowledged) < 3 and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(writer.acknowledged) >= 3, f"{where}: writer stalled: {writer.ended_by!r}"
        time.sleep(rng.uniform(0.0, 0.4))
        pid = _kill(daemon)
        writer.join(timeout=30)
        assert not writer.is_alive(), f"{where}: the writer hangs on a dead daemon"
        assert isinstance(writer.ended_by, ClientConnectionError), (
            f"{where}: writer ended by {writer.ended_by!r}")

        _assert_stale(daemon.mountpoint)
        daemon.start()  # clears the stale mount itself
        assert daemon.pid() != pid

        acknowledged = writer.acknowledged
        in_flight = [token for token in writer.attempted if token not in acknowledged]
        present = _all_version_ids(client, name)
        lost = [token for token in acknowledged if token not in present]
        assert not lost, f"{where}: {len(lost)} of {len(acknowledged)} acknowledged writes lost"
        current = [vid for vid, stages in _stages(client, name).items() if AWSCURRENT in stages]
        # One writer: AWSCURRENT is the last acknowledged write or the one in flight.
        assert current in ([acknowledged[-1]], in_flight), f"{where}: AWSCURRENT is {current}"
        current_value = writer.attempted[current[0]].encode()
        assert os.readlink(daemon.path(name, AWSCURRENT)) == f"versions/{current[0]}"
        assert _read(daemon.path(name, AWSCURRENT)) == current_value
        assert _api_value(client, name) == current_value
        for token in acknowledged:
            value = writer.attempted[token].encode()
            assert _read(daemon.path(name, "versions", token)) == value, where
            assert _api_value(client, name, VersionId=token) == value, where
        print(f"{where}: {len(acknowledged)} acknowledged writes, "
              f"{len(in_flight)} in flight, all present after SIGKILL")


def test_the_next_start_clears_a_stale_mount_at_once(daemon):
    client = _client(daemon)
    version_id = _create(client, "stale", "survives a crash")
    pid = _kill(daemon)
    _assert_stale(daemon.mountpoint)

    daemon.start()  # conftest's cli() raises AssertionError when `secretfs mount` fails

    assert daemon.pid() != pid
    assert os.readlink(daemon.path("stale", AWSCURRENT)) == f"versions/{version_id}"
    assert _read(daemon.path("stale", AWSCURRENT)) == b"survives a crash"
    assert "clearing a stale mount" in StateDir(daemon.state_dir).log.read_text()


# --- 4. plaintext never reaches disk ----------------------------------------------------

def _needles(value: str | bytes) -> dict[str, bytes]:
    raw = _encoded(value)
    return {"raw": raw, "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode(),
            "base64": base64.b64encode(raw), "base64url": base64.urlsafe_b64encode(raw)}


def _plaintext_on_disk(state_dir: Path, values: list[str | bytes]) -> list[str]:
    found = []
    files = [path for path in state_dir.rglob("*") if path.is_file()]
    for path in files:
        data = path.read_bytes()
        for index, value in enumerate(values):
            for form, needle in _needles(value).items():
                if needle in data:
                    found.append(f"value {index} ({form}) in {path.name}")
    return found


@pytest.mark.slow
def test_plaintext_never_reaches_disk(daemon):
    # Debug logging on both sides (Python's and libfuse's), the most a log would ever hold.
    daemon.stop()
    daemon.extra_args = ["--debug"]
    daemon.start()
    client = _client(daemon)
    values: list[str | bytes] = []
    for index in range(25):
        string = f"sfs-plain-{index}-{os.urandom(24).hex()}"
        binary = os.urandom(48)
        _create(client, f"plain/string{index}", string)
        _create(client, f"plain/binary{index}", binary)
        values += [string, binary]
        if index % 5 == 0:  # a second version, and an update, of some of them
            newer = f"sfs-newer-{index}-{os.urandom(24).hex()}"
            _put(client, f"plain/string{index}", newer)
            updated = os.urandom(40)
            client.call("UpdateSecret", {"SecretId": f"plain/binary{index}",
                                         "SecretBinary": updated})
            values += [newer, updated]
    password = f"sfs-json-{os.urandom(24).hex()}"
    _create(client, "plain/json", json.dumps({"user": "app", "password": password}))
    values.append(password)

    for index in range(25):
        for name in (f"string{index}", f"binary{index}"):
            through_mount = _read(daemon.path("plain", name, AWSCURRENT))
            assert through_mount == _api_value(client, f"plain/{name}")
            assert through_mount in {_encoded(value) for value in values}
    assert _read(daemon.path("plain", "json", "keys", AWSCURRENT, "password")) == (
        password.encode())

    state = StateDir(daemon.state_dir)
    pid = daemon.pid()
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.MULTILINE), limits
    # While it runs: the WAL and shared-memory files hold the latest pages.
    assert state.database.with_name("secrets.db-wal").exists()
    assert _plaintext_on_disk(state.root, values) == []

    daemon.stop()
    assert state.log.stat().st_size > 0
    for expected in ("secrets.db", "keys.json", "config.json", "daemon.log"):
        assert (state.root / expected).exists(), expected
    assert _plaintext_on_disk(state.root, values) == []


def test_hardening_disables_dumps():
    # PR_SET_DUMPABLE can't be seen from outside for a root daemon (its /proc files are
    # root's either way), so check what harden_process() leaves in a process of its own;
    # the test above sees its RLIMIT_CORE in the live daemon.
    code = ("import ctypes, resource; from secretfs.daemon import harden_process; "
            "harden_process(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), "
            "resource.getrlimit(resource.RLIMIT_CORE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=1)
    assert out == ["0", "(0, 0)\n"]


# --- 5. tampered rows fail closed -------------------------------------------------------

def test_tampered_rows_fail_with_eio_and_decryption_failure(daemon):
    client = _client(daemon)
    good_doc = json.dumps({"user": "good", "password": "previous"})
    bad_doc = json.dumps({"user": "flipped", "password": "current"})
    flipped_previous = _create(client, "tamper/flipped", good_doc)
    flipped = _put(client, "tamper/flipped", bad_doc)
    swap_a = _create(client, "tamper/swap-a", "value of a")
    swap_b = _create(client, "tamper/swap-b", "value of b")
    _create(client, "tamper/control", "control value")
    database = StateDir(daemon.state_dir).database

    daemon.stop()
    db = sqlite3.connect(database)
    try:
        with db:
            def row(name: str, version_id: str) -> tuple:
                return db.execute(
                    "SELECT v.secret_id, v.ciphertext, v.wrapped_key, v.key_id FROM versions v"
                    " JOIN secrets s ON s.id = v.secret_id"
                    " WHERE s.name = ? AND v.version_id = ?", (name, version_id)).fetchone()

            secret_id, ciphertext, _, _ = row("tamper/flipped", flipped)
            ciphertext = bytearray(ciphertext)
            ciphertext[len(ciphertext) // 2] ^= 0x01
            db.execute("UPDATE versions SET ciphertext = ? WHERE secret_id = ? AND version_id = ?",
                       (bytes(ciphertext), secret_id, flipped))
            a, b = row("tamper/swap-a", swap_a), row("tamper/swap-b", swap_b)
            for (target_id, version_id), (_, sealed, wrapped, key_id) in (
                    ((a[0], swap_a), b), ((b[0], swap_b), a)):
                db.execute(
                    "UPDATE versions SET ciphertext = ?, wrapped_key = ?, key_id = ?"
                    " WHERE secret_id = ? AND version_id = ?",
                    (sealed, wrapped, key_id, target_id, version_id))
    finally:
        db.close()
    daemon.start()
    pid = daemon.pid()

    for name in ("tamper/flipped", "tamper/swap-a", "tamper/swap-b"):
        path = daemon.path(*name.split("/"), AWSCURRENT)
        assert _read_errno(path) == errno.EIO, name
        with pytest.raises(model.DecryptionFailure) as failure:
            client.call("GetSecretValue", {"SecretId": name})
        assert failure.value.code == "DecryptionFailure"
    assert _read_errno(daemon.path("tamper", "flipped", "keys", AWSCURRENT, "user")) == errno.EIO
    # The untouched version of a tampered secret, and other secrets, still read.
    assert _read(daemon.path("tamper", "flipped", "AWSPREVIOUS")) == good_doc.encode()
    assert _read(daemon.path("tamper", "flipped", "versions", flipped_previous)) == (
        good_doc.encode())
    assert _api_value(client, "tamper/flipped", VersionStage="AWSPREVIOUS") == good_doc.encode()
    assert _read(daemon.path("tamper", "control", AWSCURRENT)) == b"control value"
    assert _api_value(client, "tamper/control") == b"control value"
    # The daemon stays up and keeps serving writes.
    _put(client, "tamper/control", "control value 2")
    assert _read(daemon.path("tamper", "control", AWSCURRENT)) == b"control value 2"
    assert os.path.ismount(daemon.mountpoint)
    assert daemon.pid() == pid


# --- 6. bad input changes nothing -------------------------------------------------------

def _raw_post(socket_path: Path, target: str, body: bytes) -> tuple[int, str]:
    conn = UnixHTTPConnection(socket_path, timeout=30.0)
    try:
        conn.request("POST", "/", body=body, headers={
            "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target})
        response = conn.getresponse()
        return response.status, json.loads(response.read())["__type"]
    finally:
        conn.close()


def test_bad_input_gets_its_error_code_and_changes_nothing(daemon):
    client = _client(daemon)
    current = _create(client, "bad/secret", "the value")
    other = _put(client, "bad/secret", "other value", stages=["OTHER"])
    _create(client, "bad/deleted", "deleted value")
    client.call("DeleteSecret", {"SecretId": "bad/deleted", "RecoveryWindowInDays": 7})
    token = str(uuid.uuid4())
    _put(client, "bad/secret", "tokened value", stages=["TOKENED"], token=token)
    state = StateDir(daemon.state_dir)
    socket_path = state.socket
    missing_version = str(uuid.uuid4())

    raw_cases = [
        ("malformed JSON", "secretsmanager.PutSecretValue",
         b'{"SecretId": "bad/secret", "SecretString": ', "SerializationException"),
        ("non-object JSON", "secretsmanager.PutSecretValue",
         b'["bad/secret", "x"]', "SerializationException"),
        ("unknown target", "secretsmanager.Frobnicate", b"{}", "UnknownOperationException"),
        ("unknown prefix", "kms.CreateKey", b"{}", "UnknownOperationException"),
        ("unimplemented action", "secretsmanager.ReplicateSecretToRegions",
         b'{"SecretId": "bad/secret", "AddReplicaRegions": [{"Region": "eu-west-1"}]}',
         "UnknownOperationException"),
    ]
    client_cases = [
        ("too-long name", "CreateSecret", {"Name": "n" * 513, "SecretString": "x"},
         "ValidationException"),
        ("too-long value", "PutSecretValue",
         {"SecretId": "bad/secret", "SecretString": "x" * 65537}, "ValidationException"),
        ("too-long binary", "PutSecretValue",
         {"SecretId": "bad/secret", "SecretBinary": b"\0" * 65537}, "ValidationException"),
        ("unknown version id", "GetSecretValue",
         {"SecretId": "bad/secret", "VersionId": missing_version}, "ResourceNotFoundException"),
        ("move to an unknown version", "UpdateSecretVersionStage",
         {"SecretId": "bad/secret", "VersionStage": AWSCURRENT, "MoveToVersionId":
          missing_version, "RemoveFromVersionId": current}, "ResourceNotFoundException"),
        ("move a label without RemoveFromVersionId", "UpdateSecretVersionStage",
         {"SecretId": "bad/secret", "VersionStage": AWSCURRENT, "MoveToVersionId": other},
         "InvalidParameterException"),
        ("remove from the wrong version", "UpdateSecretVersionStage",
         {"SecretId": "bad/secret", "VersionStage": AWSCURRENT, "MoveToVersionId": other,
          "RemoveFromVersionId": other}, "InvalidParameterException"),
        ("remove AWSCURRENT without a move", "UpdateSecretVersionStage",
         {"SecretId": "bad/secret", "VersionStage": AWSCURRENT,
          "RemoveFromVersionId": current}, "InvalidParameterException"),
        ("delete twice", "DeleteSecret", {"SecretId": "bad/deleted"},
         "InvalidRequestException"),
        ("restore a live secret", "RestoreSecret", {"SecretId": "bad/secret"},
         "InvalidRequestException"),
        ("put to a deleted secret", "PutSecretValue",
         {"SecretId": "bad/deleted", "SecretString": "x"}, "InvalidRequestException"),
        ("reuse a token with another value", "PutSecretValue",
         {"SecretId": "bad/secret", "SecretString": "another value",
          "ClientRequestToken": token}, "ResourceExistsException"),
        ("create an existing name", "CreateSecret",
         {"Name": "bad/secret", "SecretString": "x"}, "ResourceExistsException"),
        ("child under a reserved segment", "CreateSecret",
         {"Name": "bad/secret/versions", "SecretString": "x"}, "InvalidParameterException"),
        ("unknown secret", "PutSecretValue", {"SecretId": "bad/nothing", "SecretString": "x"},
         "ResourceNotFoundException"),
        ("unknown member", "GetSecretValue", {"SecretId": "bad/secret", "Bogus": 1},
         "ValidationException"),
    ]

    before = _dump(state.database)
    label = daemon.path("bad", "secret", AWSCURRENT)
    answers = {}
    for what, target, body, _ in raw_cases:
        status, answers[what] = _raw_post(socket_path, target, body)
        assert status == 400, what
    for what, action, params, _ in client_cases:
        try:
            client.call(action, params)
        except model.SecretsManagerError as error:
            answers[what] = error.code
        else:
            answers[what] = "(no error)"
    with pytest.raises(model.ValidationException):
        client.call("CreateSecret", {"Name": "bad name", "SecretString": "x"})
    expected = {what: code for what, _, _, code in raw_cases + client_cases}
    assert answers == expected
    assert _dump(state.database) == before
    assert os.readlink(label) == f"versions/{current}"
    assert _read(label) == b"the value"
    assert not daemon.path("bad", "deleted").exists()


def test_an_invalid_name_is_a_validation_exception_as_in_aws(daemon):
    client = _client(daemon)
    for name in ("bad name", " bad*name? "):
        with pytest.raises(model.SecretsManagerError) as refused:
            client.call("CreateSecret", {"Name": name, "SecretString": "x"})
        assert refused.value.code == "ValidationException", name
        assert refused.value.message == (
            "Invalid name. Must be a valid name containing alphanumeric characters, or any "
            "of the following: -/_+=.@!")


# --- 7. a full disk ----------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MiB tmpfs, unmounted in teardown."""
    root = tmp_path / "tiny"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "secretfs-test-tmpfs",
                    str(root)], check=True)
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)


@pytest.fixture
def daemon_on_tiny_disk(tmp_path, tiny_disk):
    """conftest's daemon, with its state directory on the tiny tmpfs."""
    mountpoint = tmp_path / "secrets"
    mountpoint.mkdir()
    running = Daemon(state_dir=tiny_disk / "state", mountpoint=mountpoint)
    running.cli("init", "--state-dir", str(running.state_dir))
    try:
        running.start()
        yield running
    finally:
        running.stop()
        force_unmount(mountpoint)


@pytest.mark.slow
def test_a_full_disk_refuses_writes_and_keeps_serving_reads(daemon_on_tiny_disk, tiny_disk):
    daemon = daemon_on_tiny_disk
    client = _client(daemon)
    acknowledged: dict[str, tuple[str, bytes]] = {}  # version id -> (secret, value)
    for name in ("disk/a", "disk/b"):
        value = f"{name} {os.urandom(16).hex()}"
        acknowledged[_create(client, name, value)] = (name, value.encode())

    # Leave about 1 MiB free, then write 40 KB values until the store refuses.
    free = os.statvfs(tiny_disk)
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * max(0, free.f_bavail * free.f_frsize - (1 << 20)))
    refusal, written = None, 0
    while refusal is None and written < 400:
        value = os.urandom(30 * 1024)
        try:
            version_id = _put(client, "disk/a", value)
        except model.SecretsManagerError as error:
            refusal = error
            continue
        acknowledged[version_id] = ("disk/a", value)
        written += 1
    assert refusal is not None, "the store never refused a write on a full disk"
    assert refusal.code == "InternalServiceError", refusal
    assert "full" in refusal.message.lower(), refusal.message
    assert written > 0, "the disk was already full before the first write"

    # Reads keep working, through the mount and the API; so do refusals of more writes.
    def check_everything() -> None:
        for version_id, (name, value) in acknowledged.items():
            assert _read(daemon.path(*name.split("/"), "versions", version_id)) == value
            assert _api_value(client, name, VersionId=version_id) == value
        for name in ("disk/a", "disk/b"):
            current = [vid for vid, st in _stages(client, name).items() if AWSCURRENT in st]
            assert _read(daemon.path(*name.split("/"), AWSCURRENT)) == acknowledged[
                current[0]][1]

    check_everything()
    # Take the last free bytes too; a write as large is refused again. (A tiny one may
    # still fit: the refused commit's WAL frames left allocated space behind.)
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as file:
        while True:
            file.write(b"\0" * 4096)
    with pytest.raises(model.SecretsManagerError) as again:
        _put(client, "disk/b", os.urandom(30 * 1024))
    assert again.value.code == "InternalServiceError", again.value
    check_everything()
    assert os.path.ismount(daemon.mountpoint)

    # Once space is free again, writes work again and nothing acknowledged is lost.
    filler.unlink()
    for name in ("disk/a", "disk/b"):
        value = f"{name} after {os.urandom(16).hex()}"
        acknowledged[_put(client, name, value)] = (name, value.encode())
    check_everything()
    daemon.stop()
    daemon.start()
    check_everything()
    print(f"{written} writes of 30 KiB acknowledged before the store refused: {refusal.message}")
