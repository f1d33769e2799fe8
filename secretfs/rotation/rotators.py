"""The rotators a secret may name in RotationLambdaARN, and how their names read.

Built-ins are `secretfs:<name>`; `exec:/path/to/program` runs any executable once
per step; `python:package.module:function` runs an AWS Lambda-style handler.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Protocol

from secretfs.identity import ROTATION_TOKEN_ENV, rotation_access_key
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


# A secret's tags named `secretfs:rotation:<NAME>` are its rotator's settings: the
# environment of exec and python rotators (AWS's templates read EXCLUDE_CHARACTERS and
# PASSWORD_LENGTH from theirs), and the password rules of the built-ins. Tags travel
# with the secret and are set with TagResource from any Secrets Manager client.
SETTING_TAG = "secretfs:rotation:"
# GetRandomPassword's parameters, by the environment names AWS's templates use.
_PASSWORD_SETTINGS = {
    "PASSWORD_LENGTH": ("PasswordLength", int),
    "EXCLUDE_CHARACTERS": ("ExcludeCharacters", str),
    "EXCLUDE_NUMBERS": ("ExcludeNumbers", bool),
    "EXCLUDE_PUNCTUATION": ("ExcludePunctuation", bool),
    "EXCLUDE_UPPERCASE": ("ExcludeUppercase", bool),
    "EXCLUDE_LOWERCASE": ("ExcludeLowercase", bool),
    "INCLUDE_SPACE": ("IncludeSpace", bool),
    "REQUIRE_EACH_INCLUDED_TYPE": ("RequireEachIncludedType", bool),
}


def settings_of(described: dict) -> dict[str, str]:
    """A secret's rotation settings from its DescribeSecret response."""
    return {tag["Key"].removeprefix(SETTING_TAG): tag["Value"]
            for tag in described.get("Tags", []) if tag["Key"].startswith(SETTING_TAG)}


def password_rules(settings: dict[str, str], *, defaults: dict | None = None) -> dict:
    """GetRandomPassword's parameters from a secret's settings, over `defaults`."""
    rules = dict(defaults or {})
    for name, (parameter, kind) in _PASSWORD_SETTINGS.items():
        if name not in settings:
            continue
        text = settings[name]
        if kind is bool:
            rules[parameter] = text.strip().lower() in ("1", "true", "yes")
        elif kind is int:
            try:
                rules[parameter] = int(text)
            except ValueError:
                raise InvalidParameterException(
                    f"Rotation setting {name} must be a whole number, not {text!r}.") from None
        else:
            rules[parameter] = text
    return rules


def new_password(secret_id: str, client: Client, *, defaults: dict | None = None) -> str:
    """A password by the secret's rules, drawn by the service's GetRandomPassword."""
    settings = settings_of(client("DescribeSecret", {"SecretId": secret_id}))
    return client("GetRandomPassword",
                  password_rules(settings, defaults=defaults))["RandomPassword"]


def pending_value(secret_id: str, token: str, client: Client) -> dict | None:
    """The pending version's GetSecretValue response, or None while it is empty."""
    try:
        return client("GetSecretValue", {"SecretId": secret_id, "VersionId": token,
                                         "VersionStage": "AWSPENDING"})
    except ResourceNotFoundException:
        return None


class RandomPassword:
    """For secrets whose only consumer reads the file: a new random password.

    A JSON object keeps its other keys and gets a new "password"; any other value
    is replaced whole. The password follows GetRandomPassword's rules, adjusted by
    the secret's `secretfs:rotation:*` tags (PASSWORD_LENGTH, EXCLUDE_CHARACTERS, ...).
    """

    def run(self, event: dict, client: Client) -> None:
        step, secret_id, token = event["Step"], event["SecretId"], event["ClientRequestToken"]
        if step == "createSecret":
            self._create(secret_id, token, client)
        elif step == "testSecret":
            if pending_value(secret_id, token, client) is None:
                raise ResourceNotFoundException("The pending version holds no value.")
        elif step == "finishSecret":
            finish(secret_id, token, client)

    @staticmethod
    def _create(secret_id: str, token: str, client: Client) -> None:
        if pending_value(secret_id, token, client) is not None:
            return  # filled already: a resumed rotation
        current = client("GetSecretValue", {"SecretId": secret_id})
        password = new_password(secret_id, client)
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


# The python rotator's time limit, for its handler's context.
TIMEOUT_ENV = "SECRETFS_ROTATION_TIMEOUT"
_ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_AWS_CLIENT_SETTINGS = frozenset({
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SECRETS_MANAGER", "SECRETS_MANAGER_ENDPOINT",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE", ROTATION_TOKEN_ENV,
})


class Exec:
    """Any executable, once per step: the event as JSON on stdin, the daemon's state
    directory in SECRETFS_STATE_DIR so it can read and write the pending version with
    the `secretfs` command (or any Secrets Manager client on the control socket), and
    the step's RotationToken in SECRETFS_ROTATION_TOKEN, with which the `secretfs`
    command calls as the rotator's principal (`rotator:exec:/path`), so policies
    govern what it may touch. The secret's `secretfs:rotation:<NAME>` tags are in its
    environment as NAME, and AWS_REGION names the daemon's region.

    A non-zero exit or a timeout fails the step. Its output is not kept: a program
    may print what it handles, and nothing a rotator prints may land in the store or
    a log, so the recorded error is the exit status.
    """

    def __init__(self, program: str, *, state_dir: str | None, region: str | None = None,
                 endpoint: str | None = None, ca_bundle: str | None = None,
                 timeout: float = 300.0):
        self.program = program
        self.state_dir = state_dir
        self.region = region
        self.endpoint = endpoint
        self.ca_bundle = ca_bundle
        self.timeout = timeout

    def command(self) -> list[str]:
        return [self.program]

    def run(self, event: dict, client: Client) -> None:
        described = client("DescribeSecret", {"SecretId": event["SecretId"]})
        environment = self.environment(event, settings_of(described))
        try:
            result = subprocess.run(
                self.command(), input=json.dumps(event).encode(),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                timeout=self.timeout, env=environment, cwd="/", start_new_session=True)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self.program} did not finish {event['Step']} within "
                               f"{self.timeout:g} s") from None
        except OSError as error:
            raise RuntimeError(f"can't run {self.program}: {error.strerror}") from None
        if result.returncode != 0:
            raise RuntimeError(self.failure(event["Step"], result))

    def environment(self, event: dict, settings: dict[str, str]) -> dict[str, str]:
        # What the daemon was started with says nothing about where a rotator's AWS
        # SDK should go or as whom: that is this daemon, as this rotation's principal.
        environment = {name: value for name, value in os.environ.items()
                       if name not in _AWS_CLIENT_SETTINGS}
        environment.update((name, value) for name, value in settings.items()
                           if _ENVIRONMENT_NAME.fullmatch(name))
        token = event["RotationToken"]
        environment[ROTATION_TOKEN_ENV] = token
        if self.state_dir:
            environment["SECRETFS_STATE_DIR"] = self.state_dir
        if self.region:
            environment["AWS_REGION"] = environment["AWS_DEFAULT_REGION"] = self.region
        if self.endpoint:
            # The network endpoint, with a key pair valid while this step runs.
            environment["AWS_ENDPOINT_URL_SECRETS_MANAGER"] = self.endpoint
            environment["SECRETS_MANAGER_ENDPOINT"] = self.endpoint
            key_id, secret = rotation_access_key(token)
            environment["AWS_ACCESS_KEY_ID"], environment["AWS_SECRET_ACCESS_KEY"] = key_id, secret
            if self.ca_bundle:
                environment["AWS_CA_BUNDLE"] = self.ca_bundle
        return environment

    def failure(self, step: str, result: subprocess.CompletedProcess) -> str:
        return f"{self.program} exited with status {result.returncode} at {step}"


class Python(Exec):
    """A rotation function written for AWS Lambda, `handler(event, context)`, run in its
    own process by secretfs.rotation.lambda_host with Exec's environment; boto3's
    Secrets Manager client inside it reaches this daemon as the rotator's principal.
    The recorded error of a failing handler is its exception's class name."""

    _EXCEPTION_NAME = re.compile(rb"[A-Za-z_][\w.]{0,99}")

    def __init__(self, target: str, **options):
        super().__init__(f"python:{target}", **options)
        self.target = target

    def command(self) -> list[str]:
        return [sys.executable, "-m", "secretfs.rotation.lambda_host", self.target]

    def environment(self, event: dict, settings: dict[str, str]) -> dict[str, str]:
        environment = super().environment(event, settings)
        environment[TIMEOUT_ENV] = f"{self.timeout:g}"
        return environment

    def failure(self, step: str, result: subprocess.CompletedProcess) -> str:
        name = result.stdout.strip()
        if result.returncode == 1 and self._EXCEPTION_NAME.fullmatch(name):
            return f"{self.target} raised {name.decode()} at {step}"
        return super().failure(step, result)


def rotator_for(name: str, *, state_dir: str | None = None, region: str | None = None,
                endpoint: str | None = None, ca_bundle: str | None = None) -> Rotator:
    """The rotator a RotationLambdaARN names. Programs learn the daemon's state
    directory, region and (when it serves one) network endpoint and its CA bundle."""
    if name == "secretfs:random-password":
        return RandomPassword()
    where = {"state_dir": state_dir, "region": region, "endpoint": endpoint,
             "ca_bundle": ca_bundle}
    if name.startswith("exec:"):
        return Exec(name.removeprefix("exec:"), **where)
    if name.startswith("python:"):
        return Python(name.removeprefix("python:"), **where)
    if name.startswith(("secretfs:postgresql-", "secretfs:mysql-")):
        from secretfs.rotation import databases  # the database drivers load only when used
        return databases.rotator_for(name)
    raise InvalidRequestException(f"The rotator {name} can't run on this host yet.")
