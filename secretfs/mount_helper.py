"""`mount.fuse.secretfs`: the mount(8) helper behind fstab lines and .mount units.

For `mount -t fuse.secretfs /var/lib/secretfs /secrets -o strict_names`, mount(8)
runs `/sbin/mount.fuse.secretfs /var/lib/secretfs /secrets -o <options>` when that
helper exists (it looks for mount.<type> before the generic /sbin/mount.fuse, which
would run a program named `secretfs` with arguments the `secretfs` command doesn't
take). The source is the state directory. The helper starts the daemon detached, as
`secretfs mount` does, and returns once the mount is up; `umount /secrets` ends it.

Options map to `secretfs mount` flags (`strict_names`, `lock_memory`, `debug`,
`plain_http`, `listen=HOST:PORT`, `tls_cert=PEM`, `tls_key=PEM`,
`max_staleness=SECONDS`; `-` or `_` alike).
Generic options meant for mount(8), systemd or other tools (`rw`, `defaults`,
`nofail`, `_netdev`, `x-systemd.*`, `comment=`...) are ignored: the mount is always
ro, nosuid, nodev, noexec and allow_other. Any other option is refused, unless
mount(8) was given -s (sloppy).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from secretfs.options import MountOptions, OptionsError

EXIT_USAGE, EXIT_FAILURE = 1, 32  # mount(8)'s codes: incorrect invocation, mount failure

_FLAGS = {"strict_names", "lock_memory", "debug", "plain_http", "metrics_allow_remote"}
_VALUES = {"listen": "listen", "tls_cert": "tls_certificate", "tls_key": "tls_key",
           "metrics_listen": "metrics_listen", "log_format": "log_format",
           "max_staleness": "max_staleness"}
# What fstab lines carry for mount(8), systemd or the kernel, and the daemon decides itself.
_IGNORED = {
    "rw", "ro", "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
    "nofail", "_netdev", "netdev", "sync", "async", "dirsync", "atime", "noatime", "diratime",
    "nodiratime", "relatime", "norelatime", "strictatime", "lazytime", "nolazytime", "suid",
    "nosuid", "dev", "nodev", "exec", "noexec", "allow_other", "allow_root",
    "default_permissions", "loud", "silent",
}
_IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=")


def parse_options(text: str, *, sloppy: bool = False) -> tuple[MountOptions, list[str]]:
    """The MountOptions an `-o` list asks for, and the unknown options a sloppy mount
    ignored; OptionsError names an unknown one otherwise."""
    options, skipped = MountOptions(), []
    for item in filter(None, text.split(",")):
        name, has_value, value = item.partition("=")
        key = name.replace("-", "_")
        if key in _FLAGS and not has_value:
            options = replace(options, **{key: True})
        elif key in _VALUES and has_value and value:
            options = replace(options, **{_VALUES[key]: value})
        elif item in _IGNORED or item.startswith(_IGNORED_PREFIXES):
            continue
        elif sloppy:
            skipped.append(item)
        else:
            raise OptionsError(f"unknown mount option {item!r}")
    return options, skipped


def _parse_argv(argv: list[str]) -> tuple[str, str, str, set[str]]:
    """SOURCE MOUNTPOINT [-o OPTS] [-sfnv] [-t TYPE], in any order, as mount(8) calls."""
    positional, opts, flags = [], [], set()
    args = iter(argv)
    for arg in args:
        if arg in ("-o", "-t"):
            value = next(args, None)
            if value is None:
                raise OptionsError(f"{arg} needs a value")
            if arg == "-o":
                opts.append(value)
        elif arg.startswith("-o") and len(arg) > 2:
            opts.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1:
            flags.update(arg[1:])
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise OptionsError("usage: mount.fuse.secretfs STATE_DIR MOUNTPOINT [-o OPTIONS]")
    return positional[0], positional[1], ",".join(opts), flags


def main(argv: list[str] | None = None) -> int:
    from secretfs import daemon

    argv = sys.argv[1:] if argv is None else argv
    try:
        source, mountpoint, text, flags = _parse_argv(argv)
        options, skipped = parse_options(text, sloppy="s" in flags)
        options.endpoint()  # a bad listen= is a usage error, before anything starts
        options.staleness_bound()
    except OptionsError as error:
        print(f"mount.fuse.secretfs: {error}", file=sys.stderr)
        return EXIT_USAGE
    for item in skipped:
        print(f"mount.fuse.secretfs: ignoring unknown option {item!r}", file=sys.stderr)
    if "f" in flags:  # mount -f: do everything but the mount
        return 0
    try:
        daemon.mount(Path(mountpoint), Path(source), foreground=False, options=options)
    except (daemon.DaemonError, OSError) as error:
        print(f"mount.fuse.secretfs: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
