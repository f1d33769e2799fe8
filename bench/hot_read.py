"""Hot read through the mount versus the same bytes on tmpfs.

Starts a daemon on a temporary state dir, stores one secret, then times
open+read+close of <mount>/<name>/AWSCURRENT (through the label symlink) and of
<mount>/<name>/versions/<id> against a tmpfs file holding the same bytes.
Prints p50/p99 per path and the ratios. Run as root: python bench/hot_read.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cli(state: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "secretfs.cli", *args], check=True,
                         capture_output=True, env=dict(os.environ, SECRETFS_STATE_DIR=str(state)))
    return json.loads(out.stdout or b"{}")


def time_reads(path: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        with open(path, "rb") as handle:
            handle.read()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reads", type=int, default=20000)
    args = parser.parse_args()
    value = json.dumps({"username": "app", "password": "x" * 24})
    with tempfile.TemporaryDirectory() as tmp:
        state, mount = Path(tmp, "state"), Path(tmp, "mnt")
        mount.mkdir()
        cli(state, "init", "--state-dir", str(state))
        subprocess.run([sys.executable, "-m", "secretfs.cli", "mount", str(mount),
                        "--state-dir", str(state)], check=True)
        try:
            created = cli(state, "create-secret", "--name", "bench/db", "--secret-string", value)
            tmpfs = Path("/dev/shm", f"secretfs-bench-{os.getpid()}")
            tmpfs.write_text(value)
            paths = {
                "tmpfs file": str(tmpfs),
                "secretfs versions/<id>": str(mount / "bench/db/versions" / created["VersionId"]),
                "secretfs AWSCURRENT (symlink)": str(mount / "bench/db/AWSCURRENT"),
            }
            for path in paths.values():
                time_reads(path, 500)  # warm the caches
            results = {label: summary(time_reads(path, args.reads))
                       for label, path in paths.items()}
            tmpfs.unlink()
        finally:
            subprocess.run([sys.executable, "-m", "secretfs.cli", "umount", str(mount)],
                           check=False)
    floor = results["tmpfs file"][0]
    print(f"{'path':32} {'p50 µs':>9} {'p99 µs':>9} {'p50 / tmpfs':>12}")
    for label, (p50, p99) in results.items():
        print(f"{label:32} {p50:9.1f} {p99:9.1f} {p50 / floor:11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
