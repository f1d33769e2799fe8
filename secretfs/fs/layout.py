"""The mount's layout: a pure mapping between paths and nodes, testable without FUSE.

    <mount>/prod/db/                      a secret's directory (its name, split at '/')
        AWSCURRENT -> versions/<id>       one relative symlink per staging label
        AWSPREVIOUS -> versions/<id>
        versions/<id>                     each version's whole value, immutable
        keys/AWSCURRENT -> .by-version/<id>
        keys/.by-version/<id>/<key>       each top-level key of a JSON-object value
        <child>/                          deeper names: prod/db/replica is a secret too
    <mount>/~templates/prod/app.conf      a template secret's rendering, by its path

Labels, version ids and JSON keys become file names through `model.file_name`
(percent-encoding '%', '/' and a leading '.'). The symlinks are relative, so a
secret's directory bind-mounted into a container still resolves them. A node is
a small tuple; the adapter in `ops.py` gives each one an inode number.

A file's owner, group and mode come from its secret's presentation tags
(`presentation.py`); directories and symlinks are always root's. `~templates` can't
collide with a secret: AWS names never contain '~'.
"""

from __future__ import annotations

import json
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from secretfs import presentation
from secretfs.model import Secret, file_name
from secretfs.templates import is_template

DIR, LABEL, VERSIONS, VERSION, KEYS, KEYLINK, BY_VERSION, VERSION_KEYS, KEY = (
    "dir", "label", "versions", "version", "keys", "keylink", "by-version", "version-keys",
    "key")
TEMPLATE_DIR, TEMPLATE = "template-dir", "template"
ROOT = (DIR, "")
TEMPLATES = (TEMPLATE_DIR, "")
BY_VERSION_NAME = ".by-version"
TEMPLATES_NAME = "~templates"
# Nodes whose content is a secret's (or a rendering's): they show the presentation tags.
FILES = frozenset({VERSION, KEY, TEMPLATE})

# Files are presented as root's and owner-readable only unless their secret's tags say
# otherwise (ops.py adds 0044 when a policy may let others read them).
FILE_MODE = stat.S_IFREG | 0o400
DIR_MODE = stat.S_IFDIR | 0o555
LINK_MODE = stat.S_IFLNK | 0o777

Node = tuple


@dataclass(frozen=True, slots=True)
class Attributes:
    mode: int
    size: int
    mtime: datetime | None
    immutable: bool  # a version's content: the kernel may cache it for as long as it likes
    uid: int = 0
    gid: int = 0
    mode_tagged: bool = False  # the mode is the secret's own choice, not the mount's default


class NotFound(Exception):
    """No such node; the adapter answers ENOENT."""


def key_values(value: bytes) -> dict[str, bytes]:
    """The files of a JSON object's top-level keys: strings raw, anything else as JSON."""
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    files = {}
    for key, item in document.items():
        if not key:
            continue  # an empty key has no file name
        data = item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))
        files[file_name(key)] = data.encode("utf-8")
    return files


class Layout:
    """Resolves nodes against the service's catalog; decrypts only for JSON keys."""

    def __init__(self, service, *, key_cache_size: int = 256):
        self.service = service
        self.catalog = service.catalog
        self._keys: OrderedDict[tuple[int, str], dict[str, bytes]] = OrderedDict()
        # The FUSE loop and worker threads (cold reads, catalog changes) share _keys.
        self._keys_lock = threading.Lock()
        self._key_cache_size = key_cache_size
        # Template secret id -> path: built on first use (one pass over the catalog),
        # then kept by catalog changes; replaced whole, so readers never see it change.
        self._templates: dict[int, str] | None = None
        self._templates_lock = threading.Lock()
        self.catalog.subscribe(self._track_templates)

    # --- resolution --------------------------------------------------------------

    def secret(self, secret_id: int) -> Secret:
        secret = self.catalog.get(secret_id)
        if secret is None or secret.is_deleted:
            raise NotFound
        return secret

    def secret_at(self, path: str) -> Secret | None:
        secret_id = self.catalog.live_id_at(path) if path else None
        return None if secret_id is None else self.catalog.get(secret_id)

    def lookup(self, parent: Node, name: str) -> Node:
        kind = parent[0]
        if parent == ROOT and name == TEMPLATES_NAME:
            return TEMPLATES
        if kind == TEMPLATE_DIR:
            return self._template_lookup(parent[1], name)
        if kind == DIR:
            path = parent[1]
            secret = self.secret_at(path)
            if secret is not None:
                if name == "versions":
                    return (VERSIONS, secret.secret_id)
                if name == "keys":
                    return (KEYS, secret.secret_id)
                label = self._label_named(secret, name)
                if label is not None:
                    return (LABEL, secret.secret_id, label)
            if self.catalog.has_child(path, name):
                return (DIR, f"{path}/{name}" if path else name)
            raise NotFound
        secret = self.secret(parent[1])
        if kind == VERSIONS:
            version_id = self._version_named(secret, name)
            return (VERSION, secret.secret_id, version_id)
        if kind == KEYS:
            if name == BY_VERSION_NAME:
                return (BY_VERSION, secret.secret_id)
            label = self._label_named(secret, name)
            if label is None:
                raise NotFound
            return (KEYLINK, secret.secret_id, label)
        if kind == BY_VERSION:
            return (VERSION_KEYS, secret.secret_id, self._version_named(secret, name))
        if kind == VERSION_KEYS:
            if name not in self.keys_of(secret, parent[2]):
                raise NotFound
            return (KEY, secret.secret_id, parent[2], name)
        raise NotFound

    def _template_lookup(self, directory: str, name: str) -> Node:
        path = f"{directory}/{name}" if directory else name
        secret = self.secret_at(path)
        if secret is not None and is_template(secret):
            return (TEMPLATE, secret.secret_id)
        if self.catalog.has_child(directory, name) and (
                secret is None or self.catalog.children(path)):
            return (TEMPLATE_DIR, path)
        raise NotFound

    def template_children(self, path: str) -> list[tuple[str, Node]]:
        """A directory of `~templates`: the templates directly in it, and the
        subdirectories that hold a template somewhere below."""
        prefix = f"{path}/" if path else ""
        files, directories = {}, set()
        for secret_id, below in self.template_paths().items():
            if not below.startswith(prefix):
                continue
            segment, _, rest = below[len(prefix):].partition("/")
            if rest:
                directories.add(segment)
            else:
                files[segment] = (TEMPLATE, secret_id)
        # A template's path is a file even if other templates lie below it.
        return sorted([(segment, (TEMPLATE_DIR, prefix + segment))
                       for segment in directories - files.keys()] + list(files.items()))

    def template_paths(self) -> dict[int, str]:
        templates = self._templates
        if templates is not None:
            return templates
        with self._templates_lock:
            if self._templates is None:
                found = {}
                for path, secret_id in self.catalog.live_below(""):
                    secret = self.catalog.get(secret_id)
                    if secret is not None and is_template(secret):
                        found[secret_id] = path
                self._templates = found
            return self._templates

    def _track_templates(self, old: Secret | None, new: Secret | None) -> None:
        with self._templates_lock:
            if self._templates is None:
                return
            templates = dict(self._templates)
            if old is not None:
                templates.pop(old.secret_id, None)
            if self._shows_template(new):
                templates[new.secret_id] = new.path
            self._templates = templates

    def template(self, node: Node) -> Secret:
        secret = self.secret(node[1])
        if not is_template(secret):
            raise NotFound
        return secret

    @staticmethod
    def _label_named(secret: Secret, name: str) -> str | None:
        if name in secret.labels and file_name(name) == name:
            return name  # the common case: the name needs no encoding
        for label in secret.labels:
            if file_name(label) == name:
                return label
        return None

    @staticmethod
    def _version_named(secret: Secret, name: str) -> str:
        version = secret.versions.get(name)
        if version is not None and file_name(name) == name and version.size is not None:
            return name
        for version_id, version in secret.versions.items():
            if file_name(version_id) == name and version.size is not None:
                return version_id
        raise NotFound

    def exists(self, node: Node) -> bool:
        try:
            self.attributes(node)
        except NotFound:
            return False
        return True

    def readlink(self, node: Node) -> str:
        return self.link_target(self.secret(node[1]), node)

    @staticmethod
    def link_target(secret: Secret, node: Node) -> str:
        """Where a label's (or a key link's) symlink points in this snapshot."""
        version_id = secret.labels.get(node[2])
        if version_id is None:
            raise NotFound
        if node[0] == LABEL:
            return f"versions/{file_name(version_id)}"
        return f"{BY_VERSION_NAME}/{file_name(version_id)}"

    def children(self, node: Node) -> list[tuple[str, Node]]:
        kind = node[0]
        if kind == DIR:
            path = node[1]
            entries = []
            secret = self.secret_at(path)
            if secret is not None:
                entries += [(file_name(label), (LABEL, secret.secret_id, label))
                            for label in sorted(secret.labels)]
                entries += [("keys", (KEYS, secret.secret_id)),
                            ("versions", (VERSIONS, secret.secret_id))]
            prefix = f"{path}/" if path else ""
            entries += [(segment, (DIR, prefix + segment))
                        for segment in self.catalog.children(path)]
            if node == ROOT and self.template_paths():
                entries.append((TEMPLATES_NAME, TEMPLATES))
            return entries
        if kind == TEMPLATE_DIR:
            return self.template_children(node[1])
        secret = self.secret(node[1])
        if kind == VERSIONS:
            return [(file_name(version_id), (VERSION, secret.secret_id, version_id))
                    for version_id, version in secret.versions.items() if version.size is not None]
        if kind == KEYS:
            return [(file_name(label), (KEYLINK, secret.secret_id, label))
                    for label in sorted(secret.labels)]
        if kind == BY_VERSION:
            return [(file_name(version_id), (VERSION_KEYS, secret.secret_id, version_id))
                    for version_id, version in secret.versions.items() if version.size is not None]
        if kind == VERSION_KEYS:
            return [(name, (KEY, secret.secret_id, node[2], name))
                    for name in sorted(self.keys_of(secret, node[2]))]
        raise NotFound

    def attributes(self, node: Node) -> Attributes:
        kind = node[0]
        if kind == DIR:
            secret = self.secret_at(node[1])
            if node != ROOT and secret is None and not self.catalog.is_directory(node[1]):
                raise NotFound
            return Attributes(DIR_MODE, 0, secret.changed if secret else None, False)
        if kind == TEMPLATE_DIR:
            if node != TEMPLATES and not self.catalog.is_directory(node[1]):
                raise NotFound
            return Attributes(DIR_MODE, 0, None, False)
        if kind == TEMPLATE:
            # Rendered at each open and read with direct_io: the size is unknown, and 0.
            secret = self.template(node)
            return self._file(secret, None, 0, secret.changed, False)
        secret = self.secret(node[1])
        if kind in (VERSIONS, KEYS, BY_VERSION):
            return Attributes(DIR_MODE, 0, secret.changed, False)
        if kind in (LABEL, KEYLINK):
            return Attributes(LINK_MODE, len(self.readlink(node)), secret.changed, False)
        version = secret.versions.get(node[2])
        if version is None or version.size is None:
            raise NotFound
        if kind == VERSION:
            return self._file(secret, None, version.size, version.created, True)
        if kind == VERSION_KEYS:
            return Attributes(DIR_MODE, 0, version.created, True)
        if kind == KEY:
            data = self.keys_of(secret, node[2]).get(node[3])
            if data is None:
                raise NotFound
            return self._file(secret, node[3], len(data), version.created, True)
        raise NotFound

    @staticmethod
    def _file(secret: Secret, key_file: str | None, size: int, mtime: datetime | None,
              immutable: bool) -> Attributes:
        shown = presentation.of(secret.tags, key_file)
        mode = FILE_MODE if shown.mode is None else stat.S_IFREG | shown.mode
        return Attributes(mode, size, mtime, immutable, shown.uid, shown.gid,
                          shown.mode is not None)

    # --- content -------------------------------------------------------------------

    def content(self, node: Node) -> bytes:
        """The bytes of a file node (decrypts; DecryptionFailure propagates)."""
        secret = self.secret(node[1])
        if node[0] == VERSION:
            return self.service.read_version(secret, node[2])
        if node[0] == KEY:
            data = self.keys_of(secret, node[2]).get(node[3])
            if data is None:
                raise NotFound
            return data
        raise NotFound

    def keys_of(self, secret: Secret, version_id: str) -> dict[str, bytes]:
        """A JSON value's key files; a first call decrypts (see keys_cached)."""
        cache_key = (secret.secret_id, version_id)
        with self._keys_lock:
            files = self._keys.get(cache_key)
            if files is not None:
                self._keys.move_to_end(cache_key)
                return files
        if version_id not in secret.versions:
            raise NotFound
        files = key_values(self.service.read_version(secret, version_id))
        with self._keys_lock:
            self._keys[cache_key] = files
            if len(self._keys) > self._key_cache_size:
                self._keys.popitem(last=False)
        return files

    def keys_cached(self, secret_id: int, version_id: str) -> bool:
        """Whether keys_of answers from memory, without reading and decrypting."""
        return (secret_id, version_id) in self._keys

    @property
    def templates_known(self) -> bool:
        """Whether template_paths answers from memory: the first call loads every
        secret's snapshot to find the templates."""
        return self._templates is not None

    def version_of(self, node: Node) -> tuple[Secret, str]:
        """The secret and version a content node belongs to (for authorization)."""
        secret = self.secret(node[1])
        if node[2] not in secret.versions:
            raise NotFound
        return secret, node[2]

    # --- what a change makes stale ---------------------------------------------------

    @staticmethod
    def _shows_template(secret: Secret | None) -> bool:
        return secret is not None and not secret.is_deleted and is_template(secret)

    @staticmethod
    def retagged(old: Secret | None, new: Secret | None) -> bool:
        """Whether a change may show a secret's files with another owner, group or mode."""
        return old is not None and new is not None and old.tags != new.tags

    def stale_entries(self, old: Secret | None, new: Secret | None) -> tuple[
            list[tuple[Node, str]], list[Node]]:
        """Directory entries the kernel must forget, and link nodes whose target moved."""
        if old is None:
            return [], []
        entries: list[tuple[Node, str]] = []
        moved: list[Node] = []
        sid = old.secret_id
        gone = new is None or (new.is_deleted and not old.is_deleted)
        if self._shows_template(old) != self._shows_template(new):
            parent, _, segment = old.path.rpartition("/")
            entries.append(((TEMPLATE_DIR, parent), segment))
        new_labels = {} if gone else new.labels
        for label, version_id in old.labels.items():
            name = file_name(label)
            if label not in new_labels:
                entries += [((DIR, old.path), name), ((KEYS, sid), name)]
            elif new_labels[label] != version_id:
                moved += [(LABEL, sid, label), (KEYLINK, sid, label)]
        new_versions = {} if gone else new.versions
        for version_id in old.versions:
            if version_id not in new_versions:
                name = file_name(version_id)
                entries += [((VERSIONS, sid), name), ((BY_VERSION, sid), name)]
        if gone:
            entries += [((DIR, old.path), "versions"), ((DIR, old.path), "keys")]
            # The secret's directory, and any prefix directory it alone held up.
            path = old.path
            while path and not self.catalog.is_directory(path):
                parent, _, segment = path.rpartition("/")
                entries.append(((DIR, parent), segment))
                path = parent
            if new is None or new.is_deleted:
                with self._keys_lock:
                    self._keys = OrderedDict(
                        (key, files) for key, files in self._keys.items() if key[0] != sid)
        return entries, moved
