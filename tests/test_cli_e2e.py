"""Tier 2: the `secretfs` command end to end, against a real daemon.

Every verb runs as a user types it (a subprocess of the real CLI) and is checked by
its JSON output, by other verbs and, for values, by the mount. Every refusal must be
one line on stderr naming the AWS error code, exit non-zero, change nothing (checked
with describe-secret and list-secret-version-ids before and after), and never show a
secret value. The daemon is shared by the module: each test uses names of its own.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import string
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Daemon

from secretfs.api.client import Client
from secretfs.model import ResourceNotFoundException
from secretfs.state import StateDir

pytestmark = pytest.mark.mount

ARN_PREFIX = "arn:aws:secretsmanager:us-east-1:000000000000:secret:"
EXIT_USAGE, EXIT_SERVICE_ERROR = 252, 254


# --- fixtures and helpers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sm(tmp_path_factory) -> Iterator[Daemon]:
    """One daemon for the module, started through the real CLI as conftest's is."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("mount tests need root and /dev/fuse (run through the README's test command)")
    base = tmp_path_factory.mktemp("cli")
    running = Daemon(state_dir=base / "state", mountpoint=base / "secrets")
    running.mountpoint.mkdir()
    running.cli("init", "--state-dir", str(running.state_dir))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def unique(stem: str) -> str:
    return f"e2e-{stem}-{uuid.uuid4().hex[:8]}"


def run(daemon: Daemon, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return daemon.cli(*args, input=input, check=False)


def ok(daemon: Daemon, *args: str, input: bytes | None = None) -> dict:
    """A verb that must succeed silently on stderr; its JSON output, parsed."""
    result = run(daemon, *args, input=input)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return json.loads(result.stdout) if result.stdout else {}


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    return text.rstrip("\n")


def refused(daemon: Daemon, code: str, operation: str, *args: str,
            secrets: tuple[str, ...] = (), input: bytes | None = None) -> str:
    """Run a verb that must fail with `code`; returns its one stderr line."""
    result = run(daemon, *args, input=input)
    assert result.returncode == EXIT_SERVICE_ERROR, result.stderr
    assert result.stdout == b""
    line = one_line(result.stderr)
    assert re.fullmatch(rf"An error occurred \({code}\) when calling the {operation} "
                        r"operation: \S.*", line), line
    for value in secrets:
        assert value not in line
    return line


def client(daemon: Daemon) -> Client:
    return Client(StateDir(daemon.state_dir).socket)


def _without_access_dates(value):
    if isinstance(value, dict):
        return {key: _without_access_dates(item) for key, item in value.items()
                if key != "LastAccessedDate"}
    if isinstance(value, list):
        return [_without_access_dates(item) for item in value]
    return value


def state_of(daemon: Daemon, name: str) -> tuple | None:
    """describe-secret and list-secret-version-ids (access dates aside), or None."""
    api = client(daemon)
    try:
        described = api.call("DescribeSecret", {"SecretId": name})
    except ResourceNotFoundException:
        return None
    versions = api.call("ListSecretVersionIds", {"SecretId": name, "IncludeDeprecated": True})
    return _without_access_dates(described), _without_access_dates(versions)


def create(daemon: Daemon, name: str, value: str | bytes, **members) -> str:
    """Setup through the socket (the verbs under test run through the CLI); the version id."""
    kind = "SecretBinary" if isinstance(value, bytes) else "SecretString"
    return client(daemon).call("CreateSecret", {"Name": name, kind: value,
                                                **members})["VersionId"]


def put(daemon: Daemon, name: str, value: str, *stages: str) -> str:
    members = {"VersionStages": list(stages)} if stages else {}
    return client(daemon).call("PutSecretValue", {"SecretId": name, "SecretString": value,
                                                  **members})["VersionId"]


def value_of(daemon: Daemon, name: str, **selector: str) -> str | bytes:
    answer = client(daemon).call("GetSecretValue", {"SecretId": name, **selector})
    return answer.get("SecretString", answer.get("SecretBinary"))


def iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, text
    return moment


def assert_recent(text: str) -> None:
    assert abs(iso(text) - datetime.now(UTC)) < timedelta(minutes=10), text


def assert_nowhere_on_disk(daemon: Daemon, *values: str) -> None:
    """Not in the daemon's log, the store, its WAL, or anything else it writes."""
    for path in daemon.state_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in values:
                assert value.encode() not in data, path


# --- create-secret, get-secret-value ------------------------------------------------------

def test_create_secret_with_a_string_description_and_shorthand_tags(sm):
    name = unique("string") + "/db"
    created = ok(sm, "create-secret", "--name", name, "--secret-string", "s3cret value",
                 "--description", "the database", "--tags", "Key=env,Value=prod",
                 "Key=team,Value=core")
    assert set(created) == {"ARN", "Name", "VersionId"}
    assert created["Name"] == name
    assert re.fullmatch(re.escape(ARN_PREFIX + name) + "-[A-Za-z0-9]{6}", created["ARN"])
    uuid.UUID(created["VersionId"])

    got = ok(sm, "get-secret-value", "--secret-id", name)
    assert got["SecretString"] == "s3cret value"
    assert (got["ARN"], got["Name"], got["VersionId"]) == (created["ARN"], name,
                                                          created["VersionId"])
    assert got["VersionStages"] == ["AWSCURRENT"]
    assert_recent(got["CreatedDate"])

    # By full ARN and by partial ARN (without the random suffix), as AWS accepts.
    for secret_id in (created["ARN"], ARN_PREFIX + name):
        described = ok(sm, "describe-secret", "--secret-id", secret_id)
        assert described["Name"] == name
    assert described["Description"] == "the database"
    assert described["Tags"] == [{"Key": "env", "Value": "prod"}, {"Key": "team", "Value": "core"}]
    assert described["VersionIdsToStages"] == {created["VersionId"]: ["AWSCURRENT"]}
    assert sm.path(*name.split("/"), "AWSCURRENT").read_bytes() == b"s3cret value"


def test_create_secret_with_json_tags(sm):
    name = unique("jsontags")
    ok(sm, "create-secret", "--name", name, "--secret-string", "x", "--tags",
       json.dumps([{"Key": "owner", "Value": "ops@example.com"}, {"Key": "empty", "Value": ""}]))
    assert ok(sm, "describe-secret", "--secret-id", name)["Tags"] == [
        {"Key": "owner", "Value": "ops@example.com"}, {"Key": "empty", "Value": ""}]


def test_create_secret_binary_from_fileb_keeps_every_byte(sm, tmp_path):
    name = unique("binary")
    value = b"\0\x01binary\xff\xfe\0" + bytes(range(256))
    source = tmp_path / "blob"
    source.write_bytes(value)
    created = ok(sm, "create-secret", "--name", name, "--secret-binary", f"fileb://{source}")
    got = ok(sm, "get-secret-value", "--secret-id", name)
    assert "SecretString" not in got
    assert base64.b64decode(got["SecretBinary"]) == value
    assert got["VersionId"] == created["VersionId"]
    text = run(sm, "get-secret-value", "--secret-id", name, "--query", "SecretBinary",
               "--output", "text")
    assert base64.b64decode(text.stdout) == value
    assert sm.path(name, "AWSCURRENT").read_bytes() == value


def test_kms_key_from_create_key_seals_the_versions_of_a_secret(sm):
    first = ok(sm, "create-key", "--alias", f"alias/{unique('key')}", "--description", "app key")
    second = ok(sm, "create-key", "--alias", f"alias/{unique('key')}")
    uuid.UUID(first["KeyId"])
    assert first["Arn"] == f"arn:aws:kms:us-east-1:000000000000:key/{first['KeyId']}"
    assert first["Description"] == "app key"
    assert_recent(first["CreationDate"])
    listed = {key["KeyId"]: key for key in ok(sm, "list-keys")["Keys"]}
    assert listed[first["KeyId"]]["Aliases"] == first["Aliases"]
    assert listed[second["KeyId"]]["Arn"] == second["Arn"]
    assert any(key["Aliases"] == ["alias/aws/secretsmanager"] for key in listed.values())

    name = unique("kms")
    alias = first["Aliases"][0]
    ok(sm, "create-secret", "--name", name, "--secret-string", "under the app key",
       "--kms-key-id", alias)
    assert ok(sm, "describe-secret", "--secret-id", name)["KmsKeyId"] == alias
    versions = ok(sm, "list-secret-version-ids", "--secret-id", name)["Versions"]
    assert [version["KmsKeyIds"] for version in versions] == [[first["Arn"]]]

    ok(sm, "update-secret", "--secret-id", name, "--kms-key-id", second["Arn"],
       "--secret-string", "under the second key")
    versions = ok(sm, "list-secret-version-ids", "--secret-id", name)["Versions"]
    keys = {tuple(version["VersionStages"]): version["KmsKeyIds"] for version in versions}
    assert keys == {("AWSCURRENT",): [second["Arn"]], ("AWSPREVIOUS",): [first["Arn"]]}
    assert value_of(sm, name, VersionStage="AWSPREVIOUS") == "under the app key"
    assert value_of(sm, name) == "under the second key"


def test_get_secret_value_by_stage_and_by_version_id(sm):
    name = unique("stages")
    v1 = create(sm, name, "one")
    v2 = put(sm, name, "two")
    v3 = put(sm, name, "three", "AWSPENDING")

    def get(*selector: str) -> dict:
        return ok(sm, "get-secret-value", "--secret-id", name, *selector)

    assert (get()["SecretString"], get()["VersionId"]) == ("two", v2)
    previous = get("--version-stage", "AWSPREVIOUS")
    assert (previous["SecretString"], previous["VersionId"]) == ("one", v1)
    pending = get("--version-id", v3)
    assert (pending["SecretString"], pending["VersionStages"]) == ("three", ["AWSPENDING"])
    assert get("--version-id", v2, "--version-stage", "AWSCURRENT")["SecretString"] == "two"


def test_batch_get_secret_value_by_ids_and_by_filter(sm):
    prefix = unique("batch")
    names = [f"{prefix}/a", f"{prefix}/b", f"{prefix}/c"]
    for name in names:
        create(sm, name, f"value of {name}")
    missing = f"{prefix}/missing"
    answer = ok(sm, "batch-get-secret-value", "--secret-id-list", names[0], names[1], missing)
    assert {value["Name"]: value["SecretString"] for value in answer["SecretValues"]} == {
        names[0]: f"value of {names[0]}", names[1]: f"value of {names[1]}"}
    assert [(error["SecretId"], error["ErrorCode"]) for error in answer["Errors"]] == [
        (missing, "ResourceNotFoundException")]
    answer = ok(sm, "batch-get-secret-value", "--filters", f"Key=name,Values={prefix}/")
    assert sorted(value["Name"] for value in answer["SecretValues"]) == names
    assert answer["Errors"] == []
    assert all(value["VersionStages"] == ["AWSCURRENT"] for value in answer["SecretValues"])


# --- put-secret-value, update-secret, update-secret-version-stage --------------------------

def test_put_secret_value_from_a_file_keeps_every_byte_and_the_trailing_newline(sm, tmp_path):
    name = unique("file")
    create(sm, name, "first")
    content = "line one\n\tindented ünïcödé\r\nlast line\n\n"
    source = tmp_path / "value.txt"
    source.write_bytes(content.encode())
    put = ok(sm, "put-secret-value", "--secret-id", name, "--secret-string", f"file://{source}")
    assert put["VersionStages"] == ["AWSCURRENT"]
    assert ok(sm, "get-secret-value", "--secret-id", name)["SecretString"] == content
    assert sm.path(name, "AWSCURRENT").read_bytes() == content.encode()
    assert sm.path(name, "AWSPREVIOUS").read_bytes() == b"first"


def test_put_secret_value_from_stdin(sm):
    name = unique("stdin")
    create(sm, name, "first")
    answer = ok(sm, "put-secret-value", "--secret-id", name, "--secret-string", "-",
                input=b"from stdin\nwith a newline\n")
    assert answer["VersionStages"] == ["AWSCURRENT"]
    assert value_of(sm, name) == "from stdin\nwith a newline\n"
    ok(sm, "put-secret-value", "--secret-id", name, "--secret-binary", "-",
       input=b"\0raw\xffbytes\n")
    assert value_of(sm, name) == b"\0raw\xffbytes\n"
    assert sm.path(name, "AWSCURRENT").read_bytes() == b"\0raw\xffbytes\n"


def test_update_secret_changes_the_description_and_adds_a_version(sm):
    name = unique("update")
    v1 = create(sm, name, "v1", Description="before")
    answer = ok(sm, "update-secret", "--secret-id", name, "--description", "after")
    assert "VersionId" not in answer
    described = ok(sm, "describe-secret", "--secret-id", name)
    assert described["Description"] == "after"
    assert described["VersionIdsToStages"] == {v1: ["AWSCURRENT"]}

    v2 = ok(sm, "update-secret", "--secret-id", name, "--secret-string", "v2")["VersionId"]
    described = ok(sm, "describe-secret", "--secret-id", name)
    assert described["VersionIdsToStages"] == {v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT"]}
    assert iso(described["LastChangedDate"]) >= iso(described["CreatedDate"])
    assert value_of(sm, name) == "v2"


def test_update_secret_version_stage_moves_and_removes_labels(sm):
    name = unique("labels")
    v1 = create(sm, name, "one")
    v2 = put(sm, name, "two", "AWSPENDING")
    directory = sm.path(name)

    answer = ok(sm, "update-secret-version-stage", "--secret-id", name,
                "--version-stage", "blue", "--move-to-version-id", v1)
    assert answer["Name"] == name
    assert os.readlink(directory / "blue") == f"versions/{v1}"
    ok(sm, "update-secret-version-stage", "--secret-id", name, "--version-stage", "blue",
       "--move-to-version-id", v2, "--remove-from-version-id", v1)
    assert os.readlink(directory / "blue") == f"versions/{v2}"
    ok(sm, "update-secret-version-stage", "--secret-id", name, "--version-stage", "AWSCURRENT",
       "--move-to-version-id", v2, "--remove-from-version-id", v1)
    assert ok(sm, "describe-secret", "--secret-id", name)["VersionIdsToStages"] == {
        v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT", "AWSPENDING", "blue"]}
    ok(sm, "update-secret-version-stage", "--secret-id", name, "--version-stage", "blue",
       "--remove-from-version-id", v2)
    assert ok(sm, "describe-secret", "--secret-id", name)["VersionIdsToStages"] == {
        v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT", "AWSPENDING"]}
    assert not os.path.lexists(directory / "blue")
    assert (directory / "AWSCURRENT").read_bytes() == b"two"


# --- describe, list ------------------------------------------------------------------------

def test_describe_secret_dates_are_iso_strings(sm):
    name = unique("dates")
    create(sm, name, "x")
    described = ok(sm, "describe-secret", "--secret-id", name)
    for key in ("CreatedDate", "LastChangedDate"):
        assert isinstance(described[key], str)
        assert_recent(described[key])
    text = run(sm, "describe-secret", "--secret-id", name, "--query", "CreatedDate",
               "--output", "text")
    assert iso(text.stdout.decode().strip()) == iso(described["CreatedDate"])


def test_list_secrets_pages_through_120_secrets(sm):
    prefix = unique("page")
    api = client(sm)
    names = [f"{prefix}/{index:03d}" for index in range(120)]
    for name in names:  # setup through the socket: only list-secrets is under test
        api.call("CreateSecret", {"Name": name, "SecretString": "v"})
    name_filter = f"Key=name,Values={prefix}/"

    listed = ok(sm, "list-secrets", "--filters", name_filter)
    assert "NextToken" not in listed
    assert [entry["Name"] for entry in listed["SecretList"]] == names
    assert all(entry["SecretVersionsToStages"] for entry in listed["SecretList"])

    pages, token = [], None
    while True:
        args = ["list-secrets", "--filters", name_filter, "--max-results", "50"]
        page = ok(sm, *args, *(["--next-token", token] if token else []))
        pages.append([entry["Name"] for entry in page["SecretList"]])
        token = page.get("NextToken")
        if token is None:
            break
    assert [len(page) for page in pages] == [50, 50, 20]
    assert sum(pages, []) == names

    count = run(sm, "list-secrets", "--filters", name_filter, "--query", "length(SecretList)",
                "--output", "text")
    assert count.stdout == b"120\n"
    some = ok(sm, "list-secrets", "--filters", f"Key=name,Values={prefix}/00,{prefix}/11",
              "--query", "SecretList[].Name")
    assert some == names[:10] + names[110:]


def test_list_secrets_filters_by_tag_and_description(sm):
    tag = unique("tag")
    tagged = unique("tagged")
    create(sm, tagged, "x", Tags=[{"Key": tag, "Value": "yes"}], Description=f"described {tag}")
    create(sm, unique("untagged"), "x")
    for filters in (f"Key=tag-key,Values={tag}", f"Key=description,Values=described {tag}"):
        listed = ok(sm, "list-secrets", "--filters", filters, "--query", "SecretList[].Name")
        assert listed == [tagged], filters


def test_list_secret_version_ids(sm):
    name = unique("versions")
    ids = [create(sm, name, "1"), put(sm, name, "2"), put(sm, name, "3")]
    listed = ok(sm, "list-secret-version-ids", "--secret-id", name)
    assert listed["Name"] == name and listed["ARN"].startswith(ARN_PREFIX + name)
    stages = {entry["VersionId"]: entry["VersionStages"] for entry in listed["Versions"]}
    assert stages == {ids[2]: ["AWSCURRENT"], ids[1]: ["AWSPREVIOUS"]}
    for entry in listed["Versions"]:
        assert_recent(entry["CreatedDate"])
    everything = ok(sm, "list-secret-version-ids", "--secret-id", name, "--include-deprecated")
    assert sorted(entry["VersionId"] for entry in everything["Versions"]) == sorted(ids)
    assert {entry["VersionId"]: entry["VersionStages"]
            for entry in everything["Versions"]}[ids[0]] == []


# --- delete, restore, tags, passwords, keys ----------------------------------------------

def test_delete_with_a_recovery_window_then_restore(sm):
    name = unique("delete")
    create(sm, name, "restorable")
    deleted = ok(sm, "delete-secret", "--secret-id", name, "--recovery-window-in-days", "7")
    assert deleted["Name"] == name
    expected = datetime.now(UTC) + timedelta(days=7)
    assert abs(iso(deleted["DeletionDate"]) - expected) < timedelta(minutes=10)
    assert iso(ok(sm, "describe-secret", "--secret-id", name)["DeletedDate"]) == iso(
        deleted["DeletionDate"])
    refused(sm, "InvalidRequestException", "GetSecretValue", "get-secret-value",
            "--secret-id", name, secrets=("restorable",))
    name_filter = f"Key=name,Values={name}"
    assert ok(sm, "list-secrets", "--filters", name_filter)["SecretList"] == []
    planned = ok(sm, "list-secrets", "--filters", name_filter, "--include-planned-deletion")
    assert [entry["Name"] for entry in planned["SecretList"]] == [name]
    assert not sm.path(name).exists()

    restored = ok(sm, "restore-secret", "--secret-id", name)
    assert restored["Name"] == name
    assert "DeletedDate" not in ok(sm, "describe-secret", "--secret-id", name)
    assert ok(sm, "get-secret-value", "--secret-id", name)["SecretString"] == "restorable"
    assert sm.path(name, "AWSCURRENT").read_bytes() == b"restorable"


def test_force_delete_without_recovery_frees_the_name(sm):
    name = unique("force")
    create(sm, name, "gone")
    first = client(sm).call("DescribeSecret", {"SecretId": name})
    deleted = ok(sm, "delete-secret", "--secret-id", name, "--force-delete-without-recovery")
    assert deleted["Name"] == name
    assert_recent(deleted["DeletionDate"])
    refused(sm, "ResourceNotFoundException", "DescribeSecret", "describe-secret",
            "--secret-id", name)
    assert state_of(sm, name) is None
    create(sm, name, "new")
    assert client(sm).call("DescribeSecret", {"SecretId": name})["ARN"] != first["ARN"]
    assert value_of(sm, name) == "new"


def test_tag_and_untag_resource(sm):
    name = unique("tags")
    create(sm, name, "x", Tags=[{"Key": "a", "Value": "1"}])
    result = run(sm, "tag-resource", "--secret-id", name, "--tags", "Key=b,Value=2",
                 "Key=a,Value=one")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert sorted((tag["Key"], tag["Value"]) for tag in ok(
        sm, "describe-secret", "--secret-id", name)["Tags"]) == [("a", "one"), ("b", "2")]
    ok(sm, "untag-resource", "--secret-id", name, "--tag-keys", "a", "missing")
    assert ok(sm, "describe-secret", "--secret-id", name)["Tags"] == [{"Key": "b", "Value": "2"}]


def test_get_random_password(sm):
    password = ok(sm, "get-random-password", "--password-length", "40",
                  "--exclude-punctuation")["RandomPassword"]
    assert len(password) == 40
    assert set(password) <= set(string.ascii_letters + string.digits)
    assert len(ok(sm, "get-random-password")["RandomPassword"]) == 32
    bare = run(sm, "get-random-password", "--password-length", "12", "--exclude-numbers",
               "--query", "RandomPassword", "--output", "text")
    assert re.fullmatch(rb"[^0-9\s]{12}\n", bare.stdout), bare.stdout


def test_query_and_text_output(sm):
    name = unique("query")
    create(sm, name, "bare value", Tags=[{"Key": "env", "Value": "prod"}])
    bare = run(sm, "get-secret-value", "--secret-id", name, "--query", "SecretString",
               "--output", "text")
    assert (bare.returncode, bare.stdout, bare.stderr) == (0, b"bare value\n", b"")
    stages = run(sm, "get-secret-value", "--secret-id", name, "--query", "VersionStages",
                 "--output", "text")
    assert stages.stdout == b"AWSCURRENT\n"
    tag = run(sm, "describe-secret", "--secret-id", name,
              "--query", "Tags[?Key=='env'].Value | [0]", "--output", "text")
    assert tag.stdout == b"prod\n"
    assert ok(sm, "get-secret-value", "--secret-id", name,
              "--query", "{v: SecretString, n: Name}") == {"v": "bare value", "n": name}
    result = run(sm, "get-secret-value", "--secret-id", name, "--query", "[[")
    assert result.returncode == EXIT_USAGE and result.stdout == b""
    assert "--query" in one_line(result.stderr)


# --- refusals: one line, the AWS code, nothing changed, no value shown ------------------

@pytest.fixture
def victim(sm) -> dict:
    """A secret with two versions and a custom label, to be left exactly as it is."""
    name = unique("victim")
    v1 = create(sm, name, "victim-one", Tags=[{"Key": "keep", "Value": "me"}],
                Description="untouched")
    v2 = put(sm, name, "victim-two")
    client(sm).call("UpdateSecretVersionStage", {"SecretId": name, "VersionStage": "blue",
                                                 "MoveToVersionId": v1})
    return {"name": name, "v1": v1, "v2": v2, "state": state_of(sm, name)}


def unchanged(sm: Daemon, victim: dict) -> None:
    assert state_of(sm, victim["name"]) == victim["state"]
    assert value_of(sm, victim["name"]) == "victim-two"
    assert os.readlink(sm.path(victim["name"], "AWSCURRENT")) == f"versions/{victim['v2']}"


SENTINEL = "sentinel-value-must-not-leak"


@pytest.mark.parametrize(("name", "code"), [
    ("bad name!", "ValidationException"),
    ("n" * 513, "ValidationException"),
    ("prod/../db", "InvalidParameterException"),
])
def test_an_invalid_name_is_refused_and_creates_nothing(sm, name, code):
    refused(sm, code, "CreateSecret", "create-secret", "--name", name,
            "--secret-string", SENTINEL, secrets=(SENTINEL,))
    assert state_of(sm, name) is None
    assert_nowhere_on_disk(sm, SENTINEL)


def test_a_value_over_65536_bytes_is_refused(sm, victim, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"s" * 65537)
    new_name = unique("toolong")
    refused(sm, "ValidationException", "CreateSecret", "create-secret", "--name", new_name,
            "--secret-string", f"file://{big}", secrets=("s" * 100,))
    assert state_of(sm, new_name) is None
    refused(sm, "ValidationException", "PutSecretValue", "put-secret-value",
            "--secret-id", victim["name"], "--secret-string", f"file://{big}",
            secrets=("s" * 100,))
    refused(sm, "ValidationException", "PutSecretValue", "put-secret-value",
            "--secret-id", victim["name"], "--secret-binary", f"fileb://{big}",
            secrets=("s" * 100, base64.b64encode(b"s" * 75).decode()))
    unchanged(sm, victim)
    # Exactly the limit is fine.
    big.write_bytes(b"s" * 65536)
    ok(sm, "create-secret", "--name", new_name, "--secret-string", f"file://{big}")
    assert len(value_of(sm, new_name)) == 65536


def test_an_unknown_version_id_is_refused(sm, victim):
    unknown = str(uuid.uuid4())
    refused(sm, "ResourceNotFoundException", "GetSecretValue", "get-secret-value",
            "--secret-id", victim["name"], "--version-id", unknown)
    refused(sm, "ResourceNotFoundException", "UpdateSecretVersionStage",
            "update-secret-version-stage", "--secret-id", victim["name"],
            "--version-stage", "AWSCURRENT", "--move-to-version-id", unknown,
            "--remove-from-version-id", victim["v2"])
    refused(sm, "InvalidParameterException", "UpdateSecretVersionStage",
            "update-secret-version-stage", "--secret-id", victim["name"],
            "--version-stage", "blue", "--remove-from-version-id", unknown)
    unchanged(sm, victim)


def test_a_label_already_on_a_version_moves_only_with_remove_from(sm, victim):
    line = refused(sm, "InvalidParameterException", "UpdateSecretVersionStage",
                   "update-secret-version-stage", "--secret-id", victim["name"],
                   "--version-stage", "AWSCURRENT", "--move-to-version-id", victim["v1"])
    assert victim["v2"] in line  # names the version that holds the label
    refused(sm, "InvalidParameterException", "UpdateSecretVersionStage",
            "update-secret-version-stage", "--secret-id", victim["name"],
            "--version-stage", "blue", "--move-to-version-id", victim["v2"])
    refused(sm, "InvalidParameterException", "UpdateSecretVersionStage",
            "update-secret-version-stage", "--secret-id", victim["name"],
            "--version-stage", "AWSCURRENT", "--move-to-version-id", victim["v1"],
            "--remove-from-version-id", victim["v1"])
    unchanged(sm, victim)


def test_deleting_twice_and_restoring_a_live_secret_are_refused(sm, victim):
    refused(sm, "InvalidRequestException", "RestoreSecret", "restore-secret",
            "--secret-id", victim["name"])
    unchanged(sm, victim)
    client(sm).call("DeleteSecret", {"SecretId": victim["name"], "RecoveryWindowInDays": 7})
    scheduled = state_of(sm, victim["name"])
    refused(sm, "InvalidRequestException", "DeleteSecret", "delete-secret",
            "--secret-id", victim["name"], "--recovery-window-in-days", "30")
    refused(sm, "InvalidRequestException", "PutSecretValue", "put-secret-value",
            "--secret-id", victim["name"], "--secret-string", SENTINEL, secrets=(SENTINEL,))
    assert state_of(sm, victim["name"]) == scheduled
    client(sm).call("RestoreSecret", {"SecretId": victim["name"]})
    assert_nowhere_on_disk(sm, SENTINEL)


def test_an_existing_name_is_refused(sm, victim):
    refused(sm, "ResourceExistsException", "CreateSecret", "create-secret",
            "--name", victim["name"], "--secret-string", SENTINEL, secrets=(SENTINEL,))
    unchanged(sm, victim)


def test_an_unknown_kms_key_is_refused(sm):
    name = unique("nokey")
    refused(sm, "InvalidParameterException", "CreateSecret", "create-secret", "--name", name,
            "--secret-string", SENTINEL, "--kms-key-id", "alias/does-not-exist",
            secrets=(SENTINEL,))
    assert state_of(sm, name) is None
    alias = f"alias/{unique('dup')}"
    ok(sm, "create-key", "--alias", alias)
    keys = ok(sm, "list-keys")
    refused(sm, "ResourceExistsException", "CreateKey", "create-key", "--alias", alias)
    assert ok(sm, "list-keys") == keys


@pytest.mark.parametrize(("tags", "code"), [
    (["Key=a,Valu=b"], None),
    (['[{"Key": "a", "Value": '], None),
    (["Value=only"], "InvalidParameterException"),
    (['[{"Key": 5, "Value": "x"}]'], "ValidationException"),
    (["Key=aws:reserved,Value=x"], "InvalidParameterException"),
    (["Key=a,Value=1", "Key=a,Value=2"], "InvalidParameterException"),
])
def test_malformed_tags_are_refused_and_change_nothing(sm, victim, tags, code):
    new_name = unique("badtags")
    for operation, args in (
            ("CreateSecret", ["create-secret", "--name", new_name, "--secret-string", SENTINEL]),
            ("TagResource", ["tag-resource", "--secret-id", victim["name"]])):
        if code is None:  # the CLI can't build a request: AWS CLI's "Error parsing parameter"
            result = run(sm, *args, "--tags", *tags)
            assert result.returncode == EXIT_USAGE and result.stdout == b""
            line = one_line(result.stderr)
            assert line.startswith("Error parsing parameter '--tags': "), line
            assert SENTINEL not in line
        else:
            refused(sm, code, operation, *args, "--tags", *tags, secrets=(SENTINEL,))
    assert state_of(sm, new_name) is None
    unchanged(sm, victim)


@pytest.mark.parametrize(("args", "stdin", "code"), [
    (["put-secret-value", "--secret-id", "{missing}", "--secret-string", SENTINEL], None,
     "ResourceNotFoundException"),
    (["put-secret-value", "--secret-id", "{missing}", "--secret-string", "-"], SENTINEL,
     "ResourceNotFoundException"),
    (["put-secret-value", "--secret-id", "{victim}", "--secret-string", SENTINEL,
      "--client-request-token", "too-short"], None, "ValidationException"),
    (["put-secret-value", "--secret-id", "{victim}", "--secret-string", SENTINEL,
      "--secret-binary", base64.b64encode(SENTINEL.encode()).decode()], None,
     "InvalidParameterException"),
    (["update-secret", "--secret-id", "{victim}", "--secret-string", SENTINEL,
      "--kms-key-id", "alias/does-not-exist"], None, "InvalidParameterException"),
    (["put-secret-value", "--secret-id", "{victim}", "--secret-binary", SENTINEL + "!"], None,
     None),
    (["put-secret-value", "--secret-id", "{victim}", "--secret-strng", SENTINEL], None, None),
    (["put-secret-value", "--secret-id", "{victim}", SENTINEL], None, None),
], ids=["unknown-secret", "unknown-secret-stdin", "bad-token", "string-and-binary",
        "unknown-key", "bad-base64", "misspelt-flag", "stray-value"])
def test_a_failing_command_never_shows_the_value(sm, victim, args, stdin, code):
    args = [arg.format(missing=unique("missing"), victim=victim["name"]) for arg in args]
    result = run(sm, *args, input=stdin.encode() if stdin else None)
    assert result.returncode == (EXIT_SERVICE_ERROR if code else EXIT_USAGE)
    assert result.stdout == b""
    line = one_line(result.stderr)
    if code:
        assert line.startswith(f"An error occurred ({code}) when calling the "), line
    assert SENTINEL not in line and base64.b64encode(SENTINEL.encode()).decode() not in line
    unchanged(sm, victim)
    assert_nowhere_on_disk(sm, SENTINEL)


# --- the control socket, spoken to raw -------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(self.unix_path))


def raw_post(daemon: Daemon, target: str | None, body: bytes) -> tuple[int, dict, dict]:
    connection = _UnixHTTPConnection(StateDir(daemon.state_dir).socket)
    headers = {"Content-Type": "application/x-amz-json-1.1"}
    if target is not None:
        headers["X-Amz-Target"] = target
    try:
        connection.request("POST", "/", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(("target", "body", "code"), [
    ("secretsmanager.CreateSecret", b'{"Name": "NAME", "SecretString": "VALUE"',
     "SerializationException"),
    ("secretsmanager.CreateSecret", b'["NAME", "VALUE"]', "SerializationException"),
    ("secretsmanager.CreateSecret", b'{"Name": "NAME", "SecretString": "VALUE", }',
     "SerializationException"),
    ("secretsmanager.FlyToTheMoon", b'{"Name": "NAME", "SecretString": "VALUE"}',
     "UnknownOperationException"),
    ("secretsmanager.ReplicateSecretToRegions", b'{"SecretId": "NAME", "AddReplicaRegions": [{"Region": "eu-west-1"}]}',
     "UnknownOperationException"),
    ("secretfs.CreateSecret", b'{"Name": "NAME", "SecretString": "VALUE"}',
     "UnknownOperationException"),
    (None, b'{"Name": "NAME", "SecretString": "VALUE"}', "UnknownOperationException"),
])
def test_raw_malformed_requests_get_aws_json_errors_and_change_nothing(sm, target, body, code):
    name = unique("raw")
    status, headers, answer = raw_post(
        sm, target, body.replace(b"NAME", name.encode()).replace(b"VALUE", SENTINEL.encode()))
    assert status == 400
    assert answer["__type"] == code
    assert isinstance(answer["Message"], str) and answer["Message"]
    assert SENTINEL not in answer["Message"]
    assert headers["X-Amzn-ErrorType"] == code
    assert headers["Content-Type"] == "application/x-amz-json-1.1"
    assert state_of(sm, name) is None
    assert_nowhere_on_disk(sm, SENTINEL)


def test_curl_on_the_control_socket(sm):
    name = unique("curl")
    create(sm, name, "x")
    before = state_of(sm, name)
    socket_path = str(StateDir(sm.state_dir).socket)

    def curl(target: str, body: str) -> dict:
        result = subprocess.run(
            ["curl", "-sS", "--unix-socket", socket_path, "http://localhost/",
             "-H", f"X-Amz-Target: {target}",
             "-H", "Content-Type: application/x-amz-json-1.1", "-d", body],
            capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert curl("secretsmanager.PutSecretValue",
                f'{{"SecretId": "{name}", "SecretString": ')["__type"] == "SerializationException"
    assert curl("secretsmanager.Nope", "{}")["__type"] == "UnknownOperationException"
    assert state_of(sm, name) == before
    described = curl("secretsmanager.DescribeSecret", json.dumps({"SecretId": name}))
    assert described["Name"] == name and isinstance(described["CreatedDate"], int | float)
