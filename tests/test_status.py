"""Tier 2: `secretfs status` and `secretfs refresh` against the real daemon.

Refresh is for a store that another process writes too (a shared store): here a
second service instance on the same state directory, opened as `secretfs.daemon`
opens the daemon's own, commits behind the daemon's back.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECRETFS, Daemon, serving_daemon, wait_for

from secretfs.api.client import Client
from secretfs.daemon import open_service
from secretfs.identity import SYSTEM
from secretfs.state import StateDir

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def served() -> Iterator[Daemon]:
    with serving_daemon(prefix="secretfs-status-") as running:
        yield running


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(StateDir(served.state_dir).socket, timeout=30.0)


def elsewhere(served: Daemon):
    """Another process's view of the same store: a second service instance, opened now
    (it knows the store as it is, and then only its own commits)."""
    return open_service(StateDir(served.state_dir))


def status(served: Daemon) -> dict:
    return served.call("status", "--output", "json")


def test_status_names_the_mount_store_keys_and_audit_log(served, client):
    client.call("CreateSecret", {"Name": "status/one", "SecretString": "a"})
    client.call("CreateSecret", {"Name": "status/gone", "SecretString": "a"})
    client.call("DeleteSecret", {"SecretId": "status/gone"})
    found = status(served)
    mount = found["Mount"]
    assert mount["MountPoint"] == str(served.mountpoint)
    assert mount["Pid"] == served.pid()
    assert mount["UptimeSeconds"] >= 0 and mount["StrictNames"] is False
    assert mount["ExecutablesWatched"] is True  # root here: the process events connector
    assert "Endpoint" not in mount  # no --listen
    store = found["Store"]
    assert store == {"Kind": "sqlite", "Location": str(served.state_dir / "secrets.db"),
                     "ReadOnly": False, "SchemaVersion": store["SchemaVersion"],
                     "Secrets": store["Secrets"], "ScheduledForDeletion": 1}
    assert store["Secrets"] >= 1 and store["SchemaVersion"] >= 4
    assert found["KeyProvider"] == {"Kind": "local", "Source": "key file",
                                    "Path": str(served.state_dir / "keys.json"), "Keys": 1}
    assert found["Hooks"] == [] and found["HookProblems"] == []
    # The audit log is written every second; its queue empties, its last write is recent.
    assert wait_for(lambda: status(served)["Audit"]["Queued"] == 0)
    audit = status(served)["Audit"]
    assert audit["Failing"] is False
    assert audit["Directory"] == str(served.state_dir / "audit")
    assert audit["LastWriteDate"]  # an ISO time, as the other ...Date members show

    text = served.cli("status").stdout.decode()
    assert f"mount         {served.mountpoint}  pid {served.pid()}  up " in text
    assert f"store         sqlite {served.state_dir / 'secrets.db'}  schema " in text
    assert "(1 scheduled for deletion)  writable" in text
    assert "endpoint      none (Unix socket only)" in text
    assert "hooks         0 configured" in text


def test_rotations_due_and_failing(served, client):
    client.call("CreateSecret", {"Name": "status/rotates", "SecretString": "a"})
    client.call("CreateSecret", {"Name": "status/broken", "SecretString": "a"})
    served.call("rotate-secret", "--secret-id", "status/rotates", "--rotation-lambda-arn",
                "secretfs:random-password", "--rotation-rules", '{"AutomaticallyAfterDays": 30}')
    served.call("rotate-secret", "--secret-id", "status/broken", "--rotation-lambda-arn",
                "exec:/bin/false")

    def failing() -> list[dict]:
        return status(served)["Rotations"]["Failing"]

    assert wait_for(lambda: [failure["Name"] for failure in failing()] == ["status/broken"])
    failure = failing()[0]
    assert failure["Error"].startswith("createSecret: ")
    assert failure["Attempts"] == 1
    assert failure["RetryDate"]  # a minute away
    rotations = status(served)["Rotations"]
    assert rotations["Scheduled"] == 2  # the good one again in 30 days
    assert rotations["Due"] == []  # the good one is done, the broken one waits for its retry
    assert rotations["NextDueDate"]
    text = served.cli("status").stdout.decode()
    assert "rotations     2 scheduled  0 due  1 failing  next due 20" in text
    assert "  failing     status/broken: createSecret: " in text


def call_as(user, state_dir: Path, action: str) -> str:
    """An extension action called through the socket by a process running as `user` (a
    forked child: this interpreter may not be one another user can start); returns the
    error code, or "ok"."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, call, report, exit
        try:
            os.setgroups([user.pw_gid])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            try:
                Client(StateDir(state_dir).socket).call(action, {}, extension=True)
                answer = "ok"
            except Exception as error:
                answer = getattr(error, "code", type(error).__name__)
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


def test_status_and_refresh_are_root_s_unless_a_policy_says_otherwise(served, make_user):
    user = make_user()
    socket = StateDir(served.state_dir).socket
    # An operator lets a group use the socket; the policies still decide each action.
    served.state_dir.chmod(0o711)
    os.chown(socket, -1, user.pw_gid)
    try:
        assert call_as(user, served.state_dir, "GetStatus") == "AccessDeniedException"
        assert call_as(user, served.state_dir, "Refresh") == "AccessDeniedException"
        served.call("put-identity-policy", "--principal", f"uid:{user.pw_uid}",
                    "--policy-name", "Status", "--policy-document", json.dumps({
                        "Statement": [{"Effect": "Allow", "Action": "secretfs:GetStatus",
                                       "Resource": "*"}]}))
        assert call_as(user, served.state_dir, "GetStatus") == "ok"
        assert call_as(user, served.state_dir, "Refresh") == "AccessDeniedException"
    finally:
        os.chown(socket, -1, 0)
        served.state_dir.chmod(0o700)
    assert wait_for(lambda: [record["decision"] for record in served.audit_records(
        "--uid", str(user.pw_uid)) if record["eventName"] in (
            "secretfs:GetStatus", "secretfs:Refresh")] == ["deny", "deny", "allow", "deny"])


def settle_accesses(client, *names: str) -> None:
    """Wait until the daemon has written today's LastAccessedDate of each secret: that
    write re-reads the secret from the store, so one landing after another process's
    commit would show that commit before any refresh (reads don't write again today)."""
    assert wait_for(lambda: all(
        "LastAccessedDate" in client.call("DescribeSecret", {"SecretId": name})
        for name in names))


def test_refresh_shows_what_another_process_committed(served, client, tmp_path):
    first = client.call("CreateSecret", {"Name": "status/shared",
                                         "SecretString": "ours"})["VersionId"]
    assert served.path("status/shared/AWSCURRENT").read_text() == "ours"
    settle_accesses(client, "status/shared")
    runs = tmp_path / "runs"
    hooks = StateDir(served.state_dir).hooks_dir
    hooks.mkdir(mode=0o700, exist_ok=True)
    hook = hooks / "shared.json"
    hook.write_text(json.dumps({"Secret": "status/shared", "Debounce": 0, "Command": [
        "/bin/sh", "-c", f"echo $SECRETFS_VERSION_ID >> {runs}"]}))
    hook.chmod(0o600)
    try:
        assert "(new: shared)" in served.cli("refresh").stdout.decode()
        other = elsewhere(served)
        theirs = other.call("PutSecretValue", {"SecretId": "status/shared",
                                                   "SecretString": "theirs"},
                                SYSTEM)["VersionId"]
        other.call("CreateSecret", {"Name": "status/new-elsewhere",
                                        "SecretString": "new"}, SYSTEM)
        # The daemon doesn't know yet: its catalog (and the kernel's cache) say "ours".
        assert served.path("status/shared/AWSCURRENT").read_text() == "ours"
        assert not served.path("status/new-elsewhere").exists()
        out = served.cli("refresh").stdout.decode()
        assert "refreshed every secret" in out
        assert "changed: status/new-elsewhere, status/shared" in out
        assert served.path("status/shared/AWSCURRENT").read_text() == "theirs"
        assert served.path("status/shared/AWSPREVIOUS").read_text() == "ours"
        assert os.readlink(served.path("status/shared/AWSPREVIOUS")) == f"versions/{first}"
        assert served.path("status/new-elsewhere/AWSCURRENT").read_text() == "new"
        # The hook hears the change the refresh found.
        assert wait_for(lambda: runs.exists() and runs.read_text() == f"{theirs}\n")
    finally:
        hook.unlink()
        served.cli("refresh")


def test_refresh_of_one_secret(served, client):
    client.call("CreateSecret", {"Name": "status/single", "SecretString": "one"})
    client.call("CreateSecret", {"Name": "status/untouched", "SecretString": "one"})
    assert served.path("status/single/AWSCURRENT").read_text() == "one"
    assert served.path("status/untouched/AWSCURRENT").read_text() == "one"
    settle_accesses(client, "status/single", "status/untouched")
    other = elsewhere(served)
    for name in ("status/single", "status/untouched"):
        other.call("PutSecretValue", {"SecretId": name, "SecretString": "two"}, SYSTEM)
    refreshed = served.call("refresh", "status/single", "--output", "json")
    assert refreshed == {"Refreshed": "status/single", "Secrets": 1,
                         "Changed": ["status/single"], "Hooks": 0, "HooksStarted": [],
                         "HookProblems": []}
    assert served.path("status/single/AWSCURRENT").read_text() == "two"
    assert served.path("status/untouched/AWSCURRENT").read_text() == "one"
    # A secret only the other process knows, by name.
    other.call("CreateSecret", {"Name": "status/born-elsewhere", "SecretString": "x"},
                   SYSTEM)
    assert served.call("refresh", "status/born-elsewhere", "--output", "json")[
        "Changed"] == ["status/born-elsewhere"]
    assert served.path("status/born-elsewhere/AWSCURRENT").read_text() == "x"
    missing = served.cli("refresh", "status/nowhere", check=False)
    assert missing.returncode == 254
    assert missing.stderr.decode().startswith(
        "An error occurred (ResourceNotFoundException) when calling the Refresh operation")


def test_refresh_reloads_the_policies_another_process_changed(served, client, make_user):
    from conftest import run_as

    user = make_user()
    client.call("CreateSecret", {"Name": "status/policy", "SecretString": "readable"})
    path = served.path("status/policy/AWSCURRENT")
    assert run_as(user, "cat", str(path)).returncode != 0
    # By uid: the daemon remembers a uid's name for a few seconds, and make_user may
    # hand out the uid of a user an earlier test removed.
    elsewhere(served).call("PutIdentityPolicy", {
        "Principal": f"uid:{user.pw_uid}", "PolicyName": "Read",
        "PolicyDocument": json.dumps({"Statement": [{
            "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
            "Resource": "status/policy*"}]})}, SYSTEM)
    assert run_as(user, "cat", str(path)).returncode != 0
    served.cli("refresh")
    read = run_as(user, "cat", str(path))
    assert (read.returncode, read.stdout) == (0, b"readable"), read.stderr


def test_a_stopped_daemon_is_one_line_and_exit_status_1(tmp_path: Path):
    env = dict(os.environ, SECRETFS_STATE_DIR=str(tmp_path))
    for verb in (["status"], ["refresh"], ["wait", "x", "--timeout", "1"]):
        started = time.monotonic()
        result = subprocess.run([*SECRETFS, *verb], capture_output=True, text=True, env=env,
                                timeout=30)
        assert result.returncode == 1, verb
        assert result.stdout == ""
        assert result.stderr == (f"the secretfs daemon is not running (no one serves "
                                 f"{tmp_path}/control.sock); start it with 'secretfs mount'\n")
        assert time.monotonic() - started < 10
