#!/bin/sh
# A container without an engine: bind-mount one secret's *directory* (not a file:
# a single-file bind mount pins the version it was given) at /run/secret, then read
# the label inside. The relative symlink AWSCURRENT -> versions/<id> resolves within
# the bind mount, and promotions show up without restarting the container.
SECRET_DIR=${1:-/secrets/prod/db}
exec bwrap --ro-bind / / --ro-bind "$SECRET_DIR" /run/secret --dev /dev --proc /proc \
    --unshare-pid -- sh -c 'ls -l /run/secret; cat /run/secret/AWSCURRENT; echo'
