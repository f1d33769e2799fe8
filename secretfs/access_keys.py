"""Access keys: how a caller on the network endpoint proves who it is.

An access key is an AWS-style pair — an id (`AKSF` and 16 base32 characters, the
shape of AWS's `AKIA…`) and a 40-character secret — bound to one Unix principal,
`user:NAME` or `uid:N`. A request signed with it (Signature Version 4) is made as
that user: the same policies govern the network as the filesystem and the socket.

The secret half is shown once, at creation, and stored sealed like a secret's value
(a fresh data key wrapped by the master key, the key id bound in as context), so
the store's file never holds it in the clear. Keys handed to a rotator for one
rotation step live only in memory (identity.Sessions).
"""

from __future__ import annotations

import base64
import pwd
import re
import secrets
import threading
from datetime import datetime

from secretfs.crypto import KeyProvider
from secretfs.crypto.envelope import Sealed, encryption_context, seal, unseal
from secretfs.identity import Caller
from secretfs.model import InvalidParameterException, ResourceNotFoundException
from secretfs.store import SealedValue

ACCESS_KEY_ID = re.compile(r"AKSF[A-Z2-7]{16}")
_PRINCIPAL = re.compile(r"(user):([a-z_][a-z0-9_.-]*\$?)|(uid):(\d+)")


def new_pair() -> tuple[str, str]:
    """A fresh (access key id, secret access key)."""
    key_id = "AKSF" + base64.b32encode(secrets.token_bytes(10)).decode()
    return key_id, secrets.token_urlsafe(30)


def _context(access_key_id: str) -> dict:
    # The sealing context: the secret half opens only under its own key id.
    return {"arn": f"secretfs:access-key:{access_key_id}", "version_id": access_key_id}


def wrapping_context(access_key_id: str) -> dict[str, str]:
    """The encryption context an access key's data key is wrapped under."""
    return encryption_context(**_context(access_key_id))


def check_principal(principal) -> str:
    """A Unix user an access key may act as: `user:NAME` of an existing user, or `uid:N`."""
    if not isinstance(principal, str) or not _PRINCIPAL.fullmatch(principal):
        raise InvalidParameterException(
            f"Principal {principal!r}: an access key acts as one user, user:NAME or uid:N.")
    if principal.startswith("user:"):
        try:
            pwd.getpwnam(principal.removeprefix("user:"))
        except KeyError:
            raise InvalidParameterException(f"Principal {principal}: no such user.") from None
    return principal


def principal_caller(principal: str, *, source: str, access_key: str,
                     address: str | None) -> Caller | None:
    """The caller an access key's principal is now, or None if its user is gone."""
    kind, _, value = principal.partition(":")
    try:
        entry = pwd.getpwnam(value) if kind == "user" else pwd.getpwuid(int(value))
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if kind == "user":
            return None
        uid = gid = int(value)  # a uid without a passwd entry is still a uid
    return Caller(uid=uid, gid=gid, pid=0, source=source, access_key=access_key,
                  address=address)


# Secret halves kept open in memory, each with the stored blob it came from.
OPENED_MAX = 1024


class AccessKeys:
    def __init__(self, store, keys: KeyProvider):
        self.store = store
        self.keys = keys
        # access key id -> (stored ciphertext + wrapped key, secret half): every signed
        # request would otherwise unwrap its data key, with KMS a network round trip.
        # The row is still read at every request, so a deleted key stops working at
        # once, and a re-wrapped one (re-encrypt) is opened again.
        self._opened: dict[str, tuple[bytes, str]] = {}
        self._opened_lock = threading.Lock()  # requests are answered in several threads

    def create(self, principal: str, now: datetime) -> dict:
        principal = check_principal(principal)
        key_id, secret = new_pair()
        master = self.keys.resolve(None)
        with self.store.write() as writer:
            # Sealed inside the write, as versions are: retiring an old master-key
            # version (secretfs/rekey.py) checks in a write that nothing still uses it.
            sealed = seal(self.keys, master, secret.encode(), **_context(key_id))
            writer.put_access_key(key_id, principal, SealedValue(
                sealed.ciphertext, sealed.wrapped_key, sealed.key_id, False), now)
        return {"AccessKeyId": key_id, "SecretAccessKey": secret, "Principal": principal,
                "CreateDate": now}

    def list(self, principal: str | None = None) -> list[dict]:
        with self.store.read() as reader:
            found = reader.access_keys()
        return [{"AccessKeyId": key_id, "Principal": owner, "CreateDate": created}
                for key_id, owner, created in found if principal in (None, owner)]

    def delete(self, access_key_id) -> dict:
        if not isinstance(access_key_id, str) or not ACCESS_KEY_ID.fullmatch(access_key_id):
            raise InvalidParameterException(f"{access_key_id!r} is not an access key id.")
        with self.store.write() as writer:
            if not writer.delete_access_key(access_key_id):
                raise ResourceNotFoundException(f"No access key {access_key_id}.")
        return {"AccessKeyId": access_key_id}

    def credentials(self, access_key_id: str) -> tuple[str, str] | None:
        """(secret access key, principal) of a stored key, or None."""
        if not ACCESS_KEY_ID.fullmatch(access_key_id):
            return None
        with self.store.read() as reader:
            found = reader.access_key(access_key_id)
        if found is None:
            return None
        principal, stored = found
        blob = stored.ciphertext + stored.wrapped_key
        opened = self._opened.get(access_key_id)
        if opened is not None and opened[0] == blob:
            return opened[1], principal
        secret = unseal(self.keys, Sealed(stored.ciphertext, stored.wrapped_key, stored.key_id),
                        **_context(access_key_id)).decode()
        with self._opened_lock:
            if len(self._opened) >= OPENED_MAX:
                self._opened.pop(next(iter(self._opened)))
            self._opened[access_key_id] = (blob, secret)
        return secret, principal
