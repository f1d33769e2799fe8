"""Change hooks: commands the daemon runs when a secret's AWSCURRENT or a template's
output changes (reload nginx, send a SIGHUP).

A hook runs as root (or as its `User`) on the daemon's word, so only root on the host
configures one: each is a JSON file `<state-dir>/hooks.d/NAME.json`, owned by root
and writable by nobody else; nothing the API or a tag sets can add one.

    {"Secret": "prod/db*",                            a secret's name, or a glob
     "Command": ["/usr/sbin/nginx", "-s", "reload"],  argv: an absolute path, no shell
     "Debounce": 1, "Timeout": 60, "User": "www-data"}    optional

or `"Template": NAME` instead of "Secret". A secret hook fires when a matching
secret's AWSCURRENT is on another version than last time (a put, a promotion, a
rotation, a new or restored secret: event `current`) or the secret is gone (`deleted`).
A template hook fires (`template`) when the template's output may have changed: its
own AWSCURRENT moved, or a label it reads moved. What it reads is found in its syntax
tree: `secret('prod/db', stage='AWSPREVIOUS')` with literal arguments names the secret
and label; a template that computes a name (or passes `secret` around) depends on
every label of every secret.

Hooks are debounced each on its own: a run starts once the changes have been quiet
for `Debounce` seconds (and at most 10 x Debounce after the first), one run of a hook
at a time; a change during a run makes one more run after it. Whether anything
changed is decided against what the hook last saw, not by counting events, so a
burst coalesces and a `secretfs refresh` can re-check every hook.

A command never gets a value: names, version ids and paths, in its environment
(SECRETFS_HOOK, SECRETFS_EVENT, SECRETFS_SECRET, SECRETFS_VERSION_ID, SECRETFS_PATH,
SECRETFS_SECRETS, SECRETFS_MOUNTPOINT, SECRETFS_STATE_DIR). Its standard streams are
/dev/null (output could quote a value, so none is kept); it runs in a process group
of its own, signalled TERM then KILL at its timeout. Each run is logged and is one
audit record (eventName RunHook). All of it happens in trio tasks and worker threads:
a failing or hanging hook never holds up the mount or the API.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import pwd
import re
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from secretfs import templates
from secretfs.identity import INTERNAL
from secretfs.model import AWSCURRENT, Secret, name_segments

log = logging.getLogger(__name__)

DEFAULT_DEBOUNCE = 1.0
DEFAULT_TIMEOUT = 60.0
MAX_SECONDS = 3600.0
MAX_DELAY_FACTOR = 10  # under a constant stream of changes, a hook still runs this often
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL at a timeout
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CURRENT, DELETED, TEMPLATE = "current", "deleted", "template"
ANY_LABEL = "*"  # a reference whose label isn't literal: every label of the secret counts
_FIELDS = {"Secret", "Template", "Command", "Debounce", "Timeout", "User"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")


class HookError(ValueError):
    """A hook file that can't be used; one line naming the file."""


@dataclass(frozen=True)
class Hook:
    name: str
    command: tuple[str, ...]
    secret: str | None = None  # a secret's name or a glob
    template: str | None = None  # a template's name
    debounce: float = DEFAULT_DEBOUNCE
    timeout: float = DEFAULT_TIMEOUT
    user: str | None = None

    def describe(self) -> dict:
        found = {"Name": self.name, "Command": list(self.command),
                 "Debounce": self.debounce, "Timeout": self.timeout, "User": self.user or "root"}
        found.update({"Secret": self.secret} if self.secret is not None
                     else {"Template": self.template})
        return found


def parse_hook(name: str, document: object) -> Hook:
    if not isinstance(document, dict):
        raise HookError("a hook is a JSON object")
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        raise HookError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    secret, template = document.get("Secret"), document.get("Template")
    if (secret is None) == (template is None):
        raise HookError("give one of \"Secret\" (a name or glob) and \"Template\" (a name)")
    for value in (secret, template):
        if value is not None and (not isinstance(value, str) or not value):
            raise HookError("\"Secret\" and \"Template\" are non-empty strings")
    command = document.get("Command")
    if not isinstance(command, list) or not command or \
            not all(isinstance(arg, str) and "\0" not in arg for arg in command):
        raise HookError("\"Command\" is a non-empty list of strings (argv, no shell)")
    if not os.path.isabs(command[0]):
        raise HookError(f"\"Command\" must start with an absolute path, not {command[0]!r}")
    debounce = _seconds(document, "Debounce", DEFAULT_DEBOUNCE, minimum=0.0)
    timeout = _seconds(document, "Timeout", DEFAULT_TIMEOUT, minimum=0.1)
    user = document.get("User")
    if user is not None:
        if not isinstance(user, str | int) or isinstance(user, bool):
            raise HookError("\"User\" is a user name or uid")
        user = str(user)
        _account(user)
    return Hook(name, tuple(command), secret, template, debounce, timeout, user)


def _seconds(document: dict, key: str, default: float, *, minimum: float) -> float:
    value = document.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) \
            or not minimum <= value <= MAX_SECONDS:
        raise HookError(f"{key!r} is a number of seconds from {minimum:g} to {MAX_SECONDS:g}")
    return float(value)


def _account(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise HookError(f"no user {user!r} on this host") from None


def _owned_by_us(info: os.stat_result) -> bool:
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


def load_hooks(directory: Path) -> tuple[list[Hook], list[str]]:
    """The hooks of a hooks.d directory, and one line per file refused. A file or a
    directory that anyone but root could have written is refused whole."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return [], []
    except OSError as error:
        return [], [f"{directory}: {error.strerror}; no hook is run"]
    if not stat.S_ISDIR(info.st_mode) or not _owned_by_us(info):
        return [], [f"{directory}: not a directory owned by root and writable by root "
                    "alone; no hook is run"]
    hooks, problems = [], []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            hooks.append(_load_file(path))
        except HookError as error:
            problems.append(f"{path}: {error}")
    return hooks, problems


def _load_file(path: Path) -> Hook:
    if not _NAME.fullmatch(path.stem):
        raise HookError("a hook's file name is letters, digits and _.@- with .json")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        reason = "a symbolic link" if error.errno == errno.ELOOP else error.strerror
        raise HookError(f"can't be read: {reason}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or not _owned_by_us(info):
            raise HookError("not a regular file owned by root and writable by root alone")
        try:
            document = json.loads(handle.read(1 << 16))
        except ValueError as error:
            raise HookError(f"not valid JSON: {error}") from None
    return parse_hook(path.stem, document)


def references(source: str) -> frozenset[tuple[str, str]] | None:
    """The (secret name, label) pairs a template reads with literal arguments; None
    when it computes a name or passes `secret` around, so any label move may matter.
    A template that doesn't parse reads nothing (its output is an error either way)."""
    from jinja2 import Environment, TemplateSyntaxError, nodes

    try:
        tree = Environment().parse(source)
    except TemplateSyntaxError:
        return frozenset()
    found, calls = set(), set()
    for call in tree.find_all(nodes.Call):
        if not isinstance(call.node, nodes.Name) or call.node.name != "secret":
            continue
        calls.add(id(call.node))
        if call.dyn_args is not None or call.dyn_kwargs is not None:
            return None
        given = dict(zip(("name", "stage", "version_id"), call.args, strict=False))
        given.update((keyword.key, keyword.value) for keyword in call.kwargs)
        name = given.get("name")
        if not isinstance(name, nodes.Const) or not isinstance(name.value, str):
            return None
        stage = given.get("stage")
        if stage is None:
            label = AWSCURRENT if given.get("version_id") is None else ANY_LABEL
        elif isinstance(stage, nodes.Const) and isinstance(stage.value, str):
            label = stage.value
        else:
            label = ANY_LABEL
        found.add((name.value, label))
    if any(node.name == "secret" and id(node) not in calls for node in tree.find_all(nodes.Name)):
        return None
    return frozenset(found)


@dataclass
class _Change:
    name: str
    event: str
    version_id: str | None
    path: str


@dataclass(eq=False)
class _State:
    """One hook, what it last saw, and how its runs went."""

    hook: Hook
    seen: dict[str, object] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    wake: trio.Event = field(default_factory=trio.Event)
    last_change: float = 0.0
    # A template hook: what the template reads (None: it computes names), and for
    # which (secret id, version) of the template that was found.
    reads: frozenset[tuple[str, str]] | None = frozenset()
    parsed: tuple[int, str | None] | None = None
    cancel: trio.CancelScope | None = None
    runs: int = 0
    failures: int = 0
    running: bool = False
    last_run: float | None = None
    last_exit: int | None = None
    last_error: str | None = None

    def wants(self, name: str) -> bool:
        hook = self.hook
        if hook.secret is not None:
            return fnmatch.fnmatchcase(name, hook.secret)
        return name == hook.template or self.reads is None or any(
            read == name for read, _ in self.reads)


class HookManager:
    """Runs the hooks of a hooks.d directory in the daemon's trio run."""

    def __init__(self, service, *, directory: Path, mountpoint: Path, state_dir: Path):
        self.service = service
        self.directory = Path(directory)
        self.mountpoint = Path(mountpoint)
        self.state_dir = Path(state_dir)
        self.problems: list[str] = []
        self._states: dict[str, _State] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        # Label moves heard: a template that computes names depends on all of them.
        self._generation = 0
        self._reloading = trio.Lock()  # refreshes may come from several API threads

    # --- configuration ---------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        # Before the first baseline, so no change falls between the two.
        self.service.catalog.subscribe(self._changed)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.reload(recheck=False)
            task_status.started()
            await trio.sleep_forever()

    async def reload(self, *, recheck: bool = True) -> dict:
        """Read hooks.d again: start new hooks (from what they see now), stop removed or
        changed ones, and with `recheck` look at every secret each hook watches."""
        async with self._reloading:
            return await self._reload(recheck)

    async def _reload(self, recheck: bool) -> dict:
        hooks, problems = await trio.to_thread.run_sync(load_hooks, self.directory)
        for problem in problems:
            if problem not in self.problems:
                log.error("hook refused: %s", problem)
        self.problems = problems
        wanted = {hook.name: hook for hook in hooks}
        for name, state in list(self._states.items()):
            if wanted.get(name) != state.hook:
                state.cancel.cancel()
                del self._states[name]
        started = []
        for hook in hooks:
            if hook.name in self._states:
                continue
            state = self._states[hook.name] = _State(hook)
            try:
                await trio.to_thread.run_sync(self._baseline, state)
            except Exception:  # a store error: the hook starts from nothing seen
                log.exception("hook %s: can't see what it watches", hook.name)
            await self._nursery.start(self._serve, state)
            started.append(hook.name)
        if recheck:
            for state in list(self._states.values()):
                names = await trio.to_thread.run_sync(self._watched, state)
                self._touch(state, names | set(state.seen))
        return {"Hooks": len(self._states), "Started": started,
                "Rejected": list(problems)}

    def describe(self) -> list[dict]:
        return [{**state.hook.describe(), "Runs": state.runs, "Failures": state.failures,
                 "Running": state.running, "Pending": bool(state.touched),
                 "LastRunDate": state.last_run, "LastExitCode": state.last_exit,
                 "LastError": state.last_error} for state in self._states.values()]

    # --- hearing changes ---------------------------------------------------------------

    def _changed(self, old: Secret | None, new: Secret | None) -> None:
        """A catalog listener: runs in the committing thread, so it only hands over."""
        if not self._states or self._token is None:
            return
        if old is not None and new is not None and old.labels == new.labels \
                and old.deleted == new.deleted and old.tags == new.tags:
            return  # an access date, a description: no hook cares
        secret = new or old
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._heard, secret.name)

    def _heard(self, name: str) -> None:
        self._generation += 1
        for state in self._states.values():
            if state.wants(name):
                self._touch(state, {name})

    @staticmethod
    def _touch(state: _State, names: set[str]) -> None:
        state.touched |= names
        state.last_change = trio.current_time()
        state.wake.set()

    # --- deciding ----------------------------------------------------------------------

    def _watched(self, state: _State) -> set[str]:
        """The names a hook watches now (in a worker thread)."""
        hook = state.hook
        if hook.template is not None:
            return {hook.template}
        if not any(char in hook.secret for char in "*?["):
            return {hook.secret}
        catalog = self.service.catalog
        rows = (catalog.row(secret_id) for _, secret_id in catalog.live_below(""))
        return {row.name for row in rows
                if row is not None and fnmatch.fnmatchcase(row.name, hook.secret)}

    def _baseline(self, state: _State) -> None:
        """What a new hook sees now: its first run is for a change after this."""
        self._evaluate(state, self._watched(state))

    def _live(self, name: str) -> Secret | None:
        catalog = self.service.catalog
        secret_id = catalog.id_by_name(name)
        secret = catalog.get(secret_id) if secret_id is not None else None
        return None if secret is None or secret.is_deleted else secret

    def _evaluate(self, state: _State, names: set[str]) -> list[_Change]:
        """What changed for a hook since it last looked (in a worker thread)."""
        changes = []
        if state.hook.template is not None:
            change = self._template_change(state)
            if change is not None:
                changes.append(change)
        else:
            for name in sorted(names):
                secret = self._live(name)
                version_id = secret.labels.get(AWSCURRENT) if secret is not None else None
                if version_id == state.seen.get(name):
                    continue
                state.seen[name] = version_id
                changes.append(_Change(name, CURRENT if version_id else DELETED, version_id,
                                       self._file(name, AWSCURRENT)))
        return changes

    def _template_change(self, state: _State) -> _Change | None:
        name = state.hook.template
        template = self._live(name)
        if template is None or not templates.is_template(template):
            state.reads, state.parsed = frozenset(), None
            fingerprint = None
        else:
            current = template.labels.get(AWSCURRENT)
            if state.parsed != (template.secret_id, current):
                state.reads = self._reads(template, current)
                state.parsed = (template.secret_id, current)
            if state.reads is None:
                reads = self._generation
            else:
                reads = tuple(sorted((read, self._label_state(*read)) for read in state.reads))
            fingerprint = (current, reads)
        if fingerprint == state.seen.get(name):
            return None
        state.seen[name] = fingerprint
        return _Change(name, TEMPLATE if fingerprint else DELETED,
                       fingerprint[0] if fingerprint else None,
                       f"{self.mountpoint}/~templates/{'/'.join(name_segments(name))}")

    def _reads(self, template: Secret, version_id: str | None):
        if version_id is None:
            return frozenset()
        try:
            source = self.service.read_version(template, version_id).decode("utf-8")
        except Exception as error:  # an undecryptable or binary template renders nothing
            log.warning("hook: can't read template %s: %s", template.name, type(error).__name__)
            return frozenset()
        return references(source)

    def _label_state(self, name: str, label: str):
        secret = self._live(name)
        if secret is None:
            return None
        if label == ANY_LABEL:
            return tuple(sorted(secret.labels.items()))
        return secret.labels.get(label)

    def _file(self, name: str, label: str) -> str:
        return "/".join([str(self.mountpoint), *name_segments(name), label])

    # --- running -----------------------------------------------------------------------

    async def _serve(self, state: _State, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            state.cancel = scope
            task_status.started()
            while True:
                await state.wake.wait()
                first = trio.current_time()
                debounce = state.hook.debounce
                while True:
                    until = min(state.last_change + debounce, first + MAX_DELAY_FACTOR * debounce)
                    if until <= trio.current_time():
                        break
                    await trio.sleep_until(until)
                state.wake = trio.Event()
                names, state.touched = state.touched, set()
                try:
                    changes = await trio.to_thread.run_sync(self._evaluate, state, names)
                    if changes:
                        await self._run(state, changes)
                except Exception:  # one hook's trouble must never take the daemon down
                    log.exception("hook %s failed", state.hook.name)

    def _environment(self, hook: Hook, changes: list[_Change],
                     account: pwd.struct_passwd | None) -> dict[str, str]:
        first = changes[0]
        return {"PATH": HOOK_PATH, "LANG": "C.UTF-8",
                "HOME": account.pw_dir if account is not None else "/",
                "SECRETFS_HOOK": hook.name, "SECRETFS_EVENT": first.event,
                "SECRETFS_SECRET": first.name, "SECRETFS_VERSION_ID": first.version_id or "",
                "SECRETFS_PATH": first.path,
                "SECRETFS_SECRETS": " ".join(change.name for change in changes),
                "SECRETFS_MOUNTPOINT": str(self.mountpoint),
                "SECRETFS_STATE_DIR": str(self.state_dir)}

    async def _run(self, state: _State, changes: list[_Change]) -> None:
        hook = state.hook
        started = time.monotonic()
        state.running, state.runs = True, state.runs + 1
        state.last_run = self.service.now().timestamp()
        exit_code, error = None, None
        try:
            account = _account(hook.user) if hook.user is not None else None
            identity = {} if account is None else {
                "user": account.pw_uid, "group": account.pw_gid,
                "extra_groups": os.getgrouplist(account.pw_name, account.pw_gid)}
            groups: list[int] = []

            async def stop(process: trio.Process) -> None:
                groups.append(process.pid)
                await _stop_group(process)

            with trio.move_on_after(hook.timeout) as timer:
                result = await trio.run_process(
                    hook.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, env=self._environment(hook, changes, account),
                    cwd="/", check=False, start_new_session=True, deliver_cancel=stop,
                    **identity)
                exit_code = result.returncode
            if timer.cancelled_caught:
                # trio stops waiting once the leader exits: what it left behind in its
                # group (a child that ignores SIGTERM) is killed here.
                for group in groups:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(group, signal.SIGKILL)
                error = f"timed out after {hook.timeout:g} s; its process group was killed"
            elif exit_code != 0:
                error = _exit_text(exit_code)
        except (OSError, HookError) as problem:
            error = f"could not start: {getattr(problem, 'strerror', None) or problem}"
        finally:
            state.running = False
        seconds = time.monotonic() - started
        state.last_exit, state.last_error = exit_code, error
        names = " ".join(change.name for change in changes)
        if error is None:
            log.info("hook %s ran for %s (%s): exit 0 in %.2f s", hook.name, names,
                     changes[0].event, seconds)
        else:
            state.failures += 1
            log.warning("hook %s for %s %s", hook.name, names, error)
        self._audit(hook, changes, exit_code, error, seconds)

    def _audit(self, hook: Hook, changes: list[_Change], exit_code: int | None,
               error: str | None, seconds: float) -> None:
        audit = self.service.authorizer.audit
        if audit is None:
            return
        first = changes[0]
        resources = {"name": first.name}
        catalog = self.service.catalog
        secret_id = catalog.id_by_name(first.name)
        row = catalog.row(secret_id) if secret_id is not None else None
        if row is not None:
            resources["arn"] = row.arn
        if first.version_id:
            resources["versionId"] = first.version_id
        record = {"eventName": "RunHook", "eventSource": INTERNAL,
                  "userIdentity": {"hook": hook.name, "user": hook.user or "root"},
                  "resources": resources, "decision": "allow", "decidedBy": "hook",
                  "hook": {"name": hook.name, "event": first.event, "command": hook.command[0],
                           "secrets": [change.name for change in changes],
                           "exitCode": exit_code, "milliseconds": int(seconds * 1000)}}
        if error is not None:
            record["errorCode"] = "HookFailed"
            record["errorMessage"] = error
        audit.record(record)


def _exit_text(code: int) -> str:
    if code > 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


async def _stop_group(process: trio.Process) -> None:
    """At a hook's timeout: TERM to its whole process group, KILL a moment later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with trio.move_on_after(KILL_GRACE):
        await process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
