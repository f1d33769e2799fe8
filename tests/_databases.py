"""Throw-away database servers for the database rotators' tests: one PostgreSQL and one
MariaDB per test session, each in a temporary directory of its own, listening on a
free port on 127.0.0.1 with password authentication, stopped and removed at the end.
The system's own database services, if any run, are never used.

Test modules load this with `pytest_plugins = ["_databases"]` and use the
`postgresql_server` and `mariadb_server` fixtures. A test makes its own users with
`server.new_user()`; credentials travel as `Login`, whose repr hides the password, so
an assertion about one never prints a secret.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pymysql
import pytest
from conftest import free_port
from psycopg import sql

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Login:
    """A username and password; compared and inspected only through methods that
    answer yes or no, so a failing assertion shows no password."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def of(cls, secret_string: str) -> Login:
        document = json.loads(secret_string)
        return cls(document["username"], document["password"])

    def matches(self, other: Login) -> bool:
        return (self.username, self.password) == (other.username, other.password)

    def has_any_of(self, characters: str) -> bool:
        return any(character in self.password for character in characters)

    def has_each_of(self, characters: str) -> bool:
        return all(character in self.password for character in characters)

    def appears_in(self, text: str) -> bool:
        return self.password in text


def _directory_of(owner: str, prefix: str) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the database servers run as their system users: the tests need root")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.chown(root, owner, owner)
    return root


def _as(user: str, *command: str, log: Path) -> None:
    with open(log, "ab") as output:
        result = subprocess.run(["runuser", "-u", user, "--", *command], stdout=output,
                                stderr=subprocess.STDOUT, timeout=120)
    if result.returncode:
        pytest.fail(f"{command[0]} failed ({result.returncode}):\n{log.read_text()[-2000:]}")


@dataclass
class Server:
    """A running server, its administrator, and the secrets that describe its users."""

    family: str  # the rotators' name: secretfs:<family>-single-user
    engine: str  # the secret's "engine"
    port: int
    admin: Login
    dbname: str
    tables: dict[str, str] = field(default_factory=dict)  # user -> the table it may read

    def secret(self, login: Login, **extra) -> str:
        """The secret AWS's templates expect for `login`."""
        return json.dumps({"engine": self.engine, "host": HOST, "port": self.port,
                           "username": login.username, "password": login.password,
                           "dbname": self.dbname, **extra})

    @staticmethod
    def login(secret_string: str) -> Login:
        return Login.of(secret_string)

    def rotator(self, scheme: str) -> str:
        return f"secretfs:{self.family}-{scheme}"

    def new_user(self, name: str | None = None, password: str | None = None) -> Login:
        """A user (of a random name unless given) and a table only it may read."""
        login = Login(name or f"app_{secrets.token_hex(4)}",
                      password or secrets.token_urlsafe(18))
        table = f"t_{secrets.token_hex(6)}"
        self.create_user(login, table)
        self.tables[login.username] = table
        return login

    def logs_in(self, login: Login) -> bool:
        try:
            self.connect(login).close()
        except (psycopg.Error, pymysql.Error):
            return False
        return True

    def reads_table_of(self, login: Login, owner: str) -> bool:
        """Whether `login` reads the table made for the user `owner`."""
        try:
            connection = self.connect(login)
        except (psycopg.Error, pymysql.Error):
            return False
        try:
            return self.count_rows(connection, self.tables[owner]) == 1
        except (psycopg.Error, pymysql.Error):
            return False
        finally:
            connection.close()

    # Each engine's own.
    def connect(self, login: Login): ...
    def create_user(self, login: Login, table: str) -> None: ...
    def set_password(self, username: str, password: str) -> None: ...
    def count_rows(self, connection, table: str) -> int: ...


class PostgreSQLServer(Server):
    def connect(self, login: Login, **options):
        return psycopg.connect(host=HOST, port=self.port, user=login.username,
                               password=login.password, dbname=self.dbname,
                               connect_timeout=5, **options)

    @contextlib.contextmanager
    def _admin(self) -> Iterator:
        with self.connect(self.admin, autocommit=True) as connection:
            yield connection

    def create_user(self, login: Login, table: str) -> None:
        role, name = sql.Identifier(login.username), sql.Identifier(table)
        with self._admin() as connection:
            connection.execute(sql.SQL("CREATE ROLE {} WITH LOGIN PASSWORD {}").format(
                role, sql.Literal(login.password)))
            connection.execute(sql.SQL("CREATE TABLE {} (x int)").format(name))
            connection.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(name))
            connection.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(name, role))

    def set_password(self, username: str, password: str) -> None:
        with self._admin() as connection:
            connection.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
                sql.Identifier(username), sql.Literal(password)))

    def count_rows(self, connection, table: str) -> int:
        return connection.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(table))).fetchone()[0]


class MariaDBServer(Server):
    def connect(self, login: Login, **options):
        return pymysql.connect(host=HOST, port=self.port, user=login.username,
                               password=login.password.encode(), database=self.dbname,
                               connect_timeout=5, ssl_disabled=True, **options)

    @contextlib.contextmanager
    def _admin(self) -> Iterator:
        connection = self.connect(self.admin, autocommit=True)
        try:
            with connection.cursor() as cursor:
                yield cursor
        finally:
            connection.close()

    def create_user(self, login: Login, table: str) -> None:
        """The table is granted through a role, the user's default one, so that a
        clone's privileges take its roles and default role as well as its grants."""
        with self._admin() as cursor:
            cursor.execute("CREATE USER %s@'%%' IDENTIFIED BY %s",
                           (login.username, login.password))
            cursor.execute(f"CREATE TABLE {table} (x int)")
            cursor.execute(f"INSERT INTO {table} VALUES (1)")
            cursor.execute(f"CREATE ROLE reader_{table}")
            cursor.execute(f"GRANT SELECT ON {table} TO reader_{table}")
            cursor.execute(f"GRANT reader_{table} TO %s@'%%'", (login.username,))
            cursor.execute(f"SET DEFAULT ROLE reader_{table} FOR %s@'%%'", (login.username,))

    def set_password(self, username: str, password: str) -> None:
        with self._admin() as cursor:
            cursor.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (username, password))

    def count_rows(self, connection, table: str) -> int:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {table}")
            return cursor.fetchone()[0]


def _postgresql_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(Path(path).parts[-3]))
    if not found:
        pytest.fail("PostgreSQL's server binaries are missing: run scripts/setup.sh")
    return Path(found[-1]).parent


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgreSQLServer]:
    """initdb and pg_ctl as the postgres user; SCRAM passwords on 127.0.0.1 only."""
    bindir = _postgresql_bin()
    root = _directory_of("postgres", "secretfs-postgresql-")
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    admin = Login("postgres", secrets.token_urlsafe(18))
    password_file = root / "password"
    password_file.write_text(admin.password)
    for path in (password_file, log):
        path.touch()
        shutil.chown(path, "postgres", "postgres")
    sockets.mkdir()
    shutil.chown(sockets, "postgres", "postgres")
    port = free_port(HOST)
    try:
        _as("postgres", str(bindir / "initdb"), "--pgdata", str(data), "--username", "postgres",
            "--pwfile", str(password_file), "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256", "--encoding=UTF8", "--no-sync", "--no-instructions",
            log=log)
        password_file.unlink()
        _as("postgres", str(bindir / "pg_ctl"), "--pgdata", str(data), "--log", str(log),
            "--wait", "--options",
            f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories={sockets}"
            " -c fsync=off -c max_connections=200", "start", log=log)
        yield PostgreSQLServer(family="postgresql", engine="postgres", port=port,
                               admin=admin, dbname="postgres")
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "--pgdata",
                        str(data), "--mode", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """mariadb-install-db and mariadbd as the mysql user; root only on the server's
    own socket, an administrator with a password on 127.0.0.1."""
    for program in ("mariadb-install-db", "mariadbd"):
        if not shutil.which(program, path=f"{os.environ.get('PATH', '')}:/usr/sbin"):
            pytest.fail(f"{program} is missing: run scripts/setup.sh")
    root = _directory_of("mysql", "secretfs-mariadb-")
    data, server_socket, log = root / "data", root / "mariadbd.sock", root / "server.log"
    port = free_port(HOST)
    process = None
    try:
        _as("root", "mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=mysql",
            "--auth-root-authentication-method=socket", "--skip-test-db", log=log)
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [shutil.which("mariadbd", path="/usr/sbin:/usr/bin"), "--no-defaults",
                 f"--datadir={data}", f"--socket={server_socket}", f"--port={port}",
                 f"--bind-address={HOST}", "--skip-networking=0", "--skip-name-resolve",
                 f"--pid-file={root / 'mariadbd.pid'}", f"--log-error={log}",
                 "--user=mysql", "--innodb-buffer-pool-size=32M", "--max-connections=200"],
                stdout=output, stderr=subprocess.STDOUT)
        admin = Login("secretfs_admin", secrets.token_urlsafe(18))
        connection = _wait_for_socket(server_socket, process, log)
        with connection.cursor() as cursor:
            cursor.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (admin.username,
                                                                    admin.password))
            cursor.execute("GRANT ALL PRIVILEGES ON *.* TO %s@'%%' WITH GRANT OPTION",
                           (admin.username,))
            cursor.execute("CREATE DATABASE apps")
        connection.close()
        yield MariaDBServer(family="mysql", engine="mariadb", port=port, admin=admin,
                            dbname="apps")
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_socket(path: Path, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            return pymysql.connect(unix_socket=str(path), user="root", autocommit=True)
        except pymysql.Error:
            time.sleep(0.1)
    pytest.fail(f"mariadbd did not start:\n{log.read_text()[-2000:]}")
