#!/bin/sh
# A legacy program that knows nothing of secrets: it reads its whole configuration
# from one .ini file each time it connects. secretfs renders that file from the
# template secret legacy/app.ini (app.ini.j2) at each open, so a rotation of prod/db
# shows in the next connection. It reads the file once per connection (one open is
# one consistent rendering) and prints a fingerprint of the password, never the password.
CONFIG=${CONFIG:-/etc/legacy-app/app.ini}
INTERVAL=${INTERVAL:-5}

while :; do
    if config=$(cat "$CONFIG"); then
        user=$(printf '%s\n' "$config" | sed -n 's/^user = //p')
        password=$(printf '%s\n' "$config" | sed -n 's/^password = //p')
        echo "connecting as $user, password $(printf %s "$password" | sha256sum | cut -c1-16)"
    else
        echo "error"
    fi
    sleep "$INTERVAL"
done
