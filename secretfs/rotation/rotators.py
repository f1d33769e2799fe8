"""The rotators a secret may name in RotationLambdaARN, and how their names read.

Built-ins are `secretfs:<name>`; `exec:/path/to/program` runs any executable once
per step; `python:package.module:function` runs an AWS Lambda-style handler.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Callable
from typing import Protocol

from secretfs.model import (
    InvalidParameterException,
    InvalidRequestException,
    ResourceNotFoundException,
)

BUILT_IN = frozenset({
    "random-password", "postgresql-single-user", "postgresql-alternating-users",
    "mysql-single-user", "mysql-alternating-users",
})
_PYTHON = re.compile(r"python:[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def check_rotator(name: str) -> str:
    """The rotator's name if it is one secretfs can run; InvalidParameterException if not."""
    if name.startswith("secretfs:") and name.removeprefix("secretfs:") in BUILT_IN:
        return name
    if name.startswith("exec:/") and len(name) > len("exec:/"):
        return name
    if _PYTHON.fullmatch(name):
        return name
    raise InvalidParameterException(
        f"RotationLambdaARN {name!r} names no rotator: use secretfs:<"
        f"{'|'.join(sorted(BUILT_IN))}>, exec:/absolute/path or python:module:function.")


Client = Callable[[str, dict], dict]


class Rotator(Protocol):
    def run(self, event: dict, client: Client) -> None:
        """Carry out one step of AWS's protocol; `client(action, params)` calls the service."""


class RandomPassword:
    """For secrets whose only consumer reads the file: a new random password.

    A JSON object keeps its other keys and gets a new "password"; any other value
    is replaced whole. The password follows GetRandomPassword's defaults.
    """

    def run(self, event: dict, client: Client) -> None:
        step, secret_id, token = event["Step"], event["SecretId"], event["ClientRequestToken"]
        if step == "createSecret":
            self._create(secret_id, token, client)
        elif step == "testSecret":
            client("GetSecretValue", {"SecretId": secret_id, "VersionId": token,
                                      "VersionStage": "AWSPENDING"})
        elif step == "finishSecret":
            finish(secret_id, token, client)

    @staticmethod
    def _create(secret_id: str, token: str, client: Client) -> None:
        try:
            client("GetSecretValue", {"SecretId": secret_id, "VersionId": token,
                                      "VersionStage": "AWSPENDING"})
            return  # filled already: a resumed rotation
        except ResourceNotFoundException:
            pass
        current = client("GetSecretValue", {"SecretId": secret_id})
        password = client("GetRandomPassword", {})["RandomPassword"]
        value = password
        try:
            document = json.loads(current.get("SecretString", ""))
        except ValueError:
            document = None
        if isinstance(document, dict):
            document["password"] = password
            value = json.dumps(document)
        client("PutSecretValue", {"SecretId": secret_id, "ClientRequestToken": token,
                                  "SecretString": value, "VersionStages": ["AWSPENDING"]})


def finish(secret_id: str, token: str, client: Client) -> None:
    """finishSecret as AWS's templates write it: move AWSCURRENT unless it is there."""
    described = client("DescribeSecret", {"SecretId": secret_id})
    current = next((version for version, stages in described["VersionIdsToStages"].items()
                    if "AWSCURRENT" in stages), None)
    if current == token:
        return
    client("UpdateSecretVersionStage", {"SecretId": secret_id, "VersionStage": "AWSCURRENT",
                                        "MoveToVersionId": token,
                                        "RemoveFromVersionId": current})


class Exec:
    """Any executable, once per step: the event as JSON on stdin, the daemon's state
    directory in SECRETFS_STATE_DIR so it can read and write the pending version with
    the `secretfs` command (or any Secrets Manager client on the control socket).
    A non-zero exit or a timeout fails the step. Its output is not kept: a program
    may print what it handles, and nothing a rotator prints may land in the store or
    a log, so the recorded error is the exit status.
    """

    def __init__(self, program: str, *, state_dir: str | None, timeout: float = 300.0):
        self.program = program
        self.state_dir = state_dir
        self.timeout = timeout

    def run(self, event: dict, client: Client) -> None:
        environment = dict(os.environ)
        if self.state_dir:
            environment["SECRETFS_STATE_DIR"] = self.state_dir
        payload = dict(event, RotationToken=str(uuid.uuid4()))
        try:
            result = subprocess.run(
                [self.program], input=json.dumps(payload).encode(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=self.timeout, env=environment, cwd="/", start_new_session=True)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self.program} did not finish {event['Step']} within "
                               f"{self.timeout:g} s") from None
        except OSError as error:
            raise RuntimeError(f"can't run {self.program}: {error.strerror}") from None
        if result.returncode != 0:
            raise RuntimeError(f"{self.program} exited with status {result.returncode} at "
                               f"{event['Step']}")


def rotator_for(name: str, *, state_dir: str | None = None) -> Rotator:
    if name == "secretfs:random-password":
        return RandomPassword()
    if name.startswith("exec:"):
        return Exec(name.removeprefix("exec:"), state_dir=state_dir)
    raise InvalidRequestException(f"The rotator {name} can't run on this host yet.")
