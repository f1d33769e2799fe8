"""Tier 2: the real daemon on a real FUSE mount, read with the tools a sysadmin uses.

Values are checked with `cat`, names with `ls`, `readlink` and `stat`, permissions
with throw-away users, containers with `mount --bind`, `bwrap` and `unshare`. Most
tests share one module-scoped daemon (each on its own secret names); the lifecycle,
restart and tampering tests start their own through conftest's `daemon` fixture.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from conftest import Daemon, force_unmount, run_as, serving_daemon, wait_for

import secretfs
from secretfs.api.client import Client
from secretfs.state import StateDir

pytestmark = pytest.mark.mount

EROFS_TEXT = b"Read-only file system"


# --- helpers -----------------------------------------------------------------------

def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def tool(*command: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command-line tool as root, in the C locale (stable `ls` order and messages)."""
    return subprocess.run([str(part) for part in command], input=input, capture_output=True,
                          timeout=30, env=dict(os.environ, LC_ALL="C"))


def cat(path: Path) -> bytes:
    result = tool("cat", path)
    assert result.returncode == 0, result.stderr
    return result.stdout


def ls(path: Path, *flags: str) -> list[str]:
    result = tool("ls", *flags, path)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().splitlines()


def readlink(path: Path) -> str:
    result = tool("readlink", path)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().rstrip("\n")


def stat_format(path: Path, fmt: str, *flags: str) -> str:
    result = tool("stat", *flags, "-c", fmt, path)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().rstrip("\n")


def errno_of(function, *args) -> int | None:
    try:
        function(*args)
    except OSError as error:
        return error.errno
    return None


def secret_dir(daemon: Daemon, name: str) -> Path:
    return daemon.path(*name.split("/"))


def api(daemon: Daemon) -> Client:
    """The daemon's control socket, for setup that is not itself under test."""
    return Client(StateDir(daemon.state_dir).socket)


def create(daemon: Daemon, name: str, value: str | bytes, **members) -> str:
    """Setup through the socket, where the CLI itself is not under test; the version id."""
    kind = "SecretBinary" if isinstance(value, bytes) else "SecretString"
    return api(daemon).call("CreateSecret", {"Name": name, kind: value, **members})["VersionId"]


def put(daemon: Daemon, name: str, value: str | bytes, *stages: str) -> str:
    kind = "SecretBinary" if isinstance(value, bytes) else "SecretString"
    members = {"VersionStages": list(stages)} if stages else {}
    return api(daemon).call("PutSecretValue", {"SecretId": name, kind: value,
                                               **members})["VersionId"]


def move(daemon: Daemon, name: str, label: str, version: str) -> None:
    api(daemon).call("UpdateSecretVersionStage", {"SecretId": name, "VersionStage": label,
                                                  "MoveToVersionId": version})


def as_user(user, *command: str | Path) -> subprocess.CompletedProcess:
    return run_as(user, "env", "LC_ALL=C", *(str(part) for part in command))


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    return text.rstrip("\n")


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped: either way no longer serving.

    The main thread turns zombie while the daemon's other threads may still be
    exiting (and holding /dev/fuse open): every thread must be done.
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return True
    for tid in threads:
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # that thread is done
        if state.rpartition(")")[2].split()[0] not in ("Z", "X"):
            return False
    return True


def wait_exited(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not exited(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"daemon pid {pid} still running {timeout} s after the signal")
        time.sleep(0.02)


def daemon_pids(mountpoint: Path) -> list[int]:
    result = tool("pgrep", "-f", f"secretfs.daemon --mountpoint {mountpoint}")
    return [int(pid) for pid in result.stdout.split()]


def mount_entries(path: Path) -> list[str]:
    result = tool("findmnt", "-rn", "-o", "TARGET,FSTYPE")
    return [line for line in result.stdout.decode().splitlines()
            if line.split(" ")[0] == str(path)]


@pytest.fixture(scope="module")
def mounted() -> Iterator[Daemon]:
    """One daemon shared by the tests that each work on secrets of their own."""
    with serving_daemon(prefix="secretfs-mount-test-") as running:
        yield running


# --- values through cat ----------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "hunter2",
    "p@ss wörd\twith tab and no newline",
    "ends with a newline\n",
    "{\"user\": \"app\"}\n\n",
])
def test_cat_prints_a_string_value_byte_for_byte(mounted, tmp_path, value):
    name = unique("cat") + "/db"
    source = tmp_path / "value"
    source.write_bytes(value.encode())
    mounted.call("create-secret", "--name", name, "--secret-string", f"file://{source}")
    label = secret_dir(mounted, name) / "AWSCURRENT"
    assert cat(label) == value.encode()
    assert label.read_bytes() == value.encode()


def test_cat_prints_a_binary_value_with_nul_bytes(mounted, tmp_path):
    name = unique("bin") + "/blob"
    value = b"\0" + bytes(range(256)) + b"\0\0\xff\0"
    source = tmp_path / "value"
    source.write_bytes(value)
    mounted.call("create-secret", "--name", name, "--secret-binary", f"fileb://{source}")
    label = secret_dir(mounted, name) / "AWSCURRENT"
    assert cat(label) == value
    assert stat_format(label, "%s", "-L") == str(len(value))


@pytest.mark.parametrize("kind", ["string", "binary"])
def test_a_65536_byte_value_reads_whole_and_at_any_offset(mounted, tmp_path, kind):
    name = unique("big") + "/" + kind
    if kind == "string":
        value = (b"0123456789abcdef" * 4096)[:-1] + b"\n"
        flag, uri = "--secret-string", "file://"
    else:
        value = os.urandom(65536)
        flag, uri = "--secret-binary", "fileb://"
    assert len(value) == 65536
    source = tmp_path / "value"
    source.write_bytes(value)
    mounted.call("create-secret", "--name", name, flag, f"{uri}{source}")
    label = secret_dir(mounted, name) / "AWSCURRENT"
    assert cat(label) == value
    assert stat_format(label, "%s", "-L") == "65536"
    fd = os.open(label, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 65530) == value[65530:]
        assert os.pread(fd, 10, 65536) == b""
        chunks = b"".join(iter(lambda: os.read(fd, 4000), b""))
    finally:
        os.close(fd)
    assert chunks == value


# --- names: symlinks, listings, stat -----------------------------------------------------

def test_label_is_a_relative_symlink_to_its_version(mounted):
    name = unique("link") + "/db"
    version = create(mounted, name, "v")
    label = secret_dir(mounted, name) / "AWSCURRENT"
    assert readlink(label) == f"versions/{version}"
    assert os.readlink(label) == f"versions/{version}"
    assert stat_format(label, "%F") == "symbolic link"
    assert ls(secret_dir(mounted, name) / "versions") == [version]


def test_each_open_is_audited_with_the_stages_its_version_has_then(mounted):
    """Repeated opens are answered from memory (the label's target, the version's
    stages, the caller's description); a promotion in between is seen by the very
    next readlink and open, and so in the next audit record's stages."""
    name = unique("stages") + "/db"
    directory = secret_dir(mounted, name)
    old = mounted.call("create-secret", "--name", name, "--secret-string", "one")["VersionId"]
    for _ in range(3):
        assert cat(directory / "AWSCURRENT") == b"one"
    new = mounted.call("put-secret-value", "--secret-id", name,
                       "--secret-string", "two")["VersionId"]
    assert readlink(directory / "AWSCURRENT") == f"versions/{new}"
    assert cat(directory / "AWSCURRENT") == b"two"
    assert cat(directory / "versions" / old) == b"one"

    def opens() -> list[tuple[str, list[str]]]:
        return [(r["resources"]["versionId"], r["resources"]["versionStage"])
                for r in mounted.audit_records("--secret", name)
                if r["eventName"] == "GetSecretValue" and r["eventSource"] == "fuse"]

    assert wait_for(lambda: len(opens()) == 5)
    assert opens() == [(old, ["AWSCURRENT"])] * 3 + [(new, ["AWSCURRENT"]),
                                                     (old, ["AWSPREVIOUS"])]


def test_issue_flow_pending_then_stage_move_is_visible_at_once(mounted, tmp_path):
    """The flow from the issue, with every check right after the CLI returns."""
    name = unique("issue") + "/db"
    directory = secret_dir(mounted, name)
    old = mounted.call("create-secret", "--name", name,
                       "--secret-string", "old-password")["VersionId"]
    assert cat(directory / "AWSCURRENT") == b"old-password"  # the kernel has seen it now
    source = tmp_path / "new"
    source.write_bytes(b"new-password")
    put = mounted.call("put-secret-value", "--secret-id", name,
                       "--secret-string", f"file://{source}", "--version-stages", "AWSPENDING")
    new = put["VersionId"]
    assert put["VersionStages"] == ["AWSPENDING"]
    assert ls(directory) == ["AWSCURRENT", "AWSPENDING", "keys", "versions"]
    assert cat(directory / "AWSCURRENT") == b"old-password"
    assert cat(directory / "AWSPENDING") == b"new-password"

    mounted.call("update-secret-version-stage", "--secret-id", name,
                 "--version-stage", "AWSCURRENT", "--move-to-version-id", new,
                 "--remove-from-version-id", old)

    assert readlink(directory / "AWSCURRENT") == f"versions/{new}"
    assert readlink(directory / "AWSPREVIOUS") == f"versions/{old}"
    assert cat(directory / "AWSCURRENT") == b"new-password"
    assert cat(directory / "AWSPREVIOUS") == b"old-password"
    assert ls(directory) == ["AWSCURRENT", "AWSPENDING", "AWSPREVIOUS", "keys", "versions"]
    assert ls(directory / "versions") == sorted([old, new])
    assert ls(directory / "keys") == ["AWSCURRENT", "AWSPENDING", "AWSPREVIOUS"]


def test_stat_reports_size_type_mode_and_owner(mounted):
    top = unique("stat")
    name = f"{top}/app/db"
    value = "seven!!"
    version = create(mounted, name, value)
    directory = secret_dir(mounted, name)
    fmt = "%s|%F|%a|%U|%G"
    expected_file = f"{len(value)}|regular file|400|root|root"
    assert stat_format(directory / "AWSCURRENT", fmt, "-L") == expected_file
    assert stat_format(directory / "versions" / version, fmt) == expected_file
    for path in (mounted.mountpoint, mounted.path(top), mounted.path(top, "app"), directory,
                 directory / "versions", directory / "keys"):
        assert stat_format(path, "%F|%a|%U|%G") == "directory|555|root|root", path
    assert stat_format(directory / "keys" / "AWSCURRENT", "%F|%a", "-L") == "directory|555"
    info = os.stat(directory / "AWSCURRENT")
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o400
    assert (info.st_size, info.st_uid, info.st_gid) == (len(value), 0, 0)


def test_custom_labels_are_symlinks_with_percent_encoded_names(mounted):
    name = unique("labels") + "/db"
    first = create(mounted, name, "one")
    second = put(mounted, name, "two")
    directory = secret_dir(mounted, name)
    expected = {"blue": first, "team/ops": second, ".hidden": first, "100%": second}
    for label, version in expected.items():
        move(mounted, name, label, version)
    files = {"blue": "blue", "team/ops": "team%2Fops", ".hidden": "%2Ehidden",
             "100%": "100%25"}
    labels = sorted(["AWSCURRENT", "AWSPREVIOUS", *files.values()])
    assert ls(directory) == sorted([*labels, "keys", "versions"])
    assert ls(directory / "keys") == labels
    values = {first: b"one", second: b"two"}
    for label, file_name in files.items():
        assert readlink(directory / file_name) == f"versions/{expected[label]}"
        assert cat(directory / file_name) == values[expected[label]]
    # The raw names are no path: not a hidden file, not a directory "team".
    for raw in (".hidden", "team", "100%25x"):
        assert errno_of(os.lstat, directory / raw) == errno.ENOENT
    assert ".hidden" not in ls(directory, "-a")

    mounted.call("update-secret-version-stage", "--secret-id", name,
                 "--version-stage", "team/ops", "--remove-from-version-id", second)
    assert "team%2Fops" not in ls(directory)
    assert errno_of(os.lstat, directory / "team%2Fops") == errno.ENOENT


def test_version_ids_are_percent_encoded_too(mounted):
    name = unique("tokens") + "/db"
    create(mounted, name, "first")
    token = ".starts-with-a-dot%and-a-percent.." + "0123456789"
    client = api(mounted)
    client.call("PutSecretValue", {"SecretId": name, "SecretString": "tokened",
                                   "ClientRequestToken": token})
    directory = secret_dir(mounted, name)
    encoded = "%2Estarts-with-a-dot%25and-a-percent..0123456789"
    assert readlink(directory / "AWSCURRENT") == f"versions/{encoded}"
    assert encoded in ls(directory / "versions")
    assert cat(directory / "AWSCURRENT") == b"tokened"
    assert cat(directory / "versions" / encoded) == b"tokened"
    assert errno_of(os.stat, directory / "versions" / token) == errno.ENOENT


# --- JSON key files ------------------------------------------------------------------------

def test_json_key_files_give_each_top_level_key(mounted):
    name = unique("json") + "/db"
    document = {"user": "admin", "port": 5432, "ratio": 0.5, "enabled": True, "nothing": None,
                "nested": {"a": [1, 2], "b": "x"}, "multi": "line1\nline2\n",
                "a/b": "slash", ".dot": "dot", "unicode": "pässwörd"}
    version = create(mounted, name, json.dumps(document, indent=2))
    keys = secret_dir(mounted, name) / "keys"
    assert readlink(keys / "AWSCURRENT") == f".by-version/{version}"
    expected = {"user": b"admin", "port": b"5432", "ratio": b"0.5", "enabled": b"true",
                "nothing": b"null", "nested": b'{"a":[1,2],"b":"x"}',
                "multi": b"line1\nline2\n", "a%2Fb": b"slash", "%2Edot": b"dot",
                "unicode": "pässwörd".encode()}
    assert ls(keys / "AWSCURRENT/") == sorted(expected)
    for key, data in expected.items():
        assert cat(keys / "AWSCURRENT" / key) == data, key
        assert stat_format(keys / "AWSCURRENT" / key, "%s|%F|%a") == f"{len(data)}|regular file|400"


def test_json_key_files_follow_the_label_after_a_promotion(mounted):
    name = unique("jsonmove") + "/db"
    old = create(mounted, name, json.dumps({"user": "admin", "password": "old", "gone": 1}))
    keys = secret_dir(mounted, name) / "keys"
    assert cat(keys / "AWSCURRENT" / "password") == b"old"
    new = mounted.call("put-secret-value", "--secret-id", name, "--secret-string",
                       json.dumps({"user": "admin", "password": "new"}))["VersionId"]
    assert readlink(keys / "AWSCURRENT") == f".by-version/{new}"
    assert cat(keys / "AWSCURRENT" / "password") == b"new"
    assert cat(keys / "AWSPREVIOUS" / "password") == b"old"
    assert ls(keys / "AWSCURRENT/") == ["password", "user"]
    assert errno_of(os.stat, keys / "AWSCURRENT" / "gone") == errno.ENOENT
    assert cat(keys / "AWSPREVIOUS" / "gone") == b"1"
    assert ls(keys / ".by-version") == sorted([old, new])


@pytest.mark.parametrize("value", ["not json", "[1, 2]", "\"a string\"", "{}"])
def test_a_value_that_is_not_a_json_object_has_no_key_files(mounted, value):
    name = unique("nokeys") + "/db"
    create(mounted, name, value)
    directory = secret_dir(mounted, name)
    assert ls(directory / "keys") == ["AWSCURRENT"]
    assert ls(directory / "keys" / "AWSCURRENT/") == []
    assert cat(directory / "AWSCURRENT") == value.encode()


# --- the hierarchy and deletion ------------------------------------------------------------

def test_names_are_directories_and_a_secret_may_hold_another(mounted):
    top = unique("tree")
    client = api(mounted)
    for name, value in ((f"{top}/a", "A"), (f"{top}/a/b", "AB"), (f"{top}/x/y/z", "XYZ")):
        create(mounted, name, value)
    assert top in ls(mounted.mountpoint)
    assert ls(mounted.path(top)) == ["a", "x"]
    assert ls(mounted.path(top, "a")) == ["AWSCURRENT", "b", "keys", "versions"]
    assert ls(mounted.path(top, "a", "b")) == ["AWSCURRENT", "keys", "versions"]
    assert ls(mounted.path(top, "x")) == ["y"]
    assert ls(mounted.path(top, "x", "y")) == ["z"]
    assert cat(mounted.path(top, "a", "AWSCURRENT")) == b"A"
    assert cat(mounted.path(top, "a", "b", "AWSCURRENT")) == b"AB"
    assert cat(mounted.path(top, "x", "y", "z", "AWSCURRENT")) == b"XYZ"
    assert errno_of(os.stat, mounted.path(top, "x", "AWSCURRENT")) == errno.ENOENT

    # The outer secret goes; the inner one and the directory holding it stay.
    mounted.call("delete-secret", "--secret-id", f"{top}/a", "--recovery-window-in-days", "7")
    assert ls(mounted.path(top, "a")) == ["b"]
    assert errno_of(os.stat, mounted.path(top, "a", "AWSCURRENT")) == errno.ENOENT
    assert cat(mounted.path(top, "a", "b", "AWSCURRENT")) == b"AB"
    client.call("RestoreSecret", {"SecretId": f"{top}/a"})
    assert ls(mounted.path(top, "a")) == ["AWSCURRENT", "b", "keys", "versions"]


def test_a_deleted_secret_disappears_at_once_and_restore_brings_it_back(mounted):
    top = unique("del")
    name = f"{top}/only/db"
    create(mounted, name, "doomed")
    create(mounted, f"{top}/keep", "kept")
    directory = secret_dir(mounted, name)
    # Let the kernel cache every entry on the way first.
    assert ls(mounted.path(top)) == ["keep", "only"]
    assert cat(directory / "AWSCURRENT") == b"doomed"
    assert stat_format(directory, "%F") == "directory"

    mounted.call("delete-secret", "--secret-id", name, "--recovery-window-in-days", "7")
    assert ls(mounted.path(top)) == ["keep"]
    for path in (directory / "AWSCURRENT", directory, mounted.path(top, "only")):
        assert errno_of(os.stat, path) == errno.ENOENT, path
    result = tool("stat", directory)
    assert result.returncode == 1 and b"No such file or directory" in result.stderr
    assert tool("cat", directory / "AWSCURRENT").returncode == 1

    mounted.call("restore-secret", "--secret-id", name)
    assert ls(mounted.path(top)) == ["keep", "only"]
    assert ls(directory) == ["AWSCURRENT", "keys", "versions"]
    assert cat(directory / "AWSCURRENT") == b"doomed"

    mounted.call("delete-secret", "--secret-id", name, "--force-delete-without-recovery")
    assert ls(mounted.path(top)) == ["keep"]
    assert errno_of(os.stat, directory) == errno.ENOENT
    assert errno_of(os.stat, mounted.path(top, "only")) == errno.ENOENT

    # The last secret below a top-level directory goes: so does the directory.
    assert top in ls(mounted.mountpoint)
    mounted.call("delete-secret", "--secret-id", f"{top}/keep", "--force-delete-without-recovery")
    assert top not in ls(mounted.mountpoint)
    assert errno_of(os.stat, mounted.path(top)) == errno.ENOENT


# --- containers: bind mounts, bwrap, unshare ----------------------------------------------

@pytest.fixture
def bind_mount(tmp_path) -> Iterator:
    targets: list[Path] = []

    def bind(source: Path) -> Path:
        target = tmp_path / f"bound{len(targets)}"
        target.mkdir()
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True,
                       capture_output=True)
        targets.append(target)
        return target

    yield bind
    for target in reversed(targets):
        subprocess.run(["umount", str(target)], capture_output=True)
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_bind_mounted_secret_directory_follows_promotions(mounted, bind_mount):
    name = unique("bind") + "/db"
    first = create(mounted, name, "first")
    bound = bind_mount(secret_dir(mounted, name))
    assert mount_entries(bound) == [f"{bound} fuse.secretfs"]
    assert readlink(bound / "AWSCURRENT") == f"versions/{first}"
    assert cat(bound / "AWSCURRENT") == b"first"
    second = mounted.call("put-secret-value", "--secret-id", name,
                          "--secret-string", "second")["VersionId"]
    assert readlink(bound / "AWSCURRENT") == f"versions/{second}"
    assert cat(bound / "AWSCURRENT") == b"second"
    assert cat(bound / "AWSPREVIOUS") == b"first"


def test_a_bwrap_container_reads_the_label_and_sees_a_promotion(mounted):
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is needed")
    name = unique("bwrap") + "/db"
    create(mounted, name, "in-container")
    # A tmpfs on /run keeps the host's /run untouched by the mountpoint bwrap creates.
    container = subprocess.Popen(
        ["bwrap", "--bind", "/", "/", "--tmpfs", "/run",
         "--ro-bind", str(secret_dir(mounted, name)), "/run/secret",
         "--unshare-pid", "--unshare-ipc", "--unshare-net", "--die-with-parent", "--",
         "sh", "-c", "cat /run/secret/AWSCURRENT; echo; readlink /run/secret/AWSCURRENT;"
                     " read go; cat /run/secret/AWSCURRENT; echo"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert container.stdout.readline() == b"in-container\n"
        assert container.stdout.readline().startswith(b"versions/")
        mounted.call("put-secret-value", "--secret-id", name, "--secret-string", "promoted")
        out, err = container.communicate(b"go\n", timeout=30)
    finally:
        if container.poll() is None:
            container.kill()
            container.wait()
    assert container.returncode == 0, err
    assert out == b"promoted\n"


def test_an_unshare_mount_namespace_reads_through_its_own_bind_mount(mounted, tmp_path):
    name = unique("unshare") + "/db"
    create(mounted, name, "namespaced")
    target = tmp_path / "run-secret"
    target.mkdir()
    result = tool("unshare", "-m", "--propagation", "private", "sh", "-c",
                  f"mount --bind {secret_dir(mounted, name)} {target}"
                  f" && cat {target}/AWSCURRENT")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"namespaced"
    assert not os.path.ismount(target)  # the mount lived only in the namespace


# --- fail closed until policies land -----------------------------------------------------

@pytest.fixture
def json_secret(mounted) -> tuple[str, str]:
    name = unique("closed") + "/db"
    version = create(mounted, name, json.dumps({"password": "root-only"}))
    return name, version


def test_a_non_root_user_gets_eacces_on_every_value(mounted, make_user, json_secret):
    name, version = json_secret
    directory = secret_dir(mounted, name)
    files = [directory / "AWSCURRENT", directory / "versions" / version,
             directory / "keys" / "AWSCURRENT" / "password"]
    # Root reads first, so dentries and pages are cached: the user's open must still
    # reach the daemon and be refused there.
    assert [cat(path) for path in files] == [b'{"password": "root-only"}'] * 2 + [b"root-only"]
    user = make_user()
    for path in files:
        result = as_user(user, "cat", path)
        assert result.returncode == 1, path
        assert result.stdout == b""
        assert f"cat: {path}: Permission denied".encode() in result.stderr
    # Key names are content too: listing them is a read.
    result = as_user(user, "ls", directory / "keys" / "AWSCURRENT/")
    assert result.returncode != 0 and b"Permission denied" in result.stderr


def test_access_reaches_the_daemon_test_r_is_false_for_a_user_true_for_root(
        mounted, make_user, json_secret):
    name, _ = json_secret
    directory = secret_dir(mounted, name)
    user = make_user()
    for path in (directory / "AWSCURRENT", directory / "keys" / "AWSCURRENT" / "password",
                 directory / "keys" / "AWSCURRENT"):
        assert tool("test", "-r", path).returncode == 0, path
        assert as_user(user, "test", "-r", path).returncode == 1, path
    # The key directory's mode lets everyone read (0555): only the daemon's access
    # handler can have said no.
    assert stat_format(directory / "keys" / "AWSCURRENT", "%a", "-L") == "555"
    # A secret's directory is traversable by everyone, but readable (listable) only
    # by whoever may describe or read the secret: test -r says what ls would meet.
    assert as_user(user, "test", "-r", directory).returncode == 1
    assert tool("test", "-r", directory).returncode == 0
    assert as_user(user, "test", "-x", directory).returncode == 0


def test_a_non_root_user_can_list_directories_and_resolve_names(mounted, make_user,
                                                                json_secret):
    """`ls` works for everyone. What it shows a caller is at most what root sees:
    listings may be filtered per caller (ARCHITECTURE, invariant 4), so only the
    subset is pinned here. An exact name still resolves: names are not content."""
    name, version = json_secret
    top = name.split("/")[0]
    directory = secret_dir(mounted, name)
    user = make_user()
    for path in (mounted.mountpoint, mounted.path(top)):
        result = as_user(user, "ls", path)
        assert result.returncode == 0, result.stderr
        assert set(result.stdout.decode().splitlines()) <= set(ls(path)), path
    result = as_user(user, "readlink", directory / "AWSCURRENT")
    assert result.stdout == f"versions/{version}\n".encode()
    result = as_user(user, "stat", "-L", "-c", "%s|%F|%a", directory / "AWSCURRENT")
    assert result.stdout == b"25|regular file|400\n"


def _user_python(user) -> list[str]:
    """An interpreter the user may run, importing this secretfs and its dependencies.

    The venv's interpreter may live where only root can reach (e.g. under /root); a
    system interpreter of the same version, given the same import path, runs the CLI.
    """
    package_root = str(Path(secretfs.__file__).resolve().parents[1])
    path = os.pathsep.join([package_root, *(p for p in sys.path if "-packages" in p)])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for interpreter in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin")):
        if not interpreter:
            continue
        command = ["env", f"PYTHONPATH={path}", interpreter]
        if run_as(user, *command, "-c", "import secretfs.cli").returncode == 0:
            return command
    pytest.fail(f"no {version} that uid {user.pw_uid} may run imports secretfs")


def _user_cli(user, daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    return run_as(user, *_user_python(user), "-m", "secretfs.cli", *args,
                  "--state-dir", str(daemon.state_dir))


def test_a_non_root_user_cannot_use_the_control_socket(mounted, make_user, json_secret):
    name, _ = json_secret
    user = make_user()
    result = _user_cli(user, mounted, "get-secret-value", "--secret-id", name)
    assert result.returncode != 0
    assert result.stdout == b""
    assert b"root-only" not in result.stderr


def test_a_non_root_user_denied_the_socket_gets_one_line(mounted, make_user):
    user = make_user()
    result = _user_cli(user, mounted, "list-secrets")
    assert result.returncode == 1
    assert "permission denied" in one_line(result.stderr).lower()


def test_a_non_root_user_reaching_the_socket_is_denied_by_the_service(mounted, make_user,
                                                                     json_secret):
    name, _ = json_secret
    user = make_user()
    socket_path = StateDir(mounted.state_dir).socket
    modes = mounted.state_dir.stat().st_mode, socket_path.stat().st_mode
    mounted.state_dir.chmod(0o711)
    socket_path.chmod(0o666)
    try:
        for args in (("get-secret-value", "--secret-id", name), ("list-secrets",),
                     ("create-secret", "--name", unique("intruder"), "--secret-string", "x")):
            result = _user_cli(user, mounted, *args)
            assert result.returncode == 254, result.stderr
            assert result.stdout == b""
            line = one_line(result.stderr)
            assert line.startswith("An error occurred (AccessDeniedException)"), line
            assert f"uid {user.pw_uid}" in line
    finally:
        mounted.state_dir.chmod(stat.S_IMODE(modes[0]))
        socket_path.chmod(stat.S_IMODE(modes[1]))
    assert not [s for s in mounted.call("list-secrets")["SecretList"]
                if s["Name"].startswith("intruder")]


# --- read-only -------------------------------------------------------------------------------

def test_every_write_fails_with_erofs(mounted, json_secret):
    name, version = json_secret
    directory = secret_dir(mounted, name)
    label = directory / "AWSCURRENT"
    version_file = directory / "versions" / version
    key_file = directory / "keys" / "AWSCURRENT" / "password"
    attempts = {
        "open O_WRONLY": (os.open, label, os.O_WRONLY),
        "open O_RDWR": (os.open, version_file, os.O_RDWR),
        "open O_APPEND": (os.open, key_file, os.O_WRONLY | os.O_APPEND),
        "open O_TRUNC": (os.open, label, os.O_RDONLY | os.O_TRUNC),
        "create in a secret": (os.open, directory / "new", os.O_WRONLY | os.O_CREAT, 0o600),
        "create at the root": (os.open, mounted.path("new"), os.O_WRONLY | os.O_CREAT, 0o600),
        "unlink a label": (os.unlink, label),
        "unlink a version": (os.unlink, version_file),
        "rmdir": (os.rmdir, directory / "versions"),
        "mkdir": (os.mkdir, directory / "dir"),
        "rename": (os.rename, label, directory / "renamed"),
        "symlink": (os.symlink, "versions/x", directory / "MINE"),
        "link": (os.link, version_file, directory / "hard"),
        "chmod": (os.chmod, version_file, 0o444),
        "chmod a directory": (os.chmod, directory, 0o777),
        "chown": (os.chown, version_file, 1, 1),
        "truncate": (os.truncate, version_file, 0),
        "utime": (os.utime, version_file, None),
        "setxattr": (os.setxattr, version_file, "user.note", b"x"),
        "mknod": (os.mknod, directory / "fifo", stat.S_IFIFO | 0o600),
    }
    errors = {what: errno.errorcode.get(errno_of(*call)) for what, call in attempts.items()}
    assert errors == dict.fromkeys(attempts, "EROFS")
    assert cat(label) == b'{"password": "root-only"}'
    assert ls(directory) == ["AWSCURRENT", "keys", "versions"]


def test_shell_tools_report_a_read_only_file_system_to_root_and_users(mounted, make_user,
                                                                      json_secret):
    name, _ = json_secret
    directory = secret_dir(mounted, name)
    commands = [
        ("sh", "-c", f"echo x > {directory}/AWSCURRENT"),
        ("sh", "-c", f"echo x >> {directory}/keys/AWSCURRENT/password"),
        ("touch", f"{directory}/new"),
        ("rm", "-f", f"{directory}/AWSCURRENT"),
        ("chmod", "644", f"{directory}/AWSCURRENT"),
        ("mkdir", f"{directory}/dir"),
        ("ln", "-s", "versions", f"{directory}/MINE"),
        ("mv", f"{directory}/keys", f"{directory}/moved"),
    ]
    user = make_user()
    for command in commands:
        for result in (tool(*command), as_user(user, *command)):
            assert result.returncode != 0, command
            assert EROFS_TEXT in result.stderr, (command, result.stderr)
    assert ls(directory) == ["AWSCURRENT", "keys", "versions"]


def test_mount_options(mounted):
    result = tool("findmnt", "-no", "OPTIONS,FSTYPE", mounted.mountpoint)
    assert result.returncode == 0, result.stderr
    options, fstype = result.stdout.decode().split()
    options = options.split(",")
    assert fstype == "fuse.secretfs"
    assert {"ro", "nosuid", "nodev", "noexec", "allow_other"} <= set(options)
    assert "rw" not in options
    assert "default_permissions" not in options
    assert tool("findmnt", "-no", "SOURCE", mounted.mountpoint).stdout == b"secretfs\n"


# --- daemon lifecycle (each test has a daemon of its own) ---------------------------------

def test_umount_unmounts_and_the_daemon_exits(daemon):
    create(daemon, "life/db", "v")
    pid = daemon.pid()
    result = daemon.cli("umount", str(daemon.mountpoint))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert not os.path.ismount(daemon.mountpoint)
    assert mount_entries(daemon.mountpoint) == []
    assert exited(pid), "umount returned before the daemon exited"
    assert not StateDir(daemon.state_dir).socket.exists()
    assert os.listdir(daemon.mountpoint) == []
    result = daemon.cli("list-secrets", check=False)
    assert result.returncode == 1
    assert "not running" in one_line(result.stderr)


def test_umount_of_a_busy_mount_fails_with_one_line_and_keeps_serving(daemon):
    create(daemon, "life/db", "busy")
    holder = subprocess.Popen(["sleep", "60"], cwd=daemon.path("life", "db"))
    try:
        result = daemon.cli("umount", str(daemon.mountpoint), check=False)
        assert result.returncode == 1
        line = one_line(result.stderr)
        assert line.startswith(f"can't unmount {daemon.mountpoint}: "), line
        assert "busy" in line
        assert os.path.ismount(daemon.mountpoint)
        assert cat(daemon.path("life", "db", "AWSCURRENT")) == b"busy"
    finally:
        holder.kill()
        holder.wait()
    daemon.cli("umount", str(daemon.mountpoint))
    assert not os.path.ismount(daemon.mountpoint)


def test_mount_and_umount_take_a_relative_path(daemon):
    daemon.stop()
    environment = dict(os.environ, SECRETFS_STATE_DIR=str(daemon.state_dir))
    parent, relative = daemon.mountpoint.parent, daemon.mountpoint.name
    for verb in ("mount", "umount"):
        result = subprocess.run([sys.executable, "-m", "secretfs.cli", verb, relative],
                                cwd=parent, env=environment, capture_output=True, timeout=60)
        assert (result.returncode, result.stderr) == (0, b""), verb
        if verb == "mount":
            assert os.path.ismount(daemon.mountpoint)
            pid = Daemon(daemon.state_dir, Path(relative)).pid()
            assert ls(daemon.mountpoint) == []
    assert not os.path.ismount(daemon.mountpoint)
    assert exited(pid)


def test_a_second_mount_of_the_same_state_dir_fails_with_one_line(daemon, tmp_path):
    create(daemon, "life/db", "still here")
    other = tmp_path / "other"
    other.mkdir()
    result = daemon.cli("mount", str(other), "--state-dir", str(daemon.state_dir), check=False)
    assert result.returncode == 1
    assert "already serving" in one_line(result.stderr)
    assert result.stdout == b""
    assert not os.path.ismount(other)
    for pid in daemon_pids(other):  # the refused daemon is on its way out
        wait_exited(pid)
    assert cat(daemon.path("life", "db", "AWSCURRENT")) == b"still here"


def test_mounting_over_a_live_mount_fails_with_one_line(daemon, tmp_path):
    second_state = tmp_path / "second-state"
    daemon.cli("init", "--state-dir", str(second_state))
    result = daemon.cli("mount", str(daemon.mountpoint), "--state-dir", str(second_state),
                        check=False)
    assert result.returncode == 1
    assert "already a mountpoint" in one_line(result.stderr)
    assert mount_entries(daemon.mountpoint) == [f"{daemon.mountpoint} fuse.secretfs"]
    assert daemon.call("list-secrets")["SecretList"] == []


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_mounting_on_a_bad_mountpoint_fails_cleanly(state_dir, tmp_path, kind):
    target = tmp_path / kind
    if kind == "file":
        target.write_text("not a directory")
    bad = Daemon(state_dir=state_dir, mountpoint=target)
    result = bad.cli("mount", str(target), "--state-dir", str(state_dir), check=False)
    try:
        assert result.returncode == 1
        line = one_line(result.stderr)
        assert str(target) in line
        assert ("does not exist" if kind == "missing" else "not a directory") in line
        for pid in daemon_pids(target):
            wait_exited(pid)
        assert not StateDir(state_dir).socket.exists()
        assert (kind == "file") == target.exists()
    finally:
        force_unmount(target)
    # Nothing was left holding the state directory: a good mountpoint works at once.
    good = Daemon(state_dir=state_dir, mountpoint=tmp_path / "good")
    good.mountpoint.mkdir()
    try:
        good.start()
        assert good.call("list-secrets")["SecretList"] == []
    finally:
        good.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_unmounts_cleanly(daemon, signum):
    create(daemon, "life/db", "v")
    pid = daemon.pid()
    os.kill(pid, signum)
    wait_exited(pid)
    os.stat(daemon.mountpoint)  # not a stale endpoint
    assert not os.path.ismount(daemon.mountpoint)
    assert mount_entries(daemon.mountpoint) == []
    assert not StateDir(daemon.state_dir).socket.exists()
    assert f"received {signal.Signals(signum).name}" in StateDir(daemon.state_dir).log.read_text()


@pytest.fixture
def crashed(state_dir, tmp_path) -> Iterator:
    """Mount (through the CLI, without touching the mountpoint itself), write and read
    a secret, then SIGKILL the daemon; `warm` first stats the mount's root."""
    running = Daemon(state_dir=state_dir, mountpoint=tmp_path / "secrets")
    running.mountpoint.mkdir()

    def crash(*, warm: bool) -> tuple[int, str]:
        running.cli("mount", str(running.mountpoint), "--state-dir", str(state_dir))
        version = create(running, "life/db", "survives a crash")
        assert cat(running.path("life", "db", "AWSCURRENT")) == b"survives a crash"
        if warm:
            assert ls(running.mountpoint) == ["life"]
            assert os.path.ismount(running.mountpoint)
        pid = running.pid()
        os.kill(pid, signal.SIGKILL)
        wait_exited(pid)
        return pid, version

    crash.daemon = running
    try:
        yield crash
    finally:
        running.stop()


def _assert_remounted(running: Daemon, pid: int, version: str) -> None:
    result = running.cli("mount", str(running.mountpoint), "--state-dir",
                         str(running.state_dir), check=False)
    assert result.returncode == 0, result.stderr
    assert running.pid() != pid
    assert mount_entries(running.mountpoint) == [f"{running.mountpoint} fuse.secretfs"]
    directory = running.path("life", "db")
    assert cat(directory / "AWSCURRENT") == b"survives a crash"
    assert readlink(directory / "AWSCURRENT") == f"versions/{version}"
    assert "clearing a stale mount" in StateDir(running.state_dir).log.read_text()


def test_after_sigkill_the_next_mount_clears_the_stale_mountpoint(crashed):
    pid, version = crashed(warm=False)
    running = crashed.daemon
    with pytest.raises(OSError) as stale:
        os.stat(running.mountpoint)
    assert stale.value.errno == errno.ENOTCONN, stale.value
    result = tool("ls", running.path("life"))
    assert result.returncode != 0 and b"Transport endpoint is not connected" in result.stderr
    _assert_remounted(running, pid, version)


def test_after_sigkill_the_next_mount_clears_a_mountpoint_stat_just_before(crashed):
    """The kernel still answers stat() of the dead mount's root from its attribute
    cache; the next mount must see the mount is stale all the same."""
    pid, version = crashed(warm=True)
    running = crashed.daemon
    assert stat.S_ISDIR(os.stat(running.mountpoint).st_mode)  # from the cache
    for probe in (os.listdir, os.statvfs):
        assert errno_of(probe, running.mountpoint) == errno.ENOTCONN
    _assert_remounted(running, pid, version)


@pytest.mark.parametrize("route", [
    "direct",
    "symlinked-parent",
    "symlink",
])
def test_umount_by_the_mount_path_waits_for_the_daemon_to_exit(daemon, tmp_path, route):
    """umount takes the path mount took, and returns once the daemon is gone: here a
    process keeps the lazily detached filesystem (and so the daemon) alive ~3 s."""
    daemon.stop()
    if route == "direct":
        path = daemon.mountpoint
    elif route == "symlinked-parent":
        (tmp_path / "alias").symlink_to(daemon.mountpoint.parent)
        path = tmp_path / "alias" / daemon.mountpoint.name
    else:
        path = tmp_path / "link"
        path.symlink_to(daemon.mountpoint)
    daemon.cli("mount", str(path), "--state-dir", str(daemon.state_dir))
    assert os.path.ismount(daemon.mountpoint)
    (pid,) = daemon_pids(path)
    holder = subprocess.Popen(["sleep", "3"], cwd=daemon.mountpoint)
    try:
        result = daemon.cli("umount", "--lazy", str(path), check=False)
        assert result.returncode == 0, result.stderr
        assert not os.path.ismount(daemon.mountpoint)
        assert exited(pid), "umount returned while the daemon was still running"
    finally:
        holder.kill()
        holder.wait()
        force_unmount(daemon.mountpoint)
        wait_exited(pid)


# --- restart and tampering ----------------------------------------------------------------

def _snapshot(daemon: Daemon, names: list[str]) -> dict:
    """Everything a restart must keep, as the API and the mount show it."""

    def without_access(value):
        if isinstance(value, dict):
            return {key: without_access(item) for key, item in value.items()
                    if key != "LastAccessedDate"}
        if isinstance(value, list | tuple):
            return type(value)(without_access(item) for item in value)
        return value

    client = api(daemon)
    snapshot: dict = {"keys": client.call("ListKeys", {}, extension=True)}
    for name in names:
        described = client.call("DescribeSecret", {"SecretId": name})
        versions = client.call("ListSecretVersionIds",
                               {"SecretId": name, "IncludeDeprecated": True})
        values = {version["VersionId"]: value_of(client, name, version["VersionId"])
                  for version in versions["Versions"]}
        directory = secret_dir(daemon, name)
        labels = {entry: (readlink(directory / entry), cat(directory / entry))
                  for entry in ls(directory) if entry not in ("keys", "versions")}
        contents = {version: cat(directory / "versions" / version)
                    for version in ls(directory / "versions")}
        snapshot[name] = without_access((described, versions, values, labels, contents))
    return snapshot


def value_of(client: Client, name: str, version_id: str) -> str | bytes:
    answer = client.call("GetSecretValue", {"SecretId": name, "VersionId": version_id})
    return answer.get("SecretString", answer.get("SecretBinary"))


def test_values_versions_labels_tags_and_descriptions_survive_a_restart(daemon):
    client = api(daemon)
    key = client.call("CreateKey", {"Alias": "alias/restart", "Description": "for restarts"},
                      extension=True)
    db, blob = "restart/db", "restart/blob"
    first = create(daemon, db, "v1", Description="the database", KmsKeyId="alias/restart",
                   Tags=[{"Key": "env", "Value": "prod"}, {"Key": "team", "Value": "core"}])
    pending = put(daemon, db, "v2", "AWSPENDING")
    put(daemon, db, json.dumps({"k": "v3"}))
    move(daemon, db, "blue", pending)
    put(daemon, db, "deprecated soon")
    put(daemon, db, json.dumps({"k": "v3"}))  # v1 and v3 keep no label: deprecated
    create(daemon, blob, b"\0binary\xff")
    before = _snapshot(daemon, [db, blob])
    described, versions, values, labels, _ = before[db]
    assert described["Description"] == "the database"
    assert described["KmsKeyId"] == "alias/restart"
    assert described["Tags"] == [{"Key": "env", "Value": "prod"},
                                 {"Key": "team", "Value": "core"}]
    assert sorted(labels) == ["AWSCURRENT", "AWSPENDING", "AWSPREVIOUS", "blue"]
    assert len(versions["Versions"]) == 5 and values[first] == "v1"
    assert {tuple(v["KmsKeyIds"]) for v in versions["Versions"]} == {(key["Arn"],)}

    daemon.stop()
    assert not os.path.ismount(daemon.mountpoint)
    daemon.start()

    assert _snapshot(daemon, [db, blob]) == before
    assert cat(daemon.path("restart", "db", "keys", "AWSCURRENT", "k")) == b"v3"
    assert cat(daemon.path("restart", "blob", "AWSCURRENT")) == b"\0binary\xff"


def test_a_tampered_version_fails_loudly_and_alone(daemon):
    victim, other = "tamper/victim", "tamper/other"
    old = create(daemon, victim, "victim-old-value")
    new = put(daemon, victim, "victim-new-value")
    create(daemon, other, "other-value")
    daemon.stop()
    with closing(sqlite3.connect(StateDir(daemon.state_dir).database)) as db:
        (ciphertext,) = db.execute("SELECT ciphertext FROM versions WHERE version_id = ?",
                                   (new,)).fetchone()
        flipped = bytearray(ciphertext)
        flipped[len(flipped) // 2] ^= 0x01
        with db:
            changed = db.execute("UPDATE versions SET ciphertext = ? WHERE version_id = ?",
                                 (bytes(flipped), new)).rowcount
    assert changed == 1
    daemon.start()
    pid = daemon.pid()
    directory = daemon.path("tamper", "victim")

    for path in (directory / "AWSCURRENT", directory / "versions" / new):
        result = tool("cat", path)
        assert result.returncode == 1
        assert result.stdout == b""
        assert f"cat: {path}: Input/output error".encode() in result.stderr
    assert errno_of(lambda: (directory / "AWSCURRENT").read_bytes()) == errno.EIO
    assert stat_format(directory / "AWSCURRENT", "%s", "-L") == str(len("victim-new-value"))

    result = daemon.cli("get-secret-value", "--secret-id", victim, check=False)
    assert result.returncode == 254
    assert result.stdout == b""
    line = one_line(result.stderr)
    assert line.startswith("An error occurred (DecryptionFailure) when calling the "
                           "GetSecretValue operation: ")
    assert "victim-new-value" not in line

    # Everything else still reads, and the daemon keeps serving.
    assert cat(directory / "AWSPREVIOUS") == b"victim-old-value"
    assert daemon.call("get-secret-value", "--secret-id", victim, "--version-id",
                       old)["SecretString"] == "victim-old-value"
    assert cat(daemon.path("tamper", "other", "AWSCURRENT")) == b"other-value"
    assert daemon.call("get-secret-value", "--secret-id", other)["SecretString"] == "other-value"
    create(daemon, "tamper/after", "fresh")
    assert cat(daemon.path("tamper", "after", "AWSCURRENT")) == b"fresh"
    assert daemon.pid() == pid
