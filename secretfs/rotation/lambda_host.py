"""Runs a rotation function written for AWS Lambda, in its own process, for one step.

    python -m secretfs.rotation.lambda_host package.module:function < event.json

The daemon starts this once per step with the event on stdin, the secret's
rotation settings in the environment (AWS's templates read EXCLUDE_CHARACTERS
and the like from theirs), AWS_REGION, and the step's RotationToken. The handler
is called as Lambda calls it, `handler(event, context)`.

When the daemon serves the network endpoint, the environment points boto3 at it
(AWS_ENDPOINT_URL_SECRETS_MANAGER, SECRETS_MANAGER_ENDPOINT, AWS_CA_BUNDLE) with an
access key pair valid while the step runs. Otherwise a Secrets Manager client the
handler makes with boto3's default session still reaches this daemon: each request
is handed, as botocore prepared it, to the control socket, under the rotation's
principal (the token), before botocore would send it anywhere. The endpoint in the
environment then names a host that can't resolve, so a request that escaped that
route would fail rather than reach another service.

The handler's own output goes nowhere. On failure the exit status is 1 and the
only thing this writes (to its original stdout) is the exception's class name: a
message may quote a value, and nothing a rotator says may reach a log.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

from secretfs.api.client import Client
from secretfs.identity import ROTATION_TOKEN_ENV, ROTATION_TOKEN_HEADER
from secretfs.rotation.rotators import TIMEOUT_ENV
from secretfs.state import StateDir, resolve_state_dir

# What AWS_ENDPOINT_URL_SECRETS_MANAGER and SECRETS_MANAGER_ENDPOINT say while the
# requests travel over the control socket: a name under .invalid never resolves.
UNREACHABLE_ENDPOINT = "https://secretsmanager.secretfs.invalid"


class LambdaContext:
    """The parts of Lambda's context object rotation functions use."""

    def __init__(self, function: str, timeout: float):
        self.function_name = function
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"python:{function}"
        self.memory_limit_in_mb = 0
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = self.log_stream_name = "secretfs"
        self._deadline = time.monotonic() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class _Body:
    """A response body as botocore's AWSResponse reads one."""

    def __init__(self, data: bytes):
        self._data = data

    def stream(self, **_):
        yield self._data


def route_boto3_to_daemon(socket_path: Path, token: str | None) -> None:
    """Answer the default boto3 session's Secrets Manager requests from the daemon."""
    try:
        import boto3
        from botocore.awsrequest import AWSResponse
    except ImportError:
        return  # a handler that doesn't use boto3 needs no route
    client = Client(socket_path)

    def send(request, **_) -> AWSResponse:
        headers = {name: request.headers[name] for name in ("Content-Type", "X-Amz-Target")
                   if name in request.headers}
        if token:
            headers[ROTATION_TOKEN_HEADER] = token
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = body.read()
        status, answer = client.post(body, headers)
        return AWSResponse(request.url, status,
                           {"Content-Type": "application/x-amz-json-1.1",
                            "x-amzn-RequestId": str(uuid.uuid4())}, _Body(answer))

    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-send.secrets-manager", send)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or ":" not in argv[0]:
        print("usage: python -m secretfs.rotation.lambda_host package.module:function",
              file=sys.stderr)
        return 2
    module_name, function_name = argv[0].rsplit(":", 1)
    report = os.fdopen(os.dup(1), "w")
    _silence()
    try:
        event = json.load(sys.stdin)
        if "AWS_ENDPOINT_URL_SECRETS_MANAGER" not in os.environ:
            # No network endpoint: over the control socket.
            for name in ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "SECRETS_MANAGER_ENDPOINT"):
                os.environ[name] = UNREACHABLE_ENDPOINT
            # botocore signs before it sends; the route answers before anything is sent,
            # and the daemon knows the caller by the token, so any key will do.
            os.environ["AWS_ACCESS_KEY_ID"] = "SECRETFSROTATION"
            os.environ["AWS_SECRET_ACCESS_KEY"] = "unused"
            route_boto3_to_daemon(StateDir(resolve_state_dir()).socket,
                                  os.environ.get(ROTATION_TOKEN_ENV))
        handler = getattr(importlib.import_module(module_name), function_name)
        handler(event, LambdaContext(argv[0], float(os.environ.get(TIMEOUT_ENV, "300"))))
    except Exception as error:  # the class only: a message may quote a value
        report.write(type(error).__name__ + "\n")
        return 1
    finally:
        report.close()
    return 0


def _silence() -> None:
    """Point stdout and stderr (the handler's prints, a traceback) at /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
