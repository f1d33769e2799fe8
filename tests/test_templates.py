"""Tier 2: config templates rendered at `<mount>/~templates/...`, read by real users.

A template is a secret tagged `secretfs:template=jinja2`; each open renders it for the
caller from the secrets it reads, which the caller must be allowed to read, all of them.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import Daemon, run_as, serving_daemon, wait_for
from test_presentation import throwaway_users

from secretfs.api.client import Client
from secretfs.state import StateDir

pytestmark = pytest.mark.mount

TEMPLATE_TAG = [{"Key": "secretfs:template", "Value": "jinja2"}]
APP_CONF = """[db]
user = {{ secret('prod/db').username }}
password = {{ secret('prod/db')['password'] }}
previous = {{ secret('prod/db', stage='AWSPREVIOUS').password }}
[api]
key = {{ secret('prod/api') }}
"""


@dataclass
class Scene:
    daemon: Daemon
    app: pwd.struct_passwd    # may read the template and both secrets it reads
    half: pwd.struct_passwd   # may read the template and prod/db, not prod/api
    client: Client

    def template(self, name: str, text: str) -> None:
        self.client.call("CreateSecret", {"Name": name, "SecretString": text,
                                          "Tags": TEMPLATE_TAG})

    def rendered(self, name: str):
        return self.daemon.path("~templates", *name.split("/"))


def allow(daemon: Daemon, user: pwd.struct_passwd, *resources: str) -> None:
    daemon.call("put-identity-policy", "--principal", f"user:{user.pw_name}", "--policy-name",
                "Read", "--policy-document", json.dumps({"Statement": [
                    {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                     "Resource": list(resources)}]}))


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    with throwaway_users(2) as (app, half), \
            serving_daemon(prefix="secretfs-templates-") as running:
        client = Client(StateDir(running.state_dir).socket)
        client.call("CreateSecret", {"Name": "prod/db", "SecretString": json.dumps(
            {"username": "app", "password": "old-pw"})})
        client.call("PutSecretValue", {"SecretId": "prod/db", "SecretString": json.dumps(
            {"username": "app", "password": "pw-1"})})
        client.call("CreateSecret", {"Name": "prod/api", "SecretString": "api-key-1"})
        allow(running, app, "tmpl/*", "prod/db", "prod/api")
        allow(running, half, "tmpl/*", "prod/db")
        shared = Scene(running, app, half, client)
        shared.template("tmpl/app.conf", APP_CONF)
        yield shared


def as_user(user: pwd.struct_passwd, *command) -> subprocess.CompletedProcess:
    return run_as(user, "env", "LC_ALL=C", *(str(part) for part in command))


def cat(path) -> subprocess.CompletedProcess:
    return subprocess.run(["cat", str(path)], capture_output=True,
                          env=dict(os.environ, LC_ALL="C"))


def expected(password: str, previous: str, key: str) -> bytes:
    return (f"[db]\nuser = app\npassword = {password}\nprevious = {previous}\n"
            f"[api]\nkey = {key}\n").encode()


def failures(daemon: Daemon, template: str) -> list[dict]:
    """The template's RenderTemplate audit records, polled until one is on disk."""
    records: list[dict] = []

    def found() -> bool:
        records[:] = [record for record in daemon.audit_records("--secret", template)
                      if record["eventName"] == "RenderTemplate"]
        return bool(records)

    wait_for(found, 3.0, interval=0.1)
    return records


def test_a_template_renders_two_secrets_for_a_user_allowed_both(scene):
    path = scene.rendered("tmpl/app.conf")
    result = as_user(scene.app, "cat", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected("pw-1", "old-pw", "api-key-1")
    assert as_user(scene.app, "test", "-r", path).returncode == 0
    assert "app.conf" in os.listdir(scene.daemon.path("~templates", "tmpl"))
    assert "~templates" in os.listdir(scene.daemon.mountpoint)


def test_a_promotion_shows_in_the_next_open(scene):
    path = scene.rendered("tmpl/app.conf")
    before = cat(path).stdout
    scene.client.call("PutSecretValue", {"SecretId": "prod/api", "SecretString": "api-key-2"})
    after = cat(path).stdout
    assert before.endswith(b"key = api-key-1\n") and after.endswith(b"key = api-key-2\n")
    scene.client.call("PutSecretValue", {"SecretId": "prod/db", "SecretString": json.dumps(
        {"username": "app", "password": "pw-2"})})
    assert cat(path).stdout == expected("pw-2", "pw-1", "api-key-2")


def test_a_user_allowed_only_one_of_the_secrets_gets_eacces(scene):
    path = scene.rendered("tmpl/app.conf")
    result = as_user(scene.half, "cat", path)
    assert result.returncode != 0 and b"Permission denied" in result.stderr
    assert result.stdout == b""
    assert as_user(scene.half, "test", "-r", path).returncode == 1


def test_presentation_tags_apply_to_the_rendered_file(scene):
    path = scene.rendered("tmpl/app.conf")
    scene.daemon.cli("set-presentation", "--secret-id", "tmpl/app.conf", "--owner",
                     scene.app.pw_name, "--mode", "0400")
    stat = os.stat(path)
    assert (stat.st_uid, stat.st_mode & 0o7777) == (scene.app.pw_uid, 0o400)
    scene.daemon.cli("set-presentation", "--secret-id", "tmpl/app.conf", "--clear")


@pytest.mark.parametrize("text, problem", [
    ("password = {{ secret('prod/db').password ", "syntax error at line 3"),
    ("{% for x in %}", "syntax error"),
    ("{{ secret('prod/nope').password }}", "secret 'prod/nope' does not exist"),
    ("{{ secret('prod/db').pasword }}", "secret 'prod/db' has no key 'pasword'"),
    ("{{ secret('prod/db', stage='NOPE') }}", "secret 'prod/db' has no label NOPE"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox violation"),
    ("{{ secret('prod/db').password.__class__.__init__.__globals__ }}", "sandbox violation"),
    ("{{ secret.__globals__['os'] }}", "sandbox violation"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", ""),
    ("{{ 'x' * 100000000 }}", "sandbox violation"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
     "longer than"),
])
def test_a_broken_template_is_eio_with_an_audit_record_naming_the_problem(
        scene, text, problem):
    name = f"tmpl/bad-{uuid.uuid4().hex[:8]}"
    scene.template(name, "before\n" + text + "\nafter\n")
    result = cat(scene.rendered(name))
    assert result.returncode != 0 and b"Input/output error" in result.stderr, result.stderr
    assert result.stdout == b""  # never half a file
    records = failures(scene.daemon, name)
    assert records, "no RenderTemplate record"
    record = records[-1]
    assert record["errorCode"] == "TemplateError"
    assert problem in record["errorMessage"], record
    assert record["resources"]["name"] == name
    # No value reaches the audit log.
    assert not {"pw-1", "pw-2", "old-pw", "api-key-1", "api-key-2"} & set(
        json.dumps(record).split('"'))
    assert "pw-" not in json.dumps(record)
