"""secretfs's benchmark suite: the hot read against its floors and against HTTP
agents, cold reads, scale, promotion latency and the cost of policies.

    python bench/run.py [--quick] [--out bench/results.md]

Run as root (FUSE mounts, a throw-away user). Needs the `bench` extra
(`pip install -e '.[bench]'`: moto's server and matplotlib). Writes a Markdown
report and a PNG chart beside it (same name, .png) and prints, as its last line,
`targets: N of M hold`. Everything is measured side by side in one run and
reported as ratios too, because this machine is noisy. `--quick` is a subset
(about two minutes on a loaded 2-core machine, a third of it building the
10,000-secret store); the full run takes about 20 minutes, most of it building the
100,000-secret store (the service's CreateSecret gets slower as the store grows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from harness import (
    REGION,
    BenchError,
    SecretfsMount,
    Stats,
    Subject,
    bench_directory,
    connections_opened,
    file_subject,
    free_port,
    get_secret_value,
    memory_kib,
    minimal_fs,
    moto_server,
    new_value,
    postgres_server,
    read_file,
    refused_subject,
    remove_directory,
    secretsmanager_client,
    throwaway_user,
    time_concurrent,
    time_in_child,
    time_interleaved,
    tmpfs_file,
)

NAME = "bench/db"
READERS = 8


@dataclass(frozen=True)
class Plan:
    """How many samples each benchmark takes."""

    quick: bool
    file_reads: int  # per subject, one reader
    http_calls: int
    file_reads_each: int  # per reader, with READERS readers
    http_calls_each: int
    cold_versions: int
    restarts: int
    sizes: tuple[int, ...]
    scale_reads: int
    promotions: int
    policy_reads: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 1000, 200, 150, 30, 30, 1, (100, 10_000), 800, 30, 400)
        return cls(False, 5000, 2000, 500, 250, 200, 5, (100, 10_000, 100_000), 3000, 100, 3000)


@dataclass
class Target:
    text: str
    measured: str = "not measured"
    holds: bool = False


@dataclass
class Report:
    plan: Plan
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    chart: dict[str, object] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    unmeasured: list[str] = field(default_factory=list)

    def section(self, title: str, lines: list[str]) -> None:
        self.sections.append((title, lines))

    def target(self, key: str, measured: str, holds: bool) -> None:
        self.targets[key].measured, self.targets[key].holds = measured, holds


# --- formatting ----------------------------------------------------------------------

def us(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def ms(value_us: float) -> str:
    return f"{value_us / 1000:.2f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# --- 1. hot read -------------------------------------------------------------------------

def bench_hot(plan: Plan, report: Report, base: Path) -> None:
    value = new_value("hot")
    https_port = free_port()
    daemon = SecretfsMount(base, "secretfs", "--listen", f"127.0.0.1:{https_port}")
    daemon.init()
    with contextlib.ExitStack() as stack:
        moto_ready = stack.enter_context(moto_server(base))  # starts while the rest does
        stack.enter_context(daemon.running())
        version = daemon.call("CreateSecret", {"Name": NAME, "SecretString": value.decode()})
        key = daemon.call("CreateAccessKey", {"Principal": "uid:0"}, extension=True)
        floor = stack.enter_context(minimal_fs(base, NAME, version["VersionId"], value))
        shm = stack.enter_context(tmpfs_file(value))
        moto_url = moto_ready()
        secretsmanager_client(moto_url, "testing", "testing").create_secret(
            Name=NAME, SecretString=value.decode())
        https_url = f"https://127.0.0.1:{https_port}"

        def https_client():
            return secretsmanager_client(https_url, key["AccessKeyId"],
                                         key["SecretAccessKey"], daemon.ca_bundle)

        def subjects(files: int, calls: int) -> list[Subject]:
            http = {"warmup": 10, "block": 10}
            return [
                file_subject("tmpfs file (/dev/shm)", str(shm), files, value),
                file_subject("minimal pyfuse3 FS, AWSCURRENT", str(floor / NAME / "AWSCURRENT"),
                             files, value),
                file_subject("minimal pyfuse3 FS, versions/<id>",
                             str(floor / NAME / "versions" / version["VersionId"]), files, value),
                file_subject("secretfs mount, AWSCURRENT", daemon.path(NAME, "AWSCURRENT"),
                             files, value),
                file_subject("secretfs mount, versions/<id>",
                             daemon.path(NAME, "versions", version["VersionId"]), files, value),
                Subject("secretfs HTTPS GetSecretValue (boto3)",
                        lambda: get_secret_value(https_client(), NAME), calls, value, **http),
                Subject("moto server HTTP GetSecretValue (boto3)",
                        lambda: get_secret_value(secretsmanager_client(
                            moto_url, "testing", "testing"), NAME), calls, value, **http),
            ]

        single = {label: Stats.of(samples) for label, samples in
                  time_interleaved(subjects(plan.file_reads, plan.http_calls)).items()}
        # Concurrent readers: each subject alone; in a full run in two passes, in
        # opposite orders.
        together: dict[str, list[int]] = {}
        passes = 1 if plan.quick else 2
        each = subjects(plan.file_reads_each // passes, plan.http_calls_each // passes)
        for subject in [*each, *reversed(each)][:len(each) * passes]:
            together.setdefault(subject.label, []).extend(time_concurrent(subject, READERS))
        concurrent = {label: Stats.of(samples) for label, samples in together.items()}
        probe = https_client()
        for _ in range(20):
            probe.get_secret_value(SecretId=NAME)
        connections = connections_opened(probe, https_url)

    floor_label, mount_label = "minimal pyfuse3 FS, AWSCURRENT", "secretfs mount, AWSCURRENT"
    tmpfs_label, https_label = "tmpfs file (/dev/shm)", "secretfs HTTPS GetSecretValue (boto3)"
    rows = []
    for readers, stats in ((1, single), (READERS, concurrent)):
        for label, s in stats.items():
            rows.append([label, str(readers), f"{s.n:,}", us(s.p50), us(s.p99),
                         f"{s.p50 / stats[mount_label].p50:.3g}",
                         f"{s.p50 / stats[floor_label].p50:.3g}"])
    mount, floor_p50 = single[mount_label], single[floor_label].p50
    report.section("1. Hot read", [
        "open+read+close of the same bytes (a ~60-byte JSON value), timed in µs with "
        "`perf_counter_ns` after a warm-up. One reader: all subjects interleaved in turns. "
        f"{READERS} readers: {READERS} processes on the same subject at once (this machine "
        "has 2 cores), samples pooled. The minimal pyfuse3 filesystem (`bench/minimal_fs.py`) "
        "serves the same layout from memory with secretfs's mount options, reader tasks, "
        "timeouts and `keep_cache`, and no policy, audit or store. HTTP agents: boto3 "
        "clients reused (connections opened by the HTTPS client for 20 calls: "
        f"{connections if connections is not None else 'unknown'}); moto's server speaks "
        "plain HTTP.", "",
        *table(["what is read", "readers", "samples", "p50 µs", "p99 µs",
                "p50 ÷ secretfs AWSCURRENT", "p50 ÷ minimal FUSE"], rows)])
    report.chart["hot"] = {"single": single, "concurrent": concurrent}
    ratio = mount.p50 / floor_p50
    report.target("a", f"{ratio:.2f}x ({us(mount.p50)} µs vs {us(floor_p50)} µs); tmpfs: "
                       f"{mount.p50 / single[tmpfs_label].p50:.0f}x "
                       f"({us(single[tmpfs_label].p50)} µs)", ratio <= 1.25)
    speedup = single[https_label].p50 / mount.p50
    report.target("b", f"{speedup:.1f}x ({us(single[https_label].p50)} µs vs "
                       f"{us(mount.p50)} µs)", speedup >= 5)


# --- 2. cold read ------------------------------------------------------------------------

def _timed_read(path: str) -> tuple[int, bytes]:
    start = time.perf_counter_ns()
    data = read_file(path)
    return time.perf_counter_ns() - start, data


def bench_cold(plan: Plan, report: Report, base: Path) -> None:
    daemon = SecretfsMount(base, "cold")
    daemon.init()
    current = daemon.path(NAME, "AWSCURRENT")
    cold, hot, after_start = [], [], []
    with daemon.running():
        daemon.call("CreateSecret", {"Name": NAME, "SecretString": new_value("c").decode()})
        read_file(current)
        for n in range(plan.cold_versions):
            value = new_value(f"cold{n}")
            daemon.call("PutSecretValue", {"SecretId": NAME, "SecretString": value.decode()})
            for samples in (cold, hot):
                elapsed, data = _timed_read(current)
                if data != value:
                    raise BenchError("AWSCURRENT did not show the version just put")
                samples.append(elapsed)
        for _ in range(plan.restarts):
            daemon.stop()
            daemon.start()
            elapsed, data = _timed_read(current)
            if data != value:
                raise BenchError("AWSCURRENT after a restart is not the last version put")
            after_start.append(elapsed)
    rows = [[label, f"{s.n}", us(s.p50), us(s.p99)] for label, s in (
        ("first read of a version just put (PutSecretValue moved AWSCURRENT): readlink, "
         "lookup, open, read with decryption", Stats.of(cold)),
        ("the next read of the same path (hot)", Stats.of(hot)),
        ("first read of AWSCURRENT after the daemon started (all lookups cold, decryption)",
         Stats.of(after_start)))]
    report.section("2. Cold read", [
        "Reads of `<mount>/bench/db/AWSCURRENT` whose version was not decrypted yet "
        "(local master key, AES-256-GCM envelope).", "",
        *table(["read", "samples", "p50 µs", "p99 µs"], rows)])


# --- 3. scale ------------------------------------------------------------------------------

def _build_store(state: Path, size: int) -> float:
    """A store of `size` secrets under scale/, made through the service in-process."""
    from secretfs.daemon import init_state, open_service
    from secretfs.identity import SYSTEM
    from secretfs.state import DEFAULT_ACCOUNT_ID, StateDir

    init_state(state, region=REGION, account_id=DEFAULT_ACCOUNT_ID)
    service = open_service(StateDir(state))
    value = new_value("scale").decode()
    began = time.perf_counter()
    for n in range(size):
        service.call("CreateSecret", {"Name": f"scale/s{n:06d}", "SecretString": value}, SYSTEM)
    service.store.close()
    return time.perf_counter() - began


def _list_all(daemon: SecretfsMount) -> tuple[int, int, float]:
    """ListSecrets through every page (MaxResults 100): secrets, pages, seconds."""
    client, params, count, pages = daemon.client(), {"MaxResults": 100}, 0, 0
    began = time.perf_counter()
    while True:
        page = client.call("ListSecrets", params)
        count, pages = count + len(page.get("SecretList", [])), pages + 1
        if not page.get("NextToken"):
            return count, pages, time.perf_counter() - began
        params = {"MaxResults": 100, "NextToken": page["NextToken"]}


def _time_ls(directory: str) -> float:
    began = time.perf_counter()
    subprocess.run(["ls", "-1", directory], stdout=subprocess.DEVNULL, check=True, timeout=600)
    return time.perf_counter() - began


def bench_scale(plan: Plan, report: Report, base: Path) -> None:
    daemons = {size: SecretfsMount(base, f"scale{size}") for size in plan.sizes}
    with ProcessPoolExecutor(max_workers=2) as pool:
        built = {size: pool.submit(_build_store, daemons[size].state, size)
                 for size in sorted(plan.sizes, reverse=True)}
        build_seconds = {size: future.result() for size, future in built.items()}
    facts: dict[int, dict] = {size: {} for size in plan.sizes}
    with contextlib.ExitStack() as stack:
        for size, daemon in sorted(daemons.items()):
            facts[size]["start"] = daemon.start()
            stack.callback(daemon.stop)
            facts[size]["rss"] = memory_kib(daemon.pid)["VmRSS"] if daemon.pid else None
            elapsed, _ = _timed_read(daemon.path(f"scale/s{size // 2:06d}", "AWSCURRENT"))
            facts[size]["first"] = elapsed / 1000
        paths = {size: daemon.path(f"scale/s{size // 2:06d}", "AWSCURRENT")
                 for size, daemon in daemons.items()}
        reads = time_interleaved([file_subject(str(size), path, plan.scale_reads,
                                               read_file(path))
                                  for size, path in sorted(paths.items())])
        for size, daemon in sorted(daemons.items()):
            facts[size]["hot"] = Stats.of(reads[str(size)])
            first = _time_ls(daemon.path("scale"))
            facts[size]["ls"] = (first, min(_time_ls(daemon.path("scale")) for _ in range(2)))
            count, pages, seconds = _list_all(daemon)
            if count != size:
                raise BenchError(f"ListSecrets returned {count} of {size} secrets")
            facts[size]["list"] = (pages, seconds)
            facts[size]["peak"] = memory_kib(daemon.pid)["VmHWM"] if daemon.pid else None

    def mib(kib):
        return f"{kib / 1024:.0f}" if kib else "?"

    rows = [[f"{size:,}", f"{build_seconds[size]:.1f}", f"{f['start']:.2f}",
             f"{mib(f['rss'])} / {mib(f['peak'])}", us(f["first"]), us(f["hot"].p50),
             us(f["hot"].p99), f"{f['ls'][0]:.3f} / {f['ls'][1]:.3f}",
             f"{f['list'][1]:.2f} ({f['list'][0]} pages)"] for size, f in sorted(facts.items())]
    report.section("3. Scale", [
        "Stores of N secrets `scale/s000000…`, built in-process through the service API "
        "(setup, not a target), each then mounted; all N-stores stay mounted together and "
        "their hot reads are interleaved. Start: `secretfs mount` until it returns (daemon "
        "up, mount and socket ready). RSS: after start / peak after the listings. `ls`: "
        "`ls -1 <mount>/scale` (N entries), first and best of two more. ListSecrets: every "
        "page of 100 over the Unix socket.", "",
        *table(["secrets", "build s", "start → ready s", "daemon RSS MiB (start / peak)",
                "first read µs (one read)", "hot read p50 µs", "hot read p99 µs", "ls s (first / again)",
                "ListSecrets all pages s"], rows)])
    report.chart["scale"] = {size: f["hot"] for size, f in facts.items()}
    small, large = min(plan.sizes), max(plan.sizes)
    ratio = facts[large]["hot"].p50 / facts[small]["hot"].p50
    report.target("c", f"{ratio:.2f}x ({us(facts[large]['hot'].p50)} µs at {large:,} vs "
                       f"{us(facts[small]['hot'].p50)} µs at {small:,})", ratio <= 1.5)


# --- 4. promotion ----------------------------------------------------------------------------

def bench_promotion(plan: Plan, report: Report, base: Path) -> None:
    daemon = SecretfsMount(base, "promote")
    daemon.init()
    current = daemon.path(NAME, "AWSCURRENT")
    calls, visible, polls = [], [], []
    clock = time.perf_counter_ns
    with daemon.running():
        client = daemon.client()
        old = client.call("CreateSecret", {"Name": NAME, "SecretString": new_value("p").decode()})
        old_id = old["VersionId"]
        for n in range(plan.promotions):
            value = new_value(f"p{n}")
            new_id = client.call("PutSecretValue", {
                "SecretId": NAME, "SecretString": value.decode(),
                "VersionStages": ["AWSPENDING"]})["VersionId"]
            for _ in range(5):
                read_file(current)  # the old value, hot
            called = clock()
            client.call("UpdateSecretVersionStage", {
                "SecretId": NAME, "VersionStage": "AWSCURRENT", "MoveToVersionId": new_id,
                "RemoveFromVersionId": old_id})
            returned = clock()
            tries, deadline = 0, returned + 5_000_000_000
            while True:
                tries += 1
                if read_file(current) == value:
                    seen = clock()
                    break
                if clock() > deadline:
                    raise BenchError("a promoted value was not visible 5 s after the call")
            calls.append(returned - called)
            visible.append(seen - returned)
            polls.append(tries)
            old_id = new_id
    shown, call = Stats.of(visible), Stats.of(calls)
    first_try = sum(1 for tries in polls if tries == 1)
    report.section("4. Promotion", [
        f"{plan.promotions} promotions: PutSecretValue (AWSPENDING), five hot reads of "
        "AWSCURRENT, then UpdateSecretVersionStage over the Unix socket "
        "(`secretfs.api.client.Client`); from the call's return, AWSCURRENT is read in a loop "
        f"until it shows the new value. The first read after the return already showed it in "
        f"{first_try} of {len(polls)} promotions (most reads needed: {max(polls)}).", "",
        *table(["what", "samples", "p50 ms", "p99 ms", "max ms"], [
            ["UpdateSecretVersionStage call (round trip)", str(call.n), ms(call.p50),
             ms(call.p99), ms(call.max)],
            ["call returned → new value read through the mount", str(shown.n),
             ms(shown.p50), ms(shown.p99), ms(shown.max)]])])
    report.chart["promotion"] = [v / 1e6 for v in visible]
    report.target("d", f"p50 {ms(shown.p50)} ms, p99 {ms(shown.p99)} ms",
                  shown.p50 <= 10_000)


# --- 6. fleet: cross-host promotion, KMS cold reads --------------------------------------

def _wait_until(read: Callable[[], bytes], value: bytes, seconds: float, what: str) -> int:
    """perf_counter_ns when `read()` first returned `value`."""
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    while True:
        if read() == value:
            return time.perf_counter_ns()
        if time.perf_counter_ns() > deadline:
            raise BenchError(f"{what} was not visible {seconds:.0f} s after the call")


def _both_seen(read_a: Callable[[], bytes], read_b: Callable[[], bytes], value: bytes,
               seconds: float, what: str) -> tuple[int, int]:
    """perf_counter_ns when each reader first returned `value`, reading them in turns."""
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    seen: list[int | None] = [None, None]
    while None in seen:
        for index, read in enumerate((read_a, read_b)):
            if seen[index] is None and read() == value:
                seen[index] = time.perf_counter_ns()
        if time.perf_counter_ns() > deadline:
            raise BenchError(f"{what} was not visible on both hosts {seconds:.0f} s after "
                             "the call")
    return seen[0], seen[1]


def _readable(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return read_file(path)
        except OSError:
            return b""
    return read


def bench_fleet(plan: Plan, report: Report, base: Path) -> None:
    with postgres_server(base) as url:
        host_a, host_b = SecretfsMount(base, "host-a"), SecretfsMount(base, "host-b")
        host_a.init("--store", url)
        host_b.init("--join", "--store", url, "--keys-from", str(host_a.state / "keys.json"))
        calls, on_a, on_b = [], [], []
        with host_a.running(), host_b.running():
            client = host_a.client()
            first = new_value("f")
            old_id = client.call("CreateSecret", {"Name": NAME, "SecretString": first.decode()})[
                "VersionId"]
            _wait_until(_readable(host_b.path(NAME, "AWSCURRENT")), first, 10, "a new secret")
            for n in range(plan.promotions):
                value = new_value(f"f{n}")
                new_id = client.call("PutSecretValue", {
                    "SecretId": NAME, "SecretString": value.decode(),
                    "VersionStages": ["AWSPENDING"]})["VersionId"]
                for host in (host_a, host_b):
                    for _ in range(3):
                        read_file(host.path(NAME, "AWSCURRENT"))  # the old value, hot
                called = time.perf_counter_ns()
                client.call("UpdateSecretVersionStage", {
                    "SecretId": NAME, "VersionStage": "AWSCURRENT", "MoveToVersionId": new_id,
                    "RemoveFromVersionId": old_id})
                returned = time.perf_counter_ns()
                seen_a, seen_b = _both_seen(
                    _readable(host_a.path(NAME, "AWSCURRENT")),
                    _readable(host_b.path(NAME, "AWSCURRENT")), value, 10, "a promotion")
                calls.append(returned - called)
                on_b.append(seen_b - returned)
                on_a.append(seen_a - returned)
                old_id = new_id
    call, remote, local = Stats.of(calls), Stats.of(on_b), Stats.of(on_a)
    report.section("6. Fleet: promotion across hosts", [
        "Two daemons (hosts A and B, each its own mount and state directory) share one "
        "PostgreSQL database on loopback (a throw-away server, "
        "fsync off). "
        f"{plan.promotions} promotions through A's API (UpdateSecretVersionStage over its Unix "
        "socket); from the call's return, A's and B's mounts are read in turns until each "
        "shows the new value (A refreshed before answering; B learns of it by "
        "LISTEN/NOTIFY).", "",
        *table(["what", "samples", "p50 ms", "p99 ms", "max ms"], [
            ["UpdateSecretVersionStage on A (round trip, PostgreSQL commit)", str(call.n),
             ms(call.p50), ms(call.p99), ms(call.max)],
            ["call returned → new value read through B's mount", str(remote.n),
             ms(remote.p50), ms(remote.p99), ms(remote.max)],
            ["call returned → new value read through A's own mount", str(local.n), ms(local.p50), ms(local.p99),
             ms(local.max)]])])
    report.chart["fleet"] = [v / 1e6 for v in on_b]


def _kms_client(endpoint: str):
    import boto3

    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name=REGION).client("kms", endpoint_url=endpoint)


def bench_kms(plan: Plan, report: Report, base: Path) -> None:
    # moto's server takes any credentials; the daemons find these in their environment.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    samples: dict[str, list[int]] = {}
    with moto_server(base) as moto_ready:
        endpoint = moto_ready()
        key_id = _kms_client(endpoint).create_key(Description="secretfs bench")[
            "KeyMetadata"]["KeyId"]
        local = SecretfsMount(base, "local")
        kms = SecretfsMount(base, "kms")
        local.init()
        kms.init("--key-provider", "kms", "--kms-key-id", key_id, "--kms-endpoint-url",
                 endpoint, "--kms-region", REGION)
        with local.running(), kms.running():
            for daemon in (local, kms):
                daemon.call("CreateSecret", {"Name": NAME,
                                             "SecretString": new_value("k").decode()})
            for n in range(plan.cold_versions):
                for label, daemon in (("local key file", local), ("AWS KMS (moto)", kms)):
                    value = new_value(f"k{n}")
                    daemon.call("PutSecretValue", {"SecretId": NAME,
                                                   "SecretString": value.decode()})
                    for kind in ("cold", "hot"):
                        elapsed, data = _timed_read(daemon.path(NAME, "AWSCURRENT"))
                        if data != value:
                            raise BenchError("AWSCURRENT did not show the version just put")
                        samples.setdefault(f"{label}: {kind}", []).append(elapsed)
    stats = {label: Stats.of(found) for label, found in samples.items()}
    base_p50 = stats["local key file: cold"].p50
    report.section("7. Cold read with AWS KMS", [
        "As in 2, the first read of a version just put (decryption included), with the master "
        "key in the local key file and in KMS (moto's server on loopback: one Decrypt call "
        "over HTTP per cold version; a real KMS adds its network round trip, typically a few "
        "ms in-region). Interleaved, one version at a time on each.", "",
        *table(["read", "samples", "p50 µs", "p99 µs", "p50 ÷ local cold"],
               [[label, str(s.n), us(s.p50), us(s.p99), f"{s.p50 / base_p50:.3g}"]
                for label, s in stats.items()])])


# --- 5. policy cost ------------------------------------------------------------------------

def _policy(statements: list[dict]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


GRANT = {"Sid": "Grant", "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
         "Resource": f"{NAME}*"}


def _decoys(first: int, count: int) -> list[dict]:
    return [{"Sid": f"Other{n}", "Effect": "Allow",
             "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
             "Resource": f"arn:aws:secretsmanager:*:*:secret:other/app{n}/*"}
            for n in range(first, first + count)]


def bench_policy(plan: Plan, report: Report, base: Path) -> None:
    value = new_value("policy")
    plain, strict = SecretfsMount(base, "plain"), SecretfsMount(base, "strict", "--strict-names")
    results: list[tuple[str, str, str, Stats]] = []
    budget = 2.0 if plan.quick else 10.0  # seconds of samples for a slow reader, in each turn
    with contextlib.ExitStack() as stack:
        user = stack.enter_context(throwaway_user())
        principal = f"user:{user.pw_name}"
        for daemon in (plain, strict):
            daemon.init()
            stack.enter_context(daemon.running())
            daemon.call("CreateSecret", {"Name": NAME, "SecretString": value.decode()})
        mounts = (("default", plain), ("--strict-names", strict))

        def put(name: str, statements: list[dict]) -> None:
            for _, daemon in mounts:
                daemon.call("PutIdentityPolicy", {"Principal": principal, "PolicyName": name,
                                                  "PolicyDocument": _policy(statements)},
                            extension=True)

        def measure(step: str, *, granted: bool) -> None:
            turns = 1 if plan.quick else 2
            half = plan.policy_reads // turns
            root = [file_subject(f"root|{label}", daemon.path(NAME, "AWSCURRENT"), half, value,
                                 seconds=budget) for label, daemon in mounts]
            if granted:
                other = [file_subject(f"user|{label}", daemon.path(NAME, "AWSCURRENT"), half,
                                      value, seconds=budget) for label, daemon in mounts]
            else:
                other = [refused_subject(f"user, refused|{label}",
                                         daemon.path(NAME, "AWSCURRENT"), half,
                                         b"EACCES" if label == "default" else b"ENOENT",
                                         seconds=budget)
                         for label, daemon in mounts]
            samples: dict[str, list[int]] = {}
            for subjects, who in ((root, None), (other, user), (other, user),
                                  (root, None))[:2 * turns]:
                for label, taken in time_in_child(subjects, user=who).items():
                    samples.setdefault(label, []).extend(taken)
            for label, taken in samples.items():
                reader, mount = label.split("|")
                results.append((step, reader, mount, Stats.of(taken)))

        measure("0", granted=False)
        put("Grant", [GRANT])
        measure("1 (the grant)", granted=True)
        put("Others0", _decoys(0, 9))
        measure("10", granted=True)
        for n in range(9):  # policies of 100 statements stay under the 20,480-character limit
            put(f"Others{n + 1}", _decoys(9 + 100 * n, 100 if n < 8 else 91))
        measure("1,000", granted=True)
    baseline = {step: s.p50 for step, reader, mount, s in results
                if reader == "root" and mount == "default"}
    rows = [[step, reader, mount, f"{s.n:,}", us(s.p50), us(s.p99),
             f"{s.p50 / baseline[step]:.2f}"] for step, reader, mount, s in results]
    report.section("5. Policy cost", [
        "Hot reads of AWSCURRENT by root and by a throw-away user (`useradd`), each timed "
        "inside a forked child that dropped to its uid first (no process start in the "
        "samples), on a default mount and a `--strict-names` mount of the same store; root "
        "and the user take turns (root, user, user, root; one turn each in --quick). "
        "Statements are those loaded in identity policies attached to that user: one grants "
        "GetSecretValue on `bench/db*`, the rest allow other secrets (`other/app<n>/*`), in "
        "policies of up to 100 statements. With 0 statements the user's open is refused "
        "(EACCES; ENOENT under --strict-names, where the name is hidden): that row times the "
        "refusal. Audit is on throughout (it can't be turned off, so audit-off is not "
        f"measured). A slow reader stops after {budget:.0f} s of samples per turn (at least "
        "50).", "",
        *table(["statements loaded", "reader", "mount", "samples", "p50 µs", "p99 µs",
                "p50 ÷ root on default mount"], rows)])
    report.chart["policy"] = results
    report.unmeasured.append(
        "Hot read with the audit log off: the daemon can't run without it, so there is no "
        "'off' to compare with (every row above has audit on).")


# --- the report ------------------------------------------------------------------------------

def draw_chart(report: Report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(14, 10))
    hot_axis, scale_axis, promotion_axis, policy_axis = axes.flat
    hot = report.chart.get("hot")
    if hot:
        labels = list(hot["single"])
        positions = range(len(labels))
        for offset, key, name in ((-0.2, "single", "1 reader"),
                                  (0.2, "concurrent", f"{READERS} readers")):
            stats = hot[key]
            hot_axis.barh([p + offset for p in positions], [stats[k].p50 for k in labels],
                          height=0.4, label=f"p50, {name}")
            hot_axis.scatter([stats[k].p99 for k in labels], [p + offset for p in positions],
                             marker="|", s=120, color="black")
        hot_axis.set_yticks(list(positions), labels, fontsize=8)
        hot_axis.invert_yaxis()
        hot_axis.set(xscale="log", xlabel="µs (log): bars p50, ticks p99")
    scale = report.chart.get("scale")
    if scale:
        sizes = sorted(scale)
        scale_axis.plot(sizes, [scale[s].p50 for s in sizes], "o-", label="p50")
        scale_axis.plot(sizes, [scale[s].p99 for s in sizes], "s--", label="p99")
        scale_axis.set(xscale="log", ylim=(0, None), xlabel="secrets in the store",
                       ylabel="hot read µs")
    promotion = report.chart.get("promotion")
    if promotion:
        ordered = sorted(promotion)
        promotion_axis.plot(ordered, [(n + 1) / len(ordered) for n in range(len(ordered))])
        promotion_axis.axvline(10, color="red", linestyle=":", label="target: 10 ms")
        promotion_axis.set(xlabel="ms from the API call's return to the new value read",
                           ylabel="fraction of promotions")
    policy = report.chart.get("policy")
    if policy:
        steps = list(dict.fromkeys(step for step, *_ in policy))
        series = list(dict.fromkeys((reader, mount) for _, reader, mount, _ in policy))
        width = 0.8 / len(series)
        for index, (reader, mount) in enumerate(series):
            found = {step: s.p50 for step, r, m, s in policy if (r, m) == (reader, mount)}
            policy_axis.bar([n + index * width for n, step in enumerate(steps) if step in found],
                            [found[step] for step in steps if step in found], width=width,
                            label=f"{reader}, {mount}")
        policy_axis.set_xticks([n + 0.4 - width / 2 for n in range(len(steps))], steps)
        policy_axis.set(yscale="log", xlabel="identity-policy statements loaded",
                        ylabel="hot read p50 µs (log)")
    titles = ("1. Hot read", "3. Hot read as the store grows",
              "4. Promotion visible through the mount (CDF)", "5. Policy cost")
    for axis, title in zip(axes.flat, titles, strict=True):
        axis.set_title(title)
        if axis.has_data():
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not measured", ha="center", va="center",
                      transform=axis.transAxes)
            axis.set(xticks=[], yticks=[])
    figure.suptitle(f"secretfs benchmarks ({'quick' if report.plan.quick else 'full'} run)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(report: Report, out: Path, chart: Path | None, seconds: float) -> None:
    held = sum(target.holds for target in report.targets.values())
    lines = [
        "# secretfs benchmarks", "",
        f"{'Quick' if report.plan.quick else 'Full'} run of `python bench/run.py"
        f"{' --quick' if report.plan.quick else ''}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{seconds / 60:.1f} minutes; Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. Latencies are in µs unless marked; the machine "
        "is shared and noisy, so compare ratios taken in the same run.", "",
        "## Targets", "",
        *table(["", "target", "measured", "holds"],
               [[key, t.text, t.measured, "yes" if t.holds else "**no**"]
                for key, t in report.targets.items()]),
        "", f"targets: {held} of {len(report.targets)} hold", ""]
    if chart is not None:
        lines += [f"![charts]({chart.name})", ""]
    for title, body in report.sections:
        lines += [f"## {title}", "", *body, ""]
    if report.failures or report.unmeasured:
        lines += ["## Not measured", ""]
        lines += [f"- {line}" for line in report.failures + report.unmeasured]
        lines.append("")
    out.write_text("\n".join(lines))


BENCHMARKS: list[tuple[str, Callable, tuple[str, ...]]] = [
    ("hot read", bench_hot, ("a", "b")),
    ("cold read", bench_cold, ()),
    ("scale", bench_scale, ("c",)),
    ("promotion", bench_promotion, ("d",)),
    ("policy cost", bench_policy, ()),
    ("fleet promotion", bench_fleet, ()),
    ("kms cold read", bench_kms, ()),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="A subset of a minute or two (fewer samples, 100 and 10k "
                             "secrets).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.md",
                        help="The Markdown report (default: bench/results.md); the chart is "
                             "written beside it with the suffix .png.")
    parser.add_argument("--only", nargs="+", choices=[name.split()[0] for name, *_ in BENCHMARKS],
                        help="Run only these benchmarks (the others' targets don't hold).")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/run.py needs root (FUSE mounts, a throw-away user)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, through every finally that unmounts.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = Plan.make(args.quick)
    large = f"{max(plan.sizes):,}"
    report = Report(plan, targets={
        "a": Target("hot read through the mount: p50 ≤ 1.25x the minimal pyfuse3 FS"),
        "b": Target("hot read p50 ≥ 5x faster than HTTPS GetSecretValue to secretfs"),
        "c": Target(f"hot read p50 at {large} secrets ≤ 1.5x the p50 at 100"),
        "d": Target("promotion visible through the mount ≤ 10 ms after the call (p50)"),
    })
    began = time.perf_counter()
    for name, benchmark, _ in BENCHMARKS:
        if args.only and name.split()[0] not in args.only:
            report.failures.append(f"{name}: not run (--only)")
            continue
        print(f"running: {name}", flush=True)
        base, started = bench_directory(), time.perf_counter()
        try:
            benchmark(plan, report, base)
            print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
        except Exception as error:  # one line, and the other benchmarks still run
            reason = f"{name}: failed: {type(error).__name__}: {error}".splitlines()[0]
            print(reason, flush=True)
            report.failures.append(reason)
        finally:
            try:
                remove_directory(base)
            except BenchError as error:
                print(f"{name}: {error}", flush=True)
    chart = args.out.with_suffix(".png")
    try:
        draw_chart(report, chart)
    except Exception as error:  # the table is still written
        print(f"chart: failed: {type(error).__name__}: {error}", flush=True)
        chart = None
    write_report(report, args.out, chart, time.perf_counter() - began)
    print(f"report: {args.out}" + (f", chart: {chart}" if chart else ""))
    for key, target in report.targets.items():
        print(f"({key}) {target.text}: {target.measured} -> "
              f"{'holds' if target.holds else 'does not hold'}")
    held = sum(target.holds for target in report.targets.values())
    print(f"targets: {held} of {len(report.targets)} hold", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
