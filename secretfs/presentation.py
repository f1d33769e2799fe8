"""How a secret's files look in the mount: owner, group and mode, set by its tags.

    secretfs:owner = app | 1001      owner of the secret's files (versions, JSON keys,
                                     and its rendered template if it is one)
    secretfs:group = app | 1001      their group
    secretfs:mode  = 0400 | 0440     their mode: read bits only (files are read-only)
    secretfs:owner:<key>, secretfs:group:<key>, secretfs:mode:<key>
                                     one JSON key's files, over the secret-wide tags

This is presentation only. The mount doesn't use `default_permissions`, so the
kernel never checks these bits: every open() and access(2) is still decided by the
policies, for the caller. They exist for programs that check them (ssh refuses a
key readable by others, or not owned by its user). Without a mode tag a file shows
0400, or 0444 when some policy may let a non-root caller read it.
"""

from __future__ import annotations

import functools
import grp
import pwd
import re
from dataclasses import dataclass

from secretfs.model import InvalidParameterException, file_name

OWNER, GROUP, MODE = "secretfs:owner", "secretfs:group", "secretfs:mode"
_FIELDS = (OWNER, GROUP, MODE)
_MODE_RE = re.compile(r"^[0-7]{3,4}$")
_ID_MAX = 2**32 - 2  # (uid_t)-1 means "no change" to chown


@dataclass(frozen=True, slots=True)
class Presentation:
    uid: int = 0
    gid: int = 0
    mode: int | None = None  # permission bits; None: the mount's default


def _split(tag_key: str) -> tuple[str, str | None] | None:
    """(field, JSON key or None) of a presentation tag; None for any other tag."""
    for name in _FIELDS:
        if tag_key == name:
            return name, None
        if tag_key.startswith(name + ":") and len(tag_key) > len(name) + 1:
            return name, tag_key[len(name) + 1:]
    return None


def _parse(field: str, value: str) -> int:
    """A tag's value as a uid, gid or mode; ValueError (with the reason) if it isn't one."""
    if field == MODE:
        if not _MODE_RE.match(value):
            raise ValueError("a mode is three or four octal digits (e.g. 0400)")
        mode = int(value, 8)
        if mode & ~0o444:
            raise ValueError("files are read-only: only read bits (0444) may be set, no "
                             "write, execute, setuid, setgid or sticky bits")
        return mode
    if value.isdigit():
        number = int(value)
        if number > _ID_MAX:
            raise ValueError(f"{number} is out of range")
        return number
    try:
        if field == OWNER:
            return pwd.getpwnam(value).pw_uid
        return grp.getgrnam(value).gr_gid
    except KeyError:
        kind = "user" if field == OWNER else "group"
        raise ValueError(f"no {kind} named {value!r} on this host") from None


def validate(tags: list[tuple[str, str]]) -> None:
    """Refuse presentation tags that name no user or group, or a mode that isn't read-only."""
    for key, value in tags:
        parsed = _split(key)
        if parsed is None:
            continue
        try:
            _parse(parsed[0], value)
        except ValueError as error:
            raise InvalidParameterException(
                f"Invalid value {value!r} for tag {key!r}: {error}.") from None


@functools.lru_cache(maxsize=4096)
def _table(tags: tuple[tuple[str, str], ...]) -> dict[str | None, dict[str, int]]:
    """Presentation tags by JSON key file name (None: secret-wide). Names resolve when a
    secret's tags are first used; a user deleted since then leaves root in its place."""
    table: dict[str | None, dict[str, int]] = {}
    for key, value in tags:
        parsed = _split(key)
        if parsed is None:
            continue
        field, json_key = parsed
        try:
            number = _parse(field, value)
        except ValueError:
            continue
        target = None if json_key is None else file_name(json_key)
        table.setdefault(target, {})[field] = number
    return table


def of(tags: tuple[tuple[str, str], ...], key_file: str | None = None) -> Presentation:
    """The presentation of a secret's whole-value files, or of one JSON key's file."""
    table = _table(tags)
    if not table:
        return Presentation()
    fields = dict(table.get(None, {}))
    if key_file is not None:
        fields.update(table.get(key_file, {}))
    return Presentation(fields.get(OWNER, 0), fields.get(GROUP, 0), fields.get(MODE))
