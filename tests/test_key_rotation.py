"""Master-key rotation: key versions in the key file and in wrapped data keys,
`secretfs rotate-key`, `secretfs re-encrypt` and `rotate-key --retire-unused`.

Tier 1 drives the local provider, the re-encryption over a real store with the KMS
provider against moto, and a backup racing a rotation. Tier 2 runs real daemons on
real FUSE mounts through the secretfs CLI and the API socket, and counts the stored
data keys by the key version their header names, through the store. Values are compared,
never shown.
"""

from __future__ import annotations

import base64
import collections
import hmac
import json
import os
import pty
import secrets
import select
import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import SECRETFS, Daemon, serving_daemon, wait_for
from test_kms import REGION, kms, kms_provider, moto, new_key, store  # noqa: F401 - fixtures
from test_status import call_as

from secretfs import backup
from secretfs.api.client import Client
from secretfs.crypto import LocalKeyProvider, seal, unseal
from secretfs.crypto.envelope import encode_fields, encryption_context
from secretfs.identity import SYSTEM
from secretfs.model import DecryptionFailure, InvalidParameterException
from secretfs.service import SecretsManagerService
from secretfs.state import StateDir
from secretfs.store import SealedValue
from secretfs.store.sqlite import SqliteStore

ACCOUNT = "123456789012"
ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:rotate/test-AbCdEf"
V1, V2 = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
EXIT_SERVICE_ERROR = 254

pytest_plugins = ["_postgres_store"]


def value(stem: str) -> str:
    """A value no file, log or message may hold: random, so a search can't be fooled."""
    return json.dumps({"user": stem, "password": secrets.token_hex(16)})


def assert_same(actual: bytes, expected: bytes, what: str) -> None:
    if not hmac.compare_digest(actual, expected):
        raise AssertionError(f"{what}: the value differs ({len(actual)} bytes, "
                             f"{len(expected)} expected)")


def blob_version(wrapped: bytes) -> int:
    """The key version a wrapped data key's header names (format 1 predates versions)."""
    if wrapped[0] == 1:
        return 1
    assert wrapped[0] == 2, f"unknown wrapped-key format {wrapped[0]}"
    return int.from_bytes(wrapped[1:5], "big")


def stored_key_versions(state_dir: Path) -> collections.Counter:
    """How many stored data keys (versions' and access keys') each (key id, key version)
    wraps, through the store's own queries."""
    opened = SqliteStore(state_dir / "secrets.db")
    try:
        with opened.read() as reader:
            rows = [(row[4], row[5]) for row in reader.wrapped_versions(None, 10 ** 6)]
            rows += [(key_id, wrapped) for _, key_id, wrapped
                     in reader.wrapped_access_keys(None, 10 ** 6)]
    finally:
        opened.close()
    return collections.Counter((key_id, blob_version(wrapped)) for key_id, wrapped in rows)


def holds(path: Path, text: str) -> bool:
    """Whether a file holds `text` (a boolean, so a failing assert never shows it)."""
    return text.encode() in path.read_bytes()


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    return text.rstrip("\n")


# --- tier 1: the key file ------------------------------------------------------------

@pytest.fixture
def provider(tmp_path):
    return LocalKeyProvider.create(tmp_path / "keys.json", region=REGION, account_id=ACCOUNT)


def _format_1_wrap(key_path: Path, key_id: str, data_key: bytes) -> bytes:
    """A data key wrapped as secretfs wrapped them before key versions existed."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    entry = json.loads(key_path.read_text())["Keys"][0]
    material = base64.b64decode(entry["KeyMaterial"])
    context = encryption_context(ARN, V1)
    pairs = [part for name in sorted(context) for part in (name, context[name])]
    nonce = os.urandom(12)
    return bytes([1]) + nonce + AESGCM(material).encrypt(
        nonce, data_key, encode_fields("secretfs/wrap/v1", key_id, *pairs))


def test_a_wrapped_key_names_its_key_version_and_old_blobs_are_version_1(provider, tmp_path):
    key_id = provider.resolve(None)
    data_key = os.urandom(32)
    old = _format_1_wrap(tmp_path / "keys.json", key_id, data_key)
    assert provider.wrapped_version(key_id, old) == 1
    assert bytes(provider.unwrap(key_id, old, encryption_context(ARN, V1))) == data_key
    first = seal(provider, key_id, b"first", arn=ARN, version_id=V1)
    assert blob_version(first.wrapped_key) == 1 == provider.wrapped_version(
        key_id, first.wrapped_key)

    described = provider.rotate_key(key_id)
    assert (described["KeyId"], described["KeyVersion"], described["PreviousKeyVersions"],
            described["Aliases"]) == (key_id, 2, [1], ["alias/aws/secretsmanager"])
    assert provider.resolve(None) == key_id and provider.key_version(key_id) == 2
    second = seal(provider, key_id, b"second", arn=ARN, version_id=V2)
    assert blob_version(second.wrapped_key) == 2
    # Older versions keep unwrapping what they wrapped, in both formats.
    assert unseal(provider, first, arn=ARN, version_id=V1) == b"first"
    assert bytes(provider.unwrap(key_id, old, encryption_context(ARN, V1))) == data_key
    # The version is bound: a header naming another version does not unwrap.
    relabelled = bytearray(second.wrapped_key)
    relabelled[1:5] = (1).to_bytes(4, "big")
    with pytest.raises(DecryptionFailure):
        provider.unwrap(key_id, bytes(relabelled), encryption_context(ARN, V2))


def test_versions_persist_and_a_stale_or_retired_version_says_so(provider, tmp_path):
    key_path = tmp_path / "keys.json"
    key_id = provider.resolve(None)
    stale = tmp_path / "stale.json"
    shutil.copy(key_path, stale)
    first = seal(provider, key_id, b"first", arn=ARN, version_id=V1)
    provider.rotate_key(key_id)
    second = seal(provider, key_id, b"second", arn=ARN, version_id=V2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json", "stale.json"]
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"

    reloaded = LocalKeyProvider.load(key_path, region=REGION, account_id=ACCOUNT)
    assert reloaded.list_keys() == provider.list_keys()
    assert unseal(reloaded, first, arn=ARN, version_id=V1) == b"first"
    assert unseal(reloaded, second, arn=ARN, version_id=V2) == b"second"
    # A copy of the key file from before the rotation (a fleet host not given the new
    # one) can't open what the new version wrapped, and says why.
    old_copy = LocalKeyProvider.load(stale, region=REGION, account_id=ACCOUNT)
    with pytest.raises(DecryptionFailure, match="version 2 of KMS key .* does not hold"):
        old_copy.unwrap(key_id, second.wrapped_key, encryption_context(ARN, V2))

    old_material = json.loads(stale.read_text())["Keys"][0]["KeyMaterial"]
    assert holds(key_path, old_material), "version 1 is gone before it was retired"
    assert reloaded.retire_old_versions(key_id) == [1]
    assert not holds(key_path, old_material), "version 1's material is still in the file"
    entry = json.loads(key_path.read_text())["Keys"][0]
    assert (entry["KeyVersion"], entry["RetiredVersions"]) == (2, [1])
    assert "PreviousVersions" not in entry
    again = LocalKeyProvider.load(key_path, region=REGION, account_id=ACCOUNT)
    for retired_in in (reloaded, again):
        with pytest.raises(DecryptionFailure, match="version 1 of KMS key .* was retired"):
            retired_in.unwrap(key_id, first.wrapped_key, encryption_context(ARN, V1))
        assert unseal(retired_in, second, arn=ARN, version_id=V2) == b"second"
    assert again.retire_old_versions(key_id) == []


def test_a_key_file_sealed_by_the_credential_rotates_and_reopens(tmp_path):
    key_path = tmp_path / "keys.json"
    provider = LocalKeyProvider.create(key_path, region=REGION, account_id=ACCOUNT,
                                       sealed=True)
    credential = base64.b64decode(provider.master_key())
    key_id = provider.resolve(None)
    first = seal(provider, key_id, b"first", arn=ARN, version_id=V1)
    provider.rotate_key(key_id)
    second = seal(provider, key_id, b"second", arn=ARN, version_id=V2)
    entry = json.loads(key_path.read_text())["Keys"][0]
    assert "KeyMaterial" not in entry and entry["SealedKeyMaterial"]
    assert [set(old) for old in entry["PreviousVersions"]] == [
        {"KeyVersion", "CreationDate", "SealedKeyMaterial"}]
    reopened = LocalKeyProvider.load(key_path, region=REGION, account_id=ACCOUNT,
                                     credential=credential)
    assert unseal(reopened, first, arn=ARN, version_id=V1) == b"first"
    assert unseal(reopened, second, arn=ARN, version_id=V2) == b"second"
    with pytest.raises(ValueError, match="credential secretfs-master-key does not open"):
        LocalKeyProvider.load(key_path, region=REGION, account_id=ACCOUNT,
                              credential=os.urandom(32))


def test_a_backup_made_while_the_key_file_changes_is_taken_again(state_dir, monkeypatch,
                                                                 tmp_path):
    """The snapshot's data keys may name a version only a later key file holds (a
    rotate-key) or only an earlier one held (a retire): a key file that changed during
    the snapshot makes the backup take it again."""
    state = StateDir(state_dir)
    config = state.read_config()
    snapshots = []
    real_snapshot = backup._snapshot

    def snapshot_racing_a_rotation(database, target):
        counts = real_snapshot(database, target)
        snapshots.append(counts)
        if len(snapshots) == 1:  # `secretfs rotate-key` lands during the first snapshot
            keys = LocalKeyProvider.load(state.keys, region=config["Region"],
                                         account_id=config["AccountId"])
            keys.rotate_key(keys.resolve(None))
        return counts

    monkeypatch.setattr(backup, "_snapshot", snapshot_racing_a_rotation)
    out = tmp_path / "backup.tar"
    backup.create_backup(state_dir, out, b"backup passphrase")
    assert len(snapshots) == 2
    restored = tmp_path / "restored"
    backup.restore_backup(out, restored, b"backup passphrase")
    assert (restored / "keys.json").read_bytes() == state.keys.read_bytes()
    assert json.loads(state.keys.read_text())["Keys"][0]["KeyVersion"] == 2


# --- tier 1: through the provider interface, with KMS -------------------------------------

def _wait_for_job(service) -> dict:
    assert wait_for(lambda: service.rekeying.status()["State"] != "Running", 60)
    return service.rekeying.status()


def test_kms_rotates_its_own_keys_and_re_encrypt_moves_data_keys_to_a_new_kms_key(
        moto, kms, tmp_path):  # noqa: F811 - fixtures
    first_key, first_alias = new_key(kms)
    second_key, second_alias = new_key(kms)
    keys = kms_provider(moto, first_alias)
    opened = SqliteStore.create(tmp_path / "secrets.db")
    service = SecretsManagerService(opened, keys, region=REGION, account_id=ACCOUNT)
    try:
        for action, member in (("RotateKey", "rotate_key"),
                               ("RetireKeyVersions", "retire_key_versions")):
            with pytest.raises(Exception) as refused:
                service.call(action, {}, SYSTEM)
            assert refused.value.code == "InvalidRequestException", member
            assert "rotated by AWS KMS itself" in refused.value.message
        values = {name: value(name) for name in ("moves", "stays")}
        for name, text in values.items():
            service.call("CreateSecret", {"Name": name, "SecretString": text}, SYSTEM)
        service.call("UpdateSecret", {"SecretId": "moves", "KmsKeyId": second_alias}, SYSTEM)
        service.call("PutSecretValue", {"SecretId": "moves",
                                        "SecretString": values["moves"] + "!"}, SYSTEM)

        def key_ids() -> dict:
            return {name: [version["KmsKeyIds"] for version in service.call(
                "ListSecretVersionIds", {"SecretId": name}, SYSTEM)["Versions"]]
                for name in values}

        service.call("ReEncrypt", {}, SYSTEM)
        progress = _wait_for_job(service)
        assert (progress["State"], progress["Examined"], progress["Moved"],
                progress["Failed"]) == ("Complete", 3, 1, 0)
        with opened.read() as reader:
            by_key = collections.Counter(row[4] for row in reader.wrapped_versions(None, 100))
        assert by_key == {second_key: 2, first_key: 1}
        assert [key_arns for key_arns in key_ids()["moves"]] and all(
            second_key in arn for key_arns in key_ids()["moves"] for arn in key_arns)
        for name, text in values.items():
            got = service.call("GetSecretValue", {"SecretId": name, "VersionStage":
                                                  "AWSPREVIOUS" if name == "moves" else
                                                  "AWSCURRENT"}, SYSTEM)["SecretString"]
            assert_same(got.encode(), text.encode(), name)
        # Run again: nothing left to move.
        service.call("ReEncrypt", {}, SYSTEM)
        assert _wait_for_job(service)["Moved"] == 0
    finally:
        opened.close()


# --- tier 2: real daemons ---------------------------------------------------------------

def on_terminal(argv: list[str], answers: list[str], env: dict) -> tuple[int, bytes]:
    """Run a command on a terminal of its own (pty), typing each answer once its prompt
    ("Passphrase..." or "Again:") shows; its exit code and all it printed."""
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output, typed = bytearray(), 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the terminal's last process is gone
                break
            if not chunk:
                break
            output += chunk
            prompts = output.count(b"Passphrase") + output.count(b"Again: ")
            while typed < min(prompts, len(answers)):
                os.write(fd, answers[typed].encode() + b"\n")
                typed += 1
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), bytes(output)


def client(daemon: Daemon) -> Client:
    return Client(StateDir(daemon.state_dir).socket, timeout=60.0)


def default_key(daemon: Daemon) -> str:
    return daemon.call("list-keys")["Keys"][0]["KeyId"]


def assert_values(daemon: Daemon, values: dict[str, str], *, mount: bool = True) -> None:
    """Every value reads back identical through the API (BatchGetSecretValue, 20 at a
    time) and, with `mount`, through the mount."""
    api = client(daemon)
    names = list(values)
    for start in range(0, len(names), 20):
        answer = api.call("BatchGetSecretValue", {"SecretIdList": names[start:start + 20]})
        assert not answer.get("Errors"), answer.get("Errors")
        for entry in answer["SecretValues"]:
            assert_same(entry["SecretString"].encode(), values[entry["Name"]].encode(),
                        entry["Name"])
    if mount:
        for name, text in values.items():
            assert_same(daemon.path(name, "AWSCURRENT").read_bytes(), text.encode(), name)


def create_secrets(daemon: Daemon, count: int, stem: str) -> dict[str, str]:
    api = client(daemon)
    values = {f"{stem}/{index}": value(f"{stem}-{index}") for index in range(count)}
    for name, text in values.items():
        api.call("CreateSecret", {"Name": name, "SecretString": text})
    return values


def restart(daemon: Daemon) -> None:
    """A fresh daemon: every value read afterwards is unwrapped again (no page cache)."""
    daemon.stop()
    daemon.start()


@pytest.mark.mount
def test_rotate_re_encrypt_and_retire_200_versions(daemon):
    key_id = default_key(daemon)
    before = create_secrets(daemon, 150, "before")
    daemon.cli("put-secret-value", "--secret-id", "before/0",
               "--secret-string", before["before/0"] + "-2")
    previous = {"before/0": before["before/0"]}
    before["before/0"] += "-2"
    client(daemon).call("CreateAccessKey", {"Principal": "uid:0"}, extension=True)
    assert stored_key_versions(daemon.state_dir) == {(key_id, 1): 152}

    rotated = json.loads(daemon.cli("rotate-key", "--output", "json").stdout)
    assert (rotated["KeyId"], rotated["KeyVersion"], rotated["PreviousKeyVersions"]) == \
        (key_id, 2, [1])
    assert daemon.call("list-keys")["Keys"][0]["KeyVersion"] == 2
    # New data keys are wrapped under version 2 at once; the old ones still open.
    after = create_secrets(daemon, 48, "after")
    assert stored_key_versions(daemon.state_dir) == {(key_id, 1): 152, (key_id, 2): 48}
    restart(daemon)
    assert_values(daemon, {**before, **after})
    got = daemon.call("get-secret-value", "--secret-id", "before/0",
                      "--version-stage", "AWSPREVIOUS")["SecretString"]
    assert_same(got.encode(), previous["before/0"].encode(), "AWSPREVIOUS")

    # Retiring refuses while version 1 wraps anything, and changes nothing.
    keys_before = daemon.state_dir.joinpath("keys.json").read_bytes()
    refused = daemon.cli("rotate-key", "--retire-unused", check=False)
    assert refused.returncode == EXIT_SERVICE_ERROR
    assert one_line(refused.stderr) == (
        "An error occurred (InvalidRequestException) when calling the RetireKeyVersions "
        f"operation: 152 stored data keys are still wrapped under version(s) 1 of KMS key "
        f"{key_id}: run 'secretfs re-encrypt' first.")
    assert daemon.state_dir.joinpath("keys.json").read_bytes() == keys_before

    result = daemon.cli("re-encrypt")
    lines = result.stdout.decode().splitlines()
    assert lines[0] == ("re-encryption of every master key: complete: 200 of 200 data keys "
                        "examined, 152 moved, 0 failed")
    assert lines[1:] == [f"KMS key {key_id}: version(s) 1 no longer used; 'secretfs "
                         f"rotate-key --retire-unused --key-id {key_id}' drops them"]
    progress = result.stderr.decode().splitlines()
    assert progress and all(line.startswith("re-encrypt: ") for line in progress)
    assert progress[-1] == "re-encrypt: 200/200 data keys examined, 152 moved"
    assert stored_key_versions(daemon.state_dir) == {(key_id, 2): 200}
    assert_values(daemon, {**before, **after})
    # Run again: everything is under the newest version already.
    again = json.loads(daemon.cli("re-encrypt", "--output", "json").stdout)
    assert (again["State"], again["Examined"], again["Moved"]) == ("Complete", 200, 0)
    assert again["KeyVersions"] == [{"KeyId": key_id, "KeyVersion": 2, "DataKeys": 200}]

    old_material = json.loads(keys_before)["Keys"][0]["PreviousVersions"][0]["KeyMaterial"]
    retired = daemon.cli("rotate-key", "--retire-unused").stdout.decode()
    assert retired == (f"KMS key {key_id}: version(s) 1 retired, their material is gone "
                       "from the key file; version 2 remains\n")
    assert not holds(daemon.state_dir / "keys.json", old_material), \
        "version 1's material is still in the key file"
    assert daemon.call("list-keys")["Keys"][0]["PreviousKeyVersions"] == []
    restart(daemon)  # the start check unwraps access keys' and versions' data keys
    assert_values(daemon, {**before, **after})
    got = daemon.call("get-secret-value", "--secret-id", "before/0",
                      "--version-stage", "AWSPREVIOUS")["SecretString"]
    assert_same(got.encode(), previous["before/0"].encode(), "AWSPREVIOUS")

    def mutations() -> collections.Counter:
        return collections.Counter(record["eventName"] for record in daemon.audit_records()
                                   if record.get("mutation"))

    assert wait_for(lambda: mutations()["RetireKeyVersions"] == 1)
    events = mutations()
    assert events["RotateKey"] == 1 and events["ReEncrypt"] == 2
    records = [record for record in daemon.audit_records() if record.get("mutation")
               and record["eventName"] == "RotateKey"]
    assert records[0]["resources"]["keyId"] == key_id


@pytest.mark.mount
def test_an_interrupted_re_encrypt_resumes_and_completes(daemon):
    key_id = default_key(daemon)
    values = create_secrets(daemon, 1200, "many")
    daemon.cli("rotate-key")
    api, pid = client(daemon), daemon.pid()
    started = api.call("ReEncrypt", {}, extension=True)
    assert (started["State"], started["DataKeys"]) == ("Running", 1200)
    # Killed as soon as a batch is in: a few hundred rows later at most.
    assert wait_for(lambda: api.call("GetReEncryptStatus", {}, extension=True)["Moved"] > 0,
                    interval=0.001)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: _unlocked(daemon.state_dir / "daemon.lock"))
    counts = stored_key_versions(daemon.state_dir)
    assert set(counts) == {(key_id, 1), (key_id, 2)}, "killed before it began, or after"
    assert counts[(key_id, 1)] + counts[(key_id, 2)] == 1200

    daemon.start()  # clears the stale mount the killed daemon left
    assert_values(daemon, values)  # half moved, every value reads
    result = daemon.cli("re-encrypt")
    assert result.stdout.decode().splitlines()[0] == (
        "re-encryption of every master key: complete: 1200 of 1200 data keys examined, "
        f"{counts[(key_id, 1)]} moved, 0 failed")
    assert stored_key_versions(daemon.state_dir) == {(key_id, 2): 1200}
    restart(daemon)
    assert_values(daemon, values)


def _unlocked(lock: Path) -> bool:
    import fcntl

    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


@pytest.mark.mount
def test_re_encrypt_of_one_key_and_of_a_secret_whose_kms_key_id_changed(daemon):
    default = default_key(daemon)
    app = daemon.call("create-key", "--alias", "alias/app")["KeyId"]
    values = {"on-app": value("on-app"), "on-default": value("on-default"),
              "moving": value("moving")}
    daemon.cli("create-secret", "--name", "on-app", "--secret-string", values["on-app"],
               "--kms-key-id", "alias/app")
    for name in ("on-default", "moving"):
        daemon.cli("create-secret", "--name", name, "--secret-string", values[name])
    daemon.cli("update-secret", "--secret-id", "moving", "--kms-key-id", "alias/app")
    daemon.cli("rotate-key", "--key-id", "alias/app")
    assert stored_key_versions(daemon.state_dir) == {(app, 1): 1, (default, 1): 2}

    result = daemon.cli("re-encrypt", "--key-id", "alias/app")
    assert result.stdout.decode().splitlines()[0] == (
        f"re-encryption of KMS key {app}: complete: 3 of 3 data keys examined, 2 moved, "
        "0 failed")
    # The app key's data key moved to its version 2, and "moving" to the app key; the
    # default key's own data key is left alone.
    assert stored_key_versions(daemon.state_dir) == {(app, 2): 2, (default, 1): 1}
    described = daemon.call("list-secret-version-ids", "--secret-id", "moving")
    assert described["Versions"][0]["KmsKeyIds"] == [
        f"arn:aws:kms:us-east-1:000000000000:key/{app}"]
    restart(daemon)
    assert_values(daemon, values)

    # An unknown key is one line, and starts nothing.
    for verb in (["rotate-key"], ["re-encrypt"], ["rotate-key", "--retire-unused"]):
        refused = daemon.cli(*verb, "--key-id", "alias/nope", check=False)
        assert refused.returncode == EXIT_SERVICE_ERROR
        assert one_line(refused.stderr).endswith(
            "operation: KMS key 'alias/nope' not found.")
    assert daemon.call("list-keys")["Keys"][1]["KeyVersion"] == 2


@pytest.fixture
def reachable():
    """A daemon whose state directory another uid can reach (its socket, when allowed)."""
    with serving_daemon(prefix="secretfs-rotate-") as running:
        yield running


@pytest.mark.mount
def test_rotation_verbs_are_root_s_unless_a_policy_grants_them(reachable, make_user):
    daemon = reachable
    user = make_user()
    socket = StateDir(daemon.state_dir).socket
    keys_before = daemon.state_dir.joinpath("keys.json").read_bytes()
    daemon.state_dir.chmod(0o711)
    os.chown(socket, -1, user.pw_gid)
    try:
        for action in ("RotateKey", "RetireKeyVersions", "ReEncrypt", "GetReEncryptStatus"):
            assert call_as(user, daemon.state_dir, action) == "AccessDeniedException", action
        assert daemon.state_dir.joinpath("keys.json").read_bytes() == keys_before
        daemon.call("put-identity-policy", "--principal", f"uid:{user.pw_uid}",
                    "--policy-name", "Rotate", "--policy-document", json.dumps({
                        "Statement": [{"Effect": "Allow", "Action": "secretfs:RotateKey",
                                       "Resource": "*"}]}))
        assert call_as(user, daemon.state_dir, "RotateKey") == "ok"
        assert call_as(user, daemon.state_dir, "ReEncrypt") == "AccessDeniedException"
    finally:
        os.chown(socket, -1, 0)
        daemon.state_dir.chmod(0o700)
    assert daemon.call("list-keys")["Keys"][0]["KeyVersion"] == 2


@pytest.mark.mount
def test_re_encrypt_draws_a_progress_bar_on_a_terminal(daemon):
    create_secrets(daemon, 20, "bar")
    daemon.cli("rotate-key")
    code, output = on_terminal([*SECRETFS, "re-encrypt", "--state-dir",
                                str(daemon.state_dir)], [], dict(os.environ))
    assert code == 0, output
    text = output.decode()
    assert f"\r[{'#' * 30}] 100%  20/20 data keys examined, 20 moved" in text
    assert "re-encryption of every master key: complete: 20 of 20" in text
    started = daemon.cli("re-encrypt", "--no-wait").stdout.decode()
    assert started == ("re-encrypting every master key in the daemon: 20 data keys to "
                       "examine; 'secretfs re-encrypt' follows it\n")
    followed = json.loads(daemon.cli("re-encrypt", "--output", "json").stdout)
    assert (followed["State"], followed["Examined"], followed["Moved"]) == ("Complete", 20, 0)


def test_the_store_walks_each_wrapped_data_key_once_a_page_at_a_time(store):  # noqa: F811
    """Versions without a value (made empty by a rotation) hold no data key to move."""
    with store.write() as writer:
        secret_id = writer.insert_secret(name="walk", path="walk", arn=ARN, description=None,
                                         kms_key_id="alias/app", created=datetime.now(UTC))
        for index in range(5):
            sealed = None if index in (0, 2) else SealedValue(
                b"c" * 28, bytes([2, 0, 0, 0, index]) + bytes(28), "k", False)
            writer.insert_version(secret_id, f"v{index}", created=datetime.now(UTC),
                                  sealed=sealed, is_binary=False)
    with store.read() as reader:
        assert reader.wrapped_key_count() == 3
        first = reader.wrapped_versions(None, 2)
        rest = reader.wrapped_versions(first[-1][:2], 2)
        assert reader.wrapped_versions(rest[-1][:2], 2) == []
    assert [row[:5] for row in first + rest] == [
        (secret_id, f"v{index}", ARN, "alias/app", "k") for index in (1, 3, 4)]
    assert [row[5][4] for row in first + rest] == [1, 3, 4]
    with store.write() as writer:
        assert not writer.rewrap_version(secret_id, "v1", b"not what it holds", b"new", "k2")
        assert writer.rewrap_version(secret_id, "v1", first[0][5], b"new", "k2")
        assert not writer.rewrap_version(secret_id, "v0", b"", b"new", "k2")
    with store.read() as reader:
        assert reader.sealed_value(secret_id, "v1").wrapped_key == b"new"
        assert reader.sealed_value(secret_id, "v1").key_id == "k2"
        assert reader.sealed_value(secret_id, "v0") is None


def test_re_encrypt_and_retire_on_each_store(store, tmp_path):  # noqa: F811
    keys = LocalKeyProvider.create(tmp_path / "keys.json", region=REGION, account_id=ACCOUNT)
    service = SecretsManagerService(store, keys, region=REGION, account_id=ACCOUNT)
    values = {f"s{index}": value(f"s{index}") for index in range(40)}
    for name, text in values.items():
        service.call("CreateSecret", {"Name": name, "SecretString": text}, SYSTEM)
    access_key = service.call("CreateAccessKey", {"Principal": "uid:0"}, SYSTEM)
    key_id = keys.resolve(None)
    assert service.call("RotateKey", {}, SYSTEM)["KeyVersion"] == 2
    with pytest.raises(Exception, match="41 stored data keys are still wrapped under "
                                        r"version\(s\) 1"):
        service.call("RetireKeyVersions", {}, SYSTEM)
    service.call("ReEncrypt", {}, SYSTEM)
    progress = _wait_for_job(service)
    assert (progress["State"], progress["Examined"], progress["Moved"]) == ("Complete", 41, 41)
    assert progress["RetirableKeyVersions"] == [{"KeyId": key_id, "KeyVersions": [1]}]
    with store.read() as reader:
        versions = {keys.wrapped_version(row[4], row[5])
                    for row in reader.wrapped_versions(None, 1000)}
        versions |= {keys.wrapped_version(row[1], row[2])
                     for row in reader.wrapped_access_keys(None, 1000)}
    assert versions == {2}
    assert service.call("RetireKeyVersions", {}, SYSTEM)["RetiredKeyVersions"] == [1]
    for name, text in values.items():
        got = service.call("GetSecretValue", {"SecretId": name}, SYSTEM)["SecretString"]
        assert_same(got.encode(), text.encode(), name)
    secret, _ = service.access_keys.credentials(access_key["AccessKeyId"])
    assert_same(secret.encode(), access_key["SecretAccessKey"].encode(), "access key")


def test_rotating_an_unknown_key_is_refused(provider):
    with pytest.raises(InvalidParameterException):
        provider.rotate_key("not-a-key")
