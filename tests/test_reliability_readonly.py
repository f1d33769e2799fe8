"""A state directory that turns read-only: under a running daemon, and at its start.

A file system can't be remounted read-only while a process holds files open for
writing (the daemon always does: its store, its WAL, its log), but a disk error makes
one read-only at once: ext4 mounted with errors=remount-ro, and an error triggered
through /sys/fs/ext4/<dev>/trigger_fs_error. Writes must then fail with a clear error
and change nothing, reads keep working, and once the file system is repaired and
mounted again the daemon starts on an intact store where writes work. At start, a
read-only state directory is refused with a one-line error and left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from _reliability import (
    AWSCURRENT,
    all_version_ids,
    api_client,
    api_value,
    assert_intact,
    create_secret,
    files_below,
    new_daemon,
    plaintext_in,
    put_value,
    read_file,
    stages_of,
    wait_gone,
)
from conftest import force_unmount

from secretfs import model
from secretfs.state import StateDir

pytestmark = [pytest.mark.mount, pytest.mark.reliability]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def ext4_disk(tmp_path):
    """A 64 MiB ext4 file system on a loop device that turns read-only on an error."""
    for tool in ("mkfs.ext4", "e2fsck", "losetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (e2fsprogs, util-linux) is needed")
    image, root = tmp_path / "ext4.img", tmp_path / "ext4"
    root.mkdir()
    with open(image, "wb") as file:
        file.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    _mount("-o", "loop,errors=remount-ro", str(image), str(root))
    try:
        yield image, root
    finally:
        _unmount(root)


def _trigger_error(root: Path) -> None:
    device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(root)], check=True,
                            capture_output=True, text=True).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip(f"{trigger} is missing: this kernel can't simulate a disk error")
    trigger.write_text("secretfs reliability test: a disk error\n")


def _snapshot(client, names: list[str]) -> dict:
    """What a client can observe of some secrets: versions, labels and values."""
    state = {}
    for name in names:
        versions = sorted(all_version_ids(client, name))
        state[name] = {"stages": stages_of(client, name), "values": {
            version_id: api_value(client, name, VersionId=version_id) for version_id in versions}}
    return state


def _refused(call) -> model.SecretsManagerError:
    with pytest.raises(model.SecretsManagerError) as refused:
        call()
    return refused.value


def test_a_state_dir_turning_read_only_under_the_daemon(ext4_disk, tmp_path, plaintext_watch):
    image, root = ext4_disk
    daemon = new_daemon(root, tmp_path)
    mountpoint = daemon.mountpoint
    watch = plaintext_watch
    values = {}
    try:
        daemon.start()
        client = api_client(daemon)
        for name in ("ro/plain", "ro/json"):
            tokens = [watch.token("ro") for _ in range(3)]
            values[name] = tokens if name == "ro/plain" else [
                json.dumps({"password": token}) for token in tokens]
            create_secret(client, name, values[name][0])
            put_value(client, name, values[name][1], stages=["BLUE"])
            put_value(client, name, values[name][2])
        # Read some before the error (their pages cached), leave others for after.
        assert read_file(daemon.path("ro", "plain", AWSCURRENT)) == values["ro/plain"][2].encode()
        before = _snapshot(client, list(values))
        pid = daemon.pid()
        # Acknowledged and then synced: a disk error afterwards must not lose it. (What
        # isn't synced yet is what an OS crash may lose: see SqliteStore's PRAGMAs.)
        os.sync()

        _trigger_error(root)

        # Writes fail with a clear error, and change nothing.
        holders = {label: vid for vid, stages in before["ro/plain"]["stages"].items()
                   for label in stages}
        for call in (
                lambda: put_value(client, "ro/plain", watch.token("ro")),
                lambda: create_secret(client, "ro/new", watch.token("ro")),
                lambda: client.call("UpdateSecretVersionStage", {
                    "SecretId": "ro/plain", "VersionStage": "BLUE",
                    "MoveToVersionId": holders[AWSCURRENT],
                    "RemoveFromVersionId": holders["BLUE"]}),
                lambda: client.call("DeleteSecret", {"SecretId": "ro/json"})):
            error = _refused(call)
            assert error.code == "InternalServiceError", error
            assert "read-only" in error.message, error.message
        refused = daemon.cli("put-secret-value", "--secret-id", "ro/json", "--secret-string",
                             watch.token("ro"), check=False)
        assert refused.returncode != 0
        message = refused.stderr.decode().strip()
        assert "\n" not in message and "read-only" in message, message

        # Reads keep working: the API, and the mount, files read before and never read.
        assert _snapshot(client, list(values)) == before
        assert client.call("ListSecrets", {})["SecretList"]
        for name, versions in before.items():
            directory = daemon.path(*name.split("/"))
            for version_id, value in versions["values"].items():
                assert read_file(directory / "versions" / version_id) == value
            current = next(vid for vid, stages in versions["stages"].items()
                           if AWSCURRENT in stages)
            assert read_file(directory / AWSCURRENT) == versions["values"][current]
        assert read_file(daemon.path("ro", "json", "keys", "BLUE", "password")) == json.loads(
            values["ro/json"][1])["password"].encode()
        assert daemon.pid() == pid and os.path.ismount(mountpoint)

        # Repaired and writable again: the store is intact and takes writes.
        daemon.stop()
        _unmount(root)
        checked = subprocess.run(["e2fsck", "-f", "-y", str(image)], capture_output=True)
        assert checked.returncode in (0, 1), checked.stdout  # 1: errors corrected
        _mount("-o", "loop,errors=remount-ro", str(image), str(root))
        daemon.start()
        assert_intact(daemon.state_dir)
        assert _snapshot(client, list(values)) == before
        assert "ro/new" not in [entry["Name"] for entry in client.call(
            "ListSecrets", {"IncludePlannedDeletion": True})["SecretList"]]
        after = watch.token("ro")
        put_value(client, "ro/plain", after)
        assert read_file(daemon.path("ro", "plain", AWSCURRENT)) == after.encode()
        create_secret(client, "ro/new", watch.token("ro"))
        assert plaintext_in(files_below(daemon.state_dir), watch.values) == []
    finally:
        daemon.stop()
        force_unmount(mountpoint)
    _unmount(root)
    # The whole block device: no value in any block, free or used, nor in the journal.
    assert plaintext_in([image], watch.values) == []


def test_sigterm_with_a_read_only_state_dir_still_unmounts(ext4_disk, tmp_path,
                                                          plaintext_watch):
    """systemd stops the daemon with SIGTERM: that must unmount even when the state
    directory went read-only, here with an access date waiting to be recorded."""
    _, root = ext4_disk
    daemon = new_daemon(root, tmp_path)
    value = plaintext_watch.token("ro")
    try:
        daemon.start()
        create_secret(api_client(daemon), "ro/term", value)
        os.sync()
        _trigger_error(root)
        assert read_file(daemon.path("ro", "term", AWSCURRENT)) == value.encode()
        pid = daemon.pid()
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
        assert not os.path.ismount(daemon.mountpoint), "a stale mount was left behind"
    finally:
        daemon.stop()
        force_unmount(daemon.mountpoint)


@pytest.fixture
def small_tmpfs(tmp_path):
    root = tmp_path / "tmpfs"
    root.mkdir()
    _mount("-t", "tmpfs", "-o", "size=16m,mode=0700", "secretfs-test-ro", str(root))
    try:
        yield root
    finally:
        _unmount(root)


def _fingerprint(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in files_below(directory)}


def test_a_read_only_state_dir_at_start_is_refused_and_left_as_it_was(small_tmpfs, tmp_path,
                                                                       plaintext_watch):
    daemon = new_daemon(small_tmpfs, tmp_path)
    mountpoint = daemon.mountpoint
    value = plaintext_watch.token("ro")
    try:
        daemon.start()
        version_id = create_secret(api_client(daemon), "ro/start", value)
        daemon.stop()
        _mount("-o", "remount,ro", str(small_tmpfs))
        before = _fingerprint(daemon.state_dir)

        refused = daemon.cli("mount", str(mountpoint), "--state-dir", str(daemon.state_dir),
                             check=False)
        assert refused.returncode != 0
        message = refused.stderr.decode().strip()
        assert "\n" not in message and "Read-only file system" in message, message
        assert not os.path.ismount(mountpoint)
        assert _fingerprint(daemon.state_dir) == before

        _mount("-o", "remount,rw", str(small_tmpfs))
        daemon.start()
        client = api_client(daemon)
        assert read_file(daemon.path("ro", "start", AWSCURRENT)) == value.encode()
        assert stages_of(client, "ro/start") == {version_id: [AWSCURRENT]}
        newer = plaintext_watch.token("ro")
        put_value(client, "ro/start", newer)
        assert read_file(daemon.path("ro", "start", AWSCURRENT)) == newer.encode()
        assert_intact(daemon.state_dir)
        assert plaintext_in(files_below(StateDir(daemon.state_dir).root),
                            plaintext_watch.values) == []
    finally:
        daemon.stop()
        force_unmount(mountpoint)
