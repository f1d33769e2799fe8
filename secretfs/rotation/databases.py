"""The database rotators: AWS's RDS rotation templates for PostgreSQL and MySQL/MariaDB.

- `secretfs:postgresql-single-user`, `secretfs:mysql-single-user`: the user logs in with
  AWSCURRENT's password (AWSPREVIOUS's if that fails) and changes its own password to
  AWSPENDING's. Between setSecret and finishSecret the database already wants the new
  password while AWSCURRENT still holds the old one: a client that connects then fails
  and must read AWSCURRENT again.
- `secretfs:postgresql-alternating-users`, `secretfs:mysql-alternating-users`: two users,
  `<name>` and `<name>_clone`, take turns. Logged in as the master user of the secret
  that `masterarn` names, each rotation sets a new password for the user that is not
  AWSCURRENT's, creating the clone on the first rotation with the base user's
  privileges (PostgreSQL: a member of the base role; MySQL: a copy of SHOW GRANTS).
  AWSCURRENT's credentials keep working throughout, AWSPREVIOUS's until the next rotation.

The secret is AWS's JSON: engine, host, port, username, password, optional dbname, and
masterarn for alternating users. The MySQL rotators serve MariaDB too (engine "mariadb").
Every connection times out after 5 s, uses TLS when the server offers it (PostgreSQL's
sslmode=prefer) and is closed after its step. A database's error becomes a DatabaseError
naming the driver's error class, SQLSTATE or error number and the server's message,
with every password in play blanked out: what a step raises is recorded in the store
and shown by DescribeSecret.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import psycopg
import pymysql
from psycopg import sql

from secretfs.model import InvalidRequestException, ResourceNotFoundException
from secretfs.rotation.rotators import Client, finish, new_password, pending_value

CONNECT_TIMEOUT = 5  # seconds, as in AWS's templates
# AWS's templates keep these out of database passwords (they break connection URLs
# and quoting); a secret's secretfs:rotation:EXCLUDE_CHARACTERS tag overrides it.
EXCLUDE_CHARACTERS = "/@\"'\\"
CLONE_SUFFIX = "_clone"
_REQUIRED = ("engine", "host", "port", "username", "password")


class DatabaseError(RuntimeError):
    """A step could not do its work in the database; the message holds no password."""


@dataclass(frozen=True)
class Credentials:
    """One version of a database secret, validated."""

    engine: str
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    dbname: str | None = None
    masterarn: str | None = None


class PostgreSQL:
    name = "PostgreSQL"
    engines = frozenset({"postgres", "postgresql", "aurora-postgresql"})
    errors = psycopg.Error

    @staticmethod
    def username_limit(engine: str) -> tuple[int, str]:
        return 63, "bytes"  # NAMEDATALEN - 1; a longer name is silently truncated

    @staticmethod
    def username_length(name: str) -> int:
        return len(name.encode())

    @staticmethod
    def connect(login: Credentials):
        return psycopg.connect(
            host=login.host, port=login.port, user=login.username, password=login.password,
            dbname=login.dbname or "postgres", connect_timeout=CONNECT_TIMEOUT,
            sslmode="prefer", application_name="secretfs-rotation")

    @staticmethod
    def describe(error: Exception) -> str:
        state = f" [{error.sqlstate}]" if getattr(error, "sqlstate", None) else ""
        return f"{type(error).__name__}{state}: {error}"

    @staticmethod
    def ping(connection) -> None:
        connection.execute("SELECT 1")
        connection.rollback()

    def set_own_password(self, connection, login: Credentials, password: str) -> None:
        connection.execute(self._set_password("ALTER ROLE {} WITH PASSWORD {}", connection,
                                              login.username, password))
        connection.commit()

    def set_user_password(self, connection, *, base: str, user: str, password: str) -> None:
        """As AWS does: a new user is a login role and a member of `base`."""
        exists = connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                    (user,)).fetchone()
        if exists:
            connection.execute(self._set_password("ALTER ROLE {} WITH PASSWORD {}",
                                                  connection, user, password))
        else:
            connection.execute(self._set_password("CREATE ROLE {} WITH LOGIN PASSWORD {}",
                                                  connection, user, password))
            connection.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(base),
                                                                 sql.Identifier(user)))
        connection.commit()

    @staticmethod
    def _set_password(statement: str, connection, user: str, password: str) -> sql.Composed:
        # The server gets the password's verifier (SCRAM or MD5, by its
        # password_encryption), as psql's \password sends it: the plaintext stays out
        # of the server's statement log and pg_stat_activity.
        verifier = connection.pgconn.encrypt_password(password.encode(), user.encode())
        return sql.SQL(statement).format(sql.Identifier(user), sql.Literal(verifier.decode()))


class MySQL:
    name = "MySQL"
    engines = frozenset({"mysql", "mariadb", "aurora-mysql", "aurora"})
    errors = pymysql.Error
    _NO_TLS = 2026  # CR_SSL_CONNECTION_ERROR: the server offers no TLS

    @staticmethod
    def username_limit(engine: str) -> tuple[int, str]:
        return (80 if engine == "mariadb" else 32), "characters"

    @staticmethod
    def username_length(name: str) -> int:
        return len(name)

    def connect(self, login: Credentials):
        options = dict(host=login.host, port=login.port, user=login.username,
                       password=login.password.encode(), database=login.dbname,
                       connect_timeout=CONNECT_TIMEOUT, charset="utf8mb4")
        # TLS when the server offers it, like PostgreSQL's sslmode=prefer. PyMySQL 1.1
        # goes on without TLS by itself; 1.2 refuses, so ask again without.
        try:
            return pymysql.connect(**options, ssl=_UNVERIFIED_TLS)
        except pymysql.OperationalError as error:
            if error.args[:1] != (self._NO_TLS,):
                raise
        return pymysql.connect(**options, ssl_disabled=True)

    @staticmethod
    def describe(error: Exception) -> str:
        if len(error.args) == 2 and isinstance(error.args[0], int):
            return f"{type(error).__name__} ({error.args[0]}): {error.args[1]}"
        return f"{type(error).__name__}: {error}"

    @staticmethod
    def ping(connection) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    @staticmethod
    def set_own_password(connection, login: Credentials, password: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            if "mariadb" in cursor.fetchone()[0].lower():
                # MariaDB's ALTER USER takes the CREATE USER privilege, even for oneself.
                cursor.execute("SET PASSWORD = PASSWORD(%s)", (password,))
            else:
                cursor.execute("ALTER USER CURRENT_USER() IDENTIFIED BY %s", (password,))
        connection.commit()

    @staticmethod
    def set_user_password(connection, *, base: str, user: str, password: str) -> None:
        """As AWS does: `user` gets every grant of `base`, for each host `base` has."""
        with connection.cursor() as cursor:
            cursor.execute("SELECT Host FROM mysql.user WHERE User = %s", (base,))
            hosts = [row[0] for row in cursor.fetchall()]
            if not hosts:
                raise DatabaseError(f"the user {base!r} does not exist")
            cursor.execute("SELECT Host FROM mysql.user WHERE User = %s", (user,))
            existing = {row[0] for row in cursor.fetchall()}
            for host in hosts:
                if host in existing:
                    cursor.execute("ALTER USER %s@%s IDENTIFIED BY %s", (user, host, password))
                else:
                    cursor.execute("CREATE USER %s@%s IDENTIFIED BY %s", (user, host, password))
                cursor.execute("SHOW GRANTS FOR %s@%s", (base, host))
                grantee = f"{connection.escape(user)}@{connection.escape(host)}"
                for (grant,) in cursor.fetchall():
                    cursor.execute(regranted(grant, (base, host), grantee))
        connection.commit()


def _unverified_tls() -> ssl.SSLContext:
    """Encryption without verification, as sslmode=prefer: built once, since a context
    that loads the system's certificates costs about 50 ms."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_UNVERIFIED_TLS = _unverified_tls()


def regranted(statement: str, account: tuple[str, str], grantee: str) -> str:
    """A line of `SHOW GRANTS FOR account` made to grant the same to `grantee` (an
    account name already quoted). Privileges, roles, default roles and the grant or
    admin option carry over; account attributes (authentication, TLS requirements,
    resource limits) in the line's tail don't."""
    keyword = " FOR " if statement.startswith("SET DEFAULT ROLE ") else " TO "
    head, start = _split_unquoted(statement, keyword)
    user, start = _name_at(statement, start)
    host = ""
    if statement[start:start + 1] == "@":
        host, start = _name_at(statement, start + 1)
    if (user, host) != account:
        raise DatabaseError("SHOW GRANTS returned a line secretfs can't copy")
    tail = statement[start:]
    options = "".join(f" {option}" for option in ("WITH GRANT OPTION", "WITH ADMIN OPTION")
                      if option in tail)
    return f"{head}{keyword}{grantee}{options}"


_QUOTES = "`'\""


def _split_unquoted(text: str, keyword: str) -> tuple[str, int]:
    """The text before the first `keyword` outside quotes, and where what follows it starts."""
    index, quote = 0, None
    while index < len(text):
        character = text[index]
        if quote:
            if character == "\\" and quote != "`":
                index += 1
            elif character == quote:
                if text[index + 1:index + 2] == quote:
                    index += 1
                else:
                    quote = None
        elif character in _QUOTES:
            quote = character
        elif text.startswith(keyword, index):
            return text[:index], index + len(keyword)
        index += 1
    raise DatabaseError("SHOW GRANTS returned a line secretfs can't copy")


def _name_at(text: str, index: int) -> tuple[str, int]:
    """An identifier or string (quoted or bare) at `index`, unquoted, and where it ends."""
    quote = text[index:index + 1]
    if not quote or quote not in _QUOTES:
        end = index
        while end < len(text) and text[end] not in " @":
            end += 1
        return text[index:end], end
    name, index = [], index + 1
    while index < len(text):
        character = text[index]
        if character == "\\" and quote != "`":
            name.append(text[index + 1:index + 2])
            index += 2
            continue
        if character == quote:
            if text[index + 1:index + 2] != quote:
                return "".join(name), index + 1
            index += 1
        name.append(character)
        index += 1
    raise DatabaseError("SHOW GRANTS returned a line secretfs can't copy")


class DatabaseRotator:
    """One of the four database rotators: an engine, and single or alternating users."""

    def __init__(self, engine: PostgreSQL | MySQL, *, alternating: bool):
        self.engine = engine
        self.alternating = alternating

    def run(self, event: dict, client: Client) -> None:
        step, secret_id, token = event["Step"], event["SecretId"], event["ClientRequestToken"]
        if step == "createSecret":
            self._create(secret_id, token, client)
        elif step == "setSecret":
            self._set(secret_id, token, client)
        elif step == "testSecret":
            pending = self._pending(secret_id, token, client)
            with self._session(pending, "AWSPENDING", [pending]) as connection:
                self.engine.ping(connection)
        elif step == "finishSecret":
            finish(secret_id, token, client)
        else:
            raise ValueError(f"Unknown rotation step {step!r}.")

    # --- the steps -------------------------------------------------------------------

    def _create(self, secret_id: str, token: str, client: Client) -> None:
        if pending_value(secret_id, token, client) is not None:
            return  # filled already: a resumed rotation
        document, current = self._read(client("GetSecretValue", {"SecretId": secret_id}),
                                       "AWSCURRENT")
        if self.alternating:
            document["username"] = self._other_user(current)
        document["password"] = new_password(secret_id, client,
                                            defaults={"ExcludeCharacters": EXCLUDE_CHARACTERS})
        client("PutSecretValue", {"SecretId": secret_id, "ClientRequestToken": token,
                                  "SecretString": json.dumps(document),
                                  "VersionStages": ["AWSPENDING"]})

    def _set(self, secret_id: str, token: str, client: Client) -> None:
        pending = self._pending(secret_id, token, client)
        _, current = self._read(client("GetSecretValue", {"SecretId": secret_id}),
                                "AWSCURRENT")
        _same_server(pending, current, "AWSPENDING", "AWSCURRENT")
        if self._logs_in(pending):
            return  # set already: a resumed rotation
        if self.alternating:
            self._set_other_user(pending, current, client)
        else:
            self._set_own_password(secret_id, pending, current, client)

    def _set_own_password(self, secret_id: str, pending: Credentials, current: Credentials,
                          client: Client) -> None:
        if pending.username != current.username:
            raise ValueError(f"AWSPENDING names the user {pending.username!r}, not AWSCURRENT's "
                             f"{current.username!r}: a single-user rotation changes one user.")
        logins = [("AWSCURRENT", current)]
        previous = self._previous(secret_id, client)
        if previous is not None and previous.username == current.username:
            _same_server(previous, current, "AWSPREVIOUS", "AWSCURRENT")
            logins.append(("AWSPREVIOUS", previous))
        passwords = [pending, current, *(login for _, login in logins)]
        failures = []
        for label, login in logins:
            try:
                connection = self._connect(login, label, passwords)
            except DatabaseError as error:
                failures.append(str(error))
                continue
            with self._using(connection, login, passwords):
                self.engine.set_own_password(connection, login, pending.password)
            return
        raise DatabaseError("; ".join(failures))

    def _set_other_user(self, pending: Credentials, current: Credentials,
                        client: Client) -> None:
        if pending.username != self._other_user(current):
            raise ValueError(f"AWSPENDING names the user {pending.username!r}, neither "
                             f"AWSCURRENT's {current.username!r} nor its alternate.")
        # Only a secret whose credentials work may have the master user act for it, so
        # a secret can't be made to set the password of a user it doesn't own.
        _close(self._connect(current, "AWSCURRENT", [pending, current]))
        if not current.masterarn:
            raise ValueError("Alternating users need 'masterarn' in the secret: the ARN of "
                             "the secret holding the master user's credentials.")
        _, master = self._read(client("GetSecretValue", {"SecretId": current.masterarn}),
                               "the master secret")
        _same_server(master, current, "the master secret", "AWSCURRENT", engine=False)
        passwords = [pending, current, master]
        with self._session(master, "the master secret", passwords) as connection:
            self.engine.set_user_password(connection, base=current.username,
                                          user=pending.username, password=pending.password)

    # --- secrets ---------------------------------------------------------------------

    def _read(self, response: dict, label: str) -> tuple[dict, Credentials]:
        """A version's JSON document and its credentials, checked for this rotator."""
        try:
            document = json.loads(response.get("SecretString", ""))
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise ValueError(f"{label} is not a JSON object; a database secret holds "
                             f"{', '.join(_REQUIRED)}.")
        missing = [key for key in _REQUIRED if key not in document]
        if missing:
            raise ValueError(f"{label} lacks {', '.join(missing)}; a database secret holds "
                             f"{', '.join(_REQUIRED)}.")
        engine = document["engine"]
        if engine not in self.engine.engines:
            raise ValueError(f"{label} is for the engine {engine!r}; this rotator serves "
                             f"{', '.join(sorted(self.engine.engines))}.")
        port = document["port"]
        if isinstance(port, bool) or not (isinstance(port, int) or str(port).isdigit()):
            raise ValueError(f"{label}'s port must be a number.")
        for key in ("host", "username", "password"):
            if not isinstance(document[key], str) or (key != "password" and not document[key]):
                raise ValueError(f"{label}'s {key} must be a non-empty string.")
        for key in ("dbname", "masterarn"):
            if document.get(key) is not None and not isinstance(document[key], str):
                raise ValueError(f"{label}'s {key} must be a string.")
        return document, Credentials(engine=engine, host=document["host"], port=int(port),
                                     username=document["username"],
                                     password=document["password"],
                                     dbname=document.get("dbname"),
                                     masterarn=document.get("masterarn"))

    def _pending(self, secret_id: str, token: str, client: Client) -> Credentials:
        response = pending_value(secret_id, token, client)
        if response is None:
            raise ResourceNotFoundException("The pending version holds no value yet.")
        return self._read(response, "AWSPENDING")[1]

    def _previous(self, secret_id: str, client: Client) -> Credentials | None:
        try:
            response = client("GetSecretValue", {"SecretId": secret_id,
                                                 "VersionStage": "AWSPREVIOUS"})
        except ResourceNotFoundException:
            return None
        return self._read(response, "AWSPREVIOUS")[1]

    def _other_user(self, current: Credentials) -> str:
        """AWS's rule: `<name>` and `<name>_clone` take turns."""
        name = current.username
        if name.endswith(CLONE_SUFFIX) and name != CLONE_SUFFIX:
            return name.removesuffix(CLONE_SUFFIX)
        clone = name + CLONE_SUFFIX
        limit, unit = self.engine.username_limit(current.engine)
        if self.engine.username_length(clone) > limit:
            raise ValueError(f"Can't alternate {name!r} with {clone!r}: {current.engine} user "
                             f"names have at most {limit} {unit}.")
        return clone

    # --- the database ----------------------------------------------------------------

    def _logs_in(self, login: Credentials) -> bool:
        try:
            connection = self._connect(login, "", [login])
        except DatabaseError:
            return False
        _close(connection)
        return True

    @contextlib.contextmanager
    def _session(self, login: Credentials, label: str,
                 passwords: Iterable[Credentials]) -> Iterator:
        connection = self._connect(login, label, passwords)
        with self._using(connection, login, passwords):
            yield connection

    def _connect(self, login: Credentials, label: str, passwords: Iterable[Credentials]):
        try:
            return self.engine.connect(login)
        except self.engine.errors as error:
            raise DatabaseError(
                f"can't log in to {self.engine.name} at {login.host}:{login.port} as "
                f"{login.username!r} with {label}'s credentials: "
                f"{_blanked(self.engine.describe(error), passwords)}") from None

    @contextlib.contextmanager
    def _using(self, connection, login: Credentials, passwords: Iterable[Credentials]):
        try:
            yield connection
        except self.engine.errors as error:
            raise DatabaseError(
                f"{self.engine.name} at {login.host}:{login.port}, logged in as "
                f"{login.username!r}: {_blanked(self.engine.describe(error), passwords)}"
            ) from None
        finally:
            _close(connection)


def _close(connection) -> None:
    with contextlib.suppress(Exception):  # a broken connection is closed enough
        connection.close()


def _same_server(one: Credentials, other: Credentials, one_label: str, other_label: str,
                 *, engine: bool = True) -> None:
    """AWS's guard: a rotation never turns to another database server."""
    if (one.host, one.port) != (other.host, other.port) or (engine and
                                                            one.engine != other.engine):
        raise ValueError(f"{one_label} is for {one.engine} at {one.host}:{one.port}, "
                         f"{other_label} for {other.engine} at {other.host}:{other.port}: "
                         "a rotation stays on one server.")


def _blanked(text: str, logins: Iterable[Credentials]) -> str:
    """`text` without any of the passwords, raw or as SQL quoting writes them, on one line."""
    for login in logins:
        password = login.password
        if not password:
            continue
        for form in (password.replace("\\", "\\\\").replace("'", "\\'"),
                     password.replace("'", "''"), password):
            text = text.replace(form, "***")
    return " ".join(text.split())


_ROTATORS = {
    "secretfs:postgresql-single-user": (PostgreSQL, False),
    "secretfs:postgresql-alternating-users": (PostgreSQL, True),
    "secretfs:mysql-single-user": (MySQL, False),
    "secretfs:mysql-alternating-users": (MySQL, True),
}


def rotator_for(name: str) -> DatabaseRotator:
    try:
        engine, alternating = _ROTATORS[name]
    except KeyError:
        raise InvalidRequestException(f"{name} is not a database rotator.") from None
    return DatabaseRotator(engine(), alternating=alternating)
