"""PostgreSQL databases for the store's tests, in the session's throw-away server
(`postgresql_server` of tests/_databases.py, stopped and removed at the session's
end): one role owns them, each test gets an empty database of its own, dropped
afterwards even when the test failed.

Test modules load this with `pytest_plugins = ["_postgres_store"]` and use the
`postgres_cluster` fixture; like the other plugins it is never imported.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from psycopg import sql

pytest_plugins = ["_databases"]


@dataclass
class PostgresCluster:
    server: object  # _databases.PostgreSQLServer
    role: str
    password: str = field(repr=False)
    databases: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, dbname: str, *, user: str | None = None, password: str | None = None) -> str:
        """A URL with the role's password in it, unless `password=""`."""
        password = self.password if password is None else password
        userinfo = quote(user or self.role, safe="")
        if password:
            userinfo += ":" + quote(password, safe="")
        return f"postgresql://{userinfo}@127.0.0.1:{self.port}/{dbname}"

    def admin(self):
        """A superuser's connection (autocommit) to the server's own database."""
        return self.server.connect(self.server.admin, autocommit=True)

    def create_database(self) -> str:
        """An empty UTF8 database the role owns."""
        name = f"store_{secrets.token_hex(6)}"
        with self.admin() as connection:
            connection.execute(sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8'"
                                       " TEMPLATE template0").format(
                sql.Identifier(name), sql.Identifier(self.role)))
        self.databases.append(name)
        return name

    def create_role(self, password: str) -> str:
        """Another login role, for tests of how its password travels."""
        name = f"role_{secrets.token_hex(4)}"
        with self.admin() as connection:
            connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)))
            connection.execute(sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(self.role), sql.Identifier(name)))
        return name

    def drop_databases(self) -> None:
        with self.admin() as connection:
            while self.databases:
                connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.databases.pop())))

    def data_directory(self) -> Path:
        with self.admin() as connection:
            return Path(connection.execute("SHOW data_directory").fetchone()[0])


@pytest.fixture(scope="session")
def _postgres_store_cluster(postgresql_server) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(postgresql_server, f"secretfs_{secrets.token_hex(4)}",
                              secrets.token_urlsafe(18))
    with cluster.admin() as connection:
        connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(cluster.role), sql.Literal(cluster.password)))
    yield cluster


@pytest.fixture
def postgres_cluster(_postgres_store_cluster) -> Iterator[PostgresCluster]:
    """The session's server; the databases a test creates are dropped after it."""
    yield _postgres_store_cluster
    _postgres_store_cluster.drop_databases()
