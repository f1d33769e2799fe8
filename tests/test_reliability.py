"""Reliability of the real daemon on a real mount: the invariants under stress and failure.

Each test drives a daemon started through the real CLI (conftest's `daemon`) and
pins one of ARCHITECTURE.md's invariants where it is most likely to break:
promotions racing readers (3), restarts (durability), plaintext on disk and core
dumps (1), tampered rows, bad input (7) and a full disk. Mutations go through the
control socket with `Client` where speed matters; the store is only ever opened
directly to look at it, or to tamper with it while the daemon is stopped.

The other test_reliability_*.py modules add SIGKILLs under load, a read-only state
directory, hostile names, and a model-checked run of the service's rules. Every
state directory these tests use is watched for plaintext (conftest's
`plaintext_watch`, checked at the end of the session).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from _reliability import (
    AWSCURRENT,
    all_version_ids,
    api_client,
    api_value,
    assert_intact,
    assert_stale,
    create_secret,
    current_version,
    distinct_values,
    dump_database,
    encoded,
    files_below,
    kill_daemon,
    new_daemon,
    plaintext_in,
    promote,
    put_value,
    read_errno,
    read_file,
    stages_of,
    start_readers,
    stop_readers,
    wait_ready,
)
from conftest import SECRETFS, force_unmount

from secretfs import model
from secretfs.api.client import UnixHTTPConnection
from secretfs.state import StateDir

pytestmark = [pytest.mark.mount, pytest.mark.reliability]


@pytest.fixture(autouse=True)
def watched(request, plaintext_watch):
    """Every daemon's state directory is scanned for plaintext at the session's end."""
    for name in ("daemon", "daemon_on_tiny_disk"):
        if name in request.fixturenames:
            plaintext_watch.watch(request.getfixturevalue(name).state_dir)
    return plaintext_watch


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

HAMMER_READERS = 8
HAMMER_PROMOTIONS = 1000  # in all, alternating between the two secrets
HAMMER_SECONDS = 10.0  # spread over at least this long, so readers meet every moment


@pytest.mark.slow
def test_promotions_are_atomic_for_concurrent_readers(daemon, tmp_path, watched):
    """8 processes re-read a label's file and a JSON key's file while AWSCURRENT moves
    1,000 times between versions of different sizes: every read is one whole version."""
    rng = random.Random()
    client = api_client(daemon)
    sizes = [10, 300, 4000, 9000, 20000]

    # A plain secret, set up through the CLI: five versions, four on labels of their own.
    plain = distinct_values(sizes, rng)
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
    passwords = distinct_values(sizes, rng)
    documents = [json.dumps({"password": password, "n": index})
                 for index, password in enumerate(passwords)]
    json_ids = [create_secret(client, "hammer/json", documents[0])]
    json_ids += [put_value(client, "hammer/json", document, stages=[f"L{index}"])
                 for index, document in enumerate(documents[1:], 1)]
    watched.add(*plain, *passwords)
    assert stages_of(client, "hammer/plain")[plain_ids[0]] == [AWSCURRENT]

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

    readers = start_readers(_READER, HAMMER_READERS, str(config))
    try:
        wait_ready(readers)
        current = {"hammer/plain": 0, "hammer/json": 0}
        ids = {"hammer/plain": plain_ids, "hammer/json": json_ids}
        started = time.monotonic()
        for promotions in range(1, HAMMER_PROMOTIONS + 1):
            name = list(current)[promotions % 2]
            target = rng.choice([i for i in range(len(sizes)) if i != current[name]])
            promote(client, name, ids[name][target], ids[name][current[name]])
            current[name] = target
            ahead = started + promotions * HAMMER_SECONDS / HAMMER_PROMOTIONS - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        elapsed = time.monotonic() - started
    finally:
        results = stop_readers(readers, stop)

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
    for name, versions in ids.items():
        assert current_version(client, name) == [versions[current[name]]], name
    assert os.path.ismount(daemon.mountpoint)
    assert daemon.pid() == pid
    print(summary)  # shown with -s: the figures of this run


# --- 2. a promotion is visible as soon as the call returns -----------------------------

def test_promotion_is_visible_when_the_call_returns(daemon):
    client = api_client(daemon)
    rng = random.Random()
    values = [json.dumps({"user": f"u{index}", "password": f"p{index}-{uuid.uuid4()}"})
              for index in range(3)]
    ids = [create_secret(client, "visible", values[0])]
    ids += [put_value(client, "visible", value, stages=[f"L{index}"])
            for index, value in enumerate(values[1:], 1)]
    label = daemon.path("visible", AWSCURRENT)
    key_link = daemon.path("visible", "keys", AWSCURRENT)
    current = 0
    # Warm every cache the kernel has, so a stale one would show.
    assert read_file(label) == values[0].encode()
    for round_ in range(200):
        target = rng.choice([index for index in range(3) if index != current])
        promote(client, "visible", ids[target], ids[current])
        current = target
        assert os.readlink(label) == f"versions/{ids[target]}", f"round {round_}"
        assert read_file(label) == values[target].encode(), f"round {round_}"
        assert os.readlink(key_link) == f".by-version/{ids[target]}", f"round {round_}"
        assert read_file(key_link / "password") == json.loads(values[target])["password"].encode()


# --- 3. durability across restarts and crashes ---------------------------------------

def test_values_versions_and_labels_survive_a_restart(daemon):
    client = api_client(daemon)
    first = create_secret(client, "keep/string", "first value")
    second = put_value(client, "keep/string", "second value")
    staged = put_value(client, "keep/string", "staged value", stages=["STAGED", "OTHER"])
    binary_value = os.urandom(64)
    binary = create_secret(client, "keep/binary", binary_value)
    document = json.dumps({"user": "admin", "port": 5432})
    create_secret(client, "keep/json", document)
    create_secret(client, "keep/deleted", "scheduled for deletion")
    client.call("DeleteSecret", {"SecretId": "keep/deleted", "RecoveryWindowInDays": 7})
    names = ["keep/string", "keep/binary", "keep/json", "keep/deleted"]
    before = {name: client.call("DescribeSecret", {"SecretId": name}) for name in names}
    versions_before = {name: all_version_ids(client, name) for name in names}

    daemon.stop()
    daemon.start()

    for name in names:
        after = client.call("DescribeSecret", {"SecretId": name})
        for member in ("ARN", "Name", "VersionIdsToStages", "CreatedDate", "DeletedDate"):
            assert after.get(member) == before[name].get(member), (name, member)
        assert all_version_ids(client, name) == versions_before[name]
    assert stages_of(client, "keep/string") == {
        second: [AWSCURRENT], first: ["AWSPREVIOUS"], staged: ["OTHER", "STAGED"]}
    values = {first: b"first value", second: b"second value", staged: b"staged value"}
    for version_id, value in values.items():
        assert read_file(daemon.path("keep", "string", "versions", version_id)) == value
        assert api_value(client, "keep/string", VersionId=version_id) == value
    assert os.readlink(daemon.path("keep", "string", AWSCURRENT)) == f"versions/{second}"
    assert read_file(daemon.path("keep", "string", "STAGED")) == b"staged value"
    assert read_file(daemon.path("keep", "binary", AWSCURRENT)) == binary_value
    assert api_value(client, "keep/binary", VersionId=binary) == binary_value
    assert read_file(daemon.path("keep", "json", "keys", AWSCURRENT, "user")) == b"admin"
    assert read_file(daemon.path("keep", "json", "keys", AWSCURRENT, "port")) == b"5432"
    assert not daemon.path("keep", "deleted").exists()


def test_the_next_start_clears_a_stale_mount_at_once(daemon):
    client = api_client(daemon)
    version_id = create_secret(client, "stale", "survives a crash")
    pid = kill_daemon(daemon)
    assert_stale(daemon.mountpoint)

    daemon.start()  # conftest's cli() raises AssertionError when `secretfs mount` fails

    assert daemon.pid() != pid
    assert os.readlink(daemon.path("stale", AWSCURRENT)) == f"versions/{version_id}"
    assert read_file(daemon.path("stale", AWSCURRENT)) == b"survives a crash"
    assert "clearing a stale mount" in StateDir(daemon.state_dir).log.read_text()


# --- 4. plaintext never reaches disk ----------------------------------------------------

@pytest.mark.slow
def test_plaintext_never_reaches_disk(daemon, watched):
    # Debug logging on both sides (Python's and libfuse's), the most a log would ever hold.
    daemon.stop()
    daemon.extra_args = ["--debug"]
    daemon.start()
    client = api_client(daemon)
    values: list[str | bytes] = []
    for index in range(25):
        string = f"sfs-plain-{index}-{os.urandom(24).hex()}"
        binary = os.urandom(48)
        create_secret(client, f"plain/string{index}", string)
        create_secret(client, f"plain/binary{index}", binary)
        values += [string, binary]
        if index % 5 == 0:  # a second version, and an update, of some of them
            newer = f"sfs-newer-{index}-{os.urandom(24).hex()}"
            put_value(client, f"plain/string{index}", newer)
            updated = os.urandom(40)
            client.call("UpdateSecret", {"SecretId": f"plain/binary{index}",
                                         "SecretBinary": updated})
            values += [newer, updated]
    password = f"sfs-json-{os.urandom(24).hex()}"
    create_secret(client, "plain/json", json.dumps({"user": "app", "password": password}))
    values.append(password)
    watched.add(*values)

    for index in range(25):
        for name in (f"string{index}", f"binary{index}"):
            through_mount = read_file(daemon.path("plain", name, AWSCURRENT))
            assert through_mount == api_value(client, f"plain/{name}")
            assert through_mount in {encoded(value) for value in values}
    assert read_file(daemon.path("plain", "json", "keys", AWSCURRENT, "password")) == (
        password.encode())

    state = StateDir(daemon.state_dir)
    pid = daemon.pid()
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.MULTILINE), limits
    # While it runs: the WAL and shared-memory files hold the latest pages.
    assert state.database.with_name("secrets.db-wal").exists()
    assert plaintext_in(files_below(state.root), values) == []

    daemon.stop()
    assert state.log.stat().st_size > 0
    for expected in ("secrets.db", "keys.json", "config.json", "daemon.log"):
        assert (state.root / expected).exists(), expected
    assert plaintext_in(files_below(state.root), values) == []


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


NOBODY_GID = 65534


def _proc_owner_and_group(pid: int) -> tuple[tuple[int, int], int]:
    """(uid, gid) owning /proc/<pid>/status, and the process's effective gid."""
    status = Path(f"/proc/{pid}/status")
    effective_gid = int(re.search(r"^Gid:\s+\d+\s+(\d+)", status.read_text(), re.MULTILINE)[1])
    owner = status.stat()
    return (owner.st_uid, owner.st_gid), effective_gid


def test_a_running_daemon_is_not_dumpable_and_dumps_nothing(tmp_path):
    """What README promises of the live daemon: not dumpable, core size limit 0, a
    coredump_filter of no mappings.

    A root daemon's /proc files are root's whether it is dumpable or not, so this one
    runs as uid 0 in group nogroup: the kernel gives the /proc/<pid> files of a process
    that is not dumpable to root:root, and those of a dumpable one to its own uid and
    gid, as it does for a process started the same way that doesn't harden itself."""
    running = new_daemon(tmp_path, tmp_path)
    mountpoint = running.mountpoint
    in_group = ["setpriv", f"--regid={NOBODY_GID}", "--clear-groups", "--"]
    control = subprocess.Popen([*in_group, "sleep", "60"])
    try:
        subprocess.run([*in_group, *SECRETFS, "mount", str(mountpoint), "--state-dir",
                        str(running.state_dir)], check=True, capture_output=True, timeout=60,
                       env=dict(os.environ, SECRETFS_STATE_DIR=str(running.state_dir)))
        pid = running.pid()
        assert _proc_owner_and_group(control.pid) == ((0, NOBODY_GID), NOBODY_GID)
        assert _proc_owner_and_group(pid) == ((0, 0), NOBODY_GID)
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.MULTILINE), limits
        # And should something dump it anyway: no memory mappings in the dump.
        assert int(Path(f"/proc/{pid}/coredump_filter").read_text(), 16) == 0
        # The mount serves, hardened as it is.
        create_secret(api_client(running), "hardened", "hardened value")
        assert read_file(mountpoint / "hardened" / AWSCURRENT) == b"hardened value"
    finally:
        control.kill()
        control.wait()
        running.stop()


# --- 5. tampered rows fail closed -------------------------------------------------------

def test_tampered_rows_fail_with_eio_and_decryption_failure(daemon):
    client = api_client(daemon)
    good_doc = json.dumps({"user": "good", "password": "previous"})
    bad_doc = json.dumps({"user": "flipped", "password": "current"})
    flipped_previous = create_secret(client, "tamper/flipped", good_doc)
    flipped = put_value(client, "tamper/flipped", bad_doc)
    swap_a = create_secret(client, "tamper/swap-a", "value of a")
    swap_b = create_secret(client, "tamper/swap-b", "value of b")
    create_secret(client, "tamper/control", "control value")
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
        assert read_errno(path) == errno.EIO, name
        with pytest.raises(model.DecryptionFailure) as failure:
            client.call("GetSecretValue", {"SecretId": name})
        assert failure.value.code == "DecryptionFailure"
    assert read_errno(daemon.path("tamper", "flipped", "keys", AWSCURRENT, "user")) == errno.EIO
    # The untouched version of a tampered secret, and other secrets, still read.
    assert read_file(daemon.path("tamper", "flipped", "AWSPREVIOUS")) == good_doc.encode()
    assert read_file(daemon.path("tamper", "flipped", "versions", flipped_previous)) == (
        good_doc.encode())
    assert api_value(client, "tamper/flipped", VersionStage="AWSPREVIOUS") == good_doc.encode()
    assert read_file(daemon.path("tamper", "control", AWSCURRENT)) == b"control value"
    assert api_value(client, "tamper/control") == b"control value"
    # The daemon stays up and keeps serving writes.
    put_value(client, "tamper/control", "control value 2")
    assert read_file(daemon.path("tamper", "control", AWSCURRENT)) == b"control value 2"
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
    client = api_client(daemon)
    current = create_secret(client, "bad/secret", "the value")
    other = put_value(client, "bad/secret", "other value", stages=["OTHER"])
    create_secret(client, "bad/deleted", "deleted value")
    client.call("DeleteSecret", {"SecretId": "bad/deleted", "RecoveryWindowInDays": 7})
    token = str(uuid.uuid4())
    put_value(client, "bad/secret", "tokened value", stages=["TOKENED"], token=token)
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

    before = dump_database(state.database)
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
    assert dump_database(state.database) == before
    assert os.readlink(label) == f"versions/{current}"
    assert read_file(label) == b"the value"
    assert not daemon.path("bad", "deleted").exists()


def test_an_invalid_name_is_a_validation_exception_as_in_aws(daemon):
    client = api_client(daemon)
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
    running = new_daemon(tiny_disk, tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        force_unmount(running.mountpoint)


@pytest.mark.slow
def test_a_full_disk_refuses_writes_and_keeps_serving_reads(daemon_on_tiny_disk, tiny_disk,
                                                            watched):
    daemon = daemon_on_tiny_disk
    client = api_client(daemon)
    acknowledged: dict[str, tuple[str, bytes]] = {}  # version id -> (secret, value)
    for name in ("disk/a", "disk/b"):
        value = watched.token("disk")
        acknowledged[create_secret(client, name, value)] = (name, value.encode())

    # Leave about 1 MiB free, then write 40 KB values until the store refuses.
    free = os.statvfs(tiny_disk)
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * max(0, free.f_bavail * free.f_frsize - (1 << 20)))
    refusal, written = None, 0
    while refusal is None and written < 400:
        value = os.urandom(30 * 1024)
        try:
            version_id = put_value(client, "disk/a", value)
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
            assert read_file(daemon.path(*name.split("/"), "versions", version_id)) == value
            assert api_value(client, name, VersionId=version_id) == value
        for name in ("disk/a", "disk/b"):
            current = [vid for vid, st in stages_of(client, name).items() if AWSCURRENT in st]
            assert read_file(daemon.path(*name.split("/"), AWSCURRENT)) == acknowledged[
                current[0]][1]

    check_everything()
    # Take the last free bytes too; a write as large is refused again. (A tiny one may
    # still fit: the refused commit's WAL frames left allocated space behind.)
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as file:
        while True:
            file.write(b"\0" * 4096)
    with pytest.raises(model.SecretsManagerError) as again:
        put_value(client, "disk/b", os.urandom(30 * 1024))
    assert again.value.code == "InternalServiceError", again.value
    check_everything()
    assert os.path.ismount(daemon.mountpoint)

    # Once space is free again, writes work again and nothing acknowledged is lost.
    filler.unlink()
    for name in ("disk/a", "disk/b"):
        value = watched.token("disk")
        acknowledged[put_value(client, name, value)] = (name, value.encode())
    check_everything()
    daemon.stop()
    daemon.start()
    check_everything()
    assert_intact(daemon.state_dir)
    # The tmpfs goes away with the test: look for plaintext on it now.
    assert watched.findings(daemon.state_dir) == []
    print(f"{written} writes of 30 KiB acknowledged before the store refused: {refusal.message}")
