#!/usr/bin/env bash
# Install everything, create a demo store (SQLite + local master key), mount it,
# store a secret and show it with cat. The mount stays up for you to explore.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then exec sudo "$0" "$@"; fi
scripts/setup.sh

DEMO="${SECRETFS_DEMO_DIR:-/tmp/secretfs-demo}"
export SECRETFS_STATE_DIR="$DEMO/state"
MOUNT="$DEMO/secrets"
secretfs() { .venv/bin/secretfs "$@"; }

if findmnt -rn "$MOUNT" >/dev/null 2>&1 || ! stat "$MOUNT" >/dev/null 2>&1; then
    secretfs umount "$MOUNT" 2>/dev/null || fusermount3 -u -z "$MOUNT" 2>/dev/null || true
fi
rm -rf "$DEMO"
mkdir -p "$MOUNT"
secretfs init >/dev/null
secretfs mount "$MOUNT"
secretfs create-secret --name demo/db \
    --secret-string '{"username":"app","password":"correct-horse-battery-staple"}' >/dev/null

set -x
ls -l "$MOUNT/demo/db/"
readlink "$MOUNT/demo/db/AWSCURRENT"
cat "$MOUNT/demo/db/AWSCURRENT"; echo
cat "$MOUNT/demo/db/keys/AWSCURRENT/password"; echo
{ set +x; } 2>/dev/null
cat <<MSG

secretfs is mounted at $MOUNT (state in $SECRETFS_STATE_DIR).
Try:   export SECRETFS_STATE_DIR=$SECRETFS_STATE_DIR PATH=$PWD/.venv/bin:\$PATH
       secretfs put-secret-value --secret-id demo/db --secret-string '{"username":"app","password":"n3w"}'
       cat $MOUNT/demo/db/AWSCURRENT
Stop:  $PWD/.venv/bin/secretfs umount $MOUNT
MSG
