"""Import (secretfs.migrate) and backup/restore (secretfs.backup), through the real command.

Every import runs the `secretfs` CLI against a real daemon and is read back through
the mount and the API; the AWS source is moto's server, driven with boto3. Values are
compared, never shown: `assert_same` raises without them, and no assert compares a
value directly (pytest would print both sides).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, free_port, reachable_directory, serving_daemon, wait_for

from secretfs import migrate
from secretfs.api.client import Client
from secretfs.model import AWSCURRENT, AWSPENDING, AWSPREVIOUS, ResourceNotFoundException
from secretfs.state import StateDir

pytestmark = pytest.mark.mount

EXIT_FAILURE, EXIT_SERVICE_ERROR = 1, 254
PASSPHRASE = b"correct horse battery staple\n"


# --- fixtures and helpers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sm() -> Iterator[Daemon]:
    """One daemon for the module's import tests; each test imports under its own prefix."""
    with serving_daemon(prefix="secretfs-migrate-") as running:
        yield running


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """moto's standalone server on a free loopback port (as bench/harness.py runs it)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "moto server exited"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "moto server did not listen within 30 s"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials for moto, and no AWS configuration of this host's user."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_CONFIG_FILE", "/dev/null"),
                        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def aws(endpoint: str):
    import boto3

    return boto3.client("secretsmanager", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}/"


def client(daemon: Daemon) -> Client:
    return Client(StateDir(daemon.state_dir).socket)


def assert_same(actual: bytes, expected: bytes, what: str) -> None:
    if not hmac.compare_digest(actual, expected):
        raise AssertionError(f"{what}: the value differs ({len(actual)} bytes, "
                             f"{len(expected)} expected)")


def value_of(daemon: Daemon, name: str, **selector: str) -> bytes:
    answer = client(daemon).call("GetSecretValue", {"SecretId": name, **selector})
    if "SecretBinary" in answer:
        return answer["SecretBinary"]
    return answer["SecretString"].encode()


def labels_of(daemon: Daemon, name: str) -> dict[str, list[str]]:
    return client(daemon).call("DescribeSecret", {"SecretId": name})["VersionIdsToStages"]


def all_versions(daemon: Daemon, name: str) -> set[str]:
    found, params = set(), {"SecretId": name, "IncludeDeprecated": True}
    while True:
        answer = client(daemon).call("ListSecretVersionIds", params)
        found |= {version["VersionId"] for version in answer["Versions"]}
        if not answer.get("NextToken"):
            return found
        params["NextToken"] = answer["NextToken"]


def names_under(daemon: Daemon, prefix: str) -> list[str]:
    answer = client(daemon).call("ListSecrets", {"IncludePlannedDeletion": True})
    return sorted(entry["Name"] for entry in answer["SecretList"]
                  if entry["Name"].startswith(prefix))


def imported(daemon: Daemon, *args: str, input: bytes | None = None) -> str:
    """Run an import that must succeed; its one-line summary."""
    result = daemon.cli("import", *args, input=input, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return result.stdout.decode().splitlines()[-1]


def refused(daemon: Daemon, *args: str, code: int = EXIT_FAILURE,
            input: bytes | None = None) -> str:
    """Run a verb that must fail; its one stderr line."""
    result = daemon.cli(*args, input=input, check=False)
    assert result.returncode == code, result.stderr
    assert result.stdout == b""
    text = result.stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    return text.rstrip("\n")


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# --- the .env parser (pure) -----------------------------------------------------------

def test_env_parser_reads_quotes_comments_export_and_multiline_values():
    text = (
        "# a comment\n"
        "\n"
        "PLAIN=plain value   # trailing comment\n"
        "export EXPORTED=yes\n"
        "SINGLE='literal \\n $HOME # kept'\n"
        'DOUBLE="tab\\there \\"quoted\\" \\\\ \\$x"   # comment\n'
        "HASH=a#b\n"
        "EMPTY=\n"
        'MULTI="line one\nline two"\n'
        "  SPACED = padded  \n"
        "PLAIN=last wins\n"
    )
    assert migrate.parse_env(text) == {
        "PLAIN": "last wins", "EXPORTED": "yes", "SINGLE": "literal \\n $HOME # kept",
        "DOUBLE": 'tab\there "quoted" \\ $x', "HASH": "a#b", "EMPTY": "",
        "MULTI": "line one\nline two", "SPACED": "padded"}


@pytest.mark.parametrize("text, problem", [
    ("GOOD=1\nnot an assignment\n", "line 2: expected KEY=VALUE"),
    ("GOOD=1\nKEY='never closed\n", "line 2: KEY: the quoted value has no closing '"),
    ('KEY="closed" trailing-s3cret\n', "line 1: KEY: unexpected text after the closing \""),
    ("1KEY=x\n", "line 1: expected KEY=VALUE"),
])
def test_env_parser_errors_name_the_line_and_key_never_the_value(text, problem):
    with pytest.raises(migrate.MigrationError) as raised:
        migrate.parse_env(text, "app.env")
    assert str(raised.value) == f"app.env: {problem}"
    assert "s3cret" not in str(raised.value) and "never closed" not in str(raised.value)


# --- import dir -----------------------------------------------------------------------

def test_import_dir_creates_one_secret_per_file_and_a_rerun_writes_nothing(sm, tmp_path):
    prefix = unique("dir")
    root = write_tree(tmp_path / "src", {
        "db/password": b"p4ss\n", "db/user": b"app", "tls/key.der": b"\x00\x01\xff\xfe",
        ".hidden": b"skipped", ".git/config": b"skipped"})
    (root / "link").symlink_to(root / "db" / "user")

    summary = imported(sm, "dir", str(root), "--name-prefix", prefix)
    assert summary == (f"imported 4 secrets from dir {root}: 4 created, 0 updated, "
                       "0 unchanged")
    assert names_under(sm, prefix) == [prefix + name for name in
                                       ("db/password", "db/user", "link", "tls/key.der")]
    # Byte for byte through the mount, a trailing newline kept; binary as SecretBinary.
    for relative in ("db/password", "db/user", "link", "tls/key.der"):
        assert_same(sm.path(prefix + relative, AWSCURRENT).read_bytes(),
                    (root / relative).read_bytes(), relative)
    answer = client(sm).call("GetSecretValue", {"SecretId": prefix + "tls/key.der"})
    assert "SecretBinary" in answer and "SecretString" not in answer
    # Through the daemon's API: each create is the CLI's call on the socket, audited.
    assert wait_for(lambda: any(
        record["eventName"] == "CreateSecret" and record["eventSource"] == "unix-socket"
        for record in sm.audit_records("--secret", prefix + "db/user")))
    before = {name: all_versions(sm, name) for name in names_under(sm, prefix)}

    assert imported(sm, "dir", str(root), "--name-prefix", prefix).endswith(
        ": 0 created, 0 updated, 4 unchanged")
    assert {name: all_versions(sm, name) for name in names_under(sm, prefix)} == before

    (root / "db" / "password").write_bytes(b"rotated elsewhere")
    assert imported(sm, "dir", str(root), "--name-prefix", prefix).endswith(
        ": 0 created, 1 updated, 3 unchanged")
    labels = labels_of(sm, prefix + "db/password")
    (old,) = before[prefix + "db/password"]
    assert labels[old] == [AWSPREVIOUS] and len(labels) == 2
    assert_same(value_of(sm, prefix + "db/password"), b"rotated elsewhere", "new current")


def test_a_rerun_does_not_roll_back_a_local_rotation(sm, tmp_path):
    prefix = unique("rollback")
    root = write_tree(tmp_path / "src", {"api-key": b"from the file"})
    imported(sm, "dir", str(root), "--name-prefix", prefix)
    client(sm).call("PutSecretValue", {"SecretId": prefix + "api-key",
                                       "SecretString": "rotated here"})

    assert imported(sm, "dir", str(root), "--name-prefix", prefix).endswith("1 unchanged")
    assert_same(value_of(sm, prefix + "api-key"), b"rotated here", "AWSCURRENT")


def test_dry_run_lists_the_plan_and_writes_nothing(sm, tmp_path):
    prefix = unique("dry")
    root = write_tree(tmp_path / "src", {"one": b"dry-run-value-1", "two": b"dry-run-value-2"})
    result = sm.cli("import", "dir", str(root), "--name-prefix", prefix, "--dry-run")
    lines = result.stdout.decode().splitlines()
    assert lines == [f"create\t{prefix}one\t1 version", f"create\t{prefix}two\t1 version",
                     f"dry run, nothing written: 2 secrets from dir {root}: 2 to create, "
                     "0 to update, 0 unchanged"]
    assert b"dry-run-value" not in result.stdout + result.stderr
    assert names_under(sm, prefix) == []


@pytest.mark.parametrize("files, problem", [
    ({"good": b"x", "bad name": b"y"},
     r"file .*/bad name: invalid secret name '.*/bad name': Invalid name\. .*"),
    ({"good": b"x", "empty": b""},
     r"file .*/empty: the value is empty \(Secrets Manager stores no empty value\)"),
    ({"good": b"x", "big": b"x" * 65537},
     r"file .*/big: the value is 65537 bytes; the maximum is 65536"),
])
def test_bad_input_is_one_line_and_changes_nothing(sm, tmp_path, files, problem):
    prefix = unique("bad")
    root = write_tree(tmp_path / "src", files)
    line = refused(sm, "import", "dir", str(root), "--name-prefix", prefix)
    assert re.fullmatch(problem, line), line
    assert names_under(sm, prefix) == []


def test_a_name_collision_with_an_existing_secret_is_refused_before_any_write(sm, tmp_path):
    prefix = unique("collide")
    client(sm).call("CreateSecret", {"Name": prefix + "app", "SecretString": "x"})
    root = write_tree(tmp_path / "src", {"aaa-first": b"ok", "app/versions/x": b"y"})

    line = refused(sm, "import", "dir", str(root), "--name-prefix", prefix)
    assert line.endswith(f"the name segment 'versions' can't be used below the secret "
                         f"{prefix}app: its directory uses it (versions, keys and staging "
                         "labels are reserved there)"), line
    assert names_under(sm, prefix) == [prefix + "app"]


def test_a_missing_source_and_a_missing_daemon_are_one_line(sm, tmp_path):
    assert refused(sm, "import", "kubernetes", str(tmp_path / "nope.yaml")) == \
        f"{tmp_path / 'nope.yaml'}: No such file or directory"
    assert refused(sm, "import", "dir", str(tmp_path / "nope")) == \
        f"{tmp_path / 'nope'}: not a directory"
    config_map = tmp_path / "config-map.yaml"
    config_map.write_text("kind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n")
    assert refused(sm, "import", "kubernetes", str(config_map)) == \
        f"{config_map}: no Secret with keys to import"
    root = write_tree(tmp_path / "src", {"x": b"y"})
    line = refused(sm, "import", "dir", str(root), "--state-dir", str(tmp_path / "none"))
    assert line.startswith("the secretfs daemon is not running"), line


# --- import kubernetes ----------------------------------------------------------------

KUBERNETES = """\
apiVersion: v1
kind: Secret
metadata: {name: db, namespace: prod}
type: Opaque
data:
  username: YXBw
  password: b2xk
stringData:
  password: k8s-pass
---
apiVersion: v1
kind: ConfigMap
metadata: {name: not-a-secret}
data: {a: b}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Secret
  metadata: {name: tls}
  data: {tls.key: a2V5LWJ5dGVz}
- apiVersion: v1
  kind: Secret
  metadata: {name: blob, namespace: prod}
  data: {keystore: AAH//g==}
"""


def test_import_kubernetes_one_json_secret_per_secret_shown_as_keys(sm, tmp_path):
    prefix = unique("k8s")
    manifest = tmp_path / "secrets.yaml"
    manifest.write_text(KUBERNETES.replace("  data: {keystore: AAH//g==}\n",
                                           "  data: {keystore: dGV4dA==}\n"))

    assert imported(sm, "kubernetes", str(manifest), "--name-prefix", prefix).endswith(
        ": 3 created, 0 updated, 0 unchanged")
    assert names_under(sm, prefix) == [prefix + "default/tls", prefix + "prod/blob",
                                       prefix + "prod/db"]
    keys = sm.path(prefix + "prod/db", "keys", AWSCURRENT)
    # stringData wins over data, as in the Kubernetes API.
    assert_same((keys / "password").read_bytes(), b"k8s-pass", "password")
    assert_same((keys / "username").read_bytes(), b"app", "username")
    assert json.loads(value_of(sm, prefix + "prod/db")).keys() == {"username", "password"}
    assert_same(sm.path(prefix + "default/tls", "keys", AWSCURRENT, "tls.key").read_bytes(),
                b"key-bytes", "tls.key")

    assert imported(sm, "kubernetes", "-", "--name-prefix", prefix,
                    input=manifest.read_bytes()).endswith("3 unchanged")


def test_import_kubernetes_binary_key_needs_per_key(sm, tmp_path):
    prefix = unique("k8s-bin")
    manifest = tmp_path / "secrets.yaml"
    manifest.write_text(KUBERNETES)

    line = refused(sm, "import", "kubernetes", str(manifest), "--name-prefix", prefix)
    assert line == (f"Secret prod/blob in {manifest}: key keystore is not UTF-8 text, so it "
                    "can't sit in a JSON value; import with --per-key")
    assert names_under(sm, prefix) == []

    assert imported(sm, "kubernetes", str(manifest), "--per-key", "--name-prefix",
                    prefix).endswith(": 4 created, 0 updated, 0 unchanged")
    assert_same(sm.path(prefix + "prod/blob/keystore", AWSCURRENT).read_bytes(),
                b"\x00\x01\xff\xfe", "keystore")
    assert_same(sm.path(prefix + "prod/db/password", AWSCURRENT).read_bytes(), b"k8s-pass",
                "password")


@pytest.mark.parametrize("text, problem", [
    ("kind: Secret\nmetadata: {name: x\n", r".*/bad\.yaml: invalid YAML at line 7 column 1: "
                                          r"expected ',' or '}', but got '<stream end>'"),
    ("kind: Secret\nmetadata: {name: x}\ndata: {k: '%%%'}\n",
     r"Secret default/x in .*: data\.k is not valid base64"),
    ("kind: Secret\nmetadata: {name: x}\nstringData: {port: 5432}\n",
     r"Secret default/x in .*: stringData\.port is not a string \(quote it\)"),
    ("kind: Secret\nmetadata: {name: 'bad name'}\nstringData: {k: v}\n",
     r"Secret default/bad name in .*: invalid secret name .*"),
])
def test_malformed_kubernetes_input_is_one_line_and_changes_nothing(sm, tmp_path, text,
                                                                    problem):
    prefix = unique("k8s-bad")
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("kind: Secret\nmetadata: {name: fine}\nstringData: {k: v}\n---\n"
                        + text)
    line = refused(sm, "import", "kubernetes", str(manifest), "--name-prefix", prefix)
    assert re.fullmatch(problem, line), line
    assert names_under(sm, prefix) == []


# --- import env and docker ------------------------------------------------------------

def test_import_env_as_one_json_secret_or_one_per_variable(sm, tmp_path):
    prefix = unique("env")
    env = tmp_path / ".env"
    env.write_text("# app\nexport DB_USER=app\nDB_PASSWORD='s3 cr#t'\nEMPTY=\n")

    assert imported(sm, "env", str(env), "--name-prefix", prefix).endswith("1 created, "
                                                                          "0 updated, "
                                                                          "0 unchanged")
    keys = sm.path(prefix + "env", "keys", AWSCURRENT)
    assert_same((keys / "DB_PASSWORD").read_bytes(), b"s3 cr#t", "DB_PASSWORD")
    assert json.loads(value_of(sm, prefix + "env")).keys() == {"DB_USER", "DB_PASSWORD",
                                                               "EMPTY"}

    line = refused(sm, "import", "env", str(env), "--per-key", "--name-prefix", prefix)
    assert line == f"variable EMPTY in {env}: the value is empty (Secrets Manager stores " \
                   "no empty value)"
    env.write_text("DB_USER=app\nDB_PASSWORD='s3 cr#t'\n")
    assert imported(sm, "env", str(env), "--per-key", "--name-prefix",
                    prefix + "vars/").endswith("2 created, 0 updated, 0 unchanged")
    assert_same(sm.path(prefix + "vars/DB_PASSWORD", AWSCURRENT).read_bytes(), b"s3 cr#t",
                "per key")
    assert refused(sm, "import", "env", "-", input=b"A=1\n") == \
        "give the secret's name with --name"


def test_import_docker_secrets_directory_and_compose_file(sm, tmp_path, monkeypatch):
    prefix = unique("docker")
    run_secrets = write_tree(tmp_path / "run-secrets", {"db_password": b"from-run-secrets"})
    assert imported(sm, "docker", str(run_secrets), "--name-prefix", prefix).endswith(
        "1 created, 0 updated, 0 unchanged")
    assert_same(sm.path(prefix + "db_password", AWSCURRENT).read_bytes(),
                b"from-run-secrets", "docker dir")

    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "api.txt").write_bytes(b"from-a-file")
    compose = tmp_path / "compose.yaml"
    compose.write_text("services: {app: {image: x, secrets: [api, token]}}\n"
                       "secrets:\n  api: {file: ./files/api.txt}\n"
                       "  token: {environment: MIGRATE_TEST_TOKEN}\n")
    monkeypatch.setenv("MIGRATE_TEST_TOKEN", "from-the-environment")
    assert imported(sm, "docker", str(compose), "--name-prefix", prefix).endswith(
        "2 created, 0 updated, 0 unchanged")
    assert_same(value_of(sm, prefix + "api"), b"from-a-file", "compose file")
    assert_same(value_of(sm, prefix + "token"), b"from-the-environment", "compose env")

    compose.write_text("secrets:\n  ext: {external: true}\n")
    assert refused(sm, "import", "docker", str(compose)).startswith(
        f"compose secret ext in {compose}: an external secret lives in the engine")


# --- import aws (moto) ----------------------------------------------------------------

def make_aws_secrets(source, stem: str) -> dict:
    """In moto: a secret with a deprecated version, AWSPREVIOUS, AWSCURRENT and
    AWSPENDING with a custom label; a binary one; and one outside the prefix."""
    name = f"{stem}/db"
    source.create_secret(Name=name, SecretString="aws-v1", Description="the database",
                         Tags=[{"Key": "team", "Value": "payments"}],
                         KmsKeyId="alias/aws-only")
    source.put_secret_value(SecretId=name, SecretString="aws-v2")
    source.put_secret_value(SecretId=name, SecretString="aws-v3")
    source.put_secret_value(SecretId=name, SecretString="aws-v4",
                            VersionStages=[AWSPENDING, "blue"])
    source.create_secret(Name=f"{stem}/blob", SecretBinary=b"\x00aws\xff")
    source.create_secret(Name=f"other-{stem}/x", SecretString="not imported")
    return source.describe_secret(SecretId=name)["VersionIdsToStages"]


def test_import_aws_keeps_versions_labels_description_and_tags(sm, moto, aws_env):
    source, stem = aws(moto), uuid.uuid4().hex[:8]
    aws_labels = make_aws_secrets(source, stem)
    prefix = unique("aws")
    args = ("aws", "--endpoint-url", moto, "--region", "us-east-1", "--prefix", stem + "/",
            "--name-prefix", prefix)

    dry = sm.cli("import", *args, "--dry-run").stdout.decode().splitlines()
    assert dry[:2] == [f"create\t{prefix}{stem}/db\t4 versions",
                       f"create\t{prefix}{stem}/blob\t1 version"]
    assert names_under(sm, prefix) == []

    assert imported(sm, *args) == (f"imported 2 secrets from AWS Secrets Manager ({moto}): "
                                   "2 created, 0 updated, 0 unchanged")
    name = f"{prefix}{stem}/db"
    assert names_under(sm, prefix) == [f"{prefix}{stem}/blob", name]
    # Every version under AWS's id, with AWS's labels; the deprecated one too.
    assert labels_of(sm, name) == {vid: sorted(stages) for vid, stages in aws_labels.items()
                                   if stages}
    assert all_versions(sm, name) == set(aws_labels)
    for version_id in aws_labels:
        expected = source.get_secret_value(SecretId=f"{stem}/db",
                                           VersionId=version_id)["SecretString"].encode()
        assert_same(sm.path(name, "versions", version_id).read_bytes(), expected, version_id)
    current = next(vid for vid, stages in aws_labels.items() if AWSCURRENT in stages)
    assert os.readlink(sm.path(name, AWSCURRENT)) == f"versions/{current}"
    assert sm.path(name, "blue").is_symlink()
    assert not sm.path(name, migrate.IMPORT_LABEL).exists()
    described = client(sm).call("DescribeSecret", {"SecretId": name})
    assert described["Description"] == "the database"
    assert described["Tags"] == [{"Key": "team", "Value": "payments"}]
    assert "KmsKeyId" not in described
    assert_same(value_of(sm, f"{prefix}{stem}/blob"), b"\x00aws\xff", "binary")

    assert imported(sm, *args).endswith(": 0 created, 0 updated, 2 unchanged")

    # AWS rotates: the new version arrives as AWSCURRENT, the old one is AWSPREVIOUS.
    new = source.put_secret_value(SecretId=f"{stem}/db", SecretString="aws-v5")["VersionId"]
    assert imported(sm, *args).endswith(": 0 created, 1 updated, 1 unchanged")
    labels = labels_of(sm, name)
    assert labels[new] == [AWSCURRENT] and labels[current] == [AWSPREVIOUS]
    assert_same(sm.path(name, AWSCURRENT).read_bytes(), b"aws-v5", "after rotation")


def test_import_aws_conflict_is_refused_before_any_write(sm, moto, aws_env):
    source, stem = aws(moto), uuid.uuid4().hex[:8]
    aws_labels = make_aws_secrets(source, stem)
    prefix = unique("aws-conflict")
    current = next(vid for vid, stages in aws_labels.items() if AWSCURRENT in stages)
    # The same version id here, with another value.
    client(sm).call("CreateSecret", {"Name": f"{prefix}{stem}/db", "SecretString": "local",
                                     "ClientRequestToken": current})

    line = refused(sm, "import", "aws", "--endpoint-url", moto, "--region", "us-east-1",
                   "--prefix", stem + "/", "--name-prefix", prefix)
    assert line == (f"AWS secret {stem}/db: version {current} of {prefix}{stem}/db exists "
                    "here with another value")
    assert names_under(sm, prefix) == [f"{prefix}{stem}/db"]  # /blob was not created
    assert all_versions(sm, f"{prefix}{stem}/db") == {current}


def test_import_aws_errors_are_one_line(sm, moto, aws_env):
    line = refused(sm, "import", "aws", "--endpoint-url", "http://127.0.0.1:9",
                   "--region", "us-east-1")
    assert line.startswith("AWS Secrets Manager: Could not connect"), line
    line = refused(sm, "import", "aws", "--endpoint-url", moto)
    assert line.startswith("AWS Secrets Manager: You must specify a region"), line


# --- backup and restore ---------------------------------------------------------------

def secret_values(daemon: Daemon) -> dict[tuple[str, str], bytes]:
    """Every version's value of every secret, by (name, version id)."""
    api, values = client(daemon), {}
    for entry in api.call("ListSecrets", {})["SecretList"]:
        for version_id in all_versions(daemon, entry["Name"]):
            values[entry["Name"], version_id] = value_of(daemon, entry["Name"],
                                                         VersionId=version_id)
    return values


def test_backup_under_writes_restores_identical_values_with_no_plaintext(daemon, tmp_path):
    api = client(daemon)
    api.call("CreateKey", {"Alias": "alias/app"}, extension=True)
    plaintexts = [f"backup-plaintext-{index}-{uuid.uuid4().hex}" for index in range(6)]
    for index, text in enumerate(plaintexts[:4]):
        api.call("CreateSecret", {"Name": f"app/s{index}", "SecretString": text,
                                  **({"KmsKeyId": "alias/app"} if index % 2 else {})})
    api.call("PutSecretValue", {"SecretId": "app/s0", "SecretString": plaintexts[4],
                                "VersionStages": [AWSPENDING]})
    api.call("CreateSecret", {"Name": "app/bin", "SecretBinary": plaintexts[5].encode()})
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(PASSPHRASE)

    stop, written = threading.Event(), []

    def writer() -> None:
        while not stop.is_set():
            text = f"written-during-backup-{uuid.uuid4().hex}"
            api.call("PutSecretValue", {"SecretId": "app/busy", "SecretString": text})
            written.append(text)

    api.call("CreateSecret", {"Name": "app/busy", "SecretString": "busy-0"})
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        out = tmp_path / "state.backup"
        result = daemon.cli("backup", str(out), "--passphrase-file", str(passphrase),
                            "--state-dir", str(daemon.state_dir))
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert len(written) > 5, "the writer should have run during the backup"
    summary = result.stdout.decode()
    assert re.fullmatch(rf"backup of {daemon.state_dir} written to {out}: 6 secrets, "
                        r"\d+ versions; its master keys are sealed under the passphrase, "
                        r"which restore needs\n", summary), summary
    assert out.stat().st_mode & 0o777 == 0o600
    original = secret_values(daemon)

    data = out.read_bytes()
    # The file is searchable as it is (names are plaintext in a store), so not finding a
    # value below means it isn't there, not that it is compressed.
    assert b"app/s3" in data and b"app/busy" in data
    keys = json.loads(StateDir(daemon.state_dir).keys.read_text())["Keys"]
    materials = [base64.b64decode(key["KeyMaterial"]) for key in keys if "KeyMaterial" in key]
    assert len(materials) == 2, "both master keys were expected in plaintext keys.json"
    for secret in [*(text.encode() for text in [*plaintexts, *written]), *materials]:
        if secret in data or base64.b64encode(secret) in data:
            raise AssertionError("a plaintext value or master key is in the backup")

    restored = tmp_path / "restored" / "state"
    result = daemon.cli("restore", str(out), "--passphrase-file", str(passphrase),
                        "--state-dir", str(restored))
    assert result.stdout.decode().startswith("restored 6 secrets (")
    assert restored.stat().st_mode & 0o777 == 0o700
    assert (restored / "keys.json").stat().st_mode & 0o777 == 0o600

    holder = reachable_directory("secretfs-restored-")
    second = Daemon(state_dir=restored, mountpoint=holder / "secrets")
    second.mountpoint.mkdir()
    second.start()
    try:
        copy = secret_values(second)
        # Every secret; every version the snapshot holds is the original's, byte for byte.
        assert {name for name, _ in copy} == {name for name, _ in original}
        assert set(copy) <= set(original)
        assert {key for key in original if key[0] != "app/busy"} <= set(copy)
        for key, value in copy.items():
            assert_same(value, original[key], f"{key[0]} {key[1]}")
        assert labels_of(second, "app/s0") == labels_of(daemon, "app/s0")
        for index, text in enumerate(plaintexts[:4]):
            assert_same(second.path(f"app/s{index}", AWSCURRENT).read_bytes(), text.encode(),
                        f"app/s{index} through the mount")
        described = client(second).call("DescribeSecret", {"SecretId": "app/s1"})
        assert described["KmsKeyId"] == "alias/app"
    finally:
        second.stop()
        shutil.rmtree(holder, ignore_errors=True)
    verified = second.cli("audit", "verify", "--state-dir", str(restored))
    assert verified.stdout.startswith(b"audit log OK"), verified.stdout


def test_restore_refuses_live_or_non_empty_state_wrong_passphrase_and_damage(daemon,
                                                                           tmp_path):
    client(daemon).call("CreateSecret", {"Name": "r/one", "SecretString": "restore-me"})
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(PASSPHRASE)
    out = tmp_path / "b.backup"
    daemon.cli("backup", str(out), "--passphrase-file", str(passphrase),
               "--state-dir", str(daemon.state_dir))
    restore = ("restore", str(out), "--passphrase-file", str(passphrase), "--state-dir")

    assert refused(daemon, "backup", str(out), "--passphrase-file", str(passphrase),
                   "--state-dir", str(daemon.state_dir)) == f"{out} already exists"
    short = tmp_path / "short"
    short.write_bytes(b"short\n")
    assert refused(daemon, "backup", str(tmp_path / "x"), "--passphrase-file", str(short),
                   "--state-dir", str(daemon.state_dir)) == \
        "the passphrase needs at least 8 characters"

    line = refused(daemon, *restore, str(daemon.state_dir))
    assert line.startswith(f"{daemon.state_dir} already holds a secretfs state"), line
    line = refused(daemon, *restore, str(daemon.state_dir), "--force")
    assert line == (f"a secretfs daemon is serving {daemon.state_dir}: stop it "
                    "('secretfs umount') before restoring into it")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert refused(daemon, *restore, str(other), "--force").startswith(
        f"{other} is not empty and not a secretfs state directory")

    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the passphrase\n")
    target = tmp_path / "new-state"
    assert refused(daemon, "restore", str(out), "--passphrase-file", str(wrong),
                   "--state-dir", str(target)) == \
        f"{out}: wrong passphrase, or the backup was altered"
    damaged = tmp_path / "damaged.backup"
    data = bytearray(out.read_bytes())
    at = data.index(b"SQLite format 3\x00") + 4096 + 100
    data[at] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert refused(daemon, "restore", str(damaged), "--passphrase-file", str(passphrase),
                   "--state-dir", str(target)) == \
        f"{damaged}: the store in it doesn't match its manifest (damaged?)"
    assert not target.exists()
    assert [path.name for path in tmp_path.iterdir() if ".restore-" in path.name] == []

    # Stopped, the state may be replaced: its newer secret goes, the backup's comes back.
    client(daemon).call("CreateSecret", {"Name": "r/after-backup", "SecretString": "gone"})
    daemon.stop()
    # A stopped state backs up too, and restores into an empty directory.
    stopped = tmp_path / "stopped.backup"
    daemon.cli("backup", str(stopped), "--passphrase-file", str(passphrase),
               "--state-dir", str(daemon.state_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert daemon.cli("restore", str(stopped), "--passphrase-file", str(passphrase),
                      "--state-dir", str(empty)).stdout.startswith(b"restored 2 secrets")
    assert StateDir(empty).exists() and (empty / "tls" / "ca.pem").exists()

    daemon.cli(*restore, str(daemon.state_dir), "--force")
    assert not (daemon.state_dir / "secrets.db-wal").exists()
    daemon.start()
    names = [entry["Name"] for entry in client(daemon).call("ListSecrets", {})["SecretList"]]
    assert names == ["r/one"]
    assert_same(daemon.path("r/one", AWSCURRENT).read_bytes(), b"restore-me", "r/one")
    with pytest.raises(ResourceNotFoundException):
        client(daemon).call("DescribeSecret", {"SecretId": "r/after-backup"})
