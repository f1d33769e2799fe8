"""Tier 2: a secret's files show the owner, group and mode its tags ask for.

Through the real mount, read with `stat`, `ls -l`, `cat`, `test -r` and `ssh-keygen` by
throw-away users; tags set with the real `secretfs` command. The tags present; the
policies still decide every open.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Daemon, run_as, serving_daemon

from secretfs.api.client import Client
from secretfs.state import StateDir

pytestmark = pytest.mark.mount


@dataclass
class Scene:
    daemon: Daemon
    app: pwd.struct_passwd     # the application user: tags name it, a policy lets it read
    other: pwd.struct_passwd   # named by tags on some secrets, allowed by no policy
    client: Client

    def create(self, name: str, value: str, **extra) -> str:
        return self.client.call("CreateSecret", {"Name": name, "SecretString": value,
                                                 **extra})["VersionId"]

    def allow_app(self, resource: str) -> None:
        self.daemon.call("put-identity-policy", "--principal", f"user:{self.app.pw_name}",
                         "--policy-name", f"p{uuid.uuid4().hex[:8]}", "--policy-document",
                         json.dumps({"Statement": [{"Effect": "Allow", "Resource": resource,
                                                    "Action": "secretsmanager:GetSecretValue"}]}))

    def tags(self, name: str) -> list[dict]:
        return self.client.call("DescribeSecret", {"SecretId": name}).get("Tags", [])


@contextlib.contextmanager
def throwaway_users(count: int) -> Iterator[list[pwd.struct_passwd]]:
    """Users for a module's tests (make_user's are per test); removed afterwards."""
    created = []
    try:
        for _ in range(count):
            name = f"sfs{uuid.uuid4().hex[:8]}"
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            name], check=True, capture_output=True)
            created.append(name)
        yield [pwd.getpwnam(name) for name in created]
    finally:
        for name in created:
            subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    with throwaway_users(2) as (app, other), \
            serving_daemon(prefix="secretfs-presentation-") as running:
        yield Scene(running, app, other, Client(StateDir(running.state_dir).socket))


def shown(path: Path, *flags: str) -> str:
    """`stat`'s owner, group and permissions: "app app -r--r-----"."""
    result = subprocess.run(["stat", *flags, "-c", "%U %G %A", str(path)], capture_output=True,
                            env=dict(os.environ, LC_ALL="C"))
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def as_user(user: pwd.struct_passwd, *command: str | Path) -> subprocess.CompletedProcess:
    return run_as(user, "env", "LC_ALL=C", *(str(part) for part in command))


def present(scene: Scene, name: str, *flags: str) -> subprocess.CompletedProcess:
    return scene.daemon.cli("set-presentation", "--secret-id", name, *flags, check=False)


def test_stat_and_ls_show_the_tagged_owner_group_and_mode_at_once(scene):
    name = "present/db"
    version = scene.create(name, '{"user": "app", "password": "p1"}')
    app = scene.app.pw_name
    secret_dir = scene.daemon.path(*name.split("/"))
    whole = [secret_dir / "versions" / version, secret_dir / "AWSCURRENT"]
    keys = secret_dir / "keys" / "AWSCURRENT"
    for path in whole:
        assert shown(path, "-L") == "root root -r--------"

    assert present(scene, name, "--owner", app, "--group", app, "--mode", "0440").returncode == 0
    # No remount, no wait: the kernel's attributes were invalidated with the change.
    for path in [*whole, keys / "user", keys / "password"]:
        assert shown(path, "-L") == f"{app} {app} -r--r-----"
    listing = subprocess.run(["ls", "-lL", str(keys)], capture_output=True, text=True,
                             env=dict(os.environ, LC_ALL="C")).stdout.splitlines()
    assert [line.split()[0] + " " + line.split()[2] + " " + line.split()[-1]
            for line in listing[1:]] == [f"-r--r----- {app} password", f"-r--r----- {app} user"]

    # One JSON key's file on its own terms; the others keep the secret's.
    assert present(scene, name, "--key", "password", "--owner", str(scene.other.pw_uid),
                   "--mode", "400").returncode == 0
    assert shown(keys / "password", "-L") == f"{scene.other.pw_name} {app} -r--------"
    assert shown(keys / "user", "-L") == f"{app} {app} -r--r-----"
    # Directories and the label symlinks themselves stay root's.
    assert shown(secret_dir) == "root root dr-xr-xr-x"
    assert shown(secret_dir / "AWSCURRENT").startswith("root root l")

    assert present(scene, name, "--clear").returncode == 0
    assert present(scene, name, "--key", "password", "--clear").returncode == 0
    for path in [*whole, keys / "user", keys / "password"]:
        assert shown(path, "-L") == "root root -r--------"


def test_an_ssh_key_owned_by_the_app_and_0400_works_for_ssh_keygen(scene, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = "present/deploy-key"
    scene.create(name, key.read_text())
    scene.allow_app(name)
    path = scene.daemon.path("present", "deploy-key", "AWSCURRENT")
    public = (tmp_path / "id_ed25519.pub").read_text().split()[:2]

    # Owned by the app but readable by others (a policy shares it: 0444): ssh refuses.
    assert present(scene, name, "--owner", scene.app.pw_name).returncode == 0
    refused = as_user(scene.app, "ssh-keygen", "-y", "-f", path)
    assert refused.returncode != 0 and b"UNPROTECTED PRIVATE KEY FILE" in refused.stderr

    assert present(scene, name, "--mode", "0400").returncode == 0
    assert shown(path, "-L") == f"{scene.app.pw_name} root -r--------"
    derived = as_user(scene.app, "ssh-keygen", "-y", "-f", path)
    assert derived.returncode == 0, derived.stderr
    assert derived.stdout.decode().split()[:2] == public


def test_the_owner_the_tags_name_still_needs_a_policy(scene):
    name = "present/not-yours"
    scene.create(name, "s3cret")
    assert present(scene, name, "--owner", scene.other.pw_name, "--mode", "0400").returncode == 0
    path = scene.daemon.path("present", "not-yours", "AWSCURRENT")
    assert shown(path, "-L") == f"{scene.other.pw_name} root -r--------"
    result = as_user(scene.other, "cat", path)
    assert result.returncode != 0 and b"Permission denied" in result.stderr
    assert result.stdout == b""
    # access(2) answers as open() does, whatever the mode bits say.
    assert as_user(scene.other, "test", "-r", path).returncode == 1
    # ...and the app, which a policy allows, reads a file shown as someone else's 0400.
    scene.allow_app(name)
    assert as_user(scene.app, "cat", path).stdout == b"s3cret"
    assert as_user(scene.app, "test", "-r", path).returncode == 0


@pytest.mark.parametrize("tag, value, reason", [
    ("secretfs:owner", "no-such-user-here", "no user named"),
    ("secretfs:group", "no-such-group-here", "no group named"),
    ("secretfs:mode", "0600", "only read bits"),
    ("secretfs:mode", "0644", "only read bits"),
    ("secretfs:mode", "0500", "only read bits"),
    ("secretfs:mode", "4400", "only read bits"),
    ("secretfs:mode", "rw", "octal digits"),
    ("secretfs:mode:password", "0777", "only read bits"),
    ("secretfs:owner:password", "no-such-user-here", "no user named"),
    ("secretfs:template", "mustache", "the only template engine"),
])
def test_invalid_presentation_tags_are_refused_and_change_nothing(scene, tag, value, reason):
    name = f"present/bad-{uuid.uuid4().hex[:8]}"
    scene.create(name, '{"password": "p"}', Tags=[{"Key": "secretfs:mode", "Value": "0440"}])
    before = scene.tags(name)
    result = scene.daemon.cli("tag-resource", "--secret-id", name, "--tags",
                              json.dumps([{"Key": tag, "Value": value}]), check=False)
    assert result.returncode != 0
    error = result.stderr.decode()
    assert "(InvalidParameterException)" in error and reason in error, error
    assert scene.tags(name) == before
    assert shown(scene.daemon.path("present", name.split("/")[1], "AWSCURRENT"),
                 "-L") == "root root -r--r-----"
    # CreateSecret checks the same, and creates nothing.
    refused = scene.daemon.cli("create-secret", "--name", name + "-new", "--secret-string", "x",
                               "--tags", json.dumps([{"Key": tag, "Value": value}]), check=False)
    assert b"(InvalidParameterException)" in refused.stderr
    assert not scene.daemon.path("present", name.split("/")[1] + "-new").exists()


def test_set_presentation_refuses_a_bad_request_with_one_line(scene):
    result = present(scene, "present/db", "--clear", "--mode", "0400")
    assert result.returncode != 0 and result.stderr.count(b"\n") == 1
    assert present(scene, "present/db").returncode != 0
