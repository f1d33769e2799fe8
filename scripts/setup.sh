#!/usr/bin/env bash
# Install everything secretfs needs on Debian from nothing: the FUSE 3 library and
# headers pyfuse3 builds against and a virtualenv in .venv with secretfs. With
# --test, also what the tests drive (throw-away users, bubblewrap, PostgreSQL and
# MariaDB servers) and the test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev)
EXTRAS=""
if [ "${1:-}" = "--test" ]; then
    # postgresql and mariadb-server: the database rotators' tests start throw-away
    # servers of their own (the system services they may start are never used).
    PACKAGES+=(util-linux passwd bubblewrap sqlite3 postgresql mariadb-server mariadb-client)
    EXTRAS="[test]"
fi
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "secretfs setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${EXTRAS}"
echo "secretfs setup: ready ($(.venv/bin/secretfs version))"
