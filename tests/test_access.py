"""Tier 2: access policies on the real mount, read by real uids.

Throw-away users read through the mount with `cat`, `ls`, `stat` and `test -r` (run
through setpriv, so the daemon sees their uid, groups and executable in each FUSE
request); root administers policies through the real `secretfs` command. One daemon
and one set of users serve the module (each test on its own secrets or policies);
`--strict-names` gets a daemon of its own, and the audit tampering test stops and
restarts the shared one, so it runs last.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Daemon, run_as, serving_daemon

from secretfs import audit
from secretfs.api.client import Client
from secretfs.state import StateDir

pytestmark = pytest.mark.mount

DENIED = b"Permission denied"
MISSING = b"No such file or directory"
CAT = os.path.realpath(shutil.which("cat") or "/usr/bin/cat")

# The values each secret of the shared scene holds (prod/db has two versions).
VALUES = {
    "prod/db": "db-current",
    "prod/api": "api-key",
    "prod/root": "root-ca-key",
    "web/cert": "web-cert",
    "hidden/deep/key": "deep-key",
    "shared/token": "shared-token",
    "svc/by-unit": "unit-key",
    "svc/by-cgroup": "cgroup-key",
    "tools/exe-key": "exe-key",
    "tools/sh-key": "sh-key",
    "flip/key": "flip-key",
    "prod/stages": "stage-1",
}
PREVIOUS_DB = "db-previous"


# --- helpers -----------------------------------------------------------------------

def as_user(user: pwd.struct_passwd, *command: str | Path) -> subprocess.CompletedProcess:
    """A command as another uid, in the C locale (stable messages)."""
    return run_as(user, "env", "LC_ALL=C", *(str(part) for part in command))


def read_as(user: pwd.struct_passwd, path: Path, tool: str = "cat") -> bytes:
    result = as_user(user, tool, path)
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_denied(user: pwd.struct_passwd, path: Path, tool: str = "cat") -> None:
    result = as_user(user, tool, path)
    assert result.returncode != 0, f"{tool} {path} succeeded for {user.pw_name}"
    assert DENIED in result.stderr, result.stderr
    assert result.stdout == b""


def readable(user: pwd.struct_passwd, path: Path) -> bool:
    """`test -r`: coreutils' test asks access(2), which reaches the daemon."""
    result = as_user(user, "test", "-r", path)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def ls_as(user: pwd.struct_passwd, path: Path) -> list[str]:
    result = as_user(user, "ls", "-A", path)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().splitlines()


def tool(*command: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], capture_output=True, timeout=30,
                          env=dict(os.environ, LC_ALL="C"))


def mode_of(path: Path, *flags: str) -> str:
    result = tool("stat", *flags, "-c", "%A", path)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    return text.rstrip("\n")


def document_uri(directory: Path, document: dict | str) -> str:
    """A policy document in a file of its own, as file:// for the CLI."""
    path = directory / f"policy-{uuid.uuid4().hex[:8]}.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return f"file://{path}"


def allow(resource: str, sid: str, action: str = "secretsmanager:GetSecretValue",
          **extra) -> dict:
    return {"Sid": sid, "Effect": "Allow", "Action": action, "Resource": resource, **extra}


def daemon_pids(mountpoint: Path) -> list[int]:
    result = tool("pgrep", "-f", f"secretfs.daemon --mountpoint {mountpoint}")
    return [int(pid) for pid in result.stdout.split()]


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@dataclass
class Users:
    alice: pwd.struct_passwd   # identity policy user:<alice>
    bob: pwd.struct_passwd     # in group <web>, which has an identity policy
    carol: pwd.struct_passwd   # named only by one secret's resource policy (uid:N)
    dave: pwd.struct_passwd    # named by no policy: gets in only as an exe, unit or cgroup
    web: str


@dataclass
class Scene:
    daemon: Daemon
    users: Users
    policies: Path           # where the documents given to the CLI are written
    versions: dict[str, str]  # secret name -> its AWSCURRENT version id
    previous_db: str          # prod/db's AWSPREVIOUS version id

    def path(self, name: str, *below: str) -> Path:
        return self.daemon.path(*name.split("/"), *below)

    def put_identity_policy(self, principal: str, name: str, document: dict | str) -> dict:
        return self.daemon.call("put-identity-policy", "--principal", principal,
                                "--policy-name", name, "--policy-document",
                                document_uri(self.policies, document))

    def put_resource_policy(self, secret: str, document: dict | str) -> dict:
        return self.daemon.call("put-resource-policy", "--secret-id", secret,
                                "--resource-policy", document_uri(self.policies, document))

    def delete_identity_policy(self, principal: str, name: str) -> None:
        self.daemon.call("delete-identity-policy", "--principal", principal,
                         "--policy-name", name)


def alice_policy() -> dict:
    """prod/* (by ARN) at its AWSCURRENT stage, and never prod/root (by name)."""
    return {"Version": "2012-10-17", "Statement": [
        allow("arn:aws:secretsmanager:*:*:secret:prod/*", "ReadProd",
              Condition={"StringEquals": {"secretsmanager:VersionStage": "AWSCURRENT"}}),
        {"Sid": "NoRoot", "Effect": "Deny", "Action": "*", "Resource": "prod/root"},
    ]}


@contextlib.contextmanager
def serving(extra_args: list[str]) -> Iterator[Daemon]:
    """A fresh state directory mounted, with a directory for policy documents."""
    with serving_daemon(*extra_args, prefix="secretfs-access-test-") as running:
        (running.state_dir.parent / "policies").mkdir(mode=0o700)
        yield running


def populate(running: Daemon, users: Users, names: list[str]) -> Scene:
    """Secrets through the socket (setup, not under test); alice's policy through the CLI."""
    client = Client(StateDir(running.state_dir).socket)
    versions = {}
    previous = ""
    for name in names:
        if name == "prod/db":
            previous = client.call("CreateSecret", {"Name": name,
                                                    "SecretString": PREVIOUS_DB})["VersionId"]
            versions[name] = client.call("PutSecretValue", {
                "SecretId": name, "SecretString": VALUES[name]})["VersionId"]
        else:
            versions[name] = client.call("CreateSecret", {
                "Name": name, "SecretString": VALUES[name]})["VersionId"]
    scene = Scene(running, users, running.mountpoint.parent / "policies", versions, previous)
    scene.put_identity_policy(f"user:{users.alice.pw_name}", "ReadProd", alice_policy())
    return scene


# --- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    """Four throw-away users and a group named for this run; removed after the module."""
    created: list[str] = []
    web = f"web{uuid.uuid4().hex[:8]}"

    def make(*groups: str) -> pwd.struct_passwd:
        name = f"sfs{uuid.uuid4().hex[:8]}"
        args = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        if groups:
            args += ["-G", ",".join(groups)]
        subprocess.run([*args, name], check=True, capture_output=True)
        created.append(name)
        return pwd.getpwnam(name)

    subprocess.run(["groupadd", web], check=True, capture_output=True)
    try:
        yield Users(alice=make(), bob=make(web), carol=make(), dave=make(), web=web)
    finally:
        for name in created:
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", web], capture_output=True)


@pytest.fixture(scope="module")
def scene(users: Users) -> Iterator[Scene]:
    """The shared daemon: every secret in VALUES, alice's policy, bob's group policy and
    carol's resource policy."""
    with serving([]) as running:
        shared = populate(running, users, list(VALUES))
        shared.put_identity_policy(f"group:{users.web}", "ReadWeb",
                                   {"Statement": [allow("web/*", "ReadWeb")]})
        shared.put_resource_policy("shared/token", {"Statement": [allow(
            "*", "CarolReads", Principal={"Unix": [f"uid:{users.carol.pw_uid}"]})]})
        yield shared


@pytest.fixture(scope="module")
def strict(users: Users) -> Iterator[Scene]:
    """A daemon mounted with --strict-names, holding alice's policy."""
    with serving(["--strict-names"]) as running:
        yield populate(running, users, ["prod/db", "prod/api", "prod/root", "hidden/deep/key"])


# --- identity, group and resource policies --------------------------------------------

def test_alice_reads_what_her_identity_policy_allows_and_nothing_else(scene):
    alice = scene.users.alice
    assert read_as(alice, scene.path("prod/db", "AWSCURRENT")) == b"db-current"
    assert read_as(alice, scene.path("prod/api", "AWSCURRENT")) == b"api-key"
    assert read_as(alice, scene.path("prod/db", "versions", scene.versions["prod/db"])) \
        == b"db-current"
    for name in ("web/cert", "shared/token", "hidden/deep/key", "tools/exe-key"):
        assert_denied(alice, scene.path(name, "AWSCURRENT"))
        assert_denied(alice, scene.path(name, "versions", scene.versions[name]))
    # access(2) reaches the daemon with alice's uid: test -r tells the truth.
    assert readable(alice, scene.path("prod/db", "AWSCURRENT"))
    assert readable(alice, scene.path("prod/api", "versions", scene.versions["prod/api"]))
    assert not readable(alice, scene.path("web/cert", "AWSCURRENT"))
    assert not readable(alice, scene.path("shared/token", "AWSCURRENT"))
    # Root is the administrator and reads everything.
    assert tool("cat", scene.path("web/cert", "AWSCURRENT")).stdout == b"web-cert"
    assert tool("test", "-r", scene.path("web/cert", "AWSCURRENT")).returncode == 0


def test_a_group_principal_lets_its_members_read(scene):
    bob, alice = scene.users.bob, scene.users.alice
    groups = as_user(bob, "id", "-Gn").stdout.decode().split()
    assert scene.users.web in groups
    assert read_as(bob, scene.path("web/cert", "AWSCURRENT")) == b"web-cert"
    assert readable(bob, scene.path("web/cert", "AWSCURRENT"))
    assert_denied(bob, scene.path("prod/db", "AWSCURRENT"))
    assert_denied(alice, scene.path("web/cert", "AWSCURRENT"))  # not a member
    assert not readable(alice, scene.path("web/cert", "AWSCURRENT"))
    # The groups are the process's own: bob without his supplementary groups is not in web.
    dropped = subprocess.run(
        ["setpriv", f"--reuid={bob.pw_uid}", f"--regid={bob.pw_gid}", "--clear-groups", "--",
         "cat", scene.path("web/cert", "AWSCURRENT")], capture_output=True, timeout=30,
        env=dict(os.environ, LC_ALL="C"))
    assert dropped.returncode != 0 and DENIED in dropped.stderr, dropped.stderr


def test_a_deny_for_one_secret_beats_the_wildcard_allow(scene):
    alice = scene.users.alice
    root_ca = scene.path("prod/root", "AWSCURRENT")
    assert tool("cat", root_ca).stdout == b"root-ca-key"  # root read it just before
    assert_denied(alice, root_ca)
    assert_denied(alice, scene.path("prod/root", "versions", scene.versions["prod/root"]))
    assert not readable(alice, root_ca)
    # ... while prod/* still lets her read its siblings.
    api = scene.path("prod/api", "AWSCURRENT")
    assert read_as(alice, api) == b"api-key"
    # A Deny in a secret's resource policy beats her identity policy's Allow too.
    scene.put_resource_policy("prod/api", {"Statement": [{
        "Sid": "NotAlice", "Effect": "Deny", "Principal": {"Unix": [f"user:{alice.pw_name}"]},
        "Action": "secretsmanager:GetSecretValue", "Resource": "*"}]})
    try:
        assert_denied(alice, api)
        assert not readable(alice, api)
    finally:
        scene.daemon.call("delete-resource-policy", "--secret-id", "prod/api")
    assert read_as(alice, api) == b"api-key"


def test_a_resource_policy_grants_a_uid_no_identity_policy_names(scene):
    carol, alice = scene.users.carol, scene.users.alice
    listed = scene.daemon.call("list-identity-policies")["Policies"]
    assert not any(str(carol.pw_uid) in p["Principal"] or carol.pw_name in p["Principal"]
                   for p in listed)
    document = scene.daemon.call("get-resource-policy", "--secret-id", "shared/token")
    assert f"uid:{carol.pw_uid}" in document["ResourcePolicy"]
    assert read_as(carol, scene.path("shared/token", "AWSCURRENT")) == b"shared-token"
    assert readable(carol, scene.path("shared/token", "AWSCURRENT"))
    assert_denied(carol, scene.path("prod/db", "AWSCURRENT"))
    assert_denied(carol, scene.path("web/cert", "AWSCURRENT"))
    assert_denied(alice, scene.path("shared/token", "AWSCURRENT"))


@contextlib.contextmanager
def scope_cgroup() -> Iterator[Path]:
    """A cgroup of our own, named like a systemd scope. `systemd-run --scope` needs
    systemd as PID 1, which containers (this test machine's included) often lack; the
    daemon reads the kernel's cgroup either way, and the unit is the path's innermost
    .scope or .service."""
    root = cgroup2_mount()
    if root is None:
        pytest.fail("a cgroup2 hierarchy is needed to place the reader in a cgroup")
    directory = root / f"sfs-reader-{uuid.uuid4().hex[:8]}.scope"
    directory.mkdir()
    try:
        yield directory
    finally:
        deadline = time.monotonic() + 5
        while True:
            try:
                directory.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def reader_cgroup() -> Iterator[Path]:
    with scope_cgroup() as directory:
        yield directory


def in_cgroup(directory: Path, user: pwd.struct_passwd, *command: str | Path):
    """Join the cgroup as root, then become the user and exec the command: the process
    that reaches the mount is the command itself, inside the cgroup."""
    script = ('echo $$ > "$1" && uid=$2 gid=$3 && shift 3 && exec setpriv --reuid="$uid" '
              '--regid="$gid" --init-groups -- env LC_ALL=C "$@"')
    return subprocess.run(
        ["sh", "-c", script, "sh", str(directory / "cgroup.procs"), str(user.pw_uid),
         str(user.pw_gid), *(str(part) for part in command)], capture_output=True, timeout=30)


def test_unit_and_cgroup_principals_match_the_readers_cgroup(scene, reader_cgroup):
    dave = scene.users.dave
    seen = in_cgroup(reader_cgroup, dave, "cat", "/proc/self/cgroup")
    assert seen.returncode == 0, seen.stderr
    cgroup = next(line[3:] for line in seen.stdout.decode().splitlines()
                  if line.startswith("0::"))
    assert cgroup.endswith("/" + reader_cgroup.name)
    unit = reader_cgroup.name
    scene.put_resource_policy("svc/by-unit", {"Statement": [allow(
        "*", "ByUnit", Principal={"Unix": [f"unit:{unit}"]})]})
    scene.put_identity_policy(f"cgroup:{cgroup}", "ByCgroup",
                              {"Statement": [allow("svc/by-cgroup", "ByCgroup")]})
    try:
        for name in ("svc/by-unit", "svc/by-cgroup"):
            inside = in_cgroup(reader_cgroup, dave, "cat", scene.path(name, "AWSCURRENT"))
            assert inside.returncode == 0, inside.stderr
            assert inside.stdout == VALUES[name].encode()
            assert in_cgroup(reader_cgroup, dave, "test", "-r",
                             scene.path(name, "AWSCURRENT")).returncode == 0
            # The same uid outside that cgroup is nobody.
            assert_denied(dave, scene.path(name, "AWSCURRENT"))
            assert not readable(dave, scene.path(name, "AWSCURRENT"))
        # The unit's grant is for its own secret only.
        denied = in_cgroup(reader_cgroup, dave, "cat", scene.path("prod/db", "AWSCURRENT"))
        assert denied.returncode != 0 and DENIED in denied.stderr
    finally:
        scene.delete_identity_policy(f"cgroup:{cgroup}", "ByCgroup")


class SteppedShell:
    """A shell that opens a file itself (a redirection of a compound command, so its own
    pid opens it) each time the test says so, started inside a cgroup as a user: the test can move it to
    another cgroup, or make it exec another program, between two opens."""

    def __init__(self, directory: Path, user: pwd.struct_passwd, path: Path):
        script = ('echo $$ > "$1" && exec setpriv --reuid="$2" --regid="$3" --init-groups '
                  '-- sh -c \'while read -r step; do case $step in '
                  'read) if { true; } 2>/dev/null < "$0"; then echo allowed; else echo denied; fi;; '
                  'exec) exec cat "$0";; esac; done\' "$4"')
        self.process = subprocess.Popen(
            ["sh", "-c", script, "sh", str(directory / "cgroup.procs"), str(user.pw_uid),
             str(user.pw_gid), str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.pid = self.process.pid

    def read(self) -> str:
        self.process.stdin.write(b"read\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().decode().strip()

    def exec_cat(self) -> None:
        self.process.stdin.write(b"exec\n")
        self.process.stdin.close()
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_a_unit_policy_decides_on_the_cgroup_of_this_very_open(scene, reader_cgroup):
    """The audit record's unit may be remembered for a second per process; a policy's
    never is: the open right after a move to another cgroup is judged by the new one."""
    dave = scene.users.dave
    scene.put_resource_policy("svc/by-unit", {"Statement": [allow(
        "*", "ByUnit", Principal={"Unix": [f"unit:{reader_cgroup.name}"]})]})
    path = scene.path("svc/by-unit", "AWSCURRENT")
    with scope_cgroup() as elsewhere:
        shell = SteppedShell(reader_cgroup, dave, path)
        try:
            assert shell.read() == "allowed"
            (elsewhere / "cgroup.procs").write_text(str(shell.pid))
            assert shell.read() == "denied"
        finally:
            shell.close()
    records = wait_for_records(scene.daemon, {shell.pid}, "--secret", "svc/by-unit")
    units = [(r["decision"], r["userIdentity"]["unit"]) for r in records
             if r["userIdentity"]["pid"] == shell.pid]
    assert units == [("allow", reader_cgroup.name), ("deny", elsewhere.name)]


def test_the_audit_record_follows_a_process_across_exec_and_cgroup_moves(scene,
                                                                        reader_cgroup):
    """Root's opens are decided without /proc, so only the audit record reads it: a
    move shows within a second, an exec at once (with the new executable's unit)."""
    root = pwd.getpwuid(0)
    path = scene.path("prod/api", "AWSCURRENT")
    with scope_cgroup() as elsewhere:
        shell = SteppedShell(reader_cgroup, root, path)
        try:
            assert shell.read() == "allowed"
            (elsewhere / "cgroup.procs").write_text(str(shell.pid))
            time.sleep(1.2)  # longer than a remembered unit lives
            assert shell.read() == "allowed"
            (reader_cgroup / "cgroup.procs").write_text(str(shell.pid))
            shell.exec_cat()  # same pid, another program: nothing remembered applies
        finally:
            shell.close()
    expected = 3
    deadline = time.monotonic() + 3
    while True:
        records = [r for r in scene.daemon.audit_records("--secret", "prod/api")
                   if r["userIdentity"].get("pid") == shell.pid]
        if len(records) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    shell_exe = os.path.realpath("/bin/sh")
    assert [(r["userIdentity"]["exe"], r["userIdentity"]["unit"]) for r in records] == [
        (shell_exe, reader_cgroup.name), (shell_exe, elsewhere.name),
        (CAT, reader_cgroup.name)]


def test_a_recycled_pid_never_inherits_the_identity_of_its_last_owner(scene):
    """The daemon keeps /proc/<pid> open for processes that ask again; a new process
    given the same pid is still read as itself."""
    path = scene.path("prod/api", "AWSCURRENT")
    dash, bash = os.path.realpath("/bin/sh"), os.path.realpath(shutil.which("bash"))
    assert dash != bash
    for _ in range(20):
        first = subprocess.Popen([dash, "-c", '{ true; } < "$0"', str(path)])
        first.wait(timeout=30)
        # The next process gets the same pid: ns_last_pid is the pid handed out last.
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(first.pid - 1))
        second = subprocess.Popen([bash, "-c", '{ true; } < "$0"', str(path)])
        second.wait(timeout=30)
        assert first.returncode == 0 and second.returncode == 0
        if second.pid == first.pid:
            break
    else:
        pytest.fail("the kernel never handed the same pid out twice in a row")
    deadline = time.monotonic() + 3
    while True:
        exes = [r["userIdentity"]["exe"] for r in scene.daemon.audit_records("--secret", "prod/api")
                if r["userIdentity"].get("pid") == first.pid]
        if len(exes) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert exes[-2:] == [dash, bash]


def test_an_exe_principal_lets_cat_read_and_not_another_program(scene):
    dave, alice = scene.users.dave, scene.users.alice
    principal = f"exe:{CAT}"
    scene.put_identity_policy(principal, "CatReads",
                              {"Statement": [allow("tools/exe-key", "CatReads")]})
    try:
        path = scene.path("tools/exe-key", "AWSCURRENT")
        assert read_as(dave, path) == b"exe-key"
        assert read_as(alice, path) == b"exe-key"  # any uid, as long as it runs cat
        assert_denied(dave, path, tool="head")
        assert_denied(dave, path, tool="tac")
        # test -r asks as /usr/bin/test, which the policy does not name.
        assert not readable(dave, path)
    finally:
        scene.delete_identity_policy(principal, "CatReads")
    assert_denied(dave, scene.path("tools/exe-key", "AWSCURRENT"))


def test_a_program_exec_d_by_an_allowed_exe_is_judged_by_its_own_exe(scene):
    dave = scene.users.dave
    shell = os.path.realpath("/bin/sh")
    principal = f"exe:{shell}"
    scene.put_identity_policy(principal, "ShellReads",
                              {"Statement": [allow("tools/sh-key", "ShellReads")]})
    path = scene.path("tools/sh-key", "AWSCURRENT")
    try:
        shell_read = as_user(dave, "sh", "-c", 'read -r line < "$1"; printf %s "$line"',
                             "sh", path)
        assert shell_read.returncode == 0 and shell_read.stdout == b"sh-key", shell_read.stderr
        assert_denied(dave, path, tool="head")
        # The shell reads once (allowed), then becomes head: same pid, same start time.
        exec_d = as_user(dave, "sh", "-c", 'read -r line < "$1"; exec head -c 64 "$1"',
                         "sh", path)
        assert exec_d.returncode != 0 and DENIED in exec_d.stderr, (
            f"head read {exec_d.stdout!r} as {shell}")
    finally:
        scene.delete_identity_policy(principal, "ShellReads")


# --- live policy, conditions -----------------------------------------------------------

def test_a_policy_change_takes_effect_on_the_very_next_open(scene):
    alice = scene.users.alice
    principal = f"user:{alice.pw_name}"
    path = scene.path("flip/key", "AWSCURRENT")
    pids = daemon_pids(scene.daemon.mountpoint)
    assert_denied(alice, path)
    scene.put_identity_policy(principal, "Flip", {"Statement": [allow("flip/key", "Flip")]})
    assert read_as(alice, path) == b"flip-key"
    assert readable(alice, path)
    scene.delete_identity_policy(principal, "Flip")
    assert_denied(alice, path)
    assert not readable(alice, path)
    scene.put_identity_policy(principal, "Flip", {"Statement": [allow("flip/key", "Flip")]})
    try:
        assert read_as(alice, path) == b"flip-key"
        assert readable(alice, path)
    finally:
        scene.delete_identity_policy(principal, "Flip")
    assert daemon_pids(scene.daemon.mountpoint) == pids  # no remount, no restart


def test_a_version_stage_condition_allows_awscurrent_and_not_awsprevious(scene):
    alice = scene.users.alice
    current, previous = scene.path("prod/db", "AWSCURRENT"), scene.path("prod/db", "AWSPREVIOUS")
    assert tool("cat", previous).stdout == PREVIOUS_DB.encode()
    assert read_as(alice, current) == b"db-current"
    assert_denied(alice, previous)
    assert_denied(alice, scene.path("prod/db", "versions", scene.previous_db))
    assert readable(alice, current)
    assert not readable(alice, previous)


def test_the_version_stage_is_judged_at_each_open(scene):
    """A promotion moves AWSCURRENT: the version alice read a moment ago (and whose
    pages the kernel keeps) is AWSPREVIOUS now, and no longer opens for her."""
    alice = scene.users.alice
    first = scene.path("prod/stages", "versions", scene.versions["prod/stages"])
    assert read_as(alice, first) == b"stage-1"
    client = Client(StateDir(scene.daemon.state_dir).socket)
    client.call("PutSecretValue", {"SecretId": "prod/stages", "SecretString": "stage-2"})
    assert read_as(alice, scene.path("prod/stages", "AWSCURRENT")) == b"stage-2"
    assert_denied(alice, first)
    assert not readable(alice, first)
    assert tool("cat", first).stdout == b"stage-1"


# --- names: listings, strict names --------------------------------------------------------

def test_ls_shows_each_user_only_what_it_may_see_even_after_root_listed_everything(scene):
    alice, bob, carol = scene.users.alice, scene.users.bob, scene.users.carol
    mount = scene.daemon.mountpoint
    assert tool("ls", "-R", mount).returncode == 0  # every name now in the kernel's caches
    assert ls_as(alice, mount) == ["prod"]
    assert ls_as(alice, mount / "prod") == ["api", "db", "stages"]
    assert sorted(os.listdir(mount / "prod")) == ["api", "db", "root", "stages"]
    assert set(ls_as(alice, mount / "prod" / "db")) >= {"AWSCURRENT", "AWSPREVIOUS", "versions"}
    # A hidden secret's directory can't be listed; a prefix holding only hidden
    # secrets is hidden from its parent's listing and lists as empty.
    listing = as_user(alice, "ls", mount / "prod" / "root")
    assert listing.returncode != 0 and DENIED in listing.stderr
    assert ls_as(alice, mount / "hidden") == []
    assert os.listdir(mount / "hidden") == ["deep"]
    # Each user sees its own.
    assert ls_as(bob, mount) == ["web"]
    assert ls_as(carol, mount) == ["shared"]
    assert ls_as(carol, mount / "shared") == ["token"]


def test_test_r_on_a_secret_directory_agrees_with_whether_it_lists(scene):
    alice = scene.users.alice
    for path, lists in ((scene.path("prod/db"), True), (scene.path("prod/db", "versions"), True),
                        (scene.path("prod/root"), False),
                        (scene.path("prod/root", "versions"), False),
                        (scene.path("prod/root", "keys"), False),
                        (scene.path("web/cert"), False)):
        listing = as_user(alice, "ls", path)
        assert (listing.returncode == 0) == lists, listing.stderr
        assert readable(alice, path) == lists, f"test -r {path} is {not lists} for alice"


def test_without_strict_names_a_walked_name_stats_for_anyone_but_its_content_does_not_open(
        scene):
    alice = scene.users.alice
    path = scene.path("prod/root", "AWSCURRENT")
    assert tool("stat", "-L", path).returncode == 0  # root walked it
    assert as_user(alice, "stat", scene.path("prod/root")).returncode == 0
    assert as_user(alice, "stat", path).returncode == 0
    assert as_user(alice, "stat", "-L", path).returncode == 0
    assert_denied(alice, path)


def test_strict_names_hide_a_hidden_secret_even_right_after_root_read_it(strict):
    alice = strict.users.alice
    root_ca = strict.path("prod/root", "AWSCURRENT")
    assert tool("cat", root_ca).stdout == b"root-ca-key"
    assert tool("ls", "-R", strict.daemon.mountpoint).returncode == 0
    for path in (strict.path("prod/root"), root_ca,
                 strict.path("prod/root", "versions", strict.versions["prod/root"]),
                 strict.path("hidden"), strict.path("hidden/deep/key", "AWSCURRENT")):
        result = as_user(alice, "stat", path)
        assert result.returncode != 0, f"{path} stats for alice"
        assert MISSING in result.stderr, result.stderr
        result = as_user(alice, "cat", path)
        assert result.returncode != 0 and MISSING in result.stderr, result.stderr
    # Root's walk still finds them, and alice still reads hers.
    assert tool("stat", root_ca).returncode == 0
    assert tool("cat", root_ca).stdout == b"root-ca-key"
    assert read_as(alice, strict.path("prod/db", "AWSCURRENT")) == b"db-current"
    assert ls_as(alice, strict.daemon.mountpoint) == ["prod"]
    assert ls_as(alice, strict.path("prod")) == ["api", "db"]


def test_strict_names_follow_a_policy_change_on_the_next_walk(strict):
    alice = strict.users.alice
    principal = f"user:{alice.pw_name}"
    deep = strict.path("hidden/deep/key", "AWSCURRENT")
    assert tool("cat", deep).stdout == b"deep-key"
    assert MISSING in as_user(alice, "stat", deep).stderr
    strict.put_identity_policy(principal, "Deep", {"Statement": [allow("hidden/*", "Deep")]})
    try:
        assert as_user(alice, "stat", deep).returncode == 0
        assert read_as(alice, deep) == b"deep-key"
        assert ls_as(alice, strict.daemon.mountpoint) == ["hidden", "prod"]
    finally:
        strict.delete_identity_policy(principal, "Deep")
    assert MISSING in as_user(alice, "stat", deep).stderr
    assert MISSING in as_user(alice, "cat", deep).stderr


# --- mode bits ---------------------------------------------------------------------------

def test_mode_bits_follow_the_policies_without_a_remount(scene):
    client = Client(StateDir(scene.daemon.state_dir).socket)
    name = "modes/solo"
    version = client.call("CreateSecret", {"Name": name,
                                           "SecretString": '{"user": "u"}'})["VersionId"]
    files = [scene.path(name, "versions", version),
             scene.path(name, "keys", ".by-version", version, "user")]
    for path in files:
        assert mode_of(path) == "-r--------"
    assert mode_of(scene.path(name, "AWSCURRENT"), "-L") == "-r--------"
    principal = f"user:{scene.users.alice.pw_name}"
    scene.put_identity_policy(principal, "Modes", {"Statement": [allow(name, "Modes")]})
    try:
        for path in files:
            assert mode_of(path) == "-r--r--r--"
        assert mode_of(scene.path(name, "AWSCURRENT"), "-L") == "-r--r--r--"
        assert read_as(scene.users.alice, files[0]) == b'{"user": "u"}'
        assert read_as(scene.users.alice, scene.path(name, "keys", "AWSCURRENT", "user")) == b"u"
        # Mode bits describe; they don't decide: bob still can't read it.
        assert_denied(scene.users.bob, files[0])
        assert not readable(scene.users.bob, files[0])
    finally:
        scene.delete_identity_policy(principal, "Modes")
    for path in files:
        assert mode_of(path) == "-r--------"
    # A resource policy may grant others too.
    scene.put_resource_policy(name, {"Statement": [allow(
        "*", "CarolReads", Principal={"Unix": [f"uid:{scene.users.carol.pw_uid}"]})]})
    for path in files:
        assert mode_of(path) == "-r--r--r--"
    scene.daemon.call("delete-resource-policy", "--secret-id", name)
    for path in files:
        assert mode_of(path) == "-r--------"


# --- another mount namespace -----------------------------------------------------------------

INNER = ('printf "link=%s\\n" "$(readlink /run/allowed/AWSCURRENT)"; '
         'printf "value=%s\\n" "$(cat /run/allowed/AWSCURRENT)"; '
         'test -r /run/allowed/AWSCURRENT && echo readable=yes; '
         'test -r /run/denied/AWSCURRENT || echo denied-readable=no; '
         'cat /run/denied/AWSCURRENT; echo "denied-rc=$?"')


@pytest.mark.parametrize("how", ["unshare", "bwrap"])
def test_a_bind_mounted_secret_directory_reads_what_the_uid_may(scene, how):
    alice = scene.users.alice
    allowed, denied = scene.path("prod/db"), scene.path("prod/root")
    drop = ["setpriv", f"--reuid={alice.pw_uid}", f"--regid={alice.pw_gid}", "--init-groups",
            "--", "sh", "-c", INNER]
    if how == "unshare":
        setup = ('mount -t tmpfs tmpfs /run && mkdir /run/allowed /run/denied && '
                 'mount --bind "$1" /run/allowed && mount --bind "$2" /run/denied && '
                 'shift 2 && exec "$@"')
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh",
                   str(allowed), str(denied), *drop]
    else:
        if shutil.which("bwrap") is None:
            pytest.fail("bubblewrap (bwrap) is needed")
        command = ["bwrap", "--bind", "/", "/", "--tmpfs", "/run",
                   "--ro-bind", str(allowed), "/run/allowed",
                   "--ro-bind", str(denied), "/run/denied",
                   "--unshare-pid", "--die-with-parent", "--", *drop]
    result = subprocess.run(command, capture_output=True, timeout=30,
                            env=dict(os.environ, LC_ALL="C"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines == [f"link=versions/{scene.versions['prod/db']}", "value=db-current",
                     "readable=yes", "denied-readable=no", "denied-rc=1"]
    assert DENIED in result.stderr, result.stderr
    assert not os.path.ismount("/run/allowed")


# --- audit -----------------------------------------------------------------------------------

def cat_with_pid(user: pwd.struct_passwd, path: Path, program: str = "cat") -> int:
    """cat (or another program) as the user; the pid the daemon sees (the shell execs
    the program, which keeps its pid)."""
    result = as_user(user, "sh", "-c", 'echo $$; exec "$1" "$2"', "sh", program, path)
    return int(result.stdout.split(b"\n", 1)[0])


def wait_for_records(daemon: Daemon, pids: set[int], *flags: str) -> list[dict]:
    """Poll `audit search` until a record of each pid is on disk (the log flushes each
    second), for at most about two seconds."""
    deadline = time.monotonic() + 2.0
    while True:
        records = [record for record in daemon.audit_records(*flags)
                   if record.get("userIdentity", {}).get("pid") in pids]
        found = {record["userIdentity"]["pid"] for record in records}
        if found >= pids or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_audit_search_lists_each_decision_with_who_and_why_and_verify_passes(scene):
    alice = scene.users.alice
    principal = f"user:{alice.pw_name}"
    allowed = cat_with_pid(alice, scene.path("prod/db", "AWSCURRENT"))
    denied = cat_with_pid(alice, scene.path("prod/root", "AWSCURRENT"))
    implicit = cat_with_pid(alice, scene.path("web/cert", "AWSCURRENT"))
    listing = cat_with_pid(alice, scene.path("prod/root"), "ls")
    records = wait_for_records(scene.daemon, {allowed, denied, implicit, listing},
                               "--uid", str(alice.pw_uid))
    by_pid: dict[int, list[dict]] = {}
    for record in records:
        by_pid.setdefault(record["userIdentity"]["pid"], []).append(record)
    assert set(by_pid) == {allowed, denied, implicit, listing}
    assert all(len(found) == 1 for found in by_pid.values()), by_pid  # one per decision
    expected = {
        allowed: ("allow", f"identity-policy {principal}/ReadProd#ReadProd", "prod/db"),
        denied: ("deny", f"identity-policy {principal}/ReadProd#NoRoot", "prod/root"),
        implicit: ("deny", "implicit-deny", "web/cert"),
    }
    for pid, (decision, decided_by, name) in expected.items():
        (record,) = by_pid[pid]
        assert record["eventName"] == "GetSecretValue"
        assert record["eventSource"] == "fuse"
        assert record["decision"] == decision
        assert record["decidedBy"] == decided_by
        identity = record["userIdentity"]
        assert (identity["uid"], identity["gid"], identity["user"], identity["exe"]) == (
            alice.pw_uid, alice.pw_gid, alice.pw_name, CAT)
        assert record["resources"]["name"] == name
        assert record["resources"]["versionId"] == scene.versions[name]
        assert record["resources"]["versionStage"] == ["AWSCURRENT"]
        assert record.get("errorCode") == (None if decision == "allow"
                                           else "AccessDeniedException")
    (record,) = by_pid[listing]  # ls: opening a secret's directory is a decision too
    assert (record["eventName"], record["decision"], record["decidedBy"]) == (
        "OpenDirectory", "deny", f"identity-policy {principal}/ReadProd#NoRoot")
    assert record["userIdentity"]["exe"] == os.path.realpath(shutil.which("ls") or "ls")
    assert record["resources"]["name"] == "prod/root"
    denied_only = scene.daemon.audit_records("--uid", str(alice.pw_uid), "--denied-only")
    pids = {record["userIdentity"]["pid"] for record in denied_only}
    assert {denied, implicit} <= pids and allowed not in pids
    about_root = scene.daemon.audit_records("--secret", "prod/root", "--uid", str(alice.pw_uid))
    assert denied in {record["userIdentity"]["pid"] for record in about_root}
    # Never a value.
    for path in audit.log_files(StateDir(scene.daemon.state_dir).audit_dir):
        text = path.read_bytes()
        assert b"db-current" not in text and b"root-ca-key" not in text
    verified = scene.daemon.cli("audit", "verify", "--state-dir", str(scene.daemon.state_dir))
    assert verified.stdout.decode().startswith("audit log OK: ")


# --- bad policy documents ---------------------------------------------------------------------

def policies_in_store(scene: Scene) -> tuple[dict, dict]:
    """ListIdentityPolicies and the documents, and shared/token's resource policy (through
    the socket: the CLI's own output is not what these tests are about)."""
    client = Client(StateDir(scene.daemon.state_dir).socket)
    listed = client.call("ListIdentityPolicies", {}, extension=True)["Policies"]
    documents = {(item["Principal"], item["PolicyName"]): client.call(
        "GetIdentityPolicy", item, extension=True)["PolicyDocument"] for item in listed}
    return documents, client.call("GetResourcePolicy", {"SecretId": "shared/token"})


def _statement(resource_policy: bool, **changes) -> dict:
    statement = allow("prod/db", "Good")
    if resource_policy:
        statement["Principal"] = {"Unix": ["user:nobody"]}
    statement.update(changes)
    return {key: value for key, value in statement.items() if value is not None}


BAD_DOCUMENTS = {
    # case: (the document, given "is it a resource policy"; its error's location; what
    # the error says)
    "wrong-type": (lambda rp: {"Statement": [_statement(rp, Action=5)]},
                   "$.Statement[0].Action", "must be a non-empty string"),
    "effect": (lambda rp: {"Statement": [_statement(rp, Effect="allow")]},
               "$.Statement[0].Effect", 'must be "Allow" or "Deny"'),
    "unknown-key": (lambda rp: {"Statement": [_statement(rp, Colour="red")]},
                    "$.Statement[0].Colour", "unknown element"),
    "unknown-top-key": (lambda rp: {"Statement": [_statement(rp)], "Extra": 1}, "$.Extra",
                        "unknown element"),
    "too-long": (lambda rp: {"Statement": [_statement(rp, Sid="A" * 20481)]}, "$",
                 "the maximum is 20480"),
    "operator": (lambda rp: {"Statement": [_statement(rp, Condition={
        "StringEqualz": {"secretsmanager:VersionStage": "AWSCURRENT"}})]},
        "$.Statement[0].Condition.StringEqualz", "unknown condition operator"),
    "not-json": (lambda rp: '{"Statement": [', "line 1 column 16", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_a_bad_policy_document_is_refused_with_its_location_and_changes_nothing(scene, case):
    build, location, says = BAD_DOCUMENTS[case]
    daemon, alice = scene.daemon, scene.users.alice
    before = policies_in_store(scene)

    def refused(verb: str, *flags: str, resource_policy: bool) -> str:
        result = daemon.cli(verb, *flags, document_uri(scene.policies, build(resource_policy)),
                            check=False)
        assert result.returncode != 0, result.stdout
        return one_line(result.stderr)

    message = refused("put-identity-policy", "--principal", f"user:{alice.pw_name}",
                      "--policy-name", "ReadProd", "--policy-document", resource_policy=False)
    assert "MalformedPolicyDocumentException" in message
    assert f"{location}: " in message and says in message, message
    message = refused("put-resource-policy", "--secret-id", "shared/token", "--resource-policy",
                      resource_policy=True)
    if case == "too-long":
        # As in AWS, the API model's length limit on ResourcePolicy answers first.
        assert "ValidationException" in message and "'resourcePolicy'" in message, message
        assert "less than or equal to 20480" in message
        message = refused("validate-resource-policy", "--resource-policy", resource_policy=True)
        assert "ValidationException" in message and "'resourcePolicy'" in message, message
    else:
        assert "MalformedPolicyDocumentException" in message
        assert f"{location}: " in message and says in message, message
        validation = daemon.call("validate-resource-policy", "--resource-policy",
                                 document_uri(scene.policies, build(True)))
        assert validation["PolicyValidationPassed"] is False
        assert any(error["CheckName"].startswith(location) and says in error["ErrorMessage"]
                   for error in validation["ValidationErrors"]), validation
    assert policies_in_store(scene) == before
    # The policies in force are the old ones.
    assert read_as(alice, scene.path("prod/db", "AWSCURRENT")) == b"db-current"
    assert read_as(scene.users.carol, scene.path("shared/token", "AWSCURRENT")) \
        == b"shared-token"


@pytest.mark.parametrize("principal", ["person:alice", "uid:abc", "*", "user:"])
def test_a_bad_principal_is_refused_with_one_line_and_changes_nothing(scene, principal):
    daemon = scene.daemon
    before = policies_in_store(scene)
    result = daemon.cli("put-identity-policy", "--principal", principal, "--policy-name", "X",
                        "--policy-document",
                        document_uri(scene.policies, {"Statement": [allow("prod/db", "X")]}),
                        check=False)
    assert result.returncode != 0, result.stderr
    message = one_line(result.stderr)
    assert "InvalidParameterException" in message and principal in message, message
    bad = {"Statement": [allow("*", "X", Principal={"Unix": ["user:nobody", principal]})]}
    result = daemon.cli("put-resource-policy", "--secret-id", "shared/token",
                        "--resource-policy", document_uri(scene.policies, bad), check=False)
    if principal == "*":
        # "*" in the list is everyone: a public policy, refused by default.
        assert "PublicPolicyException" in one_line(result.stderr)
    else:
        assert result.returncode != 0, result.stderr
        message = one_line(result.stderr)
        assert "MalformedPolicyDocumentException" in message
        assert "$.Statement[0].Principal.Unix[1]" in message, message
        validation = daemon.call("validate-resource-policy", "--resource-policy",
                                 document_uri(scene.policies, bad))
        assert validation["PolicyValidationPassed"] is False
        assert [error["CheckName"] for error in validation["ValidationErrors"]] == [
            "$.Statement[0].Principal.Unix[1]"]
    assert policies_in_store(scene) == before


# --- audit tampering (stops and restarts the shared daemon: keep it last) ---------------------

def _tampered(lines: list[bytes], how: str, index: int) -> list[bytes]:
    changed = list(lines)
    if how == "edit":
        record = json.loads(changed[index])
        flipped = b'"decision":"allow"' if record["decision"] == "deny" else b'"decision":"deny"'
        changed[index] = changed[index].replace(
            f'"decision":"{record["decision"]}"'.encode(), flipped)
        assert changed[index] != lines[index]
    elif how == "delete":
        del changed[index]
    elif how == "swap":
        changed[index], changed[index + 1] = changed[index + 1], changed[index]
    elif how == "rehash":
        # A careful forger edits the record and its hash: the next record names it.
        record = json.loads(changed[index])
        record["decision"] = "allow" if record["decision"] == "deny" else "deny"
        record.pop("hash")
        digest = audit.record_hash(record)
        changed[index] = audit.canonical(record)[:-1] + f',"hash":"{digest}"}}\n'.encode()
    return changed


def test_audit_verify_names_an_altered_removed_or_reordered_record(scene, tmp_path):
    alice = scene.users.alice
    pids = {cat_with_pid(alice, scene.path("prod/root", "AWSCURRENT")),
            cat_with_pid(alice, scene.path("prod/db", "AWSCURRENT")),
            cat_with_pid(alice, scene.path("web/cert", "AWSCURRENT"))}
    assert wait_for_records(scene.daemon, pids, "--uid", str(alice.pw_uid))
    scene.daemon.stop()
    try:
        source = StateDir(scene.daemon.state_dir).audit_dir
        assert scene.daemon.cli("audit", "verify", "--state-dir",
                                str(scene.daemon.state_dir)).returncode == 0
        lines = (source / audit.LOG_NAME).read_bytes().splitlines(keepends=True)
        seqs = [json.loads(line)["seq"] for line in lines]
        # A decision record in the middle (not the first, not the last two).
        index = next(i for i in range(len(lines) // 2, len(lines) - 2)
                     if "decision" in json.loads(lines[i]))
        expected = {
            "edit": (index + 1, seqs[index]),
            "delete": (index + 1, seqs[index + 1]),
            "swap": (index + 1, seqs[index + 1]),
            "rehash": (index + 2, seqs[index + 1]),
        }
        for how, (line_number, seq) in expected.items():
            copy = tmp_path / how
            shutil.copytree(source, copy / "audit")
            (copy / "audit" / audit.LOG_NAME).write_bytes(
                b"".join(_tampered(lines, how, index)))
            result = scene.daemon.cli("audit", "verify", "--state-dir", str(copy), check=False)
            assert result.returncode == 1, (how, result.stdout, result.stderr)
            message = one_line(result.stderr)
            assert f"line {line_number} (seq {seq})" in message, (how, message)
        pristine = tmp_path / "pristine"
        shutil.copytree(source, pristine / "audit")
        assert scene.daemon.cli("audit", "verify", "--state-dir", str(pristine)).returncode == 0
    finally:
        scene.daemon.start()
    assert read_as(alice, scene.path("prod/db", "AWSCURRENT")) == b"db-current"
