"""Envelope encryption and the local key provider: round trips, binding, tampering, key file."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import datetime

import pytest

from secretfs.crypto import (
    DEFAULT_ALIAS,
    LocalKeyProvider,
    Sealed,
    plaintext_size,
    seal,
    unseal,
)
from secretfs.model import (
    DecryptionFailure,
    EncryptionFailure,
    InvalidParameterException,
    ResourceExistsException,
)

REGION, ACCOUNT = "us-east-1", "123456789012"
ARN_A = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:prod/db-AbCdEf"
ARN_B = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:prod/api-GhIjKl"
V1, V2 = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
VALUE = b'{"username":"admin","password":"correct horse battery staple"}'


@pytest.fixture
def key_path(tmp_path):
    return tmp_path / "keys.json"


@pytest.fixture
def provider(key_path):
    return LocalKeyProvider.create(key_path, region=REGION, account_id=ACCOUNT)


@pytest.fixture
def default_key(provider):
    return provider.resolve(None)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _material(key_path) -> list[bytes]:
    doc = json.loads(key_path.read_bytes())
    return [base64.b64decode(entry["KeyMaterial"]) for entry in doc["Keys"]]


def _data_key(provider, sealed: Sealed, arn: str, version_id: str) -> bytes:
    context = {"SecretARN": arn, "SecretVersionId": version_id}
    return bytes(provider.unwrap(sealed.key_id, sealed.wrapped_key, context))


# --- envelope -------------------------------------------------------------------------

@pytest.mark.parametrize("plaintext", [VALUE, b"", os.urandom(65536)],
                         ids=["json", "empty", "65536"])
def test_round_trip(provider, default_key, plaintext):
    sealed = seal(provider, default_key, plaintext, arn=ARN_A, version_id=V1)
    assert sealed.key_id == default_key
    assert plaintext_size(len(sealed.ciphertext)) == len(plaintext)
    assert unseal(provider, sealed, arn=ARN_A, version_id=V1) == plaintext


def test_each_seal_uses_a_fresh_data_key(provider, default_key):
    first = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    second = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    assert first.ciphertext != second.ciphertext
    assert first.wrapped_key != second.wrapped_key
    assert _data_key(provider, first, ARN_A, V1) != _data_key(provider, second, ARN_A, V1)


def test_ciphertext_is_not_plaintext(provider, default_key):
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    assert VALUE not in sealed.ciphertext
    assert b"correct horse" not in sealed.ciphertext


@pytest.mark.parametrize("arn, version_id", [(ARN_A, V2), (ARN_B, V1), (ARN_B, V2)])
def test_sealed_value_opens_only_for_its_arn_and_version(provider, default_key, arn,
                                                          version_id):
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    with pytest.raises(DecryptionFailure) as info:
        unseal(provider, sealed, arn=arn, version_id=version_id)
    assert arn in info.value.message and version_id in info.value.message


@pytest.mark.parametrize("other_arn, other_version", [(ARN_A, V2), (ARN_B, V1)])
def test_ciphertext_swapped_between_rows_fails(provider, default_key, other_arn, other_version):
    mine = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    other = seal(provider, default_key, b"other value", arn=other_arn, version_id=other_version)
    # The other row's ciphertext with this row's wrapped key, and the reverse.
    for ciphertext, wrapped_key in ((other.ciphertext, mine.wrapped_key),
                                    (mine.ciphertext, other.wrapped_key)):
        swapped = Sealed(ciphertext=ciphertext, wrapped_key=wrapped_key, key_id=default_key)
        with pytest.raises(DecryptionFailure):
            unseal(provider, swapped, arn=ARN_A, version_id=V1)
    # The other row's whole envelope presented as this row's.
    with pytest.raises(DecryptionFailure):
        unseal(provider, other, arn=ARN_A, version_id=V1)


@pytest.mark.parametrize("index", [0, 11, 12, len(VALUE) + 11, -1],
                         ids=["nonce-first", "nonce-last", "body-first", "body-last", "tag"])
def test_flipped_bit_in_ciphertext_fails(provider, default_key, index):
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    tampered = Sealed(_flip(sealed.ciphertext, index), sealed.wrapped_key, sealed.key_id)
    with pytest.raises(DecryptionFailure):
        unseal(provider, tampered, arn=ARN_A, version_id=V1)


@pytest.mark.parametrize("index", [0, 1, 13, -1], ids=["version", "nonce", "body", "tag"])
def test_flipped_bit_in_wrapped_key_fails(provider, default_key, index):
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    tampered = Sealed(sealed.ciphertext, _flip(sealed.wrapped_key, index), sealed.key_id)
    with pytest.raises(DecryptionFailure):
        unseal(provider, tampered, arn=ARN_A, version_id=V1)


@pytest.mark.parametrize("length", [0, 27])
def test_truncated_ciphertext_fails(provider, default_key, length):
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    truncated = Sealed(sealed.ciphertext[:length], sealed.wrapped_key, sealed.key_id)
    with pytest.raises(DecryptionFailure):
        unseal(provider, truncated, arn=ARN_A, version_id=V1)


def test_wrong_master_key_fails(provider, default_key):
    other_key = provider.create_key(alias="alias/other")["KeyId"]
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    relabelled = Sealed(sealed.ciphertext, sealed.wrapped_key, other_key)
    with pytest.raises(DecryptionFailure):
        unseal(provider, relabelled, arn=ARN_A, version_id=V1)


def test_key_file_of_another_install_fails(provider, default_key, tmp_path):
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    stranger = LocalKeyProvider.create(tmp_path / "other.json", region=REGION,
                                       account_id=ACCOUNT)
    with pytest.raises(DecryptionFailure):
        # Another install has its own default key: the id is unknown there.
        unseal(stranger, sealed, arn=ARN_A, version_id=V1)


def test_unknown_master_key_at_seal_fails(provider):
    with pytest.raises(EncryptionFailure):
        seal(provider, "00000000-0000-4000-8000-000000000000", VALUE, arn=ARN_A, version_id=V1)


def test_wrapped_key_is_bound_to_every_context_entry(provider, default_key):
    context = {"SecretARN": ARN_A, "SecretVersionId": V1}
    wrapped = provider.wrap(default_key, b"k" * 32, context)
    assert bytes(provider.unwrap(default_key, wrapped, dict(reversed(context.items())))) == \
        b"k" * 32
    for changed in ({**context, "SecretVersionId": V2}, {"SecretARN": ARN_A},
                    {**context, "Extra": ""}, {}):
        with pytest.raises(DecryptionFailure):
            provider.unwrap(default_key, wrapped, changed)


def test_failure_messages_and_reprs_carry_no_material(provider, default_key, key_path):
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    data_key = _data_key(provider, sealed, ARN_A, V1)
    secrets = [data_key, *_material(key_path)]
    texts = [repr(sealed), repr(provider), repr(provider.list_keys())]
    for arn, version_id in ((ARN_B, V1), (ARN_A, V2)):
        with pytest.raises(DecryptionFailure) as info:
            unseal(provider, sealed, arn=arn, version_id=version_id)
        texts += [str(info.value), repr(info.value), str(info.value.__cause__)]
    for text in texts:
        assert "correct horse" not in text
        for secret in secrets:
            for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]):
                assert form not in text


def test_plaintext_size():
    assert plaintext_size(28) == 0
    assert plaintext_size(28 + 65536) == 65536
    with pytest.raises(ValueError):
        plaintext_size(27)


# --- key file -------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_key_file_is_created_0600_whatever_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = tmp_path / "keys.json"
        LocalKeyProvider.create(path, region=REGION, account_id=ACCOUNT)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_create_refuses_an_existing_file(provider, key_path):
    before = key_path.read_bytes()
    with pytest.raises(FileExistsError):
        LocalKeyProvider.create(key_path, region=REGION, account_id=ACCOUNT)
    assert key_path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_load_refuses_a_file_open_to_group_or_others(provider, key_path, mode):
    os.chmod(key_path, mode)
    with pytest.raises(PermissionError) as info:
        LocalKeyProvider.load(key_path, region=REGION, account_id=ACCOUNT)
    assert str(key_path) in str(info.value) and f"{mode:04o}" in str(info.value)


def test_reload_gives_the_same_keys(provider, key_path, default_key):
    provider.create_key(alias="alias/app", description="for the app")
    provider.create_key(alias=None)
    sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=V1)
    reloaded = LocalKeyProvider.load(key_path, region=REGION, account_id=ACCOUNT)
    assert reloaded.list_keys() == provider.list_keys()
    assert reloaded.resolve("alias/app") == provider.resolve("alias/app")
    assert unseal(reloaded, sealed, arn=ARN_A, version_id=V1) == VALUE


def test_create_key_persists_atomically_and_keeps_0600(provider, key_path):
    provider.create_key(alias="alias/app")
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["keys.json"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert len(_material(key_path)) == 2


def test_key_file_never_holds_data_keys_or_values(provider, key_path, default_key):
    data_keys = []
    for version_id in (V1, V2):
        sealed = seal(provider, default_key, VALUE, arn=ARN_A, version_id=version_id)
        data_keys.append(_data_key(provider, sealed, ARN_A, version_id))
    provider.create_key(alias="alias/after")  # a rewrite after the seals
    raw = key_path.read_bytes()
    assert b"correct horse" not in raw
    for data_key in data_keys:
        assert data_key not in raw
        assert data_key.hex().encode() not in raw
        assert base64.b64encode(data_key) not in raw


def test_corrupt_key_file_is_refused_without_quoting_it(provider, key_path):
    material = base64.b64encode(_material(key_path)[0])
    key_path.write_bytes(key_path.read_bytes()[:-20])
    with pytest.raises(ValueError) as info:
        LocalKeyProvider.load(key_path, region=REGION, account_id=ACCOUNT)
    assert str(key_path) in str(info.value)
    assert material.decode() not in str(info.value) and info.value.__cause__ is None


def test_key_file_without_a_default_key_is_refused(provider, key_path):
    doc = json.loads(key_path.read_bytes())
    doc["Keys"][0]["Aliases"] = []
    key_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=DEFAULT_ALIAS):
        LocalKeyProvider.load(key_path, region=REGION, account_id=ACCOUNT)


# --- naming ---------------------------------------------------------------------------

def test_default_key(provider, default_key):
    (key,) = provider.list_keys()
    assert key["KeyId"] == default_key
    assert key["Aliases"] == [DEFAULT_ALIAS]
    assert provider.resolve(DEFAULT_ALIAS) == default_key


def test_create_key_describes_the_key(provider):
    key = provider.create_key(alias="alias/app/db_1-x", description="db")
    assert set(key) == {"KeyId", "Arn", "Aliases", "Description", "CreationDate",
                        "KeyVersion", "PreviousKeyVersions"}
    assert key["KeyVersion"] == 1 and key["PreviousKeyVersions"] == []
    assert key["Arn"] == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key['KeyId']}"
    assert key["Arn"] == provider.key_arn(key["KeyId"])
    assert key["Aliases"] == ["alias/app/db_1-x"] and key["Description"] == "db"
    assert isinstance(key["CreationDate"], datetime)
    assert key["CreationDate"].utcoffset().total_seconds() == 0
    assert provider.list_keys()[-1] == key


def test_resolve_by_every_name(provider):
    key_id = provider.create_key(alias="alias/app")["KeyId"]
    for ref in (key_id,
                f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}",
                "alias/app",
                f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/app"):
        assert provider.resolve(ref) == key_id


@pytest.mark.parametrize("ref", [
    "00000000-0000-4000-8000-000000000000",
    "alias/missing",
    f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-4000-8000-000000000000",
    f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/missing",
    f"arn:aws:kms:eu-west-1:{ACCOUNT}:alias/aws/secretsmanager",
    f"arn:aws:kms:{REGION}:999999999999:alias/aws/secretsmanager",
    f"arn:aws:kms:{REGION}:{ACCOUNT}:key/alias/aws/secretsmanager",
    "",
])
def test_resolve_unknown_key(provider, ref):
    with pytest.raises(InvalidParameterException) as info:
        provider.resolve(ref)
    assert repr(ref)[:100] in info.value.message


def test_resolve_bare_id_under_arn_prefix_is_unknown(provider, default_key):
    with pytest.raises(InvalidParameterException):
        provider.resolve(f"arn:aws:kms:{REGION}:{ACCOUNT}:{default_key}")


def test_duplicate_alias(provider):
    provider.create_key(alias="alias/app")
    with pytest.raises(ResourceExistsException):
        provider.create_key(alias="alias/app")
    assert len(provider.list_keys()) == 2


@pytest.mark.parametrize("alias", [
    "app", "alias/", "alias/bad name", "alias/é", "alias/a:b", "Alias/app",
    "alias/aws/secretsmanager", "alias/aws/mine", "alias/" + "a" * 251, 42,
])
def test_bad_alias(provider, key_path, alias):
    before = key_path.read_bytes()
    with pytest.raises(InvalidParameterException):
        provider.create_key(alias=alias)
    assert key_path.read_bytes() == before
    assert len(provider.list_keys()) == 1


def test_longest_alias(provider):
    alias = "alias/" + "a" * 250
    assert provider.resolve(provider.create_key(alias=alias)["Aliases"][0]) == \
        provider.list_keys()[-1]["KeyId"]


def test_key_without_alias_resolves_by_id(provider):
    key = provider.create_key(alias=None)
    assert key["Aliases"] == []
    assert provider.resolve(key["KeyId"]) == key["KeyId"]
