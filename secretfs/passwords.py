"""GetRandomPassword: AWS's character classes and rules, drawn from `secrets`."""

from __future__ import annotations

import secrets
import string

from secretfs.model import InvalidParameterException

PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
DEFAULT_LENGTH = 32
MAX_LENGTH = 4096


def random_password(
    *,
    PasswordLength: int = DEFAULT_LENGTH,
    ExcludeCharacters: str = "",
    ExcludeNumbers: bool = False,
    ExcludePunctuation: bool = False,
    ExcludeUppercase: bool = False,
    ExcludeLowercase: bool = False,
    IncludeSpace: bool = False,
    RequireEachIncludedType: bool = True,
) -> str:
    if not isinstance(PasswordLength, int) or not 1 <= PasswordLength <= MAX_LENGTH:
        raise InvalidParameterException(
            f"PasswordLength must be between 1 and {MAX_LENGTH}.")
    excluded = set(ExcludeCharacters or "")
    classes = [
        chars for chars, skip in (
            (string.ascii_lowercase, ExcludeLowercase),
            (string.ascii_uppercase, ExcludeUppercase),
            (string.digits, ExcludeNumbers),
            (PUNCTUATION, ExcludePunctuation),
            (" ", not IncludeSpace),
        ) if not skip
    ]
    classes = [[ch for ch in chars if ch not in excluded] for chars in classes]
    classes = [chars for chars in classes if chars]
    alphabet = [ch for chars in classes for ch in chars]
    if not alphabet:
        raise InvalidParameterException(
            "The password can't be generated: every character type is excluded.")
    if RequireEachIncludedType and PasswordLength < len(classes):
        raise InvalidParameterException(
            f"PasswordLength {PasswordLength} is too short to include each of the "
            f"{len(classes)} required character types.")
    # One character from each required class, the rest from the whole alphabet,
    # then a shuffle: uniform over positions, and no retry loop.
    required = [secrets.choice(chars) for chars in classes] if RequireEachIncludedType else []
    password = required + [
        secrets.choice(alphabet) for _ in range(PasswordLength - len(required))]
    secrets.SystemRandom().shuffle(password)
    return "".join(password)
