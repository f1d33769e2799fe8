"""The API's protocol and transport: real HTTP over a real socket, a stand-in service.

Blocking clients (http.client, the Client, boto3) run in worker threads so the
server keeps running on the test's trio loop.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import json
import os
import socket
import stat
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import boto3
import botocore.parsers
import botocore.session
import pytest
import trio
from botocore.exceptions import ClientError

from secretfs import model
from secretfs.api.client import (
    Client,
    DaemonNotRunning,
    SocketPermissionDenied,
    UnixHTTPConnection,
)
from secretfs.api.server import Limits, serve_listener, serve_unix
from secretfs.identity import Caller

ARN = "arn:aws:secretsmanager:us-east-1:000000000000:secret:db-AbCdEf"
VERSION = "11111111-1111-4111-8111-111111111111"
CREATED = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
BINARY = b"\x00\x01\xff"
SECRET = "hunter2-do-not-log"
FAST = Limits(timeout=5.0)
SERVICE_MODEL = botocore.session.get_session().get_service_model("secretsmanager")


class FancyNewException(model.SecretsManagerError):
    """An error code the client's table does not know."""

    code, status = "FancyNewException", 400


class RecordingService:
    """Records every call and answers a few actions with canned results."""

    AWS_ACTIONS = frozenset({
        "CreateSecret", "PutSecretValue", "GetSecretValue", "BatchGetSecretValue",
        "UpdateSecret", "UpdateSecretVersionStage", "DescribeSecret", "ListSecrets",
        "ListSecretVersionIds", "DeleteSecret", "RestoreSecret", "TagResource",
        "UntagResource", "GetRandomPassword",
    })
    EXTENSION_ACTIONS = frozenset({"CreateKey", "ListKeys"})

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, Caller]] = []

    def call(self, action: str, params: dict, caller: Caller) -> dict:
        self.calls.append((action, params, caller))
        secret_id = params.get("SecretId")
        if secret_id == "missing":
            raise model.ResourceNotFoundException("Secrets Manager can't find the specified secret.")
        if secret_id == "fancy":
            raise FancyNewException("Something new.")
        if action == "GetSecretValue":
            return {"ARN": ARN, "Name": secret_id, "VersionId": VERSION, "SecretBinary": BINARY,
                    "VersionStages": ["AWSCURRENT"], "CreatedDate": CREATED}
        if action == "DeleteSecret":
            if not 7 <= params.get("RecoveryWindowInDays", 30) <= 30:
                raise model.InvalidParameterException(
                    "The recovery window must be between 7 and 30 days.")
            return {"ARN": ARN, "Name": secret_id, "DeletionDate": CREATED}
        if action == "UpdateSecret":
            raise RuntimeError("the service has a bug")
        if action == "ListKeys":
            return {"Keys": [{"KeyId": "local-1", "Created": CREATED, "Unused": None}]}
        return {"ARN": ARN, "Name": params.get("Name") or secret_id, "VersionId": VERSION}


class Server:
    def __init__(self, service: RecordingService, path: Path):
        self.service, self.path = service, path

    def client(self) -> Client:
        return Client(self.path, timeout=10)


async def start_server(nursery: trio.Nursery, path: Path, limits: Limits = FAST) -> Server:
    service = RecordingService()
    await nursery.start(functools.partial(serve_unix, service, path, limits=limits))
    return Server(service, path)


@pytest.fixture
async def server(nursery, tmp_path) -> Server:
    return await start_server(nursery, tmp_path / "control.sock")


def post(path: Path, target: str | None, body: bytes,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw POST over the socket (blocking)."""
    conn = UnixHTTPConnection(path, timeout=10)
    try:
        sent = {"Content-Type": "application/x-amz-json-1.1", **(headers or {})}
        if target is not None:
            sent["X-Amz-Target"] = target
        conn.request("POST", "/", body=body, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def apost(path: Path, target: str | None, body: bytes | dict,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return await trio.to_thread.run_sync(post, path, target, body, headers)


async def raw_exchange(path: Path, data: bytes) -> bytes:
    """Send bytes and read until the server closes the connection."""
    stream = await trio.open_unix_socket(os.fspath(path))
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def botocore_parse(action: str, status: int, headers: dict[str, str], body: bytes) -> dict:
    """The response as boto3 would see it, by botocore's own JSON parser."""
    parser = botocore.parsers.create_parser("json")
    shape = SERVICE_MODEL.operation_model(action).output_shape
    return parser.parse({"status_code": status, "headers": headers, "body": body}, shape)


# --- dispatch and shapes --------------------------------------------------------------

async def test_dispatch_serializes_epoch_seconds_and_base64(server):
    status, headers, body = await apost(
        server.path, "secretsmanager.GetSecretValue", {"SecretId": "db"})
    assert status == 200
    assert headers["content-type"] == "application/x-amz-json-1.1"
    uuid.UUID(headers["x-amzn-requestid"])
    answer = json.loads(body)
    assert answer["SecretBinary"] == base64.b64encode(BINARY).decode()
    assert answer["CreatedDate"] == pytest.approx(CREATED.timestamp())
    assert isinstance(answer["CreatedDate"], float)
    [(action, params, _)] = server.service.calls
    assert (action, params) == ("GetSecretValue", {"SecretId": "db"})

    parsed = botocore_parse("GetSecretValue", status, headers, body)
    assert parsed["SecretBinary"] == BINARY
    assert parsed["CreatedDate"] == CREATED
    assert parsed["ResponseMetadata"]["RequestId"] == headers["x-amzn-requestid"]


async def test_blob_params_reach_the_service_as_bytes(server):
    encoded = base64.b64encode(BINARY).decode()
    status, _, _ = await apost(server.path, "secretsmanager.PutSecretValue",
                               {"SecretId": "db", "SecretBinary": encoded})
    assert status == 200
    assert server.service.calls[0][1] == {"SecretId": "db", "SecretBinary": BINARY}


async def test_extension_actions_are_dispatched_without_the_aws_model(server):
    status, _, body = await apost(server.path, "secretfs.ListKeys", {})
    assert status == 200
    # None members are left out, as AWS leaves out absent members.
    assert json.loads(body) == {"Keys": [{"KeyId": "local-1", "Created": CREATED.timestamp()}]}
    for target in ("secretsmanager.ListKeys", "secretfs.GetSecretValue"):
        status, headers, _ = await apost(server.path, target, {})
        assert (status, headers["x-amzn-errortype"]) == (400, "UnknownOperationException")


async def test_null_members_are_absent(server):
    status, _, _ = await apost(server.path, "secretsmanager.ListSecrets",
                               {"MaxResults": None, "Filters": [{"Key": "name", "Values": None}]})
    assert status == 200
    assert server.service.calls[0][1] == {"Filters": [{"Key": "name"}]}


async def test_an_empty_body_is_an_empty_input(server):
    status, _, _ = await apost(server.path, "secretsmanager.ListSecrets", b"")
    assert status == 200
    assert server.service.calls[0][:2] == ("ListSecrets", {})


async def test_peer_credentials_reach_the_service(server):
    await apost(server.path, "secretsmanager.ListSecrets", {})
    [(_, _, caller)] = server.service.calls
    assert caller == Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(),
                            source="unix-socket")


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "body", "code", "message"), [
    ("secretsmanager.NoSuchAction", b"{}", "UnknownOperationException", "NoSuchAction"),
    (None, b"{}", "UnknownOperationException", "X-Amz-Target"),
    ("secretsmanager.ReplicateSecretToRegions", b"{}", "UnknownOperationException",
     "secretfs does not implement ReplicateSecretToRegions."),
    ("secretsmanager.ListSecrets", b'{"MaxResults": ', "SerializationException", "not valid JSON"),
    ("secretsmanager.ListSecrets", b"[1, 2]", "SerializationException", "must be a JSON object"),
    ("secretsmanager.ListSecrets", b'{"MaxResults": NaN}', "SerializationException",
     "not valid JSON"),
    ("secretsmanager.DescribeSecret", b"{}", "ValidationException",
     "1 validation error detected: Value null at 'secretId' failed to satisfy constraint: "
     "Member must not be null"),
    ("secretsmanager.CreateSecret", b'{"Name": ""}', "ValidationException",
     "1 validation error detected: Value '' at 'name' failed to satisfy constraint: "
     "Member must have length greater than or equal to 1"),
    ("secretsmanager.DeleteSecret", b'{"SecretId": "db", "RecoveryWindowInDays": "7"}',
     "ValidationException",
     "Value '7' at 'recoveryWindowInDays' failed to satisfy constraint: Member must be an integer"),
    ("secretsmanager.DeleteSecret", b'{"SecretId": "db", "ForceDeleteWithoutRecovery": 1}',
     "ValidationException", "at 'forceDeleteWithoutRecovery' failed to satisfy constraint: "
     "Member must be a boolean"),
    ("secretsmanager.ListSecrets", b'{"MaxResults": 101}', "ValidationException",
     "Value '101' at 'maxResults' failed to satisfy constraint: "
     "Member must have value less than or equal to 100"),
    ("secretsmanager.ListSecrets", b'{"SortOrder": "up", "Filters": [{"Key": "colour"}]}',
     "ValidationException",
     "2 validation errors detected: Value 'colour' at 'filters.1.member.key' failed to satisfy "
     "constraint: Member must satisfy enum value set: [description, name, tag-key, tag-value, "
     "primary-region, owning-service, all]; Value 'up' at 'sortOrder' failed to satisfy "
     "constraint: Member must satisfy enum value set: [asc, desc]"),
    ("secretsmanager.TagResource", b'{"SecretId": "db", "Tags": [null]}', "ValidationException",
     "Value null at 'tags.1.member' failed to satisfy constraint: Member must not be null"),
    ("secretsmanager.BatchGetSecretValue", b'{"SecretIdList": []}', "ValidationException",
     "Value '[]' at 'secretIdList' failed to satisfy constraint: "
     "Member must have length greater than or equal to 1"),
    ("secretsmanager.CreateSecret", b'{"Name": "db", "SecretBinary": "not base64!"}',
     "SerializationException", "secretBinary"),
])
async def test_bad_requests_get_aws_errors_and_never_reach_the_service(
        server, target, body, code, message):
    status, headers, answer = await apost(server.path, target, body)
    assert status == 400
    assert headers["x-amzn-errortype"] == code
    assert json.loads(answer) == {"__type": code, "Message": json.loads(answer)["Message"]}
    parsed = botocore_parse("ListSecrets", status, headers, answer)
    assert parsed["Error"]["Code"] == code
    assert message in parsed["Error"]["Message"]
    assert server.service.calls == []


@pytest.mark.parametrize("params", [
    {"SecretId": "db", "SecretSting": SECRET},  # a typo must not echo the secret back
    {"SecretId": "db", "SecretString": SECRET * 5000},  # over the 65536 characters
])
async def test_validation_messages_never_show_secret_values(server, params):
    status, headers, answer = await apost(server.path, "secretsmanager.PutSecretValue", params)
    assert (status, headers["x-amzn-errortype"]) == (400, "ValidationException")
    assert SECRET not in answer.decode()
    assert b"secretS" in answer


async def test_recovery_window_range_is_the_services_rule(server):
    # botocore's model gives RecoveryWindowInDays no range: the service owns the
    # 7..30 rule, and the API carries its error back unchanged.
    status, headers, answer = await apost(
        server.path, "secretsmanager.DeleteSecret", {"SecretId": "db", "RecoveryWindowInDays": 3})
    assert (status, headers["x-amzn-errortype"]) == (400, "InvalidParameterException")
    parsed = botocore_parse("DeleteSecret", status, headers, answer)
    assert parsed["Error"] == {"Code": "InvalidParameterException",
                               "Message": "The recovery window must be between 7 and 30 days."}


async def test_an_unexpected_exception_is_a_generic_500_and_a_logged_traceback(server, caplog):
    status, headers, answer = await apost(
        server.path, "secretsmanager.UpdateSecret", {"SecretId": "db", "SecretString": SECRET})
    assert (status, headers["x-amzn-errortype"]) == (500, "InternalServiceError")
    assert "bug" not in answer.decode()
    assert "RuntimeError: the service has a bug" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize(("request_line", "status", "code"), [
    (b"GET / HTTP/1.1", 405, "MethodNotAllowedException"),
    (b"POST /admin HTTP/1.1", 404, "NotFoundException"),
])
async def test_only_post_to_root_is_served(server, request_line, status, code):
    raw = await raw_exchange(server.path, request_line + b"\r\nHost: x\r\n\r\n")
    got_status, headers, body = split_response(raw)
    assert (got_status, headers["x-amzn-errortype"], json.loads(body)["__type"]) == (
        status, code, code)


# --- bounds ---------------------------------------------------------------------------

async def test_an_oversized_body_is_refused_from_its_content_length(server):
    raw = await raw_exchange(server.path, (
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: secretsmanager.ListSecrets\r\n"
        b"Content-Length: %d\r\n\r\n" % (FAST.max_body + 1)))
    status, headers, body = split_response(raw)
    assert (status, headers["x-amzn-errortype"]) == (413, "RequestEntityTooLargeException")
    assert json.loads(body)["__type"] == "RequestEntityTooLargeException"
    assert server.service.calls == []


async def test_an_oversized_chunked_body_is_refused(nursery, tmp_path):
    server = await start_server(nursery, tmp_path / "s.sock", Limits(timeout=5, max_body=1000))
    chunk = b"x" * 600
    raw = await raw_exchange(server.path, (
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: secretsmanager.ListSecrets\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + (b"258\r\n" + chunk + b"\r\n") * 2 + b"0\r\n\r\n"))
    assert split_response(raw)[0] == 413
    assert server.service.calls == []


async def test_the_client_gets_the_413_for_a_body_it_sends_whole(server):
    # The body outgrows the socket buffers: the server must read it away after
    # answering, or the client fails on a reset instead of reading the 413.
    with pytest.raises(model.SecretsManagerError) as info:
        await trio.to_thread.run_sync(
            server.client().call, "PutSecretValue",
            {"SecretId": "db", "SecretString": "x" * (2 * FAST.max_body)})
    assert (info.value.code, info.value.status) == ("RequestEntityTooLargeException", 413)


@pytest.mark.parametrize("complete", [True, False])
async def test_oversized_headers_are_refused(server, complete):
    # h11 bounds a head that is still arriving; a whole one is measured once parsed.
    head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * FAST.max_header
    raw = await raw_exchange(server.path, head + (b"\r\n\r\n" if complete else b""))
    status, headers, _ = split_response(raw)
    assert (status, headers["x-amzn-errortype"]) == (431, "RequestHeaderFieldsTooLargeException")


async def test_a_slow_partial_request_is_cut_off(nursery, tmp_path):
    server = await start_server(nursery, tmp_path / "s.sock", Limits(timeout=0.3))
    stream = await trio.open_unix_socket(os.fspath(server.path))

    async def trickle() -> None:
        # Bytes keep coming, never a whole request.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await stream.send_all(b"X-Slow: 1\r\n")
                await trio.sleep(0.05)

    started = trio.current_time()
    async with stream, trio.open_nursery() as trickling:
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
        trickling.start_soon(trickle)
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            assert await stream.receive_some(1024) == b""
        trickling.cancel_scope.cancel()
    assert 0.3 <= trio.current_time() - started < 2
    assert server.service.calls == []


async def test_connections_past_the_limit_are_closed(nursery, tmp_path):
    server = await start_server(nursery, tmp_path / "s.sock", Limits(timeout=5, max_connections=2))
    kept = [UnixHTTPConnection(server.path, timeout=5) for _ in range(2)]

    def request(conn: UnixHTTPConnection) -> int:
        conn.request("POST", "/", body=b"{}",
                     headers={"X-Amz-Target": "secretsmanager.ListSecrets"})
        response = conn.getresponse()
        response.read()
        return response.status

    try:
        for conn in kept:
            assert await trio.to_thread.run_sync(request, conn) == 200
        extra = await trio.open_unix_socket(os.fspath(server.path))
        async with extra:
            # A reset is as much a refusal as an orderly close.
            with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
                assert await extra.receive_some(1024) == b""
        kept.pop().close()
        # The closed connection frees its slot once the server sees it go.
        with trio.fail_after(5):
            while True:
                try:
                    await apost(server.path, "secretsmanager.ListSecrets", {})
                    break
                except OSError:
                    await trio.sleep(0.01)
    finally:
        for conn in kept:
            conn.close()


async def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = UnixHTTPConnection(server.path, timeout=5)

    def requests() -> list[int]:
        statuses = []
        for secret_id in ("a", "b", "missing", "c"):
            conn.request("POST", "/", body=json.dumps({"SecretId": secret_id}).encode(),
                         headers={"X-Amz-Target": "secretsmanager.DescribeSecret"})
            sock = conn.sock
            response = conn.getresponse()
            response.read()
            assert conn.sock is sock is not None  # not reconnected
            statuses.append(response.status)
        return statuses

    try:
        assert await trio.to_thread.run_sync(requests) == [200, 200, 400, 200]
    finally:
        conn.close()
    assert len(server.service.calls) == 4


# --- the socket file ------------------------------------------------------------------

async def test_the_socket_has_mode_0660_and_goes_away_with_the_server(tmp_path):
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, path)
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_a_stale_socket_is_replaced(nursery, tmp_path):
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()
    server = await start_server(nursery, path)
    assert (await apost(server.path, "secretsmanager.ListSecrets", {}))[0] == 200


async def test_a_live_socket_is_not_taken_over(server):
    with pytest.raises(OSError) as info:
        await serve_unix(RecordingService(), server.path)
    assert info.value.errno == errno.EADDRINUSE
    assert (await apost(server.path, "secretsmanager.ListSecrets", {}))[0] == 200


async def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "control.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await serve_unix(RecordingService(), path)
    assert path.read_text() == "not a socket"


# --- the client -----------------------------------------------------------------------

async def test_client_round_trip_with_blobs_and_epoch_numbers(server):
    client = server.client()
    created = await trio.to_thread.run_sync(
        client.call, "CreateSecret", {"Name": "db", "SecretBinary": BINARY})
    assert created["Name"] == "db"
    assert server.service.calls[0][1] == {"Name": "db", "SecretBinary": BINARY}
    value = await trio.to_thread.run_sync(client.call, "GetSecretValue", {"SecretId": "db"})
    assert value["SecretBinary"] == BINARY
    assert value["CreatedDate"] == pytest.approx(CREATED.timestamp())
    keys = await trio.to_thread.run_sync(
        functools.partial(client.call, "ListKeys", {}, extension=True))
    assert keys["Keys"][0]["KeyId"] == "local-1"


@pytest.mark.parametrize(("params", "error_class"), [
    ({"SecretId": "missing"}, model.ResourceNotFoundException),
    ({"SecretId": ""}, model.ValidationException),
    ({"SecretId": "db", "VersionStage": 7}, model.ValidationException),
])
async def test_client_raises_the_model_error_class(server, params, error_class):
    with pytest.raises(error_class) as info:
        await trio.to_thread.run_sync(server.client().call, "GetSecretValue", params)
    assert type(info.value) is error_class
    assert info.value.message


async def test_client_keeps_an_unknown_error_code(server):
    with pytest.raises(model.SecretsManagerError) as info:
        await trio.to_thread.run_sync(server.client().call, "DescribeSecret", {"SecretId": "fancy"})
    assert (info.value.code, info.value.status, info.value.message) == (
        "FancyNewException", 400, "Something new.")


async def test_client_reports_a_daemon_that_is_not_running(tmp_path):
    missing = tmp_path / "control.sock"
    with pytest.raises(DaemonNotRunning, match="secretfs mount") as info:
        Client(missing).call("ListSecrets", {})
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(missing))
    stale.close()
    with pytest.raises(DaemonNotRunning):
        Client(missing).call("ListSecrets", {})


async def test_client_reports_permission_denied_on_the_socket(nursery):
    # The socket sits in a directory anyone may enter: only its own mode refuses.
    directory = Path(tempfile.mkdtemp(prefix="secretfs-api-"))
    directory.chmod(0o755)
    try:
        server = await start_server(nursery, directory / "control.sock")
        if os.geteuid() != 0:
            server.path.chmod(0)
            with pytest.raises(SocketPermissionDenied, match=str(server.path)):
                await trio.to_thread.run_sync(server.client().call, "ListSecrets", {})
        else:
            # root passes every permission check: ask from a child running as nobody.
            assert await trio.to_thread.run_sync(_call_as_nobody, server.path) == 0
        assert server.service.calls == []
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


def _call_as_nobody(path: Path) -> int:
    pid = os.fork()
    if pid == 0:
        status = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            Client(path).call("ListSecrets", {})
            status = 1
        except SocketPermissionDenied as error:
            status = 0 if str(path) in str(error) else 3
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# --- boto3 ------------------------------------------------------------------------------

async def test_boto3_speaks_to_the_same_connection_handler():
    # botocore cannot reach a Unix socket: the same listener loop and connection
    # handler on plain TCP, for this test only.
    service = RecordingService()
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    caller = Caller(uid=os.getuid(), gid=os.getgid(), pid=0, source="test-tcp")

    def use_boto3() -> tuple[dict, dict, ClientError]:
        client = boto3.client(
            "secretsmanager", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="y")
        with contextlib.closing(client):
            created = client.create_secret(Name="db", SecretBinary=BINARY)
            value = client.get_secret_value(SecretId="db")
            with pytest.raises(ClientError) as info:
                client.describe_secret(SecretId="missing")
        return created, value, info.value

    async with listener, trio.open_nursery() as nursery:
        await nursery.start(functools.partial(
            serve_listener, service, listener, lambda stream: lambda request: caller,
            limits=FAST))
        created, value, error = await trio.to_thread.run_sync(use_boto3)
        nursery.cancel_scope.cancel()
    assert created["ARN"] == ARN
    assert (value["SecretBinary"], value["CreatedDate"]) == (BINARY, CREATED)
    assert error.response["Error"]["Code"] == "ResourceNotFoundException"
    assert error.response["Error"]["Message"] == "Secrets Manager can't find the specified secret."
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    (_, create_params, seen), *_ = service.calls
    assert create_params["SecretBinary"] == BINARY
    assert len(create_params["ClientRequestToken"]) == 36  # botocore's idempotency token
    assert seen is caller

