"""The AWS JSON 1.1 protocol, free of any transport.

Owns: X-Amz-Target dispatch, decoding a request body into service params
(validated against botocore's Secrets Manager model, the exact AWS contract),
encoding results and errors the way AWS does so botocore parses them. Every
Secrets Manager rule beyond the model's shapes lives in the service.

Request bodies and results carry secret values: nothing here logs them, and a
validation message never echoes the value of a sensitive or unknown member.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import math
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from secretfs import model
from secretfs.identity import Caller

if TYPE_CHECKING:
    import botocore.model

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-amz-json-1.1"
AWS_PREFIX = "secretsmanager."
EXTENSION_PREFIX = "secretfs."

# How much of a rejected value a validation message shows.
_SHOWN_VALUE_MAX = 100
_INT_BOUNDS = {"integer": 2**31, "long": 2**63}
_TYPE_NAMES = {
    "string": "a string", "integer": "an integer", "long": "an integer",
    "boolean": "a boolean", "blob": "a base64-encoded string", "list": "a list",
    "structure": "an object", "map": "an object",
}


class Service(Protocol):
    """What the protocol needs of secretfs.service.SecretsManagerService."""

    AWS_ACTIONS: frozenset[str]
    EXTENSION_ACTIONS: frozenset[str]

    def call(self, action: str, params: dict, caller: Caller) -> dict: ...


class Reply(NamedTuple):
    """An HTTP response, ready for any transport to write."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def handle(service: Service, target: str | None, body: bytes, caller: Caller) -> Reply:
    """Answer one request; never raises. Synchronous: run it off the event loop."""
    try:
        action, aws = parse_target(service, target)
        params = decode_params(action, body, aws)
        result = service.call(action, params, caller)
        return Reply(200, _headers(), encode_result(result))
    except model.SecretsManagerError as error:
        return error_reply(error)
    except Exception:
        # The traceback names the code that failed; the request and its
        # params stay out of the log because they hold secret values.
        log.exception("unexpected error answering %s", target)
        return error_reply(model.InternalServiceError())


def error_reply(error: model.SecretsManagerError) -> Reply:
    """An error as AWS JSON 1.1 sends it: botocore reads the code from `__type`."""
    body = json.dumps({"__type": error.code, "Message": error.message}).encode()
    return Reply(error.status, _headers(("X-Amzn-ErrorType", error.code)), body)


def _headers(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Content-Type", CONTENT_TYPE), ("x-amzn-RequestId", str(uuid.uuid4())), *extra]


def parse_target(service: Service, target: str | None) -> tuple[str, bool]:
    """The action an X-Amz-Target names, and whether it is an AWS action."""
    if not target:
        raise model.UnknownOperationException("The request has no X-Amz-Target header.")
    if target.startswith(AWS_PREFIX):
        action = target.removeprefix(AWS_PREFIX)
        if action in service.AWS_ACTIONS:
            return action, True
        if action in _service_model().operation_names:
            raise model.UnknownOperationException(f"secretfs does not implement {action}.")
    elif target.startswith(EXTENSION_PREFIX):
        action = target.removeprefix(EXTENSION_PREFIX)
        if action in service.EXTENSION_ACTIONS:
            return action, False
    raise model.UnknownOperationException(f"Unknown operation {target!r}.")


def decode_params(action: str, body: bytes, aws: bool = True) -> dict:
    """The params of a request body; for an AWS action, checked against the model."""
    params = _parse_json(body)
    if not aws or action not in _service_model().operation_names:
        return params
    shape = _service_model().operation_model(action).input_shape
    errors = list(_check(params, shape, "", action))
    if errors:
        count = f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} detected: "
        raise model.ValidationException(count + "; ".join(errors))
    return _decode_blobs(params, shape)


def encode_result(result: dict) -> bytes:
    """A result as JSON: timestamps as epoch seconds, blobs as base64, like AWS."""
    return json.dumps(_to_json(result), separators=(",", ":")).encode()


@functools.cache
def _service_model() -> botocore.model.ServiceModel:
    # Importing botocore and loading the model cost a few hundred milliseconds:
    # once, on first use, and never in the CLI's client, which shares the
    # constants above.
    import botocore.session

    return botocore.session.get_session().get_service_model("secretsmanager")


def _parse_json(body: bytes) -> dict:
    # An empty body is an empty input, as for AWS (curl without -d).
    if not body.strip():
        return {}
    try:
        params = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise model.SerializationException("The request body is not valid JSON.") from None
    if not isinstance(params, dict):
        raise model.SerializationException("The request body must be a JSON object.")
    return params


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# --- validation against the model's shapes -------------------------------------

def _check(value: Any, shape: botocore.model.Shape, path: str, action: str) -> Iterator[str]:
    """AWS-style messages for every way `value` breaks `shape` (value is not None)."""
    kind = shape.type_name
    if not _has_type(value, kind):
        yield _violation(value, shape, path, f"Member must be {_TYPE_NAMES.get(kind, kind)}")
        return
    meta = shape.metadata
    if kind == "structure":
        for name, member in shape.members.items():
            member_path = _join(path, name)
            if value.get(name) is not None:
                yield from _check(value[name], member, member_path, action)
            elif name in shape.required_members:
                yield f"Value null at '{member_path}' failed to satisfy constraint: " \
                      "Member must not be null"
        for name in value.keys() - shape.members.keys():
            yield f"Value at '{_join(path, name)}' failed to satisfy constraint: " \
                  f"Member '{name}' is not a parameter of {action}"
    elif kind == "list":
        for index, item in enumerate(value, 1):
            yield from _check_item(item, shape.member, f"{path}.{index}.member", action)
    elif kind == "map":
        for key, item in value.items():
            yield from _check(key, shape.key, f"{path}.key", action)
            yield from _check_item(item, shape.value, f"{path}.value", action)
    elif kind == "blob":
        value = _b64decode(value, path)
    if kind in _INT_BOUNDS:
        if "min" in meta and value < meta["min"]:
            yield _violation(value, shape, path,
                             f"Member must have value greater than or equal to {meta['min']}")
        if "max" in meta and value > meta["max"]:
            yield _violation(value, shape, path,
                             f"Member must have value less than or equal to {meta['max']}")
    elif kind in ("string", "blob", "list", "map"):
        if "min" in meta and len(value) < meta["min"]:
            yield _violation(value, shape, path,
                             f"Member must have length greater than or equal to {meta['min']}")
        if "max" in meta and len(value) > meta["max"]:
            yield _violation(value, shape, path,
                             f"Member must have length less than or equal to {meta['max']}")
    if kind == "string":
        if shape.enum and value not in shape.enum:
            yield _violation(value, shape, path,
                             f"Member must satisfy enum value set: [{', '.join(shape.enum)}]")
        elif "pattern" in meta and _pattern(meta["pattern"]).search(value) is None:
            yield _violation(value, shape, path,
                             f"Member must satisfy regular expression pattern: {meta['pattern']}")


def _check_item(item: Any, shape: botocore.model.Shape, path: str, action: str) -> Iterator[str]:
    if item is None:
        yield f"Value null at '{path}' failed to satisfy constraint: Member must not be null"
    else:
        yield from _check(item, shape, path, action)


def _has_type(value: Any, kind: str) -> bool:
    if kind in ("string", "blob"):
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in _INT_BOUNDS:
        bound = _INT_BOUNDS[kind]
        return isinstance(value, int) and not isinstance(value, bool) and -bound <= value < bound
    if kind == "list":
        return isinstance(value, list)
    if kind in ("structure", "map"):
        return isinstance(value, dict)
    return True


def _join(path: str, name: str) -> str:
    # AWS names members in lowerCamelCase in validation messages.
    member = name[:1].lower() + name[1:]
    return f"{path}.{member}" if path else member


def _violation(value: Any, shape: botocore.model.Shape, path: str, constraint: str) -> str:
    shown = _shown(value, shape)
    subject = f"Value '{shown}'" if shown is not None else "Value"
    return f"{subject} at '{path}' failed to satisfy constraint: {constraint}"


def _shown(value: Any, shape: botocore.model.Shape) -> str | None:
    """How a message shows a rejected value; None hides it (secrets, structures)."""
    if shape.metadata.get("sensitive") or isinstance(value, dict):
        return None
    if isinstance(value, list):
        member = getattr(shape, "member", None)
        if member is not None and (member.metadata.get("sensitive")
                                   or member.type_name in ("structure", "map", "list")):
            return None
        text = "[" + ", ".join(_scalar_text(item) for item in value) + "]"
    else:
        text = _scalar_text(value)
    return text if len(text) <= _SHOWN_VALUE_MAX else text[:_SHOWN_VALUE_MAX] + "..."


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


@functools.cache
def _pattern(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _b64decode(value: str, path: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise model.SerializationException(f"The value at '{path}' is not valid base64.") from None


def _decode_blobs(value: Any, shape: botocore.model.Shape) -> Any:
    """A copy of validated params with blob members decoded to bytes, null members left out."""
    kind = shape.type_name
    if kind == "blob":
        return _b64decode(value, "")
    if kind == "structure":
        # JSON null means absent, as for AWS: the service never sees a None member.
        return {name: _decode_blobs(item, shape.members[name])
                for name, item in value.items() if item is not None}
    if kind == "list":
        return [_decode_blobs(item, shape.member) for item in value]
    if kind == "map":
        return {key: _decode_blobs(item, shape.value) for key, item in value.items()}
    return value


# --- results ----------------------------------------------------------------------

def _to_json(value: Any) -> Any:
    """A JSON-ready copy of a result.

    Generic on purpose: in the model a datetime can only fill a timestamp shape
    and bytes only a blob shape, so walking the output shape would change nothing.
    """
    if isinstance(value, datetime):
        # Epoch seconds with milliseconds, as AWS sends timestamps in JSON 1.1.
        return round(value.timestamp(), 3)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        # AWS leaves an absent member out instead of sending null.
        return {str(key): _to_json(item) for key, item in value.items() if item is not None}
    if isinstance(value, list | tuple | set | frozenset):
        return [_to_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError("a result holds a non-finite number")
    return value
