"""Checking AWS Signature Version 4 on a received request.

The signature is recomputed with botocore's own signer (the code every AWS SDK for
Python signs with), fed the request as received: its method, path, query, exactly
the headers the client says it signed, its body, and its own X-Amz-Date. What is
ours is only the reading of the Authorization header and the checks AWS makes
before it: the credential's scope (date, region, service), the clock skew, and the
signed headers that must be there. Errors carry AWS's codes and messages.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from secretfs import model

SERVICE = "secretsmanager"
ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = timedelta(minutes=5)  # as AWS allows
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*Signature=(?P<signature>[0-9a-f]{64})\s*")


class MissingAuthenticationTokenException(model.SecretsManagerError):
    code, status = "MissingAuthenticationTokenException", 403


class IncompleteSignatureException(model.SecretsManagerError):
    code, status = "IncompleteSignatureException", 400


class InvalidSignatureException(model.SecretsManagerError):
    code, status = "InvalidSignatureException", 400


class _Received(SigV4Auth):
    """botocore's signer, told which headers were signed rather than choosing them."""

    def __init__(self, credentials, region: str, signed: list[str]):
        super().__init__(credentials, SERVICE, region)
        self._signed = signed

    def headers_to_sign(self, request):
        chosen = HTTPHeaders()
        for name in self._signed:
            for value in request.headers.get_all(name) or ():
                chosen[name] = value
        return chosen


def verify(method: str, target: str, headers: list[tuple[str, str]], body: bytes, *,
           region: str, secret_for: Callable[[str], str | None],
           now: datetime | None = None) -> str:
    """The access key id whose secret signed this request; raises AWS's error if none did.

    `headers` are (lower-case name, value) as received; `secret_for(key_id)` is the
    secret access key of an id, or None for an id nobody issued.
    """
    received = {}
    for name, value in headers:
        received.setdefault(name, []).append(value)
    authorization = received.get("authorization", [None])[0]
    if authorization is None:
        raise MissingAuthenticationTokenException("Missing Authentication Token")
    if not authorization.startswith(ALGORITHM + " "):
        raise IncompleteSignatureException(
            f"Authorization header requires the {ALGORITHM} algorithm.")
    found = _AUTHORIZATION.fullmatch(authorization)
    if found is None:
        raise IncompleteSignatureException(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
            f"parameters. Authorization={authorization.split(' Signature=')[0]}")
    scope = found["credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise IncompleteSignatureException(
            "Credential should be scoped to a valid region, service and aws4_request: "
            f"{found['credential']}")
    key_id, day, scope_region, service, _ = scope
    signed = found["signed"].split(";")
    stamp = received.get("x-amz-date", [None])[0]
    if stamp is None:
        raise IncompleteSignatureException(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' "
            "header.")
    for needed in ("host", "x-amz-date"):
        if needed not in signed:
            raise IncompleteSignatureException(
                f"The '{needed}' header must be signed (SignedHeaders={found['signed']}).")
    try:
        when = datetime.strptime(stamp, SIGV4_TIMESTAMP).replace(tzinfo=UTC)
    except ValueError:
        raise IncompleteSignatureException(f"X-Amz-Date {stamp!r} is not a valid date.") from None
    now = now or datetime.now(UTC)
    if abs(now - when) > MAX_SKEW:
        raise InvalidSignatureException(
            f"Signature expired: {stamp} is now earlier than "
            f"{(now - MAX_SKEW).strftime(SIGV4_TIMESTAMP)} "
            f"({now.strftime(SIGV4_TIMESTAMP)} - 5 min.)" if when < now else
            f"Signature not yet current: {stamp} is still later than "
            f"{(now + MAX_SKEW).strftime(SIGV4_TIMESTAMP)} "
            f"({now.strftime(SIGV4_TIMESTAMP)} + 5 min.)")
    if day != stamp[:8]:
        raise InvalidSignatureException(
            f"Credential should be scoped to a valid date: {day} is not the date of {stamp}.")
    if service != SERVICE:
        raise InvalidSignatureException(
            f"Credential should be scoped to correct service: '{SERVICE}'.")
    if scope_region != region:
        raise InvalidSignatureException(
            f"Credential should be scoped to a valid region: '{region}'.")
    declared = received.get("x-amz-content-sha256", [None])[0]
    if declared is not None and declared != hashlib.sha256(body).hexdigest():
        raise InvalidSignatureException(
            "The X-Amz-Content-SHA256 header does not match the request body (an unsigned "
            "payload is not accepted).")
    secret = secret_for(key_id)
    if secret is None:
        raise model.UnrecognizedClientException(
            "The security token included in the request is invalid.")
    expected = _signature(method, target, received, body, signed, stamp, key_id, secret,
                          region)
    if not hmac.compare_digest(expected, found["signature"]):
        raise InvalidSignatureException(
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. Consult the service "
            "documentation for details.")
    return key_id


def claimed_key(headers) -> str | None:
    """The access key id a request's Authorization header names, checked or not."""
    for name, value in headers:
        if name == "authorization":
            found = re.search(r"Credential=([A-Z0-9]{16,128})/", value)
            return found[1] if found else None
    return None


def _signature(method: str, target: str, received: dict[str, list[str]], body: bytes,
               signed: list[str], stamp: str, key_id: str, secret: str, region: str) -> str:
    host = received.get("host", [""])[0]
    parts = urlsplit(target)
    request = AWSRequest(method=method, url=f"https://{host}{parts.path or '/'}"
                         + (f"?{parts.query}" if parts.query else ""), data=body)
    for name in signed:
        for value in received.get(name, ()):
            request.headers.add_header(name, value)
    request.context["timestamp"] = stamp
    signer = _Received(Credentials(key_id, secret), region, signed)
    canonical = signer.canonical_request(request)
    return signer.signature(signer.string_to_sign(request, canonical), request)
