"""The network endpoint, driven by the real clients: boto3 and the aws CLI over HTTPS
with the local CA, signed with secretfs access keys (Signature Version 4).

One daemon serves the whole module (`--listen 127.0.0.1:<free port>`); each test
makes its own names.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import botocore.auth
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from conftest import free_port, serving_daemon, wait_for

pytestmark = pytest.mark.mount
pytest_plugins = ["_databases"]
FUNCTIONS = Path(__file__).parent / "rotation_functions"


@pytest.fixture(scope="module")
def served():
    port = free_port()
    with serving_daemon("--listen", f"127.0.0.1:{port}", prefix="secretfs-https-") as daemon:
        daemon.endpoint = f"https://127.0.0.1:{port}"
        daemon.ca_bundle = str(daemon.state_dir / "tls" / "ca.pem")
        yield daemon


@pytest.fixture(scope="module")
def root_key(served) -> dict:
    return served.call("create-access-key", "--principal", "uid:0")


def client(served, key: dict, **options):
    return boto3.client(
        "secretsmanager", endpoint_url=served.endpoint, region_name="us-east-1",
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"],
        verify=served.ca_bundle, config=Config(retries={"max_attempts": 1}), **options)


def error_code(call, *args, **kwargs) -> str:
    with pytest.raises(ClientError) as raised:
        call(*args, **kwargs)
    return raised.value.response["Error"]["Code"]


def unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:8]}"


def audit_records(daemon, until) -> list[dict]:
    """The audit log's records, once `until(records)` holds (the log is written every
    second), or as they are after 10 s."""
    records: list[dict] = []

    def seen() -> bool:
        records[:] = daemon.audit_records()
        return until(records)

    wait_for(seen, 10, interval=0.2)
    return records


# --- every action, as boto3 makes it ---------------------------------------------------

def test_boto3_runs_every_supported_action_over_https(served, root_key):
    sm = client(served, root_key)
    name = unique("boto")
    created = sm.create_secret(Name=name, SecretString='{"user": "app"}',
                               Tags=[{"Key": "team", "Value": "a"}])
    assert created["ARN"].startswith("arn:aws:secretsmanager:us-east-1:")
    assert sm.get_secret_value(SecretId=name)["SecretString"] == '{"user": "app"}'
    second = sm.put_secret_value(SecretId=name, SecretBinary=b"\x00\x01")
    assert sm.get_secret_value(SecretId=name)["SecretBinary"] == b"\x00\x01"
    described = sm.describe_secret(SecretId=created["ARN"])
    assert described["VersionIdsToStages"][second["VersionId"]] == ["AWSCURRENT"]
    assert isinstance(described["CreatedDate"], datetime)  # epoch seconds, parsed
    sm.update_secret_version_stage(SecretId=name, VersionStage="AWSCURRENT",
                                   MoveToVersionId=created["VersionId"],
                                   RemoveFromVersionId=second["VersionId"])
    versions = sm.list_secret_version_ids(SecretId=name)["Versions"]
    assert {v["VersionId"]: v["VersionStages"] for v in versions} == {
        created["VersionId"]: ["AWSCURRENT"], second["VersionId"]: ["AWSPREVIOUS"]}
    sm.update_secret(SecretId=name, Description="over https")
    sm.tag_resource(SecretId=name, Tags=[{"Key": "env", "Value": "prod"}])
    sm.untag_resource(SecretId=name, TagKeys=["team"])
    assert sm.describe_secret(SecretId=name)["Tags"] == [{"Key": "env", "Value": "prod"}]
    batch = sm.batch_get_secret_value(SecretIdList=[name, unique("missing")])
    assert [value["Name"] for value in batch["SecretValues"]] == [name]
    assert batch["Errors"][0]["ErrorCode"] == "ResourceNotFoundException"
    document = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Unix": ["user:nobody"]},
        "Action": "secretsmanager:DescribeSecret", "Resource": "*"}]})
    assert sm.validate_resource_policy(ResourcePolicy=document)["PolicyValidationPassed"]
    sm.put_resource_policy(SecretId=name, ResourcePolicy=document)
    assert json.loads(sm.get_resource_policy(SecretId=name)["ResourcePolicy"]) == json.loads(
        document)
    sm.delete_resource_policy(SecretId=name)
    assert len(sm.get_random_password(PasswordLength=20)["RandomPassword"]) == 20
    rotated = sm.rotate_secret(SecretId=name, RotationLambdaARN="secretfs:random-password",
                               RotationRules={"AutomaticallyAfterDays": 30},
                               RotateImmediately=False)
    assert sm.describe_secret(SecretId=name)["RotationEnabled"]
    assert rotated["ARN"] == created["ARN"]
    sm.cancel_rotate_secret(SecretId=name)
    assert not sm.describe_secret(SecretId=name)["RotationEnabled"]
    deleted = sm.delete_secret(SecretId=name, RecoveryWindowInDays=7)
    assert deleted["DeletionDate"] > datetime.now(UTC) + timedelta(days=6)
    assert error_code(sm.get_secret_value, SecretId=name) == "InvalidRequestException"
    sm.restore_secret(SecretId=name)
    assert sm.get_secret_value(SecretId=name)["SecretString"] == '{"user": "app"}'
    assert error_code(sm.create_secret, Name=name, SecretString="x") == (
        "ResourceExistsException")
    assert error_code(sm.get_secret_value, SecretId=unique("none")) == (
        "ResourceNotFoundException")
    sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)


def test_boto3_paginators_walk_every_page_of_250_secrets(served, root_key):
    sm = client(served, root_key)
    prefix = unique("pages")
    names = sorted(f"{prefix}/{n:03}" for n in range(250))
    for name in names:
        sm.create_secret(Name=name, SecretString="v")
    pages = list(sm.get_paginator("list_secrets").paginate(
        Filters=[{"Key": "name", "Values": [prefix]}], PaginationConfig={"PageSize": 100}))
    assert [len(page["SecretList"]) for page in pages] == [100, 100, 50]
    assert sorted(s["Name"] for page in pages for s in page["SecretList"]) == names
    # The paginator's own limit and resumption token, as an application would use them.
    first = sm.get_paginator("list_secrets").paginate(
        Filters=[{"Key": "name", "Values": [prefix]}],
        PaginationConfig={"PageSize": 40, "MaxItems": 120}).build_full_result()
    assert len(first["SecretList"]) == 120 and first["NextToken"]
    rest = sm.get_paginator("list_secrets").paginate(
        Filters=[{"Key": "name", "Values": [prefix]}],
        PaginationConfig={"PageSize": 40, "StartingToken": first["NextToken"]}
    ).build_full_result()
    assert sorted(s["Name"] for s in first["SecretList"] + rest["SecretList"]) == names
    for name in names[:2]:
        for n in range(4):
            sm.put_secret_value(SecretId=name, SecretString=f"v{n}")
    # ListSecretVersionIds has no paginator in botocore: NextToken by hand.
    pages, token = [], None
    while True:
        page = sm.list_secret_version_ids(
            SecretId=names[0], MaxResults=2, IncludeDeprecated=True,
            **({"NextToken": token} if token else {}))
        pages.append(len(page["Versions"]))
        token = page.get("NextToken")
        if not token:
            break
    assert pages == [2, 2, 1]
    batch = sm.batch_get_secret_value(Filters=[{"Key": "name", "Values": [prefix]}],
                                      MaxResults=20)
    following = sm.batch_get_secret_value(Filters=[{"Key": "name", "Values": [prefix]}],
                                          MaxResults=20, NextToken=batch["NextToken"])
    assert [v["Name"] for v in batch["SecretValues"] + following["SecretValues"]] == names[:40]



def test_the_aws_cli_works_by_endpoint_flag_and_by_environment(served, root_key):
    name = unique("cli")
    environment = dict(os.environ, AWS_ACCESS_KEY_ID=root_key["AccessKeyId"],
                       AWS_SECRET_ACCESS_KEY=root_key["SecretAccessKey"],
                       AWS_DEFAULT_REGION="us-east-1", AWS_CA_BUNDLE=served.ca_bundle,
                       AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    aws_command = str(Path(sys.executable).with_name("aws"))

    def aws(*args: str, by_environment: bool = False) -> subprocess.CompletedProcess:
        where = (dict(environment, AWS_ENDPOINT_URL_SECRETS_MANAGER=served.endpoint),
                 []) if by_environment else (environment, ["--endpoint-url", served.endpoint])
        return subprocess.run([aws_command, *where[1], "secretsmanager", *args],
                              env=where[0], capture_output=True, timeout=60)

    def aws_json(*args: str, **options) -> dict:
        done = aws(*args, **options)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout or b"{}")

    first = aws_json("create-secret", "--name", name, "--secret-string", "one")
    assert first["Name"] == name
    second = aws_json("put-secret-value", "--secret-id", name, "--secret-string", "two")
    read = aws("get-secret-value", "--secret-id", name, "--query", "SecretString",
               "--output", "text", by_environment=True)
    assert (read.returncode, read.stdout) == (0, b"two\n")
    aws_json("update-secret-version-stage", "--secret-id", name, "--version-stage",
             "AWSCURRENT", "--move-to-version-id", first["VersionId"],
             "--remove-from-version-id", second["VersionId"])
    assert aws_json("get-secret-value", "--secret-id", name)["SecretString"] == "one"
    listed = aws_json("list-secrets", "--filters", f"Key=name,Values={name}",
                      by_environment=True)
    assert [entry["Name"] for entry in listed["SecretList"]] == [name]
    aws_json("delete-secret", "--secret-id", name, "--recovery-window-in-days", "7")
    gone = aws("get-secret-value", "--secret-id", name)
    # The aws CLI (v1) exits 255 on a service error.
    assert gone.returncode == 255 and b"InvalidRequestException" in gone.stderr
    aws_json("restore-secret", "--secret-id", name)
    assert aws_json("get-secret-value", "--secret-id", name)["SecretString"] == "one"
    missing = aws("get-secret-value", "--secret-id", unique("none"))
    assert missing.returncode == 255 and b"ResourceNotFoundException" in missing.stderr


# --- who is asking --------------------------------------------------------------------

def test_bad_signatures_unknown_keys_and_stale_requests_are_refused(served, root_key,
                                                                    monkeypatch):
    wrong_secret = dict(root_key, SecretAccessKey=root_key["SecretAccessKey"][:-1] + "x")
    assert error_code(client(served, wrong_secret).list_secrets) == "InvalidSignatureException"
    unknown = {"AccessKeyId": "AKSF" + "A" * 16, "SecretAccessKey": "x" * 40}
    assert error_code(client(served, unknown).list_secrets) == "UnrecognizedClientException"
    other_region = boto3.client(
        "secretsmanager", endpoint_url=served.endpoint, region_name="eu-west-1",
        aws_access_key_id=root_key["AccessKeyId"],
        aws_secret_access_key=root_key["SecretAccessKey"], verify=served.ca_bundle,
        config=Config(retries={"max_attempts": 1}))
    assert error_code(other_region.list_secrets) == "InvalidSignatureException"
    # A request signed ten minutes ago (AWS allows five).
    late = datetime.now(UTC) - timedelta(minutes=10)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: late.replace(tzinfo=None))
    with pytest.raises(ClientError) as raised:
        client(served, root_key).list_secrets()
    assert raised.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert "Signature expired" in raised.value.response["Error"]["Message"]


def _raw(served, headers: dict[str, str], body: bytes = b"{}") -> tuple[int, dict]:
    import http.client

    context = ssl.create_default_context(cafile=served.ca_bundle)
    host, port = served.endpoint.removeprefix("https://").split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    try:
        connection.request("POST", "/", body=body, headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "secretsmanager.ListSecrets", **headers})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_unsigned_and_malformed_requests_get_aws_errors(served):
    status, answer = _raw(served, {})
    assert status == 403 and answer["__type"] == "MissingAuthenticationTokenException"
    status, answer = _raw(served, {"Authorization": "AWS4-HMAC-SHA256 Credential=AKSF/x"})
    assert status == 400 and answer["__type"] == "IncompleteSignatureException"


def _send_signed(served, key: dict, target: str, body: bytes, *, send_body: bytes | None = None,
                 drop: str | None = None, signed_at: datetime | None = None,
                 monkeypatch=None) -> tuple[int, dict]:
    """A request botocore signs, then (maybe) altered on the way: another body sent,
    a header dropped, or signed at another time."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method="POST", url=served.endpoint + "/", data=body, headers={
        "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target})
    if signed_at is not None:
        monkeypatch.setattr(botocore.auth, "get_current_datetime",
                            lambda: signed_at.replace(tzinfo=None))
    SigV4Auth(Credentials(key["AccessKeyId"], key["SecretAccessKey"]), "secretsmanager",
              "us-east-1").add_auth(request)
    if signed_at is not None:
        monkeypatch.undo()
    headers = {name: value for name, value in request.headers.items() if name != drop}
    return _raw(served, headers, body=body if send_body is None else send_body)


def test_rejected_signatures_change_nothing_and_each_is_audited(served, root_key, monkeypatch):
    name = unique("refused")
    body = json.dumps({"Name": name, "SecretString": "x"}).encode()
    other = json.dumps({"Name": name + "-tampered", "SecretString": "x"}).encode()
    target = "secretsmanager.CreateSecret"
    wrong = dict(root_key, SecretAccessKey="not-the-secret")
    unknown = {"AccessKeyId": "AKSF" + "B" * 16, "SecretAccessKey": "x"}
    outcomes = {
        "wrong secret": _send_signed(served, wrong, target, body),
        "tampered body": _send_signed(served, root_key, target, body, send_body=other),
        "replayed late": _send_signed(served, root_key, target, body,
                                      signed_at=datetime.now(UTC) - timedelta(minutes=6),
                                      monkeypatch=monkeypatch),
        "unknown key": _send_signed(served, unknown, target, body),
        "no date": _send_signed(served, root_key, target, body, drop="X-Amz-Date"),
        "no signature": _send_signed(served, root_key, target, body, drop="Authorization"),
    }
    assert {case: (status, answer["__type"]) for case, (status, answer) in outcomes.items()} == {
        "wrong secret": (400, "InvalidSignatureException"),
        "tampered body": (400, "InvalidSignatureException"),
        "replayed late": (400, "InvalidSignatureException"),
        "unknown key": (400, "UnrecognizedClientException"),
        "no date": (400, "IncompleteSignatureException"),
        "no signature": (403, "MissingAuthenticationTokenException"),
    }
    sm = client(served, root_key)
    for created in (name, name + "-tampered"):
        assert error_code(sm.describe_secret, SecretId=created) == "ResourceNotFoundException"
    # The same request, signed right, goes through: the refusals were the signatures'.
    assert _send_signed(served, root_key, target, body)[0] == 200
    def refusals(records):
        return [record for record in records if record.get("decidedBy") == "authentication"
                and record["eventName"] == "CreateSecret"]

    refused = refusals(audit_records(served, lambda records: len(refusals(records)) >= 6))
    assert sorted(record["errorCode"] for record in refused[-6:]) == sorted(
        answer["__type"] for _, answer in outcomes.values())
    assert all(record["userIdentity"]["sourceIPAddress"] == "127.0.0.1"
               for record in refused[-6:])
    assert {record["userIdentity"].get("accessKeyId") for record in refused[-6:]} == {
        root_key["AccessKeyId"], unknown["AccessKeyId"], None}


def test_an_access_key_acts_as_its_user_and_policies_govern_it(served, root_key, make_user):
    alice = make_user()
    key = served.call("create-access-key", "--principal", f"user:{alice.pw_name}")
    assert key["AccessKeyId"].startswith("AKSF") and len(key["AccessKeyId"]) == 20
    name = unique("alice")
    client(served, root_key).create_secret(Name=name, SecretString="for-alice")
    sm = client(served, key)
    assert error_code(sm.get_secret_value, SecretId=name) == "AccessDeniedException"
    assert error_code(sm.list_secrets) == "AccessDeniedException"
    served.call("put-identity-policy", "--principal", f"user:{alice.pw_name}",
                "--policy-name", "read", "--policy-document", json.dumps({
                    "Version": "2012-10-17", "Statement": [
                        {"Effect": "Allow", "Resource": f"{name}*", "Action": [
                            "secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]},
                        {"Effect": "Allow", "Resource": "*",
                         "Action": "secretsmanager:ListSecrets"}]}))
    try:
        assert sm.get_secret_value(SecretId=name)["SecretString"] == "for-alice"
        # The listing shows her what she may describe, and nothing else.
        assert [s["Name"] for s in sm.list_secrets()["SecretList"]] == [name]
        assert error_code(sm.put_secret_value, SecretId=name, SecretString="x") == (
            "AccessDeniedException")
    finally:
        served.call("delete-identity-policy", "--principal", f"user:{alice.pw_name}",
                    "--policy-name", "read")
    # The audit record names the key and the client's address.
    def signed_by_key(records):
        return [record for record in records
                if record["userIdentity"].get("accessKeyId") == key["AccessKeyId"]]

    mine = signed_by_key(audit_records(served, lambda records: any(
        record["eventName"] == "PutSecretValue" for record in signed_by_key(records))))
    assert mine and all(record["eventSource"] == "https" for record in mine)
    assert {record["userIdentity"]["sourceIPAddress"] for record in mine} == {"127.0.0.1"}
    assert {record["userIdentity"]["uid"] for record in mine} == {alice.pw_uid}
    # A deleted key stops working at once.
    served.call("delete-access-key", "--access-key-id", key["AccessKeyId"])
    assert error_code(sm.list_secrets) == "UnrecognizedClientException"


def test_access_keys_are_listed_without_secrets_and_stored_sealed(served):
    key = served.call("create-access-key", "--principal", "uid:4321")
    listed = served.call("list-access-keys", "--principal", "uid:4321")["AccessKeys"]
    assert [entry["AccessKeyId"] for entry in listed] == [key["AccessKeyId"]]
    assert all("SecretAccessKey" not in entry for entry in listed)
    store = (served.state_dir / "secrets.db").read_bytes()
    wal = served.state_dir / "secrets.db-wal"
    store += wal.read_bytes() if wal.exists() else b""
    assert key["SecretAccessKey"].encode() not in store
    served.call("delete-access-key", "--access-key-id", key["AccessKeyId"])
    refused = served.cli("create-access-key", "--principal", "group:adm", check=False)
    assert refused.returncode == 254 and b"InvalidParameterException" in refused.stderr
    refused = served.cli("create-access-key", "--principal", "user:no-such-user-here",
                         check=False)
    assert refused.returncode == 254 and b"no such user" in refused.stderr


# --- the transport ----------------------------------------------------------------------

def _client_context(served, version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(served.ca_bundle)
    context.minimum_version = context.maximum_version = version
    context.set_ciphers(ciphers)
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_old_tls_and_suites_without_forward_secrecy_are_refused(served):
    host, port = served.endpoint.removeprefix("https://").split(":")
    # TLS 1.2 offering only RSA key exchange (no forward secrecy).
    for ciphers in ("AES128-GCM-SHA256:AES256-GCM-SHA384", "AES128-SHA256"):
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                pytest.raises(ssl.SSLError):
            _client_context(served, ssl.TLSVersion.TLSv1_2, ciphers).wrap_socket(
                raw, server_hostname=host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(served.ca_bundle)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            pytest.raises(ssl.SSLError):  # trio closes without an alert: EOF
        context.wrap_socket(raw, server_hostname=host)
    modern = ssl.create_default_context(cafile=served.ca_bundle)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            modern.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.cipher()[0].startswith(("TLS_", "ECDHE"))  # forward-secret suites only


def test_hostile_clients_get_clear_errors_while_the_mount_keeps_serving(served, root_key):
    import time

    sm = client(served, root_key)
    name = unique("hostile")
    sm.create_secret(Name=name, SecretString="steady")
    host, port = served.endpoint.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=served.ca_bundle)
    stalled = []
    try:
        # Slowloris: 40 TLS connections, each with half a request, never finished.
        for _ in range(40):
            raw = socket.create_connection((host, int(port)), timeout=10)
            tls = context.wrap_socket(raw, server_hostname=host)
            tls.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
            stalled.append(tls)
        started = time.monotonic()
        reads = [served.path(name, "AWSCURRENT").read_bytes() for _ in range(200)]
        elapsed = time.monotonic() - started
        assert reads == [b"steady"] * 200
        # A stalled loop would hold reads for the server's 30 s request timeout.
        assert elapsed < 10, f"200 reads took {elapsed:.1f} s behind stalled clients"
        status, answer = _raw(served, {}, body=b"x" * (2 << 20))
        assert (status, answer["__type"]) == (413, "RequestEntityTooLargeException")
        status, answer = _send_signed(served, root_key, "secretsmanager.ListSecrets",
                                      b"{not json")
        assert (status, answer["__type"]) == (400, "SerializationException")
        status, answer = _send_signed(served, root_key, "secretsmanager.Nope", b"{}")
        assert (status, answer["__type"]) == (400, "UnknownOperationException")
        assert sm.get_secret_value(SecretId=name)["SecretString"] == "steady"
    finally:
        for tls in stalled:
            tls.close()


def test_plain_http_is_for_loopback_only(tmp_path):
    from conftest import _cli

    state = tmp_path / "state"
    _cli(state, "init", "--state-dir", str(state))
    (tmp_path / "m").mkdir()
    refused = _cli(state, "mount", str(tmp_path / "m"), "--state-dir", str(state),
                   "--listen", f"0.0.0.0:{free_port()}", "--plain-http", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        b"--plain-http serves only a loopback address, not 0.0.0.0"]
    assert not os.path.ismount(tmp_path / "m")


# --- rotation functions written for AWS, through the endpoint -------------------------------

def test_a_python_rotator_reaches_the_endpoint_with_short_lived_credentials(served, root_key):
    """With the endpoint up, the handler's boto3 goes over HTTPS (the daemon's CA, a key
    pair valid only while its step runs), as a Lambda function goes to AWS."""
    import time

    sm = client(served, root_key)
    name = unique("lambda")
    sm.create_secret(Name=name, SecretString=json.dumps({"password": "old"}), Tags=[
        {"Key": "secretfs:rotation:PYTHONPATH", "Value": str(FUNCTIONS)}])
    token = sm.rotate_secret(SecretId=name,
                             RotationLambdaARN="python:aws_style:lambda_handler")["VersionId"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "AWSCURRENT" in sm.describe_secret(SecretId=name)["VersionIdsToStages"][token]:
            break
        time.sleep(0.1)
    assert json.loads(sm.get_secret_value(SecretId=name)["SecretString"])["password"] != "old"
    def handler_writes(records):
        return [record for record in records if record["userIdentity"].get("rotator")
                == "python:aws_style:lambda_handler" and record["eventName"] == "PutSecretValue"
                and record.get("resources", {}).get("name") == name]

    # The handler's calls (all its writes among them) came over the endpoint.
    puts = handler_writes(audit_records(served, lambda records: bool(handler_writes(records))))
    assert puts and all(record["userIdentity"]["accessKeyId"].startswith("ASRT")
                        and record["userIdentity"]["sourceIPAddress"] == "127.0.0.1"
                        for record in puts)


def test_an_aws_style_postgresql_rotation_function_rotates_a_real_password(
        served, root_key, postgresql_server):
    """A rotation function shaped like AWS's single-user template (boto3 for Secrets
    Manager, its own driver for the database) rotates a real PostgreSQL user's password
    through the endpoint, and the app's old password stops working."""
    import time

    server = postgresql_server
    user = server.new_user()
    sm = client(served, root_key)
    name = unique("pg")
    sm.create_secret(Name=name, SecretString=server.secret(user), Tags=[
        {"Key": "secretfs:rotation:PYTHONPATH", "Value": str(FUNCTIONS)}])
    token = sm.rotate_secret(
        SecretId=name,
        RotationLambdaARN="python:aws_postgres_single_user:lambda_handler")["VersionId"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stages = sm.describe_secret(SecretId=name)["VersionIdsToStages"]
        if "AWSCURRENT" in stages[token]:
            break
        time.sleep(0.1)
    rotated = server.login(sm.get_secret_value(SecretId=name)["SecretString"])
    assert rotated.username == user.username and not rotated.matches(user)
    assert server.logs_in(rotated)
    assert not server.logs_in(user)
    previous = server.login(sm.get_secret_value(SecretId=name,
                                                VersionStage="AWSPREVIOUS")["SecretString"])
    assert previous.matches(user)
    assert json.loads(served.path(name, "AWSCURRENT").read_bytes())["username"] == user.username


def test_an_operators_certificate_and_the_config_file_serve_the_endpoint(tmp_path):
    """`Listen` and `TlsCertificate`/`TlsKey` in config.json do what the flags do, with a
    certificate that isn't the one `secretfs init` made."""
    from secretfs import tls

    own = tls.create_authority(tmp_path / "own-ca", hostnames=["secrets.example"])
    port = free_port()
    with serving_daemon(prefix="secretfs-cfg-") as daemon:
        daemon.stop()
        config = json.loads((daemon.state_dir / "config.json").read_text())
        config.update(Listen=f"127.0.0.1:{port}", TlsCertificate=str(own.server_certificate),
                      TlsKey=str(own.server_key))
        (daemon.state_dir / "config.json").write_text(json.dumps(config))
        daemon.start()
        key = daemon.call("create-access-key", "--principal", "uid:0")
        sm = boto3.client("secretsmanager", endpoint_url=f"https://127.0.0.1:{port}",
                          region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"],
                          verify=str(own.ca_certificate))
        sm.create_secret(Name="cfg/one", SecretString="v")
        assert sm.get_secret_value(SecretId="cfg/one")["SecretString"] == "v"
        # The CA `secretfs init` made doesn't vouch for the operator's certificate.
        other = boto3.client("secretsmanager", endpoint_url=f"https://127.0.0.1:{port}",
                             region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                             aws_secret_access_key=key["SecretAccessKey"],
                             verify=str(daemon.state_dir / "tls" / "ca.pem"))
        from botocore.exceptions import SSLError

        with pytest.raises(SSLError):
            other.list_secrets()


def test_plain_http_on_loopback_is_served_and_audited_as_insecure(tmp_path):
    port = free_port()
    with serving_daemon("--listen", f"127.0.0.1:{port}", "--plain-http",
                        prefix="secretfs-http-") as daemon:
        key = daemon.call("create-access-key", "--principal", "uid:0")
        sm = boto3.client("secretsmanager", endpoint_url=f"http://127.0.0.1:{port}",
                          region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])
        sm.create_secret(Name="plain/one", SecretString="v")
        def insecure(records):
            return any(record["eventName"] == "CreateSecret" and record["eventSource"] == "http"
                       for record in records)

        assert insecure(audit_records(daemon, insecure))
        # TLS isn't spoken there: a client that expects it fails.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                pytest.raises(ssl.SSLError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
