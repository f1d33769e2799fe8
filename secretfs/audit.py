"""The audit log: one hash-chained record per access decision and per mutation.

Owns the record format, the writer (`AuditLog`), the checker (`verify`) and the
readers (`read_records`, `last_records`, `follow_records`) used by `secretfs audit`.

Event fields the callers pass (CloudTrail's names):

- `eventName`: the action, e.g. "GetSecretValue", "PutSecretValue", "OpenDirectory" (required)
- `eventSource`: "fuse" | "unix-socket" | "https" | "internal"
- `userIdentity`: {"uid", "gid", "user", "pid", "exe", "unit"}, and over https also
  "accessKeyId" and "sourceIPAddress"
- `resources`: {"arn", "name", "versionId", "versionStage"}, any of them may be absent
- `decision`: "allow" | "deny"
- `decidedBy`: e.g. "root", "identity-policy user:alice/ReadDb#Stmt1",
  "resource-policy#AllowWeb", "implicit-deny"
- `errorCode`: optional

`record()` stamps `eventTime` (ISO 8601 UTC with microseconds and "Z"); `flush()` adds
`eventId` (a uuid4) and the chain: `seq` (0, 1, 2, ... across files), `prev` (the
previous record's `hash`; 64 zeros for the very first record ever) and `hash`, the hex
SHA-256 of the record's canonical JSON (sorted keys, compact separators, non-ASCII and
DEL escaped as \\uXXXX, exactly as Python's `json.dumps(sort_keys=True,
separators=(",", ":"))` writes it) without `hash`. Each record is one line: that
canonical JSON with `hash` added as its last member. Values are strings, integers,
booleans, null, lists and objects; floats are refused, since JSON encoders disagree on
their text.

Files, all in one directory (0700; files 0600): `audit.log` is written, and rotated by
size to `audit.log.1` ... `audit.log.<keep-1>` (the oldest goes); the chain runs on
across files. `audit.head` holds the seq and hash of the last record written, replaced
atomically after each flush, so a tail cut off the log is noticed. One writer per
directory: the daemon's state lock sees to that.

What the chain proves: any record altered, removed, reordered or cut from the tail is
named by `verify`. It is tamper-evident, not tamper-proof: someone who can write the
directory can rewrite the whole chain and the head consistently; shipping `audit.head`
(or `secretfs audit verify` output) off the host is what pins it. Records are never
silently lost: if the queue is full, records are dropped and counted, and the next
flush writes one `AuditRecordsDropped` record with the count (the chain stays valid).
Secret values are never logged: callers don't pass them, and `record()` refuses an
event holding a SecretString, SecretBinary or RandomPassword key at any depth.

Writing: `record()` only queues (no I/O, so the FUSE loop never waits on a disk);
`run()` flushes from a worker thread. `record_keyed()` queues an event that a hashable
key fixes (the hot path's decisions: a process opening the same file again repeats its
key); the event is built and checked once per key, and its JSON encoded once per key,
cut around the fields a flush stamps, so a repeat costs a lookup when recorded and a
join and a hash when written. A flush is one write and one fsync per file it
touches (one, unless it rotates), then the head. When the queue is full the newest
records are the ones dropped. A restart continues the chain from the newest record;
it drops a final line torn by a crash (never acknowledged), and refuses with
AuditError to continue over damage the head reveals, since writing on would replace
the head that shows it. Readers skip lines they cannot parse; `verify` names them.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from secretfs.files import fsync_directory

log = logging.getLogger("secretfs.audit")

LOG_NAME = "audit.log"
HEAD_NAME = "audit.head"
GENESIS = "0" * 64
FORBIDDEN_KEYS = frozenset({"SecretString", "SecretBinary", "RandomPassword"})
DEFAULT_MAX_PENDING = 100_000
# A burst this deep wakes run() early instead of waiting out its interval.
WAKE_AT = 10_000
_SCALARS = frozenset({str, int, bool, type(None)})
# record_keyed()'s caches are emptied when they hold this many events.
KEYED_CACHE = 4096
# What flush() stamps, as placeholders in a keyed event's encoding, and their encoded
# text (seq is a number, so its placeholder's quotes go too). Control characters are
# escaped the same way by both encoders.
_PLACEHOLDERS = {"eventId": "\x00i", "eventTime": "\x00t", "prev": "\x00p", "seq": "\x00s"}
_CUT_MARKS = (b"\\u0000i", b"\\u0000t", b"\\u0000p", b'"\\u0000s"')


class AuditError(Exception):
    """The audit log cannot be written, or cannot be continued without hiding damage."""


class _IgnoredTaskStatus:
    """trio.TASK_STATUS_IGNORED without importing trio: the CLI's audit verbs only read
    files, and importing trio would double their start-up time."""

    def started(self, value=None) -> None:
        pass


_TASK_STATUS_IGNORED = _IgnoredTaskStatus()


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Seconds:
    """The text of the second an epoch-nanoseconds stamp falls in, remembered: a
    flush formats thousands of stamps of the same few seconds."""

    __slots__ = ("second", "text")

    def __init__(self):
        self.second, self.text = -1, ""

    def format(self, ns: int) -> str:
        second, rest = divmod(ns, 1_000_000_000)
        if second != self.second:
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        return f"{self.text}.{rest // 1000:06d}Z"


_SECONDS = _Seconds()


def _format_time(when: datetime | int) -> str:
    """ISO 8601 UTC with microseconds and "Z", of a datetime or of nanoseconds since
    the epoch (what the daemon's own clock stamps)."""
    if type(when) is int:
        return _SECONDS.format(when)
    if when.tzinfo is UTC:  # a UTC datetime: the quick way
        return when.isoformat(timespec="microseconds")[:-6] + "Z"
    # A naive time from an injected clock is taken as UTC.
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when.isoformat(timespec="microseconds") + "Z"


def canonical(record: dict) -> bytes:
    """The bytes a record's hash covers: its JSON, sorted keys, compact, without hash.

    orjson writes the same bytes as the standard library for what records hold, at a
    fifth of the cost (this runs once per file open), except for text outside
    printable ASCII, which the standard library escapes: such records, and what
    orjson refuses (integers beyond 64 bits, lone surrogates), take the slow path."""
    return _encode({k: v for k, v in record.items() if k != "hash"} if "hash" in record
                   else record)


def _encode(body: dict) -> bytes:
    try:
        encoded = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        encoded = None
    if encoded is not None and encoded.isascii() and b"\x7f" not in encoded:
        return encoded
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# The variant's first hex digit: its two high bits forced to 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _event_id(random: str) -> str:
    """A uuid4's text from 32 random hex digits: what
    str(uuid.UUID(hex=..., version=4)) gives, at a fifth of the cost."""
    return (f"{random[:8]}-{random[8:12]}-4{random[13:16]}-{_VARIANT[random[16]]}"
            f"{random[17:20]}-{random[20:32]}")


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def _line(body: bytes, digest: str) -> bytes:
    """A record as written: its canonical JSON with the hash as the last member, so the
    line is serialized once and a reader can see what the hash covers."""
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


def _clean(value):
    """A JSON-ready copy of an event, so a caller changing its dict later changes
    nothing queued. Refuses secret-value keys, and what JSON cannot hold, now, on the
    caller's stack, rather than poisoning a later flush. Exact type checks first:
    this runs on the hot path."""
    kind = type(value)
    if kind is dict:
        if not FORBIDDEN_KEYS.isdisjoint(value):
            key = next(key for key in value if key in FORBIDDEN_KEYS)
            raise ValueError(f"audit event refused: it holds a {key} (a secret value)")
        copy = {}
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise TypeError(f"audit event key {key!r} is not a string")
            copy[key] = item if type(item) in _SCALARS else _clean(item)
        return copy
    if kind is list or kind is tuple:
        return [item if type(item) in _SCALARS else _clean(item) for item in value]
    if kind is float or isinstance(value, float):
        raise TypeError("audit event values are never floats (JSON encoders disagree on "
                        "their text)")
    if kind in _SCALARS or isinstance(value, str | int):
        return value
    if isinstance(value, dict):
        return _clean(dict(value))
    if isinstance(value, list | tuple):
        return _clean(list(value))
    raise TypeError(f"audit event value {kind.__name__} is not JSON")


# --- the files ---------------------------------------------------------------------

def _rotation_index(name: str) -> int | None:
    """0 for audit.log, N for audit.log.N, None for anything else."""
    if name == LOG_NAME:
        return 0
    prefix, _, suffix = name.rpartition(".")
    if prefix == LOG_NAME and suffix.isdigit():
        return int(suffix)
    return None


def log_files(directory: Path) -> list[Path]:
    """The log files, oldest first (a gap left by an interrupted rotation is skipped)."""
    indexed = [(index, name) for name in os.listdir(directory)
               if (index := _rotation_index(name)) is not None]
    return [Path(directory) / name for _, name in sorted(indexed, reverse=True)]


def _read_head(directory: Path) -> dict | None:
    """The head record, None if there is none; ValueError if it is unreadable."""
    try:
        text = (Path(directory) / HEAD_NAME).read_text()
    except FileNotFoundError:
        return None
    try:
        head = json.loads(text)
        if not (isinstance(head, dict) and isinstance(head.get("seq"), int)
                and isinstance(head.get("hash"), str)):
            raise ValueError
    except ValueError:
        raise ValueError(f"{HEAD_NAME} is unreadable: {text[:80]!r}") from None
    return head


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None



class _Keyed:
    """An event queued by record_keyed(), shared by every record of its key: the
    event, checked, and its canonical JSON cut around the fields flush() stamps
    (False until the first flush needs it; None if it can't be cut)."""

    __slots__ = ("event", "pieces")

    def __init__(self, event: dict):
        self.event = event
        self.pieces: tuple[bytes, ...] | None | bool = False


def _cut(event: dict) -> tuple[bytes, ...] | None:
    """An event's canonical JSON without the fields flush() stamps: the bytes before
    eventId, between eventId and eventTime, eventTime and prev, prev and seq, and after
    seq (sorted keys put the four in that order, whatever else the event holds). Cut
    where placeholders for them are encoded; each must occur exactly once, else None
    and the record is encoded whole."""
    fields = {**event, **_PLACEHOLDERS}
    fields.pop("hash", None)
    rest = _encode(fields)
    if not all(rest.count(mark) == 1 for mark in _CUT_MARKS):
        return None
    pieces = []
    for mark in _CUT_MARKS:
        before, rest = rest.split(mark)
        pieces.append(before)
    return (*pieces, rest)


# --- the writer --------------------------------------------------------------------

class AuditLog:
    """The daemon's audit log: `record()` queues, `flush()` writes, `run()` flushes."""

    def __init__(self, directory: Path, *, max_bytes: int = 16 << 20, keep: int = 20,
                 clock: Callable[[], datetime] = _utcnow,
                 max_pending: int = DEFAULT_MAX_PENDING):
        if keep < 1:
            raise ValueError("keep must be at least 1 (the file being written)")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.keep = keep
        self.max_pending = max_pending
        # The daemon's clock stamps integers (nanoseconds since the epoch): cheaper to
        # take, and to format at flush, than a datetime.
        self._clock = time.time_ns if clock is _utcnow else clock
        # (event, time) per record; record_keyed() queues its _Keyed
        self._queue: collections.deque[tuple[dict | _Keyed, datetime | int]] = \
            collections.deque()
        # record_keyed(): key -> its event, checked once, and its encoding
        self._keyed: dict[tuple, _Keyed] = {}
        self._dropped = 0
        self._lock = threading.Lock()  # the queue and the drop count
        self._flush_lock = threading.Lock()  # one flush at a time: the chain is sequential
        self._wake: Callable[[], None] | None = None
        self._wake_pending = False
        self._failing = False
        # Called with the events of each batch written, in the flushing thread (the
        # daemon's metrics count decisions there, off the hot path); must not raise.
        self.observers: list[Callable[[list[dict]], None]] = []
        if not self.directory.is_dir():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask
        self._next_seq, self._prev = self._resume()

    def _resume(self) -> tuple[int, str]:
        """(next seq, prev hash) from the newest record on disk, so a restart continues
        the chain. Refuses to go on when the head shows records cut from the tail:
        writing would replace the head and erase that evidence."""
        try:
            head = _read_head(self.directory)
        except ValueError as error:
            raise AuditError(self._refusal(str(error))) from None
        last, torn = None, None
        for path in reversed(log_files(self.directory)):
            complete, newline, partial = path.read_bytes().rpartition(b"\n")
            if partial and path.name == LOG_NAME:
                torn = (path, len(complete) + len(newline), len(partial))
            if not newline:
                continue  # no complete record in this file
            last = _parse(complete.rpartition(b"\n")[2])
            if last is None or not isinstance(last.get("seq"), int) or "hash" not in last:
                raise AuditError(self._refusal(f"the last record of {path.name} is unreadable"))
            break
        if head is None and last is not None:
            raise AuditError(self._refusal(
                f"{HEAD_NAME} is missing, so records cut from the tail would go unnoticed"))
        if head is not None:
            ends = f"seq {last['seq']}" if last is not None else "no records"
            if head["seq"] > (last["seq"] if last is not None else -1):
                raise AuditError(self._refusal(
                    f"{HEAD_NAME} records seq {head['seq']} but the log ends at {ends}"))
            if last is not None and head["seq"] == last["seq"] and head["hash"] != last["hash"]:
                raise AuditError(self._refusal(
                    f"the last record (seq {head['seq']}) differs from the one {HEAD_NAME} "
                    "recorded"))
        if torn is not None:
            # A write cut short by a crash: flush() never returned for it, so it was
            # never acknowledged, and appending after it would break the chain.
            path, keep_bytes, torn_bytes = torn
            log.warning("%s ended with an incomplete record (a write interrupted by a "
                        "crash); removing its %d bytes", path, torn_bytes)
            os.truncate(path, keep_bytes)
        if last is not None:
            return last["seq"] + 1, last["hash"]
        if head is None:
            # A new chain: the head exists before any record, so a missing head
            # always means tampering, never a crash between a write and its head.
            self._write_head(-1, GENESIS)
        return 0, GENESIS

    def _refusal(self, problem: str) -> str:
        return (f"audit log {self.directory}: {problem}; not continuing the chain "
                "(see 'secretfs audit verify'; move the directory aside to start a new one)")

    # --- the hot path ---

    def record(self, event: dict, *, handed_over: bool = False) -> None:
        """Queue one event, stamped with its time. Never does I/O; thread-safe.
        Raises ValueError for an event holding a secret value or lacking eventName,
        TypeError for one JSON cannot hold.

        `handed_over`: the caller built the event just now from strings, numbers and
        lists and dicts of them, and will never touch it again (the decision records
        of the hot path), so it is queued as it is instead of checked and copied deep.
        """
        if type(event) is not dict or type(event.get("eventName")) is not str:
            raise ValueError("an audit event is a dict with an eventName string")
        if handed_over:
            if not FORBIDDEN_KEYS.isdisjoint(event):
                raise ValueError("audit event refused: it holds a secret value")
        else:
            event = _clean(event)
        # The time is fixed now; turning it into text, and drawing the event's id, wait
        # for flush(), off the hot path.
        self._enqueue((event, self._clock()))

    def record_keyed(self, key: tuple, build: Callable[[tuple], dict]) -> None:
        """Queue the event `build(key)`, for a hashable key that fixes the whole event:
        what the hot path records (a decision on a file open), where the same process
        opening the same file again repeats a key. The event is built and checked as
        record() checks it once per key, and its JSON is encoded once per key: a repeat
        costs a dict lookup here and a join and a hash in flush()."""
        keyed = self._keyed.get(key)
        if keyed is None:
            if len(self._keyed) >= KEYED_CACHE:
                self._keyed.clear()
            event = _clean(build(key))
            if type(event.get("eventName")) is not str:
                raise ValueError("an audit event is a dict with an eventName string")
            keyed = self._keyed[key] = _Keyed(event)
        self._enqueue((keyed, self._clock()))

    def _enqueue(self, entry: tuple) -> None:
        with self._lock:
            if len(self._queue) >= self.max_pending:
                self._dropped += 1
                return
            self._queue.append(entry)
            wake = self._wake if len(self._queue) >= WAKE_AT and not self._wake_pending else None
            if wake is not None:
                self._wake_pending = True
        if wake is not None:
            wake()

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return len(self._queue)

    @property
    def failing(self) -> bool:
        """Whether the last flush failed (the records wait in the queue)."""
        return self._failing

    # --- writing ---

    def flush(self) -> int:
        """Write every queued record (blocking); returns how many were written.

        On failure raises AuditError and keeps what was not written queued, so a later
        flush writes it; the chain on disk is left as it was before the failed write.
        """
        with self._flush_lock:
            with self._lock:
                batch = list(self._queue)
                dropped = self._dropped
                self._wake_pending = False
            if dropped:
                batch.append(({"eventName": "AuditRecordsDropped", "eventSource": "internal",
                               "count": dropped}, self._clock()))
            if not batch:
                return 0
            written = 0
            try:
                for lines, seq, prev in self._chain(batch):
                    self._append(lines)
                    written += len(lines)
                    self._next_seq, self._prev = seq, prev
            except OSError as error:
                raise AuditError(f"can't write the audit log in {self.directory}: "
                                 f"{error.strerror or error}") from error
            finally:
                with self._lock:
                    for _ in range(min(written, len(batch) - (1 if dropped else 0))):
                        self._queue.popleft()
                    if dropped and written == len(batch):
                        self._dropped -= dropped
                if written:
                    self._update_head()
                    if self.observers:
                        events = [event if type(event) is dict else event.event
                                  for event, _ in batch[:written]]
                        for observer in self.observers:
                            observer(events)
            return written

    def _chain(self, batch: list[tuple[dict, datetime]]
               ) -> Iterator[tuple[list[bytes], int, str]]:
        """The batch as chained lines, in chunks that each fit one file: (lines, next seq,
        last hash) per chunk, rotating between chunks. A record larger than max_bytes
        gets a file to itself."""
        seq, prev = self._next_seq, self._prev
        size = self._current_size()
        chunk: list[bytes] = []
        randomness = os.urandom(16 * len(batch)).hex()
        sha256 = hashlib.sha256
        for index, (event, when) in enumerate(batch):
            if index & 63 == 63:
                # Let the FUSE loop's thread have the GIL now rather than after the
                # interpreter's switch interval (5 ms): a flush of thousands of records
                # must not hold up the opens being recorded meanwhile.
                time.sleep(0)
            event_id = _event_id(randomness[32 * index:32 * index + 32])
            pieces = None
            if type(event) is _Keyed:
                pieces = event.pieces
                if pieces is False:
                    pieces = event.pieces = _cut(event.event)
                event = event.event
            if pieces is not None:
                head, after_id, after_time, after_prev, tail = pieces
                body = b"".join((head, event_id.encode(), after_id,
                                 _format_time(when).encode(), after_time, prev.encode(),
                                 after_prev, str(seq).encode(), tail))
            else:
                # What a caller passed under the stamped names is replaced.
                fields = {**event, "eventTime": _format_time(when),
                          "eventId": event_id, "seq": seq, "prev": prev}
                fields.pop("hash", None)
                body = _encode(fields)
            digest = sha256(body).hexdigest()
            line = _line(body, digest)
            if size and size + len(line) > self.max_bytes:
                if chunk:
                    yield chunk, seq, prev
                    chunk = []
                self._rotate()
                size = 0
            chunk.append(line)
            size += len(line)
            seq, prev = seq + 1, digest
        if chunk:
            yield chunk, seq, prev

    def _current_size(self) -> int:
        try:
            return os.stat(self.directory / LOG_NAME).st_size
        except FileNotFoundError:
            return 0

    def _append(self, lines: list[bytes]) -> None:
        """One write and one fsync; a failed write is cut back off the file."""
        path = self.directory / LOG_NAME
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
            created = False
        try:
            start = os.fstat(fd).st_size
            data = b"".join(lines)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {path}")
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.directory)

    def _rotate(self) -> None:
        """audit.log → audit.log.1 → ... → audit.log.<keep-1>, dropping the oldest."""
        for path in log_files(self.directory):  # oldest first: each rename frees a name
            index = _rotation_index(path.name)
            if index + 1 >= self.keep:
                path.unlink()
            else:
                os.rename(path, self.directory / f"{LOG_NAME}.{index + 1}")
        fsync_directory(self.directory)

    def _update_head(self) -> None:
        try:
            self._write_head(self._next_seq - 1, self._prev)
        except OSError as error:
            # The records are durable; verify accepts a log ahead of its head, and the
            # next flush writes the head again.
            log.error("can't update %s: %s", self.directory / HEAD_NAME, error)

    def _write_head(self, seq: int, digest: str) -> None:
        path = self.directory / HEAD_NAME
        tmp = path.with_name(HEAD_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps({"seq": seq, "hash": digest}).encode() + b"\n")
            # Durable before the rename: a head emptied by a crash would look like tampering.
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    # --- in the daemon ---

    async def run(self, *, interval: float = 1.0, task_status=_TASK_STATUS_IGNORED) -> None:
        """Flush every `interval` seconds (sooner after a burst) in a worker thread, and
        once more when cancelled. A failing flush is logged and retried: the records
        stay queued (bounded by max_pending, drops counted)."""
        import trio

        wake = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake_soon() -> None:
            # record() may run in any thread; only the trio thread may set the Event.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(wake.set)

        self._wake = wake_soon
        task_status.started()
        try:
            while True:
                with trio.move_on_after(interval):
                    await wake.wait()
                wake = trio.Event()
                await trio.to_thread.run_sync(self._flush_logged)
        finally:
            self._wake = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._flush_logged, True)

    def _flush_logged(self, final: bool = False) -> None:
        try:
            self.flush()
        except AuditError as error:
            if final:
                log.error("%s; %d records not written", error, self.pending)
            elif not self._failing:
                # Once per outage, not once per interval.
                log.error("%s; %d records queued, retrying", error, self.pending)
            self._failing = True
        else:
            if self._failing:
                log.info("audit log writable again")
            self._failing = False

    def close(self) -> None:
        """The final flush; raises AuditError if it fails."""
        self.flush()


# --- checking ----------------------------------------------------------------------

@dataclass
class VerifyResult:
    ok: bool
    records: int
    files: list[str]  # names, oldest first
    problem: str | None  # the first bad record: file, line, seq and what is wrong
    # Set when the oldest record present is not the first ever (older files rotated
    # away): its prev is accepted as the chain's anchor.
    anchor: str | None = None


def verify(directory: Path) -> VerifyResult:
    """Check the chain over every file, oldest first, and the tail against audit.head.

    Safe while the daemon writes: a line being appended is left to the head check, and
    a rotation in the middle (files renamed under us) means checking again.
    """
    directory = Path(directory)
    attempts = 10  # the daemon rotates at most once a flush; tests rotate far faster
    while True:
        attempts -= 1
        before = _snapshot(directory)
        try:
            result = _verify_once(directory, [path for path, _ in before])
        except FileNotFoundError:
            if not attempts:
                raise
            continue
        if result.ok or not attempts or _snapshot(directory) == before:
            return result


def _snapshot(directory: Path) -> list[tuple[Path, int]]:
    """The log files and their inodes: a rotation renames every one."""
    found = []
    for path in log_files(directory):
        with contextlib.suppress(FileNotFoundError):
            found.append((path, os.stat(path).st_ino))
    return found


def _verify_once(directory: Path, paths: list[Path]) -> VerifyResult:
    files = [path.name for path in paths]
    count, anchor, last, last_at = 0, None, None, ""
    head_at: tuple[str, str] | None = None  # (where, hash) of the record the head names

    def failed(problem: str) -> VerifyResult:
        return VerifyResult(False, count, files, problem, anchor)

    try:
        head = _read_head(directory)
    except ValueError as error:
        return failed(str(error))
    for path in paths:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                where = f"{path.name} line {number}"
                after = f"after seq {last['seq']}" if last else "the first record"
                if not line.endswith(b"\n"):
                    if path.name == LOG_NAME:
                        # Being appended now, or torn by a crash (never acknowledged,
                        # and dropped at restart): the head check decides.
                        break
                    return failed(f"{where} ({after}): incomplete record (no newline): "
                                  "the file was cut")
                record = _parse(line)
                if record is None:
                    return failed(f"{where} ({after}): unparsable record")
                seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
                if not (isinstance(seq, int) and isinstance(prev, str) and isinstance(digest, str)):
                    return failed(f"{where} ({after}): not a chained record (no seq, prev or hash)")
                where = f"{where} (seq {seq})"
                if record_hash(record) != digest:
                    return failed(f"{where}: hash mismatch: the record was altered")
                if last is None:
                    if seq == 0 and prev != GENESIS:
                        return failed(f"{where}: the first record ever must have prev {GENESIS}")
                    if seq != 0:
                        anchor = (f"records before seq {seq} rotated away; chain anchored at "
                                  f"prev {prev[:12]}…")
                elif seq != last["seq"] + 1:
                    return failed(f"{where}: expected seq {last['seq'] + 1}: records removed "
                                  "or reordered")
                elif prev != last["hash"]:
                    return failed(f"{where}: prev does not match the hash of seq {last['seq']} "
                                  f"({last_at}): records removed, reordered or replaced")
                if head is not None and seq == head["seq"]:
                    head_at = (where, digest)
                last, last_at = record, where
                count += 1
    if head is None:
        if count:
            return failed(f"{HEAD_NAME} is missing: records cut from the tail would go unnoticed")
    elif head["seq"] >= 0 or count:
        ends = f"seq {last['seq']} ({last_at})" if last else "no records"
        if last is None or head["seq"] > last["seq"]:
            return failed(f"{HEAD_NAME} records seq {head['seq']} but the log ends at {ends}: "
                          "records were cut from the tail")
        if head_at is None:
            if head["seq"] >= 0:
                return failed(f"{HEAD_NAME} records seq {head['seq']}, older than every record "
                              "present")
        elif head_at[1] != head["hash"]:
            return failed(f"{head_at[0]}: hash differs from the one {HEAD_NAME} recorded: "
                          "the tail was rewritten")
    return VerifyResult(True, count, files, None, anchor)


# --- reading -----------------------------------------------------------------------

def _records(lines: Iterable[bytes]) -> Iterator[dict]:
    # Readers skip what they can't parse (verify is what reports it), including the
    # line a running daemon is in the middle of appending.
    for line in lines:
        if line.endswith(b"\n") and (record := _parse(line)) is not None:
            yield record


def _matches_secret(record: dict, secret: str) -> bool:
    resources = record.get("resources")
    items = resources if isinstance(resources, list) else [resources]
    return any(isinstance(item, dict) and secret in (item.get("name"), item.get("arn"))
               for item in items)


def _filter(records: Iterable[dict], *, secret: str | None, uid: int | None,
            denied_only: bool, since: datetime | None, until: datetime | None) -> Iterator[dict]:
    # eventTime has one fixed format in UTC, so times compare as strings.
    low = _format_time(since) if since is not None else None
    high = _format_time(until) if until is not None else None
    for record in records:
        if secret is not None and not _matches_secret(record, secret):
            continue
        if uid is not None:
            identity = record.get("userIdentity")
            if not isinstance(identity, dict) or identity.get("uid") != uid:
                continue
        if denied_only and record.get("decision") != "deny":
            continue
        when = record.get("eventTime")
        if (low is not None or high is not None) and not isinstance(when, str):
            continue
        if low is not None and when < low or high is not None and when >= high:
            continue
        yield record


def read_records(directory: Path, *, secret: str | None = None, uid: int | None = None,
                 denied_only: bool = False, since: datetime | None = None,
                 until: datetime | None = None) -> Iterator[dict]:
    """Records oldest first, filtered: `secret` matches a resource's name or ARN,
    `since` is inclusive and `until` exclusive (naive times are UTC)."""
    def every() -> Iterator[dict]:
        for path in log_files(directory):
            try:
                with open(path, "rb") as handle:
                    yield from _records(handle)
            except FileNotFoundError:
                continue  # rotated away while we read
    return _filter(every(), secret=secret, uid=uid, denied_only=denied_only,
                   since=since, until=until)


def last_records(directory: Path, n: int) -> list[dict]:
    """The last `n` records, oldest first, reading only the newest files needed."""
    found: list[dict] = []
    for path in reversed(log_files(directory)):
        if len(found) >= n:
            break
        try:
            with open(path, "rb") as handle:
                found[:0] = collections.deque(_records(handle), maxlen=n - len(found))
        except FileNotFoundError:
            continue
    return found


def follow_records(directory: Path, *, after: int | None = None,
                   poll: float = 0.5) -> Iterator[dict]:
    """Records as they are written, forever: those after seq `after`, else those after
    the newest record at the time of the call. Follows rotation; records in files
    rotated past between two polls are read back."""
    if after is None:
        newest = last_records(directory, 1)
        after = newest[0]["seq"] if newest and isinstance(newest[0].get("seq"), int) else -1
    return _follow(Path(directory), after, poll)


def _follow(directory: Path, last: int, poll: float) -> Iterator[dict]:
    path = directory / LOG_NAME
    handle = None
    buffer = b""
    while True:
        if handle is None:
            with contextlib.suppress(FileNotFoundError):
                handle = open(path, "rb")  # noqa: SIM115 - held across polls
        progressed = False
        if handle is not None:
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            # Read before switching: records written just before a rotation are in the
            # file we hold, now named audit.log.1.
            data = handle.read()
            if data:
                progressed = True
                complete, _, buffer = (buffer + data).rpartition(b"\n")
                for record in _records(line + b"\n" for line in complete.split(b"\n")):
                    seq = record.get("seq")
                    if not isinstance(seq, int) or seq <= last:
                        continue
                    if seq > last + 1:
                        yield from (missed for missed in read_records(directory)
                                    if isinstance(missed.get("seq"), int)
                                    and last < missed["seq"] < seq)
                    yield record
                    last = seq
            if current != os.fstat(handle.fileno()).st_ino:
                handle.close()
                handle, buffer, progressed = None, b"", True
        if not progressed:
            time.sleep(poll)
