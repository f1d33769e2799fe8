"""Keys derived from a passphrase, and how a passphrase reaches secretfs.

Owns the key derivation functions and their parameters, which are recorded beside what
they seal (with a fresh salt each time), so a later secretfs can raise them without
losing what was sealed before: Argon2id (RFC 9106's second recommended setting: 64 MiB,
3 passes, 4 lanes) for key files sealed under a passphrase, and scrypt (128 MiB), which
backups use. Both cost a fraction of a second per derivation, and as much memory per
guess to whoever holds the file.

A passphrase comes from a file's first line (``-``: standard input), the systemd
credential ``secretfs-passphrase`` (``LoadCredentialEncrypted=`` in the unit), or the
terminal; never from argv or the environment, where ``ps`` and /proc show it.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

ARGON2ID = {"Name": "argon2id", "Iterations": 3, "Lanes": 4, "MemoryKiB": 64 * 1024}
SCRYPT = {"Name": "scrypt", "N": 2 ** 17, "R": 8, "P": 1}
SALT_SIZE = 16
KEY_SIZE = 32
MIN_PASSPHRASE = 8
# Well under a pipe's buffer, which carries it to the daemon (see daemon.mount).
MAX_PASSPHRASE = 4096
CREDENTIAL_NAME = "secretfs-passphrase"

# Bounds on what a file may ask for: a corrupt or hostile parameter must fail with a
# message, not take the host's memory or hours of CPU.
_LIMITS = {"Iterations": (1, 64), "Lanes": (1, 64), "MemoryKiB": (8, 4 << 20),
           "N": (2, 1 << 22), "R": (1, 64), "P": (1, 64)}


class PassphraseError(ValueError):
    """No usable passphrase, or key derivation parameters that can't be used; one line."""


def new_kdf(template: dict = ARGON2ID) -> dict:
    """Derivation parameters with a fresh salt, as a file records them."""
    return {**template, "Salt": base64.b64encode(os.urandom(SALT_SIZE)).decode("ascii")}


def derive_key(passphrase: bytes, kdf: object) -> bytes:
    """The 32-byte key that ``passphrase`` gives under recorded parameters (with their
    "Salt"); PassphraseError names the parameter at fault, never a value."""
    if not isinstance(kdf, dict):
        raise PassphraseError("the key derivation parameters are not an object")
    name = kdf.get("Name")
    expected = {"argon2id": ARGON2ID, "scrypt": SCRYPT}.get(name)  # type: ignore[arg-type]
    if expected is None:
        raise PassphraseError(f"unknown key derivation {str(name)[:40]!r}")
    values = {}
    for field in expected.keys() - {"Name"}:
        value, (low, high) = kdf.get(field), _LIMITS[field]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise PassphraseError(f"the {name} parameter {field} is not a number from "
                                  f"{low} to {high}")
        values[field] = value
    try:
        salt = base64.b64decode(kdf.get("Salt", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        salt = b""
    if len(salt) < SALT_SIZE:
        raise PassphraseError(f"the {name} Salt is not base64 of at least {SALT_SIZE} bytes")
    if name == "argon2id":
        function = Argon2id(salt=salt, length=KEY_SIZE, iterations=values["Iterations"],
                            lanes=values["Lanes"], memory_cost=values["MemoryKiB"])
    else:
        if values["N"] & (values["N"] - 1):
            raise PassphraseError("the scrypt parameter N is not a power of 2")
        function = Scrypt(salt=salt, length=KEY_SIZE, n=values["N"], r=values["R"],
                          p=values["P"])
    return function.derive(bytes(passphrase))


def read_passphrase(source: str | None, *, prompt: str, confirm: bool,
                    credential: bool = False) -> bytes:
    """A passphrase: the first line of file ``source`` ('-': standard input), else (with
    ``credential``) the systemd credential secretfs-passphrase, else asked on the
    terminal (twice with ``confirm``, which also asks for MIN_PASSPHRASE characters)."""
    if source:
        try:
            data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        except OSError as error:
            raise PassphraseError(f"{source}: {error.strerror or error}") from None
        passphrase = data.split(b"\n", 1)[0].removesuffix(b"\r")
    elif credential and (path := credential_path(CREDENTIAL_NAME)) is not None:
        try:
            passphrase = path.read_bytes().split(b"\n", 1)[0].removesuffix(b"\r")
        except OSError as error:
            raise PassphraseError(f"credential {path}: {error.strerror or error}") from None
    elif sys.stdin.isatty():
        passphrase = getpass.getpass(prompt).encode()
        if confirm and getpass.getpass("Again: ").encode() != passphrase:
            raise PassphraseError("the passphrases differ")
    else:
        where = f", or the systemd credential {CREDENTIAL_NAME}" if credential else ""
        raise PassphraseError(f"give --passphrase-file{where} (there is no terminal to "
                              "ask on)")
    if not passphrase:
        raise PassphraseError("the passphrase is empty")
    if len(passphrase) > MAX_PASSPHRASE:
        raise PassphraseError(f"the passphrase is longer than {MAX_PASSPHRASE} bytes")
    if confirm and len(passphrase) < MIN_PASSPHRASE:
        raise PassphraseError(f"the passphrase needs at least {MIN_PASSPHRASE} characters")
    return passphrase


def credential_path(name: str) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/NAME`` when systemd passed the credential ``name``."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    return path if path.is_file() else None
