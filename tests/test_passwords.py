"""Tier 1: GetRandomPassword through the service, every parameter and every refusal."""

from __future__ import annotations

import string

import pytest

from secretfs.model import InvalidParameterException, ValidationException
from secretfs.passwords import PUNCTUATION

pytest_plugins = ["_service_fixtures"]

CLASSES = {
    "lower": set(string.ascii_lowercase),
    "upper": set(string.ascii_uppercase),
    "digit": set(string.digits),
    "punct": set(PUNCTUATION),
    "space": {" "},
}
SAMPLES = 200


@pytest.fixture
def password(call):
    def generate(**params) -> str:
        result = call("GetRandomPassword", **params)
        assert set(result) == {"RandomPassword"}
        assert isinstance(result["RandomPassword"], str)
        return result["RandomPassword"]
    return generate


def classes_in(text: str) -> set[str]:
    return {name for name, chars in CLASSES.items() if chars & set(text)}


def test_punctuation_is_the_aws_set():
    assert set(PUNCTUATION) == set(string.punctuation)
    assert len(PUNCTUATION) == 32


def test_default_password(password):
    generated = [password() for _ in range(SAMPLES)]
    assert len(set(generated)) == SAMPLES
    for text in generated:
        assert len(text) == 32
        assert classes_in(text) == {"lower", "upper", "digit", "punct"}


@pytest.mark.parametrize("length", [1, 2, 7, 4096])
def test_length(password, length):
    assert len(password(PasswordLength=length, RequireEachIncludedType=False)) == length


def test_shortest_password_with_every_type(password):
    for _ in range(SAMPLES):
        text = password(PasswordLength=4)
        assert len(text) == 4
        assert classes_in(text) == {"lower", "upper", "digit", "punct"}
    for _ in range(SAMPLES):
        assert classes_in(password(PasswordLength=5, IncludeSpace=True)) == set(CLASSES)


def test_required_characters_are_not_at_fixed_positions(password):
    # One character of each type is drawn first; the shuffle must spread them out.
    first_types = set()
    for _ in range(SAMPLES):
        first_types |= classes_in(password(PasswordLength=4)[0])
    assert first_types == {"lower", "upper", "digit", "punct"}


@pytest.mark.parametrize(("flag", "excluded"), [
    ("ExcludeLowercase", "lower"), ("ExcludeUppercase", "upper"),
    ("ExcludeNumbers", "digit"), ("ExcludePunctuation", "punct"),
])
def test_each_exclusion(password, flag, excluded):
    for _ in range(SAMPLES // 4):
        text = password(PasswordLength=20, **{flag: True})
        assert classes_in(text) == {"lower", "upper", "digit", "punct"} - {excluded}


def test_exclude_characters(password):
    banned = "aeiouAEIOU01lI|\"'`\\ "
    for _ in range(SAMPLES // 4):
        text = password(PasswordLength=200, ExcludeCharacters=banned, IncludeSpace=True)
        assert not set(banned) & set(text)
        assert classes_in(text) == {"lower", "upper", "digit", "punct"}


def test_exclude_characters_can_empty_a_class(password):
    # With every digit excluded, digits are no longer a required type.
    for _ in range(SAMPLES // 4):
        text = password(PasswordLength=3, ExcludeCharacters=string.digits)
        assert classes_in(text) == {"lower", "upper", "punct"}


def test_include_space(password):
    texts = [password(PasswordLength=10, IncludeSpace=True) for _ in range(SAMPLES // 4)]
    assert all(" " in text for text in texts)
    assert all(" " not in password(PasswordLength=100) for _ in range(SAMPLES // 4))


def test_without_required_types_any_mix_appears(password):
    seen = set()
    for _ in range(SAMPLES):
        text = password(PasswordLength=1, RequireEachIncludedType=False)
        assert text in set().union(*(CLASSES[c] for c in ("lower", "upper", "digit", "punct")))
        seen |= classes_in(text)
    assert seen == {"lower", "upper", "digit", "punct"}


def test_a_single_remaining_class(password):
    text = password(PasswordLength=64, ExcludeUppercase=True, ExcludeNumbers=True,
                    ExcludePunctuation=True, ExcludeCharacters="abcdefghijklm")
    assert set(text) <= set("nopqrstuvwxyz")


@pytest.mark.parametrize("params", [
    {"PasswordLength": 0},
    {"PasswordLength": -1},
    {"PasswordLength": 4097},
    {"PasswordLength": "12"},
    {"PasswordLength": 12.0},
    {"ExcludeLowercase": True, "ExcludeUppercase": True, "ExcludeNumbers": True,
     "ExcludePunctuation": True},
    {"ExcludeCharacters": string.ascii_letters + string.digits + PUNCTUATION},
    {"ExcludeLowercase": True, "ExcludeUppercase": True, "ExcludeNumbers": True,
     "ExcludeCharacters": PUNCTUATION},
    {"PasswordLength": 3},
    {"PasswordLength": 4, "IncludeSpace": True},
    {"PasswordLength": 1, "ExcludeLowercase": True},
])
def test_impossible_requests_are_refused(password, params):
    with pytest.raises(InvalidParameterException):
        password(**params)


def test_unknown_parameter(password):
    with pytest.raises(ValidationException):
        password(PasswordLength=8, ExcludeSymbols=True)
