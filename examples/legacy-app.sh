#!/bin/sh
# A legacy program that reads its password from a file on every connect.
# Pointing it at the label (not a version) means a promotion is picked up on the
# next open, with no restart and no API client.
PASSWORD_FILE=${PASSWORD_FILE:-/secrets/prod/db/keys/AWSCURRENT/password}
while true; do
    password=$(cat "$PASSWORD_FILE") || exit 1
    echo "connecting with a password of ${#password} characters"
    sleep 5
done
