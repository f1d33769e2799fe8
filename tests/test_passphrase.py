"""The passphrase key provider: a key file whose master keys are sealed under a key
derived from a passphrase (Argon2id), given to the daemon once, at start.

Tier 1 drives LocalKeyProvider and the key derivation. Tier 2 runs `secretfs init` and
`secretfs mount` as an operator does, with --passphrase-file, on a terminal (a pty), or
from the systemd credential, on real FUSE mounts; the passphrase must never reach argv,
the daemon's environment, the key file, the store, the audit log or the daemon's log.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECRETFS, Daemon, _require_fuse, reachable_directory
from test_key_rotation import assert_same, holds, on_terminal, one_line, value

from secretfs.crypto import LocalKeyProvider, seal, unseal
from secretfs.crypto.passphrase import derive_key, new_kdf

REGION, ACCOUNT = "us-east-1", "000000000000"
ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:pass/test-AbCdEf"
V1 = "11111111-1111-4111-8111-111111111111"


def new_passphrase() -> str:
    return "correct horse " + secrets.token_hex(12)


# --- tier 1: the key file ------------------------------------------------------------

def test_a_passphrase_sealed_key_file_opens_only_with_its_passphrase(tmp_path):
    path = tmp_path / "keys.json"
    passphrase = new_passphrase().encode()
    provider = LocalKeyProvider.create(path, region=REGION, account_id=ACCOUNT,
                                       passphrase=passphrase)
    key_id = provider.resolve(None)
    first = seal(provider, key_id, b"first", arn=ARN, version_id=V1)
    provider.create_key(alias="alias/app")
    provider.rotate_key(key_id)
    doc = json.loads(path.read_text())
    assert doc["SealedBy"] == "passphrase"
    assert {name: doc["Kdf"][name] for name in ("Name", "Iterations", "Lanes", "MemoryKiB")} \
        == {"Name": "argon2id", "Iterations": 3, "Lanes": 4, "MemoryKiB": 65536}
    assert len(base64.b64decode(doc["Kdf"]["Salt"])) == 16
    entries = [doc["Keys"][0], *doc["Keys"][0]["PreviousVersions"], doc["Keys"][1]]
    assert all("KeyMaterial" not in entry and entry["SealedKeyMaterial"] for entry in entries)
    assert not holds(path, passphrase.decode()), "the key file holds the passphrase"

    opened = LocalKeyProvider.load(path, region=REGION, account_id=ACCOUNT,
                                   passphrase=passphrase)
    assert opened.status()["Kind"] == "passphrase" and opened.sealed
    assert opened.list_keys() == provider.list_keys()
    assert unseal(opened, first, arn=ARN, version_id=V1) == b"first"
    for wrong, message in ((b"not the passphrase", "the passphrase does not open key file"),
                           (None, "sealed under a passphrase, and none was given")):
        with pytest.raises(ValueError) as refused:
            LocalKeyProvider.load(path, region=REGION, account_id=ACCOUNT, passphrase=wrong)
        assert str(refused.value) == (f"{message} {path}" if wrong else
                                      f"key file {path} holds its keys {message}")
        assert refused.value.__cause__ is None


@pytest.mark.parametrize("change, problem", [
    ({"MemoryKiB": 1 << 40}, "MemoryKiB is not a number from 8 to 4194304"),
    ({"Iterations": "3"}, "Iterations is not a number"),
    ({"Name": "pbkdf2"}, "unknown key derivation 'pbkdf2'"),
    ({"Salt": "c2hvcnQ="}, "Salt is not base64 of at least 16 bytes"),
], ids=["huge-memory", "not-a-number", "unknown", "short-salt"])
def test_key_derivation_parameters_are_checked_before_use(tmp_path, change, problem):
    path = tmp_path / "keys.json"
    passphrase = new_passphrase().encode()
    LocalKeyProvider.create(path, region=REGION, account_id=ACCOUNT, passphrase=passphrase)
    doc = json.loads(path.read_text())
    doc["Kdf"].update(change)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as refused:
        LocalKeyProvider.load(path, region=REGION, account_id=ACCOUNT, passphrase=passphrase)
    assert str(refused.value).startswith(f"key file {path} is invalid: Kdf: ")
    assert problem in str(refused.value)


def test_the_derivation_is_the_recorded_one_and_salted():
    passphrase = new_passphrase().encode()
    kdf = new_kdf()
    assert derive_key(passphrase, kdf) == derive_key(passphrase, dict(kdf))
    assert derive_key(passphrase, kdf) != derive_key(passphrase, new_kdf())
    assert derive_key(passphrase, kdf) != derive_key(passphrase + b"!", kdf)


# --- tier 2: init and mount ----------------------------------------------------------

class Place:
    """A state directory and mountpoint for one passphrase daemon, and its passphrase."""

    def __init__(self, base: Path):
        self.base = base
        self.passphrase = new_passphrase()
        self.passphrase_file = base / "passphrase"
        self.passphrase_file.write_text(self.passphrase + "\n")
        self.passphrase_file.chmod(0o600)
        self.daemon = Daemon(state_dir=base / "state", mountpoint=base / "secrets",
                             extra_args=["--passphrase-file", str(self.passphrase_file)])
        self.daemon.mountpoint.mkdir()

    def init(self) -> None:
        self.daemon.cli("init", "--state-dir", str(self.daemon.state_dir), "--key-provider",
                        "passphrase", "--passphrase-file", str(self.passphrase_file))

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """The CLI with no terminal (stdin is /dev/null) and no systemd credential."""
        environment = dict(os.environ if env is None else env,
                           SECRETFS_STATE_DIR=str(self.daemon.state_dir))
        if env is None:
            environment.pop("CREDENTIALS_DIRECTORY", None)
        return subprocess.run([*SECRETFS, *args], stdin=subprocess.DEVNULL,
                              capture_output=True, env=environment, timeout=60)

    def assert_passphrase_nowhere(self) -> None:
        """Not in the daemon's argv or environment, nor in any file of the state
        directory (key file, store and WAL, audit log, daemon log), raw or in base64."""
        needles = [self.passphrase.encode(), base64.b64encode(self.passphrase.encode())]
        pid = self.daemon.pid()
        for what in ("cmdline", "environ"):
            found = any(needle in Path(f"/proc/{pid}/{what}").read_bytes()
                        for needle in needles)
            assert not found, f"the daemon's {what} holds the passphrase"
        for path in self.daemon.state_dir.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not any(needle in data for needle in needles), \
                    f"{path} holds the passphrase"


@pytest.fixture
def place() -> Iterator[Place]:
    _require_fuse()
    made = Place(reachable_directory("secretfs-passphrase-"))
    try:
        yield made
    finally:
        made.daemon.stop()
        shutil.rmtree(made.base, ignore_errors=True)


@pytest.mark.mount
def test_init_and_mount_with_a_passphrase_file(place):
    daemon = place.daemon
    place.init()
    doc = json.loads((daemon.state_dir / "keys.json").read_text())
    assert doc["SealedBy"] == "passphrase" and "KeyMaterial" not in doc["Keys"][0]
    assert json.loads((daemon.state_dir / "config.json").read_text())["KeyProvider"] == \
        "passphrase"
    daemon.start()
    secret = value("by-file")
    daemon.cli("create-secret", "--name", "app/db", "--secret-string", secret)
    assert_same(daemon.path("app", "db", "AWSCURRENT").read_bytes(), secret.encode(), "read")
    assert daemon.cli("status").stdout.decode().splitlines()[3].startswith(
        "key provider  passphrase: passphrase ")
    # Rotation under a passphrase: the new version is sealed too, and opens after a restart.
    daemon.cli("rotate-key")
    daemon.cli("re-encrypt")
    place.assert_passphrase_nowhere()
    daemon.stop()
    daemon.start()
    assert_same(daemon.path("app", "db", "AWSCURRENT").read_bytes(), secret.encode(), "again")
    place.assert_passphrase_nowhere()


def test_a_backup_carries_the_key_file_sealed_as_it_is(place):
    place.init()
    daemon = place.daemon
    backup_pass = place.base / "backup-passphrase"
    backup_pass.write_text(new_passphrase() + "\n")
    archive, restored = place.base / "backup.tar", place.base / "restored"
    daemon.cli("backup", str(archive), "--passphrase-file", str(backup_pass))
    result = daemon.cli("restore", str(archive), "--state-dir", str(restored),
                        "--passphrase-file", str(backup_pass))
    assert "(its keys need the key file's passphrase, as before)" in result.stdout.decode()
    assert (restored / "keys.json").read_bytes() == \
        (daemon.state_dir / "keys.json").read_bytes()
    assert json.loads((restored / "config.json").read_text())["KeyProvider"] == "passphrase"
    LocalKeyProvider.load(restored / "keys.json", region=REGION, account_id=ACCOUNT,
                          passphrase=place.passphrase.encode())
    assert not holds(archive, place.passphrase), "the backup holds the passphrase"


@pytest.mark.mount
def test_mount_asks_for_the_passphrase_on_a_terminal(place):
    daemon = place.daemon
    place.init()
    env = dict(os.environ, SECRETFS_STATE_DIR=str(daemon.state_dir))
    env.pop("CREDENTIALS_DIRECTORY", None)
    code, output = on_terminal([*SECRETFS, "mount", str(daemon.mountpoint)],
                               [place.passphrase], env)
    assert code == 0, output.decode(errors="replace")
    daemon.started = True
    assert output.count(b"Passphrase of ") == 1
    assert place.passphrase.encode() not in output, "the terminal echoed the passphrase"
    assert os.path.ismount(daemon.mountpoint)
    secret = value("by-terminal")
    daemon.cli("create-secret", "--name", "tty", "--secret-string", secret)
    assert_same(daemon.path("tty", "AWSCURRENT").read_bytes(), secret.encode(), "read")
    place.assert_passphrase_nowhere()


@pytest.mark.mount
def test_init_asks_twice_on_a_terminal(place):
    daemon = place.daemon
    argv = [*SECRETFS, "init", "--state-dir", str(daemon.state_dir),
            "--key-provider", "passphrase"]
    env = dict(os.environ)
    code, output = on_terminal(argv, [place.passphrase, place.passphrase + "x"], env)
    assert code == 1 and output.rstrip().endswith(b"secretfs init: the passphrases differ")
    assert not daemon.state_dir.exists()
    code, output = on_terminal(argv, ["short", "short"], env)
    assert code == 1 and b"the passphrase needs at least 8 characters" in output
    assert not daemon.state_dir.exists()
    code, output = on_terminal(argv, [place.passphrase, place.passphrase], env)
    assert code == 0, output.decode(errors="replace")
    assert place.passphrase.encode() not in output
    daemon.start()
    assert os.path.ismount(daemon.mountpoint)


@pytest.mark.mount
def test_a_wrong_or_missing_passphrase_fails_at_start_in_one_line(place):
    daemon = place.daemon
    place.init()
    keys = daemon.state_dir / "keys.json"
    before = {path: path.read_bytes() for path in (keys, daemon.state_dir / "secrets.db")}
    wrong = place.base / "wrong"
    wrong.write_text("not the passphrase\n")
    result = place.run("mount", str(daemon.mountpoint), "--passphrase-file", str(wrong))
    assert result.returncode == 1
    assert one_line(result.stderr) == f"the passphrase does not open key file {keys}"
    result = place.run("mount", str(daemon.mountpoint))
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"key file {keys} is sealed under a passphrase: give --passphrase-file, or the "
        "systemd credential secretfs-passphrase (there is no terminal to ask on)")
    result = place.run("mount", str(daemon.mountpoint), "--passphrase-file",
                       str(place.base / "missing"))
    assert one_line(result.stderr) == (f"key file {keys} is sealed under a passphrase: "
                                       f"{place.base / 'missing'}: No such file or directory")
    assert not os.path.ismount(daemon.mountpoint)
    assert {path: path.read_bytes() for path in before} == before
    assert not holds(daemon.state_dir / "daemon.log", "not the passphrase")


@pytest.mark.mount
def test_the_systemd_credential_secretfs_passphrase(place):
    daemon = place.daemon
    place.init()
    credentials = place.base / "credentials"
    credentials.mkdir(mode=0o700)
    shutil.copy(place.passphrase_file, credentials / "secretfs-passphrase")
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(credentials))
    result = place.run("mount", str(daemon.mountpoint), env=env)
    assert result.returncode == 0, result.stderr.decode()
    daemon.started = True
    daemon.cli("create-secret", "--name", "cred", "--secret-string", "from-credential")
    assert daemon.path("cred", "AWSCURRENT").read_text() == "from-credential"
    place.assert_passphrase_nowhere()


def test_passphrase_flags_belong_to_the_passphrase_provider(tmp_path):
    state = tmp_path / "state"
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(new_passphrase() + "\n")
    result = subprocess.run([*SECRETFS, "init", "--state-dir", str(state),
                             "--passphrase-file", str(passphrase_file)],
                            capture_output=True, timeout=60)
    assert result.returncode == 252 and not state.exists()
    assert one_line(result.stderr) == ("secretfs init: --passphrase-file goes with "
                                       "--key-provider passphrase")
    subprocess.run([*SECRETFS, "init", "--state-dir", str(state)], check=True,
                   capture_output=True, timeout=60)
    result = subprocess.run([*SECRETFS, "mount", str(tmp_path), "--state-dir", str(state),
                             "--passphrase-file", str(passphrase_file)],
                            capture_output=True, timeout=60)
    assert result.returncode == 1
    assert one_line(result.stderr) == (f"--passphrase-file is for the passphrase key "
                                       f"provider; {state} uses local")
