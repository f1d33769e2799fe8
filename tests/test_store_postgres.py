"""The PostgreSQL store from the outside: the URL and password as `secretfs init`
records them (the password never in config.json, the summary or the logs), clear
one-line refusals, and a daemon serving a real mount from PostgreSQL across a
restart. The store contract itself is tests/test_store.py, run on both backends."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import psycopg
import pytest
from conftest import SECRETFS, Daemon, free_port, reachable_directory

from secretfs.store import StoreError
from secretfs.store.postgres import PostgresStore, redacted, split_password

pytest_plugins = ["_postgres_store"]

# A password libpq's file format must escape (":" and "\"), and a URL must encode.
AWKWARD_PASSWORD = "p:a\\ss@w/rd%20?&"


def init(state_dir: Path, *args: str, **environment: str) -> subprocess.CompletedProcess:
    """`secretfs init` as an operator runs it, with no PG* variable but those given."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    env.update(environment)
    return subprocess.run([*SECRETFS, "init", "--state-dir", str(state_dir), *args],
                          capture_output=True, env=env, timeout=60)


def everything_written(state_dir: Path, result: subprocess.CompletedProcess) -> bytes:
    """The init's output and every file it left but the password file."""
    found = [result.stdout, result.stderr]
    for path in state_dir.rglob("*"):
        if path.is_file() and path.name != "pgpass":
            found.append(path.read_bytes())
    return b"\n".join(found)


# --- the URL -------------------------------------------------------------------------------


@pytest.mark.parametrize("url, kept, password", [
    ("postgresql://app:s3cret@db.example:5432/secrets",
     "postgresql://app@db.example:5432/secrets", "s3cret"),
    ("postgresql://app:p%3Aw%40rd%2F@db/secrets?sslmode=verify-full",
     "postgresql://app@db/secrets?sslmode=verify-full", "p:w@rd/"),
    ("postgresql://app@db/secrets?password=x%26y&sslmode=require",
     "postgresql://app@db/secrets?sslmode=require", "x&y"),
    ("postgresql://app@h1:5432,h2:5432/secrets?target_session_attrs=read-write",
     "postgresql://app@h1:5432,h2:5432/secrets?target_session_attrs=read-write", None),
    ("postgresql:///secrets?host=/run/postgresql",
     "postgresql:///secrets?host=/run/postgresql", None),
    ("postgres://[::1]:5433/secrets", "postgres://[::1]:5433/secrets", None),
])
def test_split_password_keeps_the_rest_of_the_url_as_written(url, kept, password):
    assert split_password(url) == (kept, password)
    assert redacted(url) == kept


def test_an_unparsable_url_is_refused_without_its_password():
    with pytest.raises(StoreError) as refused:
        PostgresStore("postgresql://app:s3cret%zz@db.example/secrets")
    assert "s3cret" not in str(refused.value)
    assert "postgresql://app@db.example/secrets" in str(refused.value)


def test_an_unreachable_server_is_a_store_error():
    port = free_port()
    with pytest.raises(StoreError, match=f"can't connect to the store at .*:{port}"):
        PostgresStore(f"postgresql://app:s3cret@127.0.0.1:{port}/secrets?connect_timeout=2")


# --- secretfs init --store ----------------------------------------------------------------


def test_init_moves_the_password_from_the_url_to_a_0600_password_file(
        postgres_cluster, tmp_path):
    role = postgres_cluster.create_role(AWKWARD_PASSWORD)
    dbname = postgres_cluster.create_database()
    url = postgres_cluster.url(dbname, user=role, password=AWKWARD_PASSWORD)
    state_dir = tmp_path / "state"
    result = init(state_dir, "--store", url)
    assert result.returncode == 0, result.stderr
    password_file = state_dir / "pgpass"
    recorded = (f"postgresql://{role}@127.0.0.1:{postgres_cluster.port}/{dbname}"
                f"?passfile={password_file}")
    assert json.loads(result.stdout)["Store"] == recorded
    config = json.loads((state_dir / "config.json").read_text())
    assert (config["Store"], config["StoreUrl"]) == ("postgresql", recorded)
    assert not (state_dir / "secrets.db").exists()
    assert AWKWARD_PASSWORD.encode() not in everything_written(state_dir, result)
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password_file.read_text() == "*:*:*:*:p\\:a\\\\ss@w/rd%20?&\n"
    # The recorded URL alone opens the store: libpq reads the password file.
    PostgresStore(recorded).close()


def test_init_takes_the_password_from_pgpassword(postgres_cluster, tmp_path):
    dbname = postgres_cluster.create_database()
    state_dir = tmp_path / "state"
    result = init(state_dir, "--store", postgres_cluster.url(dbname, password=""),
                  PGPASSWORD=postgres_cluster.password)
    assert result.returncode == 0, result.stderr
    config = json.loads((state_dir / "config.json").read_text())
    assert config["StoreUrl"].endswith(f"/{dbname}?passfile={state_dir / 'pgpass'}")
    assert postgres_cluster.password.encode() not in everything_written(state_dir, result)
    PostgresStore(config["StoreUrl"]).close()


def test_init_refuses_a_database_that_already_holds_a_store(postgres_cluster, tmp_path):
    url = postgres_cluster.url(postgres_cluster.create_database())
    assert init(tmp_path / "first", "--store", url).returncode == 0
    second = tmp_path / "second"
    result = init(second, "--store", url)
    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.count("\n") == 1 and "already holds a secretfs store" in message
    assert postgres_cluster.password not in message
    assert not (second / "config.json").exists() and not (second / "pgpass").exists()


def test_init_with_a_wrong_password_fails_in_one_line_without_it(postgres_cluster, tmp_path):
    url = postgres_cluster.url(postgres_cluster.create_database(), password="not-the-one")
    state_dir = tmp_path / "state"
    result = init(state_dir, "--store", url)
    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.count("\n") == 1 and "password authentication failed" in message
    assert "not-the-one" not in message
    assert not (state_dir / "pgpass").exists() and not (state_dir / "config.json").exists()


def test_init_refuses_an_unknown_store_url_before_creating_anything(tmp_path):
    result = init(tmp_path / "state", "--store", "mysql://app:s3cret@db/secrets")
    assert result.returncode == 1
    assert "not a store URL" in result.stderr.decode() and b"s3cret" not in result.stderr
    assert not (tmp_path / "state").exists()


# --- a daemon on PostgreSQL ----------------------------------------------------------------


@pytest.fixture
def pg_daemon(postgres_cluster) -> Daemon:
    """A daemon whose state directory names a fresh PostgreSQL database; unmounted and
    removed afterwards."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("mount tests need root and /dev/fuse (run through the README's test command)")
    base = reachable_directory("secretfs-pg-")
    running = Daemon(state_dir=base / "state", mountpoint=base / "secrets")
    running.mountpoint.mkdir()
    running.dbname = postgres_cluster.create_database()
    try:
        running.cli("init", "--state-dir", str(running.state_dir),
                    "--store", postgres_cluster.url(running.dbname))
        yield running
    finally:
        running.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.mount
def test_a_mount_served_from_postgresql_keeps_its_secrets_across_a_restart(
        pg_daemon, postgres_cluster):
    first, second = '{"user":"app","password":"one"}', '{"user":"app","password":"two"}'
    sources = pg_daemon.state_dir.parent
    (sources / "first.json").write_text(first)
    (sources / "second.json").write_text(second)
    pg_daemon.start()
    pg_daemon.call("create-secret", "--name", "prod/db",
                   "--secret-string", f"file://{sources / 'first.json'}")
    pg_daemon.call("put-secret-value", "--secret-id", "prod/db",
                   "--secret-string", f"file://{sources / 'second.json'}")

    def assert_served() -> None:
        secret = pg_daemon.path("prod", "db")
        assert (secret / "AWSCURRENT").read_text() == second
        assert (secret / "AWSPREVIOUS").read_text() == first
        assert (secret / "keys" / "AWSCURRENT" / "password").read_text() == "two"
        assert len(os.listdir(secret / "versions")) == 2

    assert_served()
    pg_daemon.stop()
    pg_daemon.start()
    assert_served()
    # The rows are PostgreSQL's, and no SQLite file was made.
    with psycopg.connect(postgres_cluster.url(pg_daemon.dbname)) as connection:
        assert connection.execute("SELECT name FROM secrets").fetchall() == [("prod/db",)]
        assert connection.execute("SELECT count(*) FROM versions").fetchone() == (2,)
    assert not (pg_daemon.state_dir / "secrets.db").exists()
    log = (pg_daemon.state_dir / "daemon.log").read_bytes()
    assert postgres_cluster.password.encode() not in log


def test_a_daemon_whose_database_is_gone_fails_to_start_in_one_line(pg_daemon,
                                                                     postgres_cluster):
    with postgres_cluster.admin() as admin:
        admin.execute(f'DROP DATABASE "{pg_daemon.dbname}" WITH (FORCE)')
    result = pg_daemon.cli("mount", str(pg_daemon.mountpoint), "--state-dir",
                           str(pg_daemon.state_dir), check=False)
    assert result.returncode != 0
    message = result.stderr.decode()
    assert f'database "{pg_daemon.dbname}" does not exist' in message
    assert postgres_cluster.password not in message
    assert not os.path.ismount(pg_daemon.mountpoint)
