"""Hot read through the mount versus the same bytes on tmpfs.

Starts a daemon on a temporary state dir, stores one secret, then times
open+read+close of <mount>/<name>/AWSCURRENT (through the label symlink) and of
<mount>/<name>/versions/<id> against a tmpfs file holding the same bytes,
interleaved. Prints p50/p99 per path and the ratios. Run as root:
python bench/hot_read.py (bench/run.py runs this comparison and more).
"""

from __future__ import annotations

import argparse
import sys

from harness import (
    SecretfsMount,
    Stats,
    bench_directory,
    file_subject,
    new_value,
    remove_directory,
    time_interleaved,
    tmpfs_file,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reads", type=int, default=20000)
    args = parser.parse_args()
    value = new_value("hot")
    base = bench_directory()
    try:
        daemon = SecretfsMount(base, "secretfs")
        daemon.init()
        with daemon.running(), tmpfs_file(value) as tmpfs:
            created = daemon.call("CreateSecret", {"Name": "bench/db",
                                                   "SecretString": value.decode()})
            subjects = [
                file_subject("tmpfs file", str(tmpfs), args.reads, value),
                file_subject("secretfs versions/<id>",
                             daemon.path("bench/db/versions", created["VersionId"]),
                             args.reads, value),
                file_subject("secretfs AWSCURRENT (symlink)",
                             daemon.path("bench/db/AWSCURRENT"), args.reads, value),
            ]
            results = {label: Stats.of(samples)
                        for label, samples in time_interleaved(subjects).items()}
    finally:
        remove_directory(base)
    floor = results["tmpfs file"].p50
    print(f"{'path':32} {'p50 µs':>9} {'p99 µs':>9} {'p50 / tmpfs':>12}")
    for label, stats in results.items():
        print(f"{label:32} {stats.p50:9.1f} {stats.p99:9.1f} {stats.p50 / floor:11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
