"""Metrics, health and structured logs, through a real daemon on a real mount.

One daemon serves the module with `--metrics-listen` and `--log-format json`; its
/metrics is scraped with urllib and parsed with prometheus_client's own parser, so a
test sees what Prometheus would. Counters are compared before and after what a test
did: decisions are counted as the audit writer flushes (every second), hence the waits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    Daemon,
    free_port,
    reachable_directory,
    run_as,
    serving_daemon,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from secretfs import logs
from secretfs.metrics import MAX_DECISION_SERIES, OTHER, Metrics
from secretfs.options import MountOptions, OptionsError

# Every value stored here: none may appear in the daemon's log.
VALUE = "metrics-value-4b1f0c"
NEW_VALUE = "metrics-value-new-77a2"


class Scraped(dict):
    """Samples of one scrape: (name, labels) -> value."""

    def get_value(self, name: str, **labels: str) -> float:
        return self.get((name, frozenset(labels.items())), 0.0)

    def named(self, name: str) -> dict[frozenset, float]:
        return {labels: value for (sample, labels), value in self.items() if sample == name}


@pytest.fixture(scope="module")
def served():
    port = free_port()
    with serving_daemon("--metrics-listen", f"127.0.0.1:{port}", "--log-format", "json",
                        prefix="secretfs-metrics-") as daemon:
        daemon.metrics_url = f"http://127.0.0.1:{port}"
        daemon.call("create-secret", "--name", "metrics/db", "--secret-string", VALUE)
        yield daemon


def get(daemon: Daemon, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(daemon.metrics_url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def scrape(daemon: Daemon) -> Scraped:
    status, headers, body = get(daemon, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = Scraped()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def opens(scraped: Scraped, decision: str) -> float:
    return scraped.get_value("secretfs_decisions_total", source="fuse",
                             action="GetSecretValue", decision=decision)


# --- what is counted ----------------------------------------------------------------

def settle(daemon: Daemon) -> None:
    """Wait until every audit record so far is written and counted (the count follows
    the write by an fsync of the head)."""
    assert wait_for(lambda: scrape(daemon).get_value("secretfs_audit_queue_depth") == 0)
    time.sleep(0.3)


@pytest.mark.mount
def test_opens_are_counted_by_decision_with_their_latency(served, make_user):
    outsider = make_user()
    path = served.path("metrics/db/AWSCURRENT")
    settle(served)
    before = scrape(served)

    assert path.read_text() == VALUE
    denied = run_as(outsider, "cat", str(path))
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr

    expected = (opens(before, "allow") + 1, opens(before, "deny") + 1)
    assert wait_for(lambda: (opens(s := scrape(served), "allow"), opens(s, "deny")) == expected)
    settle(served)  # and nothing more was on its way
    after = scrape(served)
    assert (opens(after, "allow"), opens(after, "deny")) == expected
    # The histogram counts the allowed open (a denied one never gets a file).
    name = "secretfs_fuse_open_duration_seconds"
    assert after.get_value(name + "_count") == before.get_value(name + "_count") + 1
    assert after.get_value(name + "_sum") > before.get_value(name + "_sum")
    buckets = sorted((float(dict(labels)["le"]), value)
                     for labels, value in after.named(name + "_bucket").items())
    counts = [value for _, value in buckets]
    assert counts == sorted(counts) and counts[-1] == after.get_value(name + "_count")
    assert buckets[-1][0] == float("inf")


@pytest.mark.mount
def test_api_calls_have_a_latency_histogram_and_a_count_by_status(served):
    before = scrape(served)
    for _ in range(2):
        served.call("describe-secret", "--secret-id", "metrics/db")
    missing = served.cli("describe-secret", "--secret-id", "metrics/none", check=False)
    assert missing.returncode != 0
    after = scrape(served)
    histogram = "secretfs_api_request_duration_seconds"
    for sample in ("_count", "_bucket"):
        labels = {"action": "DescribeSecret", **({"le": "+Inf"} if sample == "_bucket" else {})}
        assert after.get_value(histogram + sample, **labels) == before.get_value(
            histogram + sample, **labels) + 3
    assert after.get_value(histogram + "_sum", action="DescribeSecret") > before.get_value(
        histogram + "_sum", action="DescribeSecret")
    requests = "secretfs_api_requests_total"
    assert after.get_value(requests, action="DescribeSecret", code="200") == before.get_value(
        requests, action="DescribeSecret", code="200") + 2
    assert after.get_value(requests, action="DescribeSecret", code="400") == before.get_value(
        requests, action="DescribeSecret", code="400") + 1


@pytest.mark.mount
def test_rotation_successes_and_failures_per_secret(served):
    served.call("create-secret", "--name", "metrics/rotated", "--secret-string", VALUE)
    served.call("create-secret", "--name", "metrics/broken", "--secret-string", VALUE)
    served.call("rotate-secret", "--secret-id", "metrics/rotated",
                "--rotation-lambda-arn", "secretfs:random-password")
    served.call("rotate-secret", "--secret-id", "metrics/broken",
                "--rotation-lambda-arn", "exec:/bin/false")

    def rotations(secret: str, result: str) -> float:
        return scrape(served).get_value("secretfs_rotations_total", secret=secret,
                                        result=result)

    assert wait_for(lambda: rotations("metrics/rotated", "success") == 1)
    assert wait_for(lambda: rotations("metrics/broken", "failure") == 1)
    scraped = scrape(served)
    assert scraped.get_value("secretfs_rotations_total", secret="metrics/rotated",
                             result="failure") == 0
    assert scraped.get_value("secretfs_rotations_total", secret="metrics/broken",
                             result="success") == 0
    # The failing rotation waits for its retry (a minute away): flagged until then.
    failing = scraped.named("secretfs_rotation_failing")
    assert failing[frozenset({("secret", "metrics/broken")})] == 1
    assert failing[frozenset({("secret", "metrics/rotated")})] == 0
    assert frozenset({("secret", "metrics/db")}) not in failing  # no rotation


@pytest.mark.mount
def test_the_age_of_awscurrent_per_secret(served):
    served.call("create-secret", "--name", "metrics/aging", "--secret-string", VALUE)

    def age() -> float:
        return scrape(served).get_value("secretfs_secret_current_age_seconds",
                                        secret="metrics/aging")

    assert 0 <= age() < 30
    assert wait_for(lambda: age() >= 1.0)
    served.call("put-secret-value", "--secret-id", "metrics/aging", "--secret-string",
                NEW_VALUE)
    assert age() < 1.0  # the new version is AWSCURRENT now
    scraped = scrape(served)
    assert scraped.get_value("secretfs_secrets") >= 4
    assert scraped.get_value("secretfs_secrets_unlisted") == 0


@pytest.mark.mount
def test_audit_queue_depth_and_writer_state_are_exposed(served):
    scraped = scrape(served)
    assert ("secretfs_audit_queue_depth", frozenset()) in scraped
    assert scraped.get_value("secretfs_audit_failing") == 0
    assert scraped.get_value("secretfs_audit_records_written_total") > 0


# --- the listener -------------------------------------------------------------------

@pytest.mark.mount
def test_healthz_answers_ok_then_503_while_the_audit_log_cant_be_written(served):
    status, headers, body = get(served, "/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    report = json.loads(body)
    assert isinstance(report.pop("auditQueue"), int)
    assert report == {"status": "ok", "mount": "ok", "store": "ok", "audit": "ok"}
    audit_dir = served.state_dir / "audit"
    # Root writes through any mode bits: a read-only bind mount stops it.
    subprocess.run(["mount", "--bind", str(audit_dir), str(audit_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(audit_dir)], check=True)
        served.path("metrics/db/AWSCURRENT").read_text()  # a record to write
        assert wait_for(lambda: get(served, "/healthz")[0] == 503)
        # At once: the directory isn't writable. Within a second: the writer failed.
        assert wait_for(lambda: "can't be written" in json.loads(get(served, "/healthz")[2])[
            "audit"])
        status, _, body = get(served, "/healthz")
        report = json.loads(body)
        assert status == 503 and report["status"] == "failing" and report["mount"] == "ok"
        assert report["store"] == "ok" and report["auditQueue"] >= 1
        assert scrape(served).get_value("secretfs_audit_failing") == 1
    finally:
        subprocess.run(["umount", str(audit_dir)], check=True)
    # The queued records are written at the next flush, and the daemon is healthy again.
    assert wait_for(lambda: get(served, "/healthz")[0] == 200)
    assert scrape(served).get_value("secretfs_audit_failing") == 0


@pytest.mark.mount
def test_only_metrics_and_healthz_are_served(served):
    assert get(served, "/")[0] == 404
    assert get(served, "/metrics/x")[0] == 404
    status, headers, _ = get(served, "/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = get(served, "/healthz", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert get(served, "/metrics?name[]=secretfs_secrets")[0] == 200


@pytest.mark.mount
def test_a_non_loopback_metrics_address_is_refused_in_one_line(state_dir):
    holder = reachable_directory("secretfs-metrics-refused-")
    mountpoint = holder / "secrets"
    mountpoint.mkdir()
    daemon = Daemon(state_dir=state_dir, mountpoint=mountpoint)
    try:
        refused = daemon.cli("mount", str(mountpoint), "--state-dir", str(state_dir),
                             "--metrics-listen", "0.0.0.0:9464", check=False)
        assert refused.returncode != 0
        message = refused.stderr.decode()
        assert message.count("\n") == 1, message
        assert "0.0.0.0 is not a loopback address" in message
        assert "--metrics-allow-remote" in message
        assert not os.path.ismount(mountpoint)
    finally:
        daemon.stop()
        shutil.rmtree(holder, ignore_errors=True)


def test_metrics_options_are_flags_and_config_keys():
    assert MountOptions(metrics_listen="127.0.0.1:9464").metrics_endpoint() == (
        "127.0.0.1", 9464)
    assert MountOptions(metrics_listen="[::1]:9464").metrics_endpoint() == ("::1", 9464)
    assert MountOptions(metrics_listen="localhost:1").metrics_endpoint() == ("localhost", 1)
    assert MountOptions().metrics_endpoint() is None
    for address in ("10.0.0.1:9464", "0.0.0.0:9464", "host.example:9464"):
        with pytest.raises(OptionsError, match="not a loopback address"):
            MountOptions(metrics_listen=address).metrics_endpoint()
    assert MountOptions(metrics_listen="0.0.0.0:9464",
                        metrics_allow_remote=True).metrics_endpoint() == ("0.0.0.0", 9464)
    with pytest.raises(OptionsError, match="give HOST:PORT"):
        MountOptions(metrics_listen="9464").metrics_endpoint()
    # Handed to the detached daemon as flags, and read from config.json.
    import argparse

    parser = argparse.ArgumentParser()
    MountOptions.add_arguments(parser)
    given = MountOptions(metrics_listen="0.0.0.0:9464", metrics_allow_remote=True,
                         log_format="json")
    assert MountOptions.from_args(parser.parse_args(given.argv())) == given
    configured = MountOptions().with_config(
        {"MetricsListen": "127.0.0.1:9100", "MetricsAllowRemote": True, "LogFormat": "json"})
    assert configured == MountOptions(metrics_listen="127.0.0.1:9100",
                                      metrics_allow_remote=True, log_format="json")
    assert MountOptions(metrics_listen="127.0.0.1:1").with_config(
        {"MetricsListen": "127.0.0.1:2"}).metrics_listen == "127.0.0.1:1"


def test_decision_series_are_bounded():
    """A refused network request names its action from the client's header: past
    MAX_DECISION_SERIES series, new actions are counted under ~other."""
    class Service:
        AWS_ACTIONS = frozenset({"GetSecretValue"})
        EXTENSION_ACTIONS = frozenset()

    metrics = Metrics(Service(), None, None, Path("/"))
    events = [{"eventName": f"Made{index}", "eventSource": "https", "decision": "deny"}
              for index in range(MAX_DECISION_SERIES + 10)]
    metrics.audited(events + [{"eventName": "Made0", "eventSource": "https",
                               "decision": "deny"}])
    # The first family collected; the others read a live daemon's parts.
    samples = next(metrics.collect()).samples
    assert len(samples) == MAX_DECISION_SERIES + 1
    counts = {sample.labels["action"]: sample.value for sample in samples}
    assert counts["Made0"] == 2 and counts[OTHER] == 10


# --- logs -----------------------------------------------------------------------------

@pytest.mark.mount
def test_json_log_lines_parse_and_hold_no_secret_value(served):
    # Lines of every kind by now: start-up, a failed rotation (a warning), the
    # read-only audit directory (an error). Unmounting adds the last ones.
    served.stop()
    served.start()
    lines = (served.state_dir / "daemon.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert record["time"].endswith("Z")
    levels = {record["level"] for record in records}
    assert {"INFO", "WARNING", "ERROR"} <= levels, levels
    assert any(record["logger"] == "secretfs.rotation.runner"
               and "metrics/broken" in record["message"] for record in records)
    text = "\n".join(lines)
    for value in (VALUE, NEW_VALUE):
        assert value not in text


@pytest.mark.mount
def test_under_journald_lines_carry_the_priority(monkeypatch):
    """With stderr on the stream $JOURNAL_STREAM names (as systemd sets it up), the
    daemon writes journald's format: a <N> priority before each line."""
    holder = reachable_directory("secretfs-journal-")
    daemon = Daemon(state_dir=holder / "state", mountpoint=holder / "secrets")
    daemon.mountpoint.mkdir()
    try:
        daemon.cli("init", "--state-dir", str(daemon.state_dir))
        log_file = daemon.state_dir / "daemon.log"
        log_file.touch(mode=0o600)
        status = log_file.stat()
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        daemon.start()
        daemon.stop()
        lines = log_file.read_text().splitlines()
    finally:
        daemon.stop()
        if not os.path.ismount(daemon.mountpoint):
            shutil.rmtree(holder, ignore_errors=True)
    assert lines and all(line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>") for line in lines)
    assert any(line.startswith("<6>secretfs: serving ") for line in lines), lines
    assert any(line.startswith("<6>secretfs: unmounted ") for line in lines), lines


def test_log_formatters():
    record = logging.makeLogRecord({"name": "secretfs.x", "levelno": logging.WARNING,
                                    "levelname": "WARNING", "msg": "rotated %s",
                                    "args": ("prod/db",), "secret": "prod/db"})
    fields = json.loads(logs.JsonFormatter().format(record))
    assert fields["message"] == "rotated prod/db" and fields["level"] == "WARNING"
    assert fields["logger"] == "secretfs.x" and fields["secret"] == "prod/db"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    fields = json.loads(logs.JsonFormatter().format(record))
    assert "RuntimeError: boom" in fields["exception"]
    assert "\n" not in logs.JsonFormatter().format(record)
    journal = logs.JournalFormatter().format(record).splitlines()
    assert journal[0] == "<4>secretfs.x: rotated prod/db"
    assert len(journal) > 1 and all(line.startswith("<4>") for line in journal)
    assert [logs.priority(level) for level in (logging.DEBUG, logging.INFO, logging.ERROR,
                                               logging.CRITICAL)] == [7, 6, 3, 2]
