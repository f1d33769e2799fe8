#!/usr/bin/env bash
# Install everything from nothing, then run the whole test suite (real FUSE mounts,
# throw-away users: needs root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then exec sudo "$0" "$@"; fi
scripts/setup.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
