#!/bin/sh
# The application of compose.yaml and kubernetes.yaml. It reads the secret through
# its label each time it needs it, as an application should: each open resolves
# AWSCURRENT again, so promotions and rotations show without a restart. It prints a
# fingerprint of what it read, never the value.
SECRET_DIR=${SECRET_DIR:-/run/secrets/db}
INTERVAL=${INTERVAL:-5}

fingerprint() { printf %s "$1" | sha256sum | cut -c1-16; }

while :; do
    if value=$(cat "$SECRET_DIR/AWSCURRENT") &&
            password=$(cat "$SECRET_DIR/keys/AWSCURRENT/password"); then
        echo "AWSCURRENT $(fingerprint "$value") password $(fingerprint "$password")"
    else
        echo "error"
    fi
    sleep "$INTERVAL"
done
