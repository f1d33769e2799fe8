"""The AWS KMS key provider, against moto's KMS over real HTTP, and the start check.

moto's server app runs on a werkzeug server in a thread of this process (`MotoServer`):
stopping it closes the port, so the daemon's calls are refused as in a real outage, while
moto's keys stay in this process's memory, so starting it again on the same port brings
back the same keys. The daemons are separate processes reaching it over HTTP.

Tier 1 calls KmsKeyProvider directly, runs the envelope conformance tests on both
providers, and runs the start check on both stores. Tier 2 runs real daemons on real FUSE
mounts initialised with `--key-provider kms`, driven by the secretfs CLI, boto3 over the
HTTPS endpoint, and reads of the mount. Values are compared, never shown.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hmac
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from conftest import Daemon, free_port, reachable_directory, wait_for
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

from secretfs.crypto import LocalKeyProvider, Sealed, seal, unseal
from secretfs.crypto.envelope import encryption_context
from secretfs.crypto.kms import KmsKeyProvider
from secretfs.daemon import DaemonError, check_key_material
from secretfs.identity import SYSTEM
from secretfs.model import (
    AccessDeniedException,
    DecryptionFailure,
    InternalServiceError,
    InvalidParameterException,
    KMSInvalidStateException,
    ResourceExistsException,
)
from secretfs.service import SecretsManagerService
from secretfs.state import StateDir
from secretfs.store.postgres import PostgresStore
from secretfs.store.sqlite import SqliteStore

pytest_plugins = ["_postgres_store"]

REGION, ACCOUNT = "us-east-1", "123456789012"
ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:kms/test-AbCdEf"
V1, V2 = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
EXIT_FAILURE, EXIT_SERVICE_ERROR = 1, 254
AWS_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


# --- moto ------------------------------------------------------------------------------

class MotoServer:
    """moto's server app on a free loopback port, served from a thread of this process."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server = make_server("127.0.0.1", self.port,
                                   DomainDispatcherApplication(create_backend_app),
                                   threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop answering and close the port: connections are refused from now on."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """moto's KMS, and the AWS environment every daemon of this module inherits."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_ENVIRONMENT.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        server = MotoServer()
        server.start()
        try:
            yield server
        finally:
            if server.running:
                server.stop()


@pytest.fixture(scope="module")
def kms(moto):
    return boto3.client("kms", endpoint_url=moto.url, region_name=REGION)


def new_key(kms, stem: str = "secretfs-test") -> tuple[str, str]:
    """A fresh KMS key in moto with an alias of its own: (key id, alias)."""
    key_id = kms.create_key(Description=stem)["KeyMetadata"]["KeyId"]
    alias = f"alias/{stem}-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    return key_id, alias


def kms_provider(moto, default_key: str) -> KmsKeyProvider:
    return KmsKeyProvider(default_key=default_key, endpoint_url=moto.url, region=REGION)


def assert_same(actual: bytes, expected: bytes, what: str) -> None:
    if not hmac.compare_digest(actual, expected):
        raise AssertionError(f"{what}: the value differs ({len(actual)} bytes, "
                             f"{len(expected)} expected)")


def value(stem: str) -> str:
    """A value no file, log or message may hold: random, so a search can't be fooled."""
    return json.dumps({"user": stem, "password": secrets.token_hex(16)})


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    return text.rstrip("\n")


def errno_of(path: Path) -> int | None:
    try:
        path.read_bytes()
    except OSError as error:
        return error.errno
    return None


def assert_nowhere_on_disk(root: Path, *values: str) -> None:
    """No file below `root` (store, WAL, config, audit log, daemon log) holds a value,
    raw or in base64."""
    needles = [needle for text in values
               for needle in (text.encode(), base64.b64encode(text.encode()))]
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found = [index for index, needle in enumerate(needles) if needle in data]
            assert not found, f"{path} holds a secret value"


# --- tier 1: the provider ----------------------------------------------------------------

@pytest.fixture(params=["local", "kms"])
def provider(request, tmp_path):
    """Each key provider with its default key: the envelope's contract holds for both."""
    if request.param == "local":
        return LocalKeyProvider.create(tmp_path / "keys.json", region=REGION,
                                       account_id=ACCOUNT)
    kms_client = request.getfixturevalue("kms")
    _, alias = new_key(kms_client)
    return kms_provider(request.getfixturevalue("moto"), alias)


def test_round_trip_with_a_fresh_data_key_each_time(provider):
    key_id = provider.resolve(None)
    plaintext = value("round-trip").encode()
    first = seal(provider, key_id, plaintext, arn=ARN, version_id=V1)
    second = seal(provider, key_id, plaintext, arn=ARN, version_id=V1)
    assert first.key_id == key_id and first.wrapped_key != second.wrapped_key
    assert first.ciphertext != second.ciphertext and plaintext not in first.ciphertext
    assert_same(unseal(provider, first, arn=ARN, version_id=V1), plaintext, "first")
    assert_same(unseal(provider, second, arn=ARN, version_id=V1), plaintext, "second")


@pytest.mark.parametrize("arn, version_id", [(ARN, V2), (ARN.replace("test", "other"), V1)],
                         ids=["other-version", "other-secret"])
def test_a_value_opens_only_for_its_secret_and_version(provider, arn, version_id):
    key_id = provider.resolve(None)
    sealed = seal(provider, key_id, b"bound", arn=ARN, version_id=V1)
    with pytest.raises(DecryptionFailure) as failure:
        unseal(provider, sealed, arn=arn, version_id=version_id)
    assert key_id in failure.value.message and version_id in failure.value.message
    # The data key itself is bound: unwrapping with the altered context is refused too.
    with pytest.raises(DecryptionFailure):
        provider.unwrap(key_id, sealed.wrapped_key, encryption_context(arn, version_id))


# Not the first bytes: moto's blob starts with the key id, and a blob naming a key that
# doesn't exist is moto's AccessDeniedException (KMS's InvalidCiphertextException).
@pytest.mark.parametrize("index", [40, -1], ids=["middle", "last"])
def test_an_altered_wrapped_key_fails_and_the_message_holds_no_blob(provider, index):
    key_id = provider.resolve(None)
    sealed = seal(provider, key_id, b"altered", arn=ARN, version_id=V1)
    wrapped = bytearray(sealed.wrapped_key)
    wrapped[index] ^= 0x01
    with pytest.raises(DecryptionFailure) as failure:
        unseal(provider, Sealed(sealed.ciphertext, bytes(wrapped), key_id),
               arn=ARN, version_id=V1)
    message = failure.value.message
    assert "\n" not in message
    for blob in (bytes(wrapped), sealed.wrapped_key, sealed.ciphertext):
        assert base64.b64encode(blob).decode() not in message and blob.hex() not in message


def test_kms_wraps_each_data_key_under_the_context_secrets_manager_uses(moto, kms):
    """The wrapped key in the store is KMS's own ciphertext blob under the secret's key
    and {SecretARN, SecretVersionId}: KMS opens it with that context and no other."""
    key_id, alias = new_key(kms)
    provider = kms_provider(moto, alias)
    sealed = seal(provider, provider.resolve(None), b"kms", arn=ARN, version_id=V1)
    assert sealed.key_id == key_id
    opened = kms.decrypt(CiphertextBlob=sealed.wrapped_key,
                         EncryptionContext={"SecretARN": ARN, "SecretVersionId": V1})
    data_key_size = len(opened.pop("Plaintext"))  # a data key: never in an assert's output
    assert opened["KeyId"].endswith(f":key/{key_id}") and data_key_size == 32
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=sealed.wrapped_key,
                    EncryptionContext={"SecretARN": ARN, "SecretVersionId": V2})


def test_resolve_accepts_every_name_kms_does(moto, kms):
    key_id, alias = new_key(kms)
    provider = kms_provider(moto, alias)
    key_arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"
    alias_arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:{alias}"
    for ref in (None, key_id, key_arn, alias, alias_arn):
        assert provider.resolve(ref) == key_id, ref
    assert provider.key_arn(key_id) == key_arn
    # Secrets Manager's name for the key of secrets without one is the default key here.
    for ref in ("alias/aws/secretsmanager",
                f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/aws/secretsmanager"):
        assert provider.resolve(ref) == key_id, ref


@pytest.mark.parametrize("ref", ["alias/secretfs-missing", str(uuid.uuid4()),
                                 f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{uuid.uuid4()}",
                                 "", "x" * 3000])
def test_an_unknown_key_is_invalid_parameter_naming_it(moto, kms, ref):
    _, alias = new_key(kms)
    provider = kms_provider(moto, alias)
    with pytest.raises(InvalidParameterException) as failure:
        provider.resolve(ref)
    message = failure.value.message
    assert "\n" not in message and len(message) < 400
    if ref and len(ref) < 100:
        assert ref in message


def test_each_secret_may_have_its_own_key(moto, kms):
    own_id, own_alias = new_key(kms, "secretfs-own")
    _, default_alias = new_key(kms)
    provider = kms_provider(moto, default_alias)
    sealed = seal(provider, provider.resolve(own_alias), b"own", arn=ARN, version_id=V1)
    assert sealed.key_id == own_id
    assert unseal(provider, sealed, arn=ARN, version_id=V1) == b"own"
    # Presented as wrapped under the default key, KMS refuses it (KeyId is checked):
    # KMS says IncorrectKeyException (DecryptionFailure), moto AccessDeniedException.
    default_id = provider.resolve(None)
    moved = Sealed(sealed.ciphertext, sealed.wrapped_key, default_id)
    with pytest.raises((DecryptionFailure, AccessDeniedException)) as failure:
        unseal(provider, moved, arn=ARN, version_id=V1)
    assert default_id in failure.value.message


@pytest.mark.parametrize("change, state", [
    (lambda kms, key_id: kms.disable_key(KeyId=key_id), "Disabled"),
    (lambda kms, key_id: kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7),
     "PendingDeletion")])
def test_a_key_kms_wont_use_is_kms_invalid_state(moto, kms, change, state):
    key_id, alias = new_key(kms)
    provider = kms_provider(moto, alias)
    change(kms, key_id)
    with pytest.raises(KMSInvalidStateException) as failure:
        provider.resolve(None)
    assert failure.value.code == "KMSInvalidStateException"
    assert key_id in failure.value.message and state in failure.value.message


def test_kms_unreachable_is_one_clean_error_naming_kms_and_the_key(moto, kms, caplog):
    key_id, alias = new_key(kms)
    provider = kms_provider(moto, alias)
    sealed = seal(provider, key_id, b"reachable", arn=ARN, version_id=V1)
    closed = KmsKeyProvider(default_key=alias, region=REGION,
                            endpoint_url=f"http://127.0.0.1:{free_port()}")
    for _ in range(2):  # one warning for the outage, not one per call
        with pytest.raises(InternalServiceError) as failure:
            unseal(closed, sealed, arn=ARN, version_id=V1)
        message = failure.value.message
        assert closed.endpoint in message and key_id in message and "\n" not in message
        assert base64.b64encode(sealed.wrapped_key).decode() not in message
    warnings = [record for record in caplog.records if record.name == "secretfs.crypto.kms"]
    assert len(warnings) == 1 and closed.endpoint in warnings[0].getMessage()
    assert warnings[0].exc_info is None


def test_create_key_makes_a_kms_key_with_its_alias_and_list_keys_shows_it(moto, kms):
    _, alias = new_key(kms)
    provider = kms_provider(moto, alias)
    made_alias = f"alias/secretfs-made-{uuid.uuid4().hex[:8]}"
    made = provider.create_key(alias=made_alias, description="made by the test")
    assert made["Aliases"] == [made_alias] and made["KeyState"] == "Enabled"
    assert kms.describe_key(KeyId=made_alias)["KeyMetadata"]["KeyId"] == made["KeyId"]
    listed = {key["KeyId"]: key for key in provider.list_keys()}
    assert listed[made["KeyId"]]["Aliases"] == [made_alias]
    assert listed[made["KeyId"]]["Description"] == "made by the test"
    assert provider.resolve(made_alias) == made["KeyId"]

    count = len(kms.list_keys()["Keys"])
    with pytest.raises(ResourceExistsException):
        provider.create_key(alias=made_alias)
    with pytest.raises(InvalidParameterException):
        provider.create_key(alias="not-an-alias")
    with pytest.raises(InvalidParameterException):
        provider.create_key(alias="alias/aws/reserved")
    assert len(kms.list_keys()["Keys"]) == count  # refused before any key was made


# --- tier 1: the start check on both stores ---------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        opened = SqliteStore.create(tmp_path / "secrets.db")
    else:
        cluster = request.getfixturevalue("postgres_cluster")
        opened = PostgresStore.create(cluster.url(cluster.create_database()))
    yield opened
    opened.close()


def _service(store, keys) -> SecretsManagerService:
    return SecretsManagerService(store, keys, region=REGION, account_id=ACCOUNT)


def _alter_wrapped_key(store, name: str) -> None:
    with store.write() as writer:
        secret = writer.load(writer.find(name=name))
        version_id = secret.labels["AWSCURRENT"]
        sealed = writer.sealed_value(secret.secret_id, version_id)
        wrapped = bytearray(sealed.wrapped_key)
        wrapped[-1] ^= 0x01
        writer.fill_version(secret.secret_id, version_id, sealed.__class__(
            sealed.ciphertext, bytes(wrapped), sealed.key_id, sealed.is_binary))


def test_the_start_check_names_a_key_the_key_file_lacks(store, tmp_path):
    keys = LocalKeyProvider.create(tmp_path / "keys.json", region=REGION, account_id=ACCOUNT)
    service = _service(store, keys)
    own = keys.create_key(alias="alias/own")["KeyId"]
    service.call("CreateSecret", {"Name": "a", "SecretString": "one"}, SYSTEM)
    service.call("CreateSecret", {"Name": "b", "SecretString": "two", "KmsKeyId": "alias/own"},
                 SYSTEM)
    service.call("CreateAccessKey", {"Principal": "uid:0"}, SYSTEM)
    check_key_material(store, keys)  # the right key file passes

    other = LocalKeyProvider.create(tmp_path / "other.json", region=REGION, account_id=ACCOUNT)
    with pytest.raises(DaemonError) as failure:
        check_key_material(store, other)
    message = str(failure.value)
    assert message.startswith("key ") and "\n" not in message
    assert keys.resolve(None) in message or own in message
    assert "wrong key file?" in message


def test_the_start_check_is_not_stopped_by_one_altered_row(store, tmp_path):
    """One altered row costs its own value only: the key is proven by another row. Every
    row under the key failing is the key's fault, and stops the start."""
    keys = LocalKeyProvider.create(tmp_path / "keys.json", region=REGION, account_id=ACCOUNT)
    service = _service(store, keys)
    for name in ("a", "b"):
        service.call("CreateSecret", {"Name": name, "SecretString": name}, SYSTEM)
    _alter_wrapped_key(store, "b")  # the newest row
    check_key_material(store, keys)
    _alter_wrapped_key(store, "a")
    with pytest.raises(DaemonError) as failure:
        check_key_material(store, keys)
    assert str(failure.value).startswith(f"key {keys.resolve(None)}: ")


def test_the_start_check_tries_a_bounded_number_of_rows_per_key(store, tmp_path):
    keys = LocalKeyProvider.create(tmp_path / "keys.json", region=REGION, account_id=ACCOUNT)
    other = keys.create_key(alias="alias/other")["KeyId"]
    service = _service(store, keys)
    for n in range(5):
        service.call("CreateSecret", {"Name": f"s{n}", "SecretString": "x"}, SYSTEM)
    service.call("CreateSecret", {"Name": "o", "SecretString": "x", "KmsKeyId": other}, SYSTEM)
    with store.read() as reader:
        samples = reader.version_key_samples(3)
    by_key: dict[str, list[str]] = {}
    for key_id, arn, _, _ in samples:
        by_key.setdefault(key_id, []).append(arn.rpartition(":")[2].rsplit("-", 1)[0])
    assert by_key == {keys.resolve(None): ["s4", "s3", "s2"], other: ["o"]}


# --- tier 2: daemons ------------------------------------------------------------------------

def init_kms(host: Daemon, moto, key_ref: str | None, *args: str,
             check: bool = True) -> subprocess.CompletedProcess:
    return host.cli("init", "--state-dir", str(host.state_dir), "--key-provider", "kms",
                    *(("--kms-key-id", key_ref) if key_ref else ()),
                    "--kms-endpoint-url", moto.url, *args, check=check)


@contextlib.contextmanager
def host(prefix: str = "secretfs-kms-") -> Iterator[Daemon]:
    """A state directory and mountpoint (nothing initialised), cleaned up afterwards."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("mount tests need root and /dev/fuse (run through the README's test command)")
    base = reachable_directory(prefix)
    daemon = Daemon(state_dir=base / "state", mountpoint=base / "secrets")
    daemon.mountpoint.mkdir()
    try:
        yield daemon
    finally:
        daemon.stop()
        if not os.path.ismount(daemon.mountpoint):
            shutil.rmtree(base, ignore_errors=True)


def mount_fails(daemon: Daemon) -> str:
    """The one line a refused `secretfs mount` prints; nothing is left mounted."""
    result = daemon.cli("mount", str(daemon.mountpoint), "--state-dir", str(daemon.state_dir),
                        check=False)
    assert result.returncode == EXIT_FAILURE, result
    assert not os.path.ismount(daemon.mountpoint)
    return one_line(result.stderr)


def create(daemon: Daemon, name: str, text: str, *args: str) -> dict:
    return daemon.call("create-secret", "--name", name, "--secret-string", text, *args)


def version_stages(daemon: Daemon, name: str) -> dict[str, list[str]]:
    versions = daemon.call("list-secret-version-ids", "--secret-id", name)["Versions"]
    return {version["VersionId"]: version["VersionStages"] for version in versions}


def api_value(daemon: Daemon, name: str, *args: str) -> bytes:
    return daemon.call("get-secret-value", "--secret-id", name, *args)["SecretString"].encode()


@pytest.fixture(scope="module")
def served(moto, kms) -> Iterator[Daemon]:
    """One KMS daemon for the module's end-to-end tests, with the HTTPS endpoint."""
    _, alias = new_key(kms, "secretfs-default")
    port = free_port()
    with host("secretfs-kms-served-") as daemon:
        summary = json.loads(init_kms(daemon, moto, alias).stdout)
        daemon.default_alias, daemon.default_arn = alias, summary["DefaultKey"]
        daemon.extra_args = ["--listen", f"127.0.0.1:{port}"]
        daemon.endpoint = f"https://127.0.0.1:{port}"
        daemon.start()
        yield daemon


@pytest.mark.mount
def test_init_records_the_kms_provider_and_writes_no_key_file(served, moto, kms):
    state = StateDir(served.state_dir)
    config = state.read_config()
    key_id = kms.describe_key(KeyId=served.default_alias)["KeyMetadata"]["KeyId"]
    assert {name: config.get(name) for name in ("KeyProvider", "KmsKeyId", "KmsEndpointUrl",
                                               "KmsRegion")} == {
        "KeyProvider": "kms", "KmsKeyId": served.default_alias, "KmsEndpointUrl": moto.url,
        "KmsRegion": REGION}
    assert served.default_arn == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"
    assert not state.keys.exists()
    status = served.call("status", "--output", "json")["KeyProvider"]
    assert status["Kind"] == "kms" and moto.url in status["Source"]
    assert served.default_alias in status["Path"]
    result = served.cli("export-master-key", "--state-dir", str(served.state_dir), check=False)
    assert result.returncode == EXIT_FAILURE and "kms key provider" in one_line(result.stderr)


@pytest.mark.mount
def test_create_read_and_put_through_the_mount_cli_and_boto3(served, kms):
    name, first, second = f"e2e/{uuid.uuid4().hex[:8]}", value("first"), value("second")
    created = create(served, name, first)
    directory = served.path(*name.split("/"))
    assert_same((directory / "AWSCURRENT").read_bytes(), first.encode(), "AWSCURRENT")
    assert_same(api_value(served, name), first.encode(), "GetSecretValue")
    password = json.loads(first)["password"].encode()
    assert_same((directory / "keys" / "AWSCURRENT" / "password").read_bytes(), password,
                "keys/AWSCURRENT/password")

    served.call("put-secret-value", "--secret-id", name, "--secret-string", second)
    assert_same((directory / "AWSCURRENT").read_bytes(), second.encode(), "new AWSCURRENT")
    assert_same((directory / "AWSPREVIOUS").read_bytes(), first.encode(), "AWSPREVIOUS")
    versions = served.call("list-secret-version-ids", "--secret-id", name)["Versions"]
    assert {arn for version in versions for arn in version["KmsKeyIds"]} == {served.default_arn}

    # boto3 over the HTTPS endpoint: the access key's secret half is sealed under KMS too.
    key = served.call("create-access-key", "--principal", "uid:0")
    client = boto3.client(
        "secretsmanager", endpoint_url=served.endpoint, region_name=REGION,
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"],
        verify=str(StateDir(served.state_dir).ca_certificate),
        config=Config(retries={"max_attempts": 1}))
    assert_same(client.get_secret_value(SecretId=name)["SecretString"].encode(),
                second.encode(), "boto3 GetSecretValue")
    third = value("third")
    client.put_secret_value(SecretId=created["ARN"], SecretString=third)
    assert_same((directory / "AWSCURRENT").read_bytes(), third.encode(), "boto3's put")
    assert_nowhere_on_disk(served.state_dir, first, second, third, key["SecretAccessKey"])


@pytest.mark.mount
def test_a_secret_with_its_own_kms_key(served, kms):
    own_id, own_alias = new_key(kms, "secretfs-own")
    name, text = f"own/{uuid.uuid4().hex[:8]}", value("own")
    created = create(served, name, text, "--kms-key-id", own_alias)
    assert served.call("describe-secret", "--secret-id", name)["KmsKeyId"] == own_alias
    versions = served.call("list-secret-version-ids", "--secret-id", name)["Versions"]
    own_arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{own_id}"
    assert [version["KmsKeyIds"] for version in versions] == [[own_arn]]
    assert_same(served.path(*name.split("/"), "AWSCURRENT").read_bytes(), text.encode(),
                "AWSCURRENT")
    # The store row is KMS's blob under the secret's own key, bound to its ARN and version.
    with contextlib.closing(sqlite3.connect(StateDir(served.state_dir).database)) as db:
        key_id, wrapped = db.execute(
            "SELECT key_id, wrapped_key FROM versions WHERE version_id = ?",
            (created["VersionId"],)).fetchone()
    assert key_id == own_id
    opened = kms.decrypt(CiphertextBlob=wrapped, EncryptionContext={
        "SecretARN": created["ARN"], "SecretVersionId": created["VersionId"]})
    data_key_size = len(opened.pop("Plaintext"))  # a data key: never in an assert's output
    assert opened["KeyId"] == own_arn and data_key_size == 32

    # An unknown key is refused with the AWS error, and creates nothing.
    missing = f"bad/{uuid.uuid4().hex[:8]}"
    result = served.cli("create-secret", "--name", missing, "--secret-string", "x",
                        "--kms-key-id", "alias/secretfs-no-such-key", check=False)
    assert result.returncode == EXIT_SERVICE_ERROR
    line = one_line(result.stderr)
    assert "(InvalidParameterException)" in line and "alias/secretfs-no-such-key" in line
    assert served.cli("describe-secret", "--secret-id", missing, check=False).returncode \
        == EXIT_SERVICE_ERROR


@pytest.mark.mount
def test_create_key_and_list_keys_verbs_use_kms(served, kms):
    alias = f"alias/secretfs-cli-{uuid.uuid4().hex[:8]}"
    made = served.call("create-key", "--alias", alias, "--description", "from the CLI")
    assert kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"] == made["KeyId"]
    listed = {key["KeyId"]: key for key in served.call("list-keys")["Keys"]}
    assert listed[made["KeyId"]]["Aliases"] == [alias]
    result = served.cli("create-key", "--alias", alias, check=False)
    assert result.returncode == EXIT_SERVICE_ERROR
    assert "(ResourceExistsException)" in one_line(result.stderr)
    name, text = f"cli-key/{uuid.uuid4().hex[:8]}", value("cli-key")
    create(served, name, text, "--kms-key-id", alias)
    assert_same(api_value(served, name), text.encode(), "GetSecretValue")


@pytest.mark.mount
def test_a_kms_outage_fails_cold_reads_cleanly_serves_warm_ones_and_recovers(served, moto):
    stem = f"outage/{uuid.uuid4().hex[:8]}"
    warm_text, cold_text = value("warm"), value("cold")
    create(served, f"{stem}/warm", warm_text)
    create(served, f"{stem}/cold", cold_text)
    warm = served.path(*stem.split("/"), "warm")
    cold = served.path(*stem.split("/"), "cold", "AWSCURRENT")
    assert_same((warm / "AWSCURRENT").read_bytes(), warm_text.encode(), "warm, before")
    password = json.loads(warm_text)["password"].encode()
    assert_same((warm / "keys" / "AWSCURRENT" / "password").read_bytes(), password,
                "warm key, before")
    versions_before = version_stages(served, f"{stem}/cold")
    log = StateDir(served.state_dir).log
    log_start = log.stat().st_size

    moto.stop()
    try:
        # Already decrypted and cached: still served.
        assert_same((warm / "AWSCURRENT").read_bytes(), warm_text.encode(), "warm, during")
        assert_same((warm / "keys" / "AWSCURRENT" / "password").read_bytes(), password,
                    "warm key, during")
        # Not decrypted yet: EIO on the mount, an AWS error on the API; the daemon serves on.
        assert errno_of(cold) == errno.EIO
        assert errno_of(cold) == errno.EIO
        result = served.cli("get-secret-value", "--secret-id", f"{stem}/cold", check=False)
        assert result.returncode == EXIT_SERVICE_ERROR and result.stdout == b""
        line = one_line(result.stderr)
        assert line.startswith("An error occurred (InternalServiceError) when calling the "
                               "GetSecretValue operation: KMS at ") and moto.url in line
        # A write needs a data key from KMS: refused, and nothing changes.
        result = served.cli("put-secret-value", "--secret-id", f"{stem}/cold",
                            "--secret-string", "during the outage", check=False)
        assert result.returncode == EXIT_SERVICE_ERROR
        assert "(InternalServiceError)" in one_line(result.stderr)
        assert version_stages(served, f"{stem}/cold") == versions_before
        assert served.call("describe-secret", "--secret-id", f"{stem}/warm")["Name"] == \
            f"{stem}/warm"
    finally:
        moto.start()

    assert_same(cold.read_bytes(), cold_text.encode(), "cold, after")
    assert_same(api_value(served, f"{stem}/cold"), cold_text.encode(), "API, after")
    served.call("put-secret-value", "--secret-id", f"{stem}/cold", "--secret-string", "after")
    assert cold.read_bytes() == b"after"

    with open(log, "rb") as handle:
        handle.seek(log_start)
        logged = handle.read().decode()
    assert "Traceback" not in logged
    outage_lines = [line for line in logged.splitlines()
                    if "WARNING" in line and f"KMS at {moto.url}" in line]
    assert len(outage_lines) == 1, logged
    assert f"KMS at {moto.url} answers again" in logged
    errors = [line for line in logged.splitlines() if " ERROR " in line]
    assert errors and all(f"KMS at {moto.url}" in line for line in errors), logged
    assert_nowhere_on_disk(served.state_dir, warm_text, cold_text)


@pytest.mark.mount
def test_the_start_check_names_a_disabled_or_unreachable_kms_key(moto, kms):
    key_id, alias = new_key(kms)
    with host() as daemon:
        init_kms(daemon, moto, alias)
        daemon.start()
        text = value("start")
        create(daemon, "start/check", text)
        daemon.stop()

        kms.disable_key(KeyId=key_id)
        line = mount_fails(daemon)
        assert line.startswith(f"key {alias}: ") and key_id in line and "Disabled" in line
        kms.enable_key(KeyId=key_id)

        state = StateDir(daemon.state_dir)
        config = state.read_config()
        closed = f"http://127.0.0.1:{free_port()}"
        state.write_config({**config, "KmsEndpointUrl": closed})
        line = mount_fails(daemon)
        assert line.startswith(f"key {alias}: KMS at {closed} ")
        state.write_config(config)

        daemon.start()
        assert_same(daemon.path("start", "check", "AWSCURRENT").read_bytes(), text.encode(),
                    "after the key is enabled again")
        daemon.stop()

        # A store whose values are under a key the default one isn't: each key is checked.
        other_id, other_alias = new_key(kms)
        daemon.start()
        create(daemon, "start/other", value("other"), "--kms-key-id", other_alias)
        daemon.stop()
        kms.schedule_key_deletion(KeyId=other_id, PendingWindowInDays=7)
        line = mount_fails(daemon)
        assert line.startswith(f"key {other_id}: ") and "PendingDeletion" in line
        assert line.endswith("(wrong key file? missing KMS permission?)")


@pytest.mark.mount
def test_a_key_file_from_another_state_directory_fails_the_start_naming_the_key():
    with host() as daemon, host() as other:
        summary = daemon.call("init", "--state-dir", str(daemon.state_dir))
        other.cli("init", "--state-dir", str(other.state_dir))
        daemon.start()
        create(daemon, "local/check", value("local"))
        daemon.stop()
        keys = StateDir(daemon.state_dir).keys
        shutil.copyfile(StateDir(other.state_dir).keys, keys)
        keys.chmod(0o600)
        key_id = summary["DefaultKey"].rpartition("/")[2]
        line = mount_fails(daemon)
        assert line.startswith(f"key {key_id}: ") and "wrong key file?" in line


@pytest.mark.parametrize("args, problem", [
    ((), "--kms-key-id"),
    (("--kms-key-id", "alias/secretfs-no-such-key"), "not found"),
    (("--kms-key-id", "alias/x", "--keys-from", "/dev/null"), "--keys-from"),
    (("--kms-key-id", "alias/x", "--master-key-from-credential"), "local key provider"),
])
def test_init_with_kms_refuses_bad_flags_in_one_line_and_creates_nothing(moto, tmp_path, args,
                                                                        problem):
    state = Daemon(state_dir=tmp_path / "state", mountpoint=tmp_path / "secrets")
    result = init_kms(state, moto, None, *args, check=False)
    assert result.returncode == EXIT_FAILURE and problem in one_line(result.stderr)
    assert not (tmp_path / "state" / "config.json").exists()
    assert not (tmp_path / "state" / "secrets.db").exists()


def test_init_refuses_kms_flags_with_the_local_provider(tmp_path):
    state = Daemon(state_dir=tmp_path / "state", mountpoint=tmp_path / "secrets")
    result = state.cli("init", "--state-dir", str(state.state_dir), "--kms-key-id", "alias/x",
                       check=False)
    assert result.returncode == EXIT_FAILURE
    assert "--key-provider kms" in one_line(result.stderr)
    assert not state.state_dir.exists()


# --- tier 2: a fleet ----------------------------------------------------------------------

@pytest.mark.mount
def test_a_fleet_host_joins_with_kms_and_no_key_file(moto, kms, postgres_cluster):
    _, alias = new_key(kms, "secretfs-fleet")
    url = postgres_cluster.url(postgres_cluster.create_database())
    with host("secretfs-kms-a-") as a, host("secretfs-kms-b-") as b, \
            host("secretfs-kms-c-") as c:
        init_kms(a, moto, alias, "--store", url)
        a.start()
        text = value("fleet")
        create(a, "fleet/db", text)

        # The store says which provider seals it: a local join is refused in one line.
        result = c.cli("init", "--state-dir", str(c.state_dir), "--join", "--store", url,
                       "--keys-from", "/dev/null", check=False)
        assert result.returncode == EXIT_FAILURE
        assert "kms" in one_line(result.stderr)

        summary = json.loads(init_kms(b, moto, None, "--join", "--store", url).stdout)
        assert summary["KeyProvider"] == "kms" and "KeyFile" not in summary
        assert StateDir(b.state_dir).read_config()["KmsKeyId"] == alias  # the fleet's
        assert not StateDir(b.state_dir).keys.exists()
        b.start()
        assert_same(b.path("fleet", "db", "AWSCURRENT").read_bytes(), text.encode(),
                    "B reads A's secret")
        assert_same(api_value(b, "fleet/db"), text.encode(), "B's API")

        other = value("from-b")
        create(b, "fleet/from-b", other)
        a.cli("refresh")
        assert wait_for(lambda: a.path("fleet", "from-b", "AWSCURRENT").exists())
        assert_same(a.path("fleet", "from-b", "AWSCURRENT").read_bytes(), other.encode(),
                    "A reads B's secret")


@pytest.mark.mount
def test_a_fleet_host_joined_with_the_wrong_key_file_fails_at_start(postgres_cluster):
    url = postgres_cluster.url(postgres_cluster.create_database())
    with host("secretfs-kms-a-") as a, host("secretfs-kms-b-") as b, \
            host("secretfs-kms-c-") as elsewhere:
        summary = a.call("init", "--state-dir", str(a.state_dir), "--store", url)
        a.start()
        create(a, "fleet/db", value("fleet"))
        elsewhere.cli("init", "--state-dir", str(elsewhere.state_dir))
        b.cli("init", "--state-dir", str(b.state_dir), "--join", "--store", url,
              "--keys-from", str(StateDir(elsewhere.state_dir).keys))
        line = mount_fails(b)
        key_id = summary["DefaultKey"].rpartition("/")[2]
        assert line.startswith(f"key {key_id}: ") and "wrong key file?" in line
