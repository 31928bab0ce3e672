"""Admin paths confined under the store root a server was given.

A client names a path relative to the store root (`staging/v00000007-...` for a snapshot's
staging directory, "" for the root itself). Absolute paths, `..`, NUL bytes, overlong
names and anything resolving outside the root (symlinks included) are refused with
INVALID_ARGUMENT, before anything is created.
"""
from __future__ import annotations

import os

from . import errors
from .persistence import STAGING_DIR, VERSIONS_DIR


def confine(store_root: str | None, rel: str, field: str, max_chars: int) -> str:
    """`rel` under store_root -> its absolute path, or InvalidArgument."""
    if store_root is None:
        raise errors.FailedPrecondition("this server has no store root; admin paths are refused")
    if len(rel) > max_chars:
        raise errors.InvalidArgument(field, f"path of {len(rel)} characters exceeds max_path_chars={max_chars}")
    if "\x00" in rel:
        raise errors.InvalidArgument(field, "path contains a NUL byte")
    if os.path.isabs(rel) or rel.startswith("~"):
        raise errors.InvalidArgument(field, "must be relative to the store root, not absolute")
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise errors.InvalidArgument(field, "must not contain '..'")
    root = os.path.realpath(store_root)
    path = os.path.realpath(os.path.join(root, *parts))
    if path != root and not path.startswith(root + os.sep):
        raise errors.InvalidArgument(field, "resolves outside the store root")
    return path


def staging_dir(store_root: str | None, rel: str, max_chars: int) -> str:
    """WriteSnapshot's version_dir: an existing directory directly under <root>/staging/
    (never a published version, never a new tree elsewhere)."""
    path = confine(store_root, rel, "version_dir", max_chars)
    root = os.path.realpath(store_root)
    if os.path.dirname(path) != os.path.join(root, STAGING_DIR):
        published = os.path.join(root, VERSIONS_DIR)
        why = "is a published version (read only)" if path.startswith(published + os.sep) or path == published \
            else "must be a staging directory, staging/<name>"
        raise errors.InvalidArgument("version_dir", why)
    if not os.path.isdir(path):
        raise errors.InvalidArgument("version_dir", "no such staging directory")
    return path
