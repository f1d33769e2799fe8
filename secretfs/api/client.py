"""A small synchronous client of the daemon's control socket, for the CLI.

Owns the client side of the wire: one HTTP request per call over AF_UNIX,
blobs to and from base64, and an error answer turned back into the model's
error class. Timestamps stay epoch numbers, which the CLI prints as the AWS CLI
does.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any

from secretfs import identity, model
from secretfs.api import protocol

# SecretBinary is the model's only blob member, in requests and in results
# (GetSecretValue, BatchGetSecretValue's SecretValues).
_BLOB_MEMBERS = frozenset({"SecretBinary"})


class ClientConnectionError(Exception):
    """The daemon could not be reached or did not answer; str() is one line for the CLI."""


class DaemonNotRunning(ClientConnectionError):
    """Nothing serves the control socket."""


class SocketPermissionDenied(ClientConnectionError):
    """The control socket exists but this user may not connect to it."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix stream socket; the host name only fills the Host header."""

    def __init__(self, socket_path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(os.fspath(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: Path, timeout: float = 60.0):
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def call(self, action: str, params: dict, *, extension: bool = False) -> dict:
        """Run one action; raises the model's error for an error answer."""
        prefix = protocol.EXTENSION_PREFIX if extension else protocol.AWS_PREFIX
        body = json.dumps(_encode_blobs(params)).encode()
        headers = {"Content-Type": protocol.CONTENT_TYPE, "X-Amz-Target": prefix + action}
        # A rotator run by the daemon calls as its rotation's principal.
        rotation_token = os.environ.get(identity.ROTATION_TOKEN_ENV)
        if rotation_token:
            headers[identity.ROTATION_TOKEN_HEADER] = rotation_token
        status, answer = self.post(body, headers)
        if status != 200:
            raise _error_from(status, answer)
        try:
            result = json.loads(answer) if answer else {}
        except ValueError:
            raise ClientConnectionError(
                f"the daemon at {self.socket_path} sent an answer that is not JSON") from None
        return _decode_blobs(result)

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """One request as given; the answer's status and body."""
        # One connection per call: the CLI makes few calls, and a fresh
        # connection never meets a keep-alive the daemon has already timed out.
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.connect()
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            raise DaemonNotRunning(
                f"the secretfs daemon is not running (no one serves {self.socket_path}); "
                "start it with 'secretfs mount'") from None
        except PermissionError:
            conn.close()
            raise SocketPermissionDenied(
                f"permission denied on {self.socket_path}: ask for membership in its group "
                "or run as root") from None
        except OSError as error:
            conn.close()
            raise ClientConnectionError(
                f"cannot connect to {self.socket_path}: {error.strerror or error}") from None
        try:
            conn.request("POST", "/", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except TimeoutError:
            raise ClientConnectionError(
                f"the daemon at {self.socket_path} did not answer within {self.timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException):
            raise ClientConnectionError(
                f"the daemon at {self.socket_path} closed the connection without answering"
            ) from None
        finally:
            conn.close()


def _error_from(status: int, answer: bytes) -> model.SecretsManagerError:
    try:
        body = json.loads(answer)
        code, message = body["__type"], body.get("Message", body.get("message", ""))
    except (ValueError, KeyError, TypeError):
        code, message = "InternalServiceError", f"the daemon answered HTTP {status}"
    # A code may come namespaced ("aws.protocols#Name" or "Name:uri"), as botocore allows.
    code = str(code).split(":", 1)[0].rsplit("#", 1)[-1]
    cls = model.ERRORS_BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    error = model.SecretsManagerError(message)
    error.code, error.status = code, status
    return error


def _encode_blobs(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {key: _encode_blobs(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encode_blobs(item) for item in value]
    return value


def _decode_blobs(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: base64.b64decode(item) if key in _BLOB_MEMBERS and isinstance(item, str)
                else _decode_blobs(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_blobs(item) for item in value]
    return value
