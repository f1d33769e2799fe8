"""What the rotation runner's wake-up costs as the store grows.

Builds SQLite stores of N secrets (1 in 100 rotating, the rest never), then
times the runner's two questions — when is the next rotation due, and which are
due now — with the secrets_by_rotation_due index and with it dropped (a walk over
every secret). Prints the median per query and the ratio.

    python bench/rotation_due.py [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from secretfs.store.sqlite import SqliteStore


def build(path: Path, size: int) -> None:
    SqliteStore.create(path).close()
    def rotation(n: int) -> str | None:
        if n % 100:
            return None
        return json.dumps({"RotationLambdaARN": "secretfs:random-password", "Enabled": True,
                           "NextRotationDate": 1e9 + n})

    with sqlite3.connect(path) as connection:
        connection.executemany(
            "INSERT INTO secrets (id, name, path, arn, created, changed, rotation)"
            " VALUES (?, ?, ?, ?, 0, 0, ?)",
            ((n, f"s{n}", f"s{n}", f"arn:{n}", rotation(n)) for n in range(1, size + 1)))


def timed(store: SqliteStore, rounds: int = 200) -> tuple[float, float]:
    """Median µs of next_rotation_due() and of rotations_due(now)."""
    nexts, dues = [], []
    with store.read() as reader:
        for _ in range(rounds):
            start = time.perf_counter_ns()
            reader.next_rotation_due()
            middle = time.perf_counter_ns()
            reader.rotations_due(1e9 + 50)
            nexts.append((middle - start) / 1000)
            dues.append((time.perf_counter_ns() - middle) / 1000)
    return statistics.median(nexts), statistics.median(dues)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()
    print(f"{'secrets':>8} {'query':>18} {'indexed µs':>11} {'full walk µs':>13} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as directory:
        for size in args.sizes:
            path = Path(directory) / f"{size}.db"
            build(path, size)
            store = SqliteStore(path)
            indexed = timed(store)
            store.close()
            with sqlite3.connect(path) as connection:
                connection.execute("DROP INDEX secrets_by_rotation_due")
            store = SqliteStore(path)
            walked = timed(store)
            store.close()
            for name, fast, slow in zip(("next_rotation_due", "rotations_due"),
                                        indexed, walked, strict=True):
                print(f"{size:>8} {name:>18} {fast:>11.1f} {slow:>13.1f} {slow / fast:>6.0f}x")


if __name__ == "__main__":
    main()
