"""The audit log: the chain on disk, what verify names, the writer's guarantees
(non-blocking record, bounded memory, no secret values), the trio task, the readers
and the `secretfs audit` verbs. Real files in tmp_path; no mocks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from secretfs import audit, cli
from secretfs.audit import GENESIS, AuditError, AuditLog, read_records, verify
from secretfs.state import StateDir

ARN = "arn:aws:secretsmanager:us-east-1:000000000000:secret:prod/db-AbCdEf"
START = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


def event(**fields) -> dict:
    base = {
        "eventName": "GetSecretValue", "eventSource": "fuse",
        "userIdentity": {"uid": 1000, "gid": 1000, "user": "alice", "pid": 4242,
                         "exe": "/usr/bin/cat", "unit": "app.service"},
        "resources": {"arn": ARN, "name": "prod/db", "versionStage": ["AWSCURRENT"]},
        "decision": "allow", "decidedBy": "identity-policy user:alice/ReadDb#Stmt1",
    }
    return {**base, **fields}


class Clock:
    """A wall clock the test drives: each reading is one second after the last."""

    def __init__(self, start: datetime = START):
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def directory(tmp_path) -> Path:
    return tmp_path / "audit"


def written(directory: Path, n: int, **kwargs) -> AuditLog:
    """A log with records seq 0..n-1 flushed (in two flushes)."""
    log = AuditLog(directory, **kwargs)
    for i in range(n):
        log.record(event(n=i))
        if i == n // 2:
            log.flush()
    log.flush()
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def on_disk(directory: Path) -> list[dict]:
    return list(read_records(directory))


def assert_chained(records: list[dict], first_seq: int = 0) -> None:
    assert [r["seq"] for r in records] == list(range(first_seq, first_seq + len(records)))
    for before, after in zip(records, records[1:], strict=False):
        assert after["prev"] == before["hash"]
    for record in records:
        assert audit.record_hash(record) == record["hash"]


# --- the chain ------------------------------------------------------------------------

def test_chain_runs_across_flushes_and_a_restart(directory):
    log = AuditLog(directory)
    for i in range(3):
        log.record(event(n=i))
    assert log.flush() == 3
    log.record(event(n=3))
    log.record(event(n=4))
    assert log.flush() == 2
    assert log.flush() == 0
    log.close()

    restarted = AuditLog(directory)
    restarted.record(event(n=5))
    restarted.close()

    records = on_disk(directory)
    assert [r["n"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert_chained(records)
    assert verify(directory) == audit.VerifyResult(True, 6, ["audit.log"], None)


def test_a_record_is_stamped_canonical_json_with_its_hash(directory):
    log = AuditLog(directory, clock=Clock())
    original = event(seq=99, hash="forged")
    log.record(original)
    original["decision"] = "deny"  # a caller reusing its dict changes nothing queued
    log.flush()

    line = lines_of(directory / "audit.log")[0]
    record = json.loads(line)
    assert record["eventTime"] == "2026-11-28T10:00:01.000000Z"
    assert uuid.UUID(record["eventId"]).version == 4
    assert (record["seq"], record["prev"], record["decision"]) == (0, GENESIS, "allow")
    # The line is the canonical JSON the hash covers, with the hash added last.
    covered = json.dumps({k: v for k, v in record.items() if k != "hash"},
                         sort_keys=True, separators=(",", ":")).encode()
    assert record["hash"] == hashlib.sha256(covered).hexdigest()
    assert line == covered[:-1] + f',"hash":"{record["hash"]}"}}\n'.encode()
    assert json.loads((directory / "audit.head").read_text()) == {"seq": 0, "hash": record["hash"]}


_JSON_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | _JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_JSON_TEXT, inner, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_JSON_TEXT, _JSON_VALUES, max_size=6))
def test_canonical_json_is_the_standard_librarys_bytes(record):
    """Whichever encoder writes it, the bytes are the ones a verifier using only
    Python's json module computes: escapes, key order, big integers, surrogates."""
    assert audit.canonical(record) == json.dumps(
        {k: v for k, v in record.items() if k != "hash"},
        sort_keys=True, separators=(",", ":")).encode()


def test_event_ids_are_distinct_uuid4s(directory):
    log = AuditLog(directory)
    for n in range(500):
        log.record(event(n=n))
    log.flush()
    ids = [uuid.UUID(record["eventId"]) for record in on_disk(directory)]
    assert len(set(ids)) == 500
    assert {(i.version, i.variant) for i in ids} == {(4, uuid.RFC_4122)}


# --- keyed records (the hot path's decisions) -------------------------------------------

def keyed(event_: dict):
    """A key and build for record_keyed: the event, as a hashable key."""
    return json.dumps(event_, sort_keys=True), json.loads


def assert_canonical_lines(directory: Path) -> list[dict]:
    """Each line is its record's canonical JSON (as the standard library writes it)
    with the hash of those bytes added last; the chain verifies."""
    records = []
    for line in lines_of(directory / "audit.log"):
        record = json.loads(line)
        covered = json.dumps({k: v for k, v in record.items() if k != "hash"},
                             sort_keys=True, separators=(",", ":")).encode()
        assert line == covered[:-1] + f',"hash":"{hashlib.sha256(covered).hexdigest()}"}}\n'.encode()
        records.append(record)
    assert verify(directory).ok
    return records


# Text that looks like the placeholders a keyed record's encoding is cut at.
_PLACEHOLDER_LIKE = st.sampled_from(["\x00i", "\x00t", "\x00p", "\x00s", "\\u0000i",
                                     '"\\u0000s"', "\u0000s", "é\x00t", "\x7f"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_JSON_TEXT | _PLACEHOLDER_LIKE, _JSON_VALUES | _PLACEHOLDER_LIKE,
                       max_size=6),
       st.sampled_from(["GetSecretValue", "\x00i", "Ünïcode"]))
def test_a_keyed_record_is_written_as_the_same_event_recorded_whole(fields, name):
    """Whatever the event holds (the stamped names, text like the cut marks,
    non-ASCII that makes the encoder fall back): the keyed line is the canonical
    JSON of the event plus the stamps, chained, as record() writes it."""
    fields.pop("hash", None)
    if not audit.FORBIDDEN_KEYS.isdisjoint(fields):
        return
    original = {**fields, "eventName": name}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "audit"
        log = AuditLog(directory)
        log.record(dict(original))
        for _ in range(2):
            log.record_keyed(*keyed(original))
        log.flush()
        records = assert_canonical_lines(directory)
    stamped = ("eventTime", "eventId", "seq", "prev", "hash")
    bodies = [{k: v for k, v in record.items() if k not in stamped} for record in records]
    expected = {k: v for k, v in original.items() if k not in stamped}
    assert bodies == [expected] * 3
    assert [record["seq"] for record in records] == [0, 1, 2]
    assert len({record["eventId"] for record in records}) == 3


def test_keyed_and_whole_records_chain_together_across_flushes_and_a_restart(directory):
    key, build = keyed(event())
    log = AuditLog(directory)
    for n in range(5):
        log.record_keyed(key, build)
        log.record(event(n=n))
    log.flush()
    log.record_keyed(key, build)
    log.flush()
    log.close()
    log = AuditLog(directory)
    log.record_keyed(key, build)
    log.flush()
    records = assert_canonical_lines(directory)
    assert [record["seq"] for record in records] == list(range(12))
    assert_chained(records)


def test_a_keyed_event_holding_a_secret_value_is_refused_when_recorded(directory):
    log = AuditLog(directory)
    with pytest.raises(ValueError, match="secret value"):
        log.record_keyed(*keyed(event(requestParameters={"SecretString": "hunter2"})))
    with pytest.raises(ValueError, match="eventName"):
        log.record_keyed(*keyed({"decision": "allow"}))
    assert log.pending == 0


def test_observers_see_keyed_records_as_their_events(directory):
    log = AuditLog(directory)
    seen = []
    log.observers.append(seen.extend)
    log.record_keyed(*keyed(event()))
    log.record(event(n=1))
    log.flush()
    assert seen == [event(), event(n=1)]


@pytest.mark.parametrize("when", [
    datetime(2026, 11, 28, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(2026, 11, 29, 0, 0, 0, 0, tzinfo=UTC),
    datetime(2000, 2, 29, 12, 0, 0, 7, tzinfo=UTC),
])
def test_the_daemons_nanosecond_stamps_are_formatted_as_datetimes_are(when):
    ns = int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000 + 999
    assert audit._format_time(ns) == audit._format_time(when) == \
        when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize("value", [1.5, [0.1], {"nested": float("nan")}])
def test_an_event_holding_a_float_is_refused(directory, value):
    log = AuditLog(directory)
    with pytest.raises(TypeError, match="float"):
        log.record(event(detail=value))
    assert log.pending == 0


def test_rotation_by_size_keeps_one_chain_across_files(directory):
    log = AuditLog(directory, max_bytes=8192, keep=20)
    for i in range(200):
        log.record(event(n=i))
        if i % 7 == 0:
            log.flush()
    log.close()

    result = verify(directory)
    assert result.ok and result.problem is None and result.anchor is None
    assert result.records == 200
    assert len(result.files) > 3 and result.files[-1] == "audit.log"
    assert result.files == sorted(result.files[:-1], key=lambda n: -int(n.rsplit(".", 1)[1])) + [
        "audit.log"]
    for name in result.files:
        assert (directory / name).stat().st_size <= 8192
    # The first record of each file carries the last hash of the file before it.
    previous = None
    for name in result.files:
        records = [json.loads(line) for line in lines_of(directory / name)]
        if previous is not None:
            assert records[0]["prev"] == previous["hash"]
            assert records[0]["seq"] == previous["seq"] + 1
        previous = records[-1]
    assert_chained(on_disk(directory))


def test_rotation_drops_the_oldest_files_and_verify_anchors_at_the_first_present(directory):
    log = written(directory, 100, max_bytes=2048, keep=3)
    log.close()
    assert sorted(os.listdir(directory)) == ["audit.head", "audit.log", "audit.log.1",
                                             "audit.log.2"]
    result = verify(directory)
    first = on_disk(directory)[0]
    assert result.ok and result.records == 100 - first["seq"]
    assert first["seq"] > 0
    assert result.anchor is not None and f"before seq {first['seq']} rotated away" in result.anchor


def test_one_flush_larger_than_a_file_is_split_across_files(directory):
    log = AuditLog(directory, max_bytes=2048, keep=50)
    for i in range(60):
        log.record(event(n=i))
    assert log.flush() == 60
    result = verify(directory)
    assert result.ok and result.records == 60 and len(result.files) > 5
    assert all((directory / name).stat().st_size <= 2048 for name in result.files)


# --- what verify names ----------------------------------------------------------------

def edit_decision(lines):
    lines[4] = lines[4].replace(b'"decision":"allow"', b'"decision":"deny"')


def delete_middle(lines):
    del lines[4]


def swap(lines):
    lines[4], lines[5] = lines[5], lines[4]


def make_unparsable(lines):
    lines[4] = lines[4][:40] + b"\n"


def edit_and_rehash(lines):
    # A forger who recomputes the altered record's hash still breaks the next link.
    record = json.loads(lines[4])
    record["decision"] = "deny"
    record["hash"] = audit.record_hash(record)
    lines[4] = json.dumps(record).encode() + b"\n"


def cut_last(lines):
    del lines[-1]


def cut_mid_line(lines):
    lines[-1] = lines[-1][:30]


@pytest.mark.parametrize(("tamper", "problem"), [
    (edit_decision, "audit.log line 5 (seq 4): hash mismatch: the record was altered"),
    (delete_middle, "audit.log line 5 (seq 5): expected seq 4: records removed or reordered"),
    (swap, "audit.log line 5 (seq 5): expected seq 4: records removed or reordered"),
    (make_unparsable, "audit.log line 5 (after seq 3): unparsable record"),
    (edit_and_rehash, "audit.log line 6 (seq 5): prev does not match the hash of seq 4 "
                      "(audit.log line 5 (seq 4)): records removed, reordered or replaced"),
    (cut_last, "audit.head records seq 9 but the log ends at seq 8 (audit.log line 9 (seq 8)):"
               " records were cut from the tail"),
    (cut_mid_line, "audit.head records seq 9 but the log ends at seq 8 (audit.log line 9 "
                   "(seq 8)): records were cut from the tail"),
])
def test_verify_names_the_first_bad_record(directory, tamper, problem):
    written(directory, 10).close()
    path = directory / "audit.log"
    lines = lines_of(path)
    tamper(lines)
    path.write_bytes(b"".join(lines))

    result = verify(directory)
    assert not result.ok
    assert result.problem.startswith(problem), result.problem


def test_verify_notices_a_rewritten_tail_and_a_missing_head(directory):
    written(directory, 5).close()
    path = directory / "audit.log"
    lines = lines_of(path)
    record = json.loads(lines[-1])
    record["decision"] = "deny"
    record["hash"] = audit.record_hash(record)
    lines[-1] = json.dumps(record).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert verify(directory).problem == (
        "audit.log line 5 (seq 4): hash differs from the one audit.head recorded: "
        "the tail was rewritten")

    (directory / "audit.head").unlink()
    assert verify(directory).problem.startswith("audit.head is missing")


def test_verify_names_a_file_removed_from_the_middle(directory):
    written(directory, 60, max_bytes=2048, keep=20).close()
    files = verify(directory).files
    assert len(files) >= 4
    removed = directory / files[1]
    first_after = json.loads(lines_of(directory / files[2])[0])
    removed.unlink()
    expected = json.loads(lines_of(directory / files[0])[-1])["seq"] + 1
    assert verify(directory).problem == (
        f"{files[2]} line 1 (seq {first_after['seq']}): expected seq {expected}: "
        "records removed or reordered")


def test_verify_names_a_rotated_file_cut_short(directory):
    written(directory, 40, max_bytes=2048).close()
    path = directory / "audit.log.1"
    lines = lines_of(path)
    path.write_bytes(b"".join(lines)[:-20])
    seq = json.loads(lines[-2])["seq"]
    assert verify(directory).problem == (
        f"audit.log.1 line {len(lines)} (after seq {seq}): incomplete record (no newline): "
        "the file was cut")


def test_verify_while_the_daemon_writes(directory):
    log = AuditLog(directory, max_bytes=1024, keep=5)  # a rotation every other record
    stop = threading.Event()

    def daemon():
        while not stop.is_set():
            log.record(event())
            log.flush()

    writer = threading.Thread(target=daemon)
    writer.start()
    results = []
    try:
        # Long enough to land in the middle of appends and rotations many times.
        while len(results) < 200:
            results.append(verify(directory))
    finally:
        stop.set()
        writer.join()
    assert [r.problem for r in results if not r.ok] == []


def test_an_empty_directory_verifies_as_an_empty_log(directory):
    AuditLog(directory)
    assert verify(directory) == audit.VerifyResult(True, 0, [], None)


# --- restarts after damage --------------------------------------------------------------

def test_restart_refuses_to_continue_over_a_cut_tail(directory):
    written(directory, 5).close()
    path = directory / "audit.log"
    path.write_bytes(b"".join(lines_of(path)[:-1]))
    with pytest.raises(AuditError, match="audit.head records seq 4 but the log ends at seq 3"):
        AuditLog(directory)
    # Nothing was written over the evidence.
    assert "records were cut from the tail" in verify(directory).problem


def test_restart_drops_a_record_torn_by_a_crash_and_continues(directory, caplog):
    written(directory, 5).close()
    path = directory / "audit.log"
    # A crash in the middle of write(): the record never reached its newline, and
    # flush() never returned, so audit.head still names seq 4.
    with open(path, "ab") as handle:
        handle.write(b'{"decidedBy":"root","decision":"al')

    log = AuditLog(directory)
    assert "incomplete record" in caplog.text
    log.record(event(n=5))
    log.close()
    assert verify(directory) == audit.VerifyResult(True, 6, ["audit.log"], None)
    assert [r["n"] for r in on_disk(directory)] == [0, 1, 2, 3, 4, 5]


def test_a_head_behind_the_log_is_a_crash_before_its_update_not_damage(directory):
    written(directory, 5).close()
    head = directory / "audit.head"
    records = on_disk(directory)
    head.write_text(json.dumps({"seq": 2, "hash": records[2]["hash"]}))
    assert verify(directory).ok
    log = AuditLog(directory)
    log.record(event(n=5))
    log.close()
    assert verify(directory).ok


# --- the writer's guarantees -----------------------------------------------------------

def test_record_does_no_io(directory):
    log = AuditLog(directory)
    thread = threading.get_ident()
    seen: list[str] = []
    watching = False

    def hook(name, args):
        if watching and threading.get_ident() == thread:
            seen.append(name)

    sys.addaudithook(hook)  # stays for the process; inert outside this window
    watching = True
    try:
        for i in range(100):
            log.record(event(n=i))
    finally:
        watching = False
    assert seen == []

    watching = True
    try:
        log.flush()
    finally:
        watching = False
    assert "open" in seen  # the hook does see I/O when there is some


def test_record_returns_when_the_directory_is_unwritable_and_flush_keeps_the_queue(
        directory, tmp_path):
    log = AuditLog(directory)
    log.record(event(n=0))
    log.flush()
    # chmod would not stop root, who runs the mount tests: put a file where the
    # directory was instead.
    directory.rename(tmp_path / "aside")
    directory.write_text("")

    log.record(event(n=1))
    log.record(event(n=2))
    assert log.pending == 2
    with pytest.raises(AuditError, match=r"can't write the audit log in .*audit: Not a directory"):
        log.flush()
    assert log.pending == 2

    directory.unlink()
    (tmp_path / "aside").rename(directory)
    assert log.flush() == 2
    assert log.pending == 0
    assert [r["n"] for r in on_disk(directory)] == [0, 1, 2]
    assert verify(directory).ok


def test_eight_threads_recording_while_another_flushes(directory):
    log = AuditLog(directory, max_bytes=1 << 20)
    stop = threading.Event()

    def flusher():
        while not stop.wait(0.005):
            log.flush()

    def recorder(worker: int):
        for i in range(1000):
            log.record(event(worker=worker, n=i))

    flushing = threading.Thread(target=flusher)
    flushing.start()
    workers = [threading.Thread(target=recorder, args=(w,)) for w in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    flushing.join()
    log.flush()

    result = verify(directory)
    assert result.ok and result.records == 8000
    records = on_disk(directory)
    assert len({r["eventId"] for r in records}) == 8000
    for w in range(8):  # each thread's records in the order it made them
        assert [r["n"] for r in records if r["worker"] == w] == list(range(1000))


def test_overflow_drops_new_records_and_says_how_many(directory):
    log = AuditLog(directory, max_pending=10)
    for i in range(15):
        log.record(event(n=i))
    assert log.pending == 10
    assert log.flush() == 11

    records = on_disk(directory)
    assert [r["n"] for r in records[:10]] == list(range(10))
    dropped = records[10]
    assert (dropped["eventName"], dropped["count"], dropped["eventSource"]) == (
        "AuditRecordsDropped", 5, "internal")
    assert verify(directory).ok

    log.record(event(n=15))
    assert log.flush() == 1  # counted once
    assert on_disk(directory)[-1]["n"] == 15


def test_drops_during_an_outage_are_counted_until_a_flush_succeeds(directory, tmp_path):
    log = AuditLog(directory, max_pending=3)
    directory.rename(tmp_path / "aside")
    directory.write_text("")
    for i in range(5):
        log.record(event(n=i))
    with pytest.raises(AuditError):
        log.flush()
    log.record(event(n=5))
    directory.unlink()
    (tmp_path / "aside").rename(directory)

    assert log.flush() == 4
    assert on_disk(directory)[-1]["count"] == 3
    assert verify(directory).ok


@pytest.mark.parametrize("bad", [
    {"SecretString": "hunter2"},
    {"requestParameters": {"SecretBinary": "aHVudGVyMg=="}},
    {"responseElements": [{"x": 1}, {"RandomPassword": "p@ss"}]},
])
def test_events_holding_secret_values_are_refused(directory, bad):
    log = AuditLog(directory)
    with pytest.raises(ValueError, match="secret value"):
        log.record(event(**bad))
    assert log.pending == 0


def test_events_that_are_not_json_or_lack_a_name_are_refused(directory):
    log = AuditLog(directory)
    with pytest.raises(TypeError, match="datetime"):
        log.record(event(when=START))
    with pytest.raises(ValueError, match="eventName"):
        log.record({"decision": "allow"})
    assert log.pending == 0


def test_directory_is_0700_and_files_0600(directory):
    old = os.umask(0o002)
    try:
        written(directory, 40, max_bytes=2048).close()
    finally:
        os.umask(old)
    assert directory.stat().st_mode & 0o777 == 0o700
    names = os.listdir(directory)
    assert {"audit.head", "audit.log", "audit.log.1"} <= set(names)
    for name in names:
        assert (directory / name).stat().st_mode & 0o777 == 0o600, name


def test_recording_is_cheap(directory):
    log = AuditLog(directory)
    started = time.perf_counter()
    for i in range(10_000):
        log.record(event(n=i))
    assert time.perf_counter() - started < 1.0  # a sanity bound, not a benchmark


# --- the trio task ----------------------------------------------------------------------

async def until(condition, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_run_flushes_on_its_interval_and_once_more_when_cancelled(directory):
    log = AuditLog(directory)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: log.run(interval=0.05, task_status=task_status))
        log.record(event(n=0))
        await until(lambda: log.pending == 0)
        assert [r["n"] for r in on_disk(directory)] == [0]
        nursery.cancel_scope.cancel()
        log.record(event(n=1))
    assert [r["n"] for r in on_disk(directory)] == [0, 1]


async def test_cancellation_flushes_what_the_interval_did_not(directory):
    log = AuditLog(directory)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: log.run(interval=3600, task_status=task_status))
        log.record(event(n=0))
        await trio.sleep(0.05)
        assert on_disk(directory) == []
        nursery.cancel_scope.cancel()
    assert [r["n"] for r in on_disk(directory)] == [0]


async def test_a_burst_wakes_the_task_before_its_interval(directory):
    log = AuditLog(directory)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: log.run(interval=3600, task_status=task_status))
        await trio.to_thread.run_sync(
            lambda: [log.record(event(n=i)) for i in range(audit.WAKE_AT)])
        await until(lambda: log.pending == 0)
        nursery.cancel_scope.cancel()
    assert verify(directory).records == audit.WAKE_AT


async def test_a_failing_flush_is_logged_once_and_retried(directory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="secretfs.audit")
    log = AuditLog(directory)
    directory.rename(tmp_path / "aside")
    directory.write_text("")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: log.run(interval=0.01, task_status=task_status))
        log.record(event(n=0))
        await trio.sleep(0.1)
        assert log.pending == 1
        directory.unlink()
        (tmp_path / "aside").rename(directory)
        await until(lambda: log.pending == 0)
        nursery.cancel_scope.cancel()
    assert [r.levelname for r in caplog.records] == ["ERROR", "INFO"]
    assert "1 records queued, retrying" in caplog.records[0].getMessage()
    assert verify(directory).records == 1


# --- readers ----------------------------------------------------------------------------

def test_read_records_filters(directory):
    log = AuditLog(directory, clock=Clock())  # records at 10:00:01, :02, ...
    log.record(event(n=0))
    log.record(event(n=1, decision="deny", decidedBy="implicit-deny",
                     errorCode="AccessDeniedException"))
    log.record(event(n=2, userIdentity={"uid": 33, "gid": 33}))
    log.record(event(n=3, resources={"name": "prod/web"}))
    log.record(event(n=4, eventName="ListSecrets", resources=None))
    log.record(event(n=5, resources=[{"arn": ARN}]))
    log.close()

    def ns(**filters):
        return [r["n"] for r in read_records(directory, **filters)]

    assert ns() == [0, 1, 2, 3, 4, 5]
    assert ns(secret="prod/db") == [0, 1, 2]
    assert ns(secret=ARN) == [0, 1, 2, 5]
    assert ns(uid=33) == [2]
    assert ns(denied_only=True) == [1]
    assert ns(uid=1000, denied_only=True) == [1]
    assert ns(since=datetime(2026, 11, 28, 10, 0, 3, tzinfo=UTC)) == [2, 3, 4, 5]
    assert ns(until=datetime(2026, 11, 28, 10, 0, 3, tzinfo=UTC)) == [0, 1]
    # A naive time is UTC; an offset is honoured.
    assert ns(since=datetime(2026, 11, 28, 10, 0, 5)) == [4, 5]
    assert ns(since=datetime(2026, 11, 28, 11, 0, 5,
                             tzinfo=UTC).astimezone(datetime.now().astimezone().tzinfo)) == []


def test_last_records_reads_back_across_files(directory):
    written(directory, 50, max_bytes=2048).close()
    assert [r["seq"] for r in audit.last_records(directory, 12)] == list(range(38, 50))
    assert audit.last_records(directory, 0) == []
    assert len(audit.last_records(directory, 1000)) == 50


def take(records, n: int, timeout: float = 10.0) -> list[dict]:
    """The next n records of a follow, failing (not hanging) if they don't come."""
    taken: list[dict] = []
    reader = threading.Thread(target=lambda: taken.extend(itertools.islice(records, n)),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"only {len(taken)} of {n} records came"
    return taken


def test_follow_yields_new_records_through_rotations(directory):
    log = written(directory, 3, max_bytes=2048)
    follow = audit.follow_records(directory, after=1, poll=0.01)
    assert [r["seq"] for r in take(follow, 1)] == [2]
    # Several rotations between two reads: the files passed over are read back.
    for i in range(3, 40):
        log.record(event(n=i))
    log.flush()
    assert len(verify(directory).files) > 3
    assert [r["seq"] for r in take(follow, 37)] == list(range(3, 40))
    log.record(event(n=40))
    log.flush()
    assert [r["n"] for r in take(follow, 1)] == [40]


def test_follow_from_now_on_skips_what_is_there(directory):
    log = written(directory, 3)
    follow = audit.follow_records(directory, poll=0.01)
    log.record(event(n=3))
    log.flush()
    assert [r["n"] for r in take(follow, 1)] == [3]


# --- the CLI ----------------------------------------------------------------------------

@pytest.fixture
def state(tmp_path) -> Path:
    return tmp_path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verify_ok_and_failed(state, capsys):
    directory = StateDir(state).audit_dir
    assert directory == state / "audit"
    written(directory, 10).close()
    assert run_cli(capsys, "audit", "verify", "--state-dir", str(state)) == (
        0, "audit log OK: 10 records in 1 files\n", "")

    path = directory / "audit.log"
    lines = lines_of(path)
    edit_decision(lines)
    path.write_bytes(b"".join(lines))
    assert run_cli(capsys, "audit", "verify", "--state-dir", str(state)) == (
        1, "", "audit log FAILED: audit.log line 5 (seq 4): hash mismatch: "
               "the record was altered\n")


def test_cli_verify_uses_the_environment_and_reports_the_anchor(state, capsys, monkeypatch):
    written(StateDir(state).audit_dir, 100, max_bytes=2048, keep=2).close()
    monkeypatch.setenv("SECRETFS_STATE_DIR", str(state))
    code, out, _ = run_cli(capsys, "audit", "verify")
    assert code == 0
    assert re.fullmatch(r"audit log OK: \d+ records in 2 files \(records before seq \d+ "
                        r"rotated away; chain anchored at prev [0-9a-f]{12}…\)\n", out)


def test_cli_without_an_audit_log_is_one_line_exit_1(state, capsys):
    code, out, err = run_cli(capsys, "audit", "verify", "--state-dir", str(state))
    assert (code, out) == (1, "")
    assert err == f"secretfs: {state / 'audit'}: No such file or directory\n"


def test_cli_tail_prints_json_lines(state, capsys):
    written(StateDir(state).audit_dir, 30).close()
    code, out, err = run_cli(capsys, "audit", "tail", "--state-dir", str(state))
    assert (code, err) == (0, "")
    assert [json.loads(line)["seq"] for line in out.splitlines()] == list(range(10, 30))
    code, out, _ = run_cli(capsys, "audit", "tail", "-n", "2", "--state-dir", str(state))
    assert [json.loads(line)["n"] for line in out.splitlines()] == [28, 29]


def test_cli_search_filters(state, capsys):
    log = AuditLog(StateDir(state).audit_dir, clock=Clock())
    log.record(event(n=0))
    log.record(event(n=1, decision="deny", userIdentity={"uid": 33}))
    log.record(event(n=2, resources={"name": "prod/web"}, decision="deny"))
    log.close()

    def ns(*flags):
        code, out, err = run_cli(capsys, "audit", "search", "--state-dir", str(state), *flags)
        assert (code, err) == (0, "")
        return [json.loads(line)["n"] for line in out.splitlines()]

    assert ns() == [0, 1, 2]
    assert ns("--secret", "prod/db") == [0, 1]
    assert ns("--secret", ARN, "--denied-only") == [1]
    assert ns("--uid", "33") == [1]
    assert ns("--since", "2026-11-28T10:00:02Z") == [1, 2]
    assert ns("--since", "2026-11-28T11:00:02+01:00", "--until", "2026-11-28T10:00:03") == [1]


@pytest.mark.parametrize(("argv", "message"), [
    (["audit"], "secretfs audit: error: the following arguments are required: ACTION"),
    (["audit", "search", "--since", "yesterday"],
     "secretfs audit search: error: argument --since: expected an ISO 8601 time, "
     "got 'yesterday'"),
    (["audit", "tail", "-n", "-3"],
     "secretfs audit tail: error: argument -n: expected a count (0 or more), got '-3'"),
])
def test_cli_bad_usage_is_one_line_exit_252(capsys, argv, message):
    assert run_cli(capsys, *argv) == (252, "", message + "\n")


def test_cli_audit_verbs_load_neither_botocore_nor_trio(state):
    written(StateDir(state).audit_dir, 3).close()
    script = (
        "import sys\n"
        "from secretfs import cli\n"
        f"assert cli.main(['audit', 'verify', '--state-dir', {str(state)!r}]) == 0\n"
        f"assert cli.main(['audit', 'search', '--state-dir', {str(state)!r}]) == 0\n"
        "assert 'botocore.session' not in sys.modules\n"
        "assert 'trio' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


def test_cli_tail_follow_prints_records_as_written_until_interrupted(state):
    directory = StateDir(state).audit_dir
    log = written(directory, 3)

    def line(process) -> dict:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "no output from secretfs audit tail --follow"
        return json.loads(process.stdout.readline())

    # SIGINT as a terminal's Ctrl-C would deliver it, even where the suite itself was
    # started in the background with SIGINT ignored (which a child would inherit).
    process = subprocess.Popen(
        [sys.executable, "-m", "secretfs.cli", "audit", "tail", "-n", "1", "--follow",
         "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert line(process)["n"] == 2
        log.record(event(n=3))
        log.flush()
        assert line(process)["n"] == 3
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == cli.EXIT_INTERRUPTED
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
