"""Config templates: a secret tagged `secretfs:template=jinja2` is a Jinja2 template
that renders a whole file from other secrets, shown at `<mount>/~templates/<its path>`.

    [database]
    user = {{ secret('prod/db').username }}
    password = {{ secret('prod/db', stage='AWSPREVIOUS')['password'] }}
    api_key = {{ secret('prod/api') }}

A template is a secret, so it has versions, staging labels, policies and audit like
any other; its AWSCURRENT version is the template's text. `secret(name, stage=...,
version_id=...)` gives a JSON object's keys as attributes and items (and the raw
JSON when printed whole), and any other value as its string.

Rendering happens at each open(), for the caller: the template and every secret it
reads are GetSecretValue decisions (audited), and one denial is EACCES. All secrets
are read from one consistent catalog state: a render is repeated if a secret it
read changed meanwhile. Any problem (syntax, a missing secret, label or key, a
sandbox violation, a budget exceeded) is a TemplateError, EIO on the mount, logged
and audited with the template's name and the problem, never a value; nothing is
half-rendered. Jinja2's immutable sandbox runs the template, with budgets on time
and size, because a template is code that reads secrets.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable, Iterator

from secretfs.model import (
    AWSCURRENT,
    InvalidParameterException,
    Secret,
    SecretsManagerError,
)

TEMPLATE_TAG = "secretfs:template"
ENGINE = "jinja2"
OUTPUT_MAX = 1024 * 1024  # bytes of rendered text
RENDER_SECONDS = 2.0
RENDER_ATTEMPTS = 3  # renders tried when referenced secrets keep changing underneath


class TemplateError(SecretsManagerError):
    """A template could not be rendered."""

    code, status, errno = "TemplateError", 400, errno.EIO


class _Problem(Exception):
    """A problem found while rendering, worded for the log (never holds a value)."""


class _Denied(Exception):
    """A probe (access(2)) found a secret the caller may not read."""


def is_template(secret: Secret) -> bool:
    return any(key == TEMPLATE_TAG and value == ENGINE for key, value in secret.tags)


def validate(tags: list[tuple[str, str]]) -> None:
    for key, value in tags:
        if key == TEMPLATE_TAG and value != ENGINE:
            raise InvalidParameterException(
                f"Invalid value {value!r} for tag {TEMPLATE_TAG!r}: the only template "
                f"engine is {ENGINE!r}.")


class SecretValue(dict):
    """A JSON object's keys, for a template; printed whole, it is the raw JSON."""

    def __init__(self, name: str, raw: str, document: dict):
        super().__init__(document)
        self.secret_name = name
        self.raw = raw

    def __str__(self) -> str:
        return self.raw


_environment = None


def _sandbox():
    """The one sandboxed environment (built on first use: jinja2 loads only if needed)."""
    global _environment
    if _environment is not None:
        return _environment
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Undefined(StrictUndefined):
        @property
        def _undefined_message(self) -> str:
            if isinstance(self._undefined_obj, SecretValue) and not self._undefined_hint:
                return (f"secret {self._undefined_obj.secret_name!r} has no key "
                        f"{self._undefined_name!r}")
            return super()._undefined_message

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            budget = context.get("__budget__")
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise SecurityError("an exponent above 64 is refused")
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if isinstance(sequence, str | list | tuple) and isinstance(count, int) \
                            and len(sequence) * count > OUTPUT_MAX:
                        raise SecurityError("a repetition longer than the output limit")
            if budget is not None:
                budget()
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own)
            budget = __context.get("__budget__")
            if budget is not None:
                budget()
            return super().call(__context, __obj, *args, **kwargs)

    _environment = Sandbox(undefined=Undefined, autoescape=False, keep_trailing_newline=True)
    return _environment


def _budget(deadline: float) -> Callable[[], None]:
    def check() -> None:
        if time.monotonic() > deadline:
            raise _Problem(f"rendering took longer than {RENDER_SECONDS:g} s")
    return check


def _counted_range(check: Callable[[], None]) -> Callable[..., Iterator[int]]:
    from jinja2.sandbox import safe_range

    def counted(*args) -> Iterator[int]:
        for number in safe_range(*args):
            check()
            yield number
    return counted


def render(service, caller, template: Secret, *, probe: bool = False) -> bytes | None:
    """The rendered file for this caller. A probe (access(2)) answers None for
    "denied" instead of raising AccessDeniedException, and audits as a probe."""
    for _ in range(RENDER_ATTEMPTS):
        used: dict[int, Secret] = {template.secret_id: template}
        try:
            output = _render_once(service, caller, template, used, probe)
        except _Denied:
            return None
        except _Problem as problem:
            raise _failure(service, caller, template, str(problem)) from None
        catalog = service.catalog
        if all(catalog.get(secret_id) is snapshot for secret_id, snapshot in used.items()):
            return output
        # A secret read changed since: render again from the newer state.
        fresh = catalog.get(template.secret_id)
        if fresh is None or fresh.is_deleted or not is_template(fresh):
            raise _failure(service, caller, template, "the template went away while rendering")
        template = fresh
    raise _failure(service, caller, template, "the secrets it reads kept changing")


def _failure(service, caller, template: Secret, problem: str) -> TemplateError:
    service.record_template_failure(caller, template, problem)
    return TemplateError(f"template {template.name!r}: {problem}")


def _read(service, caller, secret: Secret, version_id: str, probe: bool, name: str) -> str:
    if not service.authorize_read(caller, secret, version_id, probe=probe):
        raise _Denied
    version = secret.versions.get(version_id)
    if version is None or version.size is None:
        raise _Problem(f"secret {name!r} version {version_id} has no value")
    if version.is_binary:
        raise _Problem(f"secret {name!r} is binary")
    if not probe:
        service.record_access(secret, version_id)
    try:
        return service.read_version(secret, version_id).decode("utf-8")
    except UnicodeDecodeError:
        raise _Problem(f"secret {name!r} is not UTF-8 text") from None


def _render_once(service, caller, template: Secret, used: dict[int, Secret],
                 probe: bool) -> bytes:
    from jinja2 import TemplateError as JinjaError
    from jinja2 import TemplateSyntaxError, UndefinedError
    from jinja2.sandbox import SecurityError

    current = template.labels.get(AWSCURRENT)
    if current is None:
        raise _Problem("the template has no AWSCURRENT version")
    source = _read(service, caller, template, current, probe, template.name)
    check = _budget(time.monotonic() + RENDER_SECONDS)

    def secret(name, stage=None, version_id=None):
        check()
        if not isinstance(name, str):
            raise _Problem("secret() takes a secret's name")
        secret_id = service.catalog.id_by_name(name)
        snapshot = used.get(secret_id) if secret_id is not None else None
        if snapshot is None and secret_id is not None:
            snapshot = service.catalog.get(secret_id)
        if snapshot is None or snapshot.is_deleted:
            raise _Problem(f"secret {name!r} does not exist")
        used[secret_id] = snapshot
        try:
            found = service.resolve_version(snapshot, version_id,
                                            None if stage is None else str(stage))
        except SecretsManagerError:
            wanted = f"version {version_id}" if version_id else f"label {stage or AWSCURRENT}"
            raise _Problem(f"secret {name!r} has no {wanted}") from None
        text = _read(service, caller, snapshot, found, probe, name)
        try:
            document = json.loads(text)
        except ValueError:
            return text
        return SecretValue(name, text, document) if isinstance(document, dict) else text

    try:
        compiled = _sandbox().from_string(source)
    except TemplateSyntaxError as error:
        raise _Problem(f"syntax error at line {error.lineno}: {error.message}") from None
    pieces, size = [], 0
    try:
        for piece in compiled.generate(secret=secret, range=_counted_range(check),
                                       __budget__=check):
            size += len(piece)
            if size > OUTPUT_MAX:
                raise _Problem(f"the output is larger than {OUTPUT_MAX} characters")
            check()
            pieces.append(piece)
    except (_Problem, _Denied, SecretsManagerError):
        raise
    except SecurityError as error:
        raise _Problem(f"sandbox violation: {error}") from None
    except UndefinedError as error:
        raise _Problem(str(error)) from None
    except JinjaError as error:
        raise _Problem(f"{type(error).__name__}: {error.message}") from None
    except Exception as error:  # the template's own mistake; its message may hold a value
        raise _Problem(f"{type(error).__name__} while rendering") from None
    return "".join(pieces).encode("utf-8")
