"""Helpers to use the debugfs tree in-process, the way the VFS would."""

from __future__ import annotations

import os

from kvmdbgfs.debugfs.dentry import Dentry, lookup
from kvmdbgfs.debugfs.file import File, vfs_open, vfs_read, vfs_write


def read_all(file: File, chunk: int = 4096) -> bytes:
    """read() until end of file, as cat does."""
    parts, offset = [], 0
    while True:
        data = vfs_read(file, chunk, offset)
        if not data:
            return b"".join(parts)
        parts.append(data)
        offset += len(data)


def cat(root: Dentry, path: str) -> str:
    """Open, read everything, close."""
    file = vfs_open(lookup(root, path), os.O_RDONLY)
    try:
        return read_all(file).decode()
    finally:
        file.f_op.release(file)


def write(root: Dentry, path: str, data: bytes) -> int:
    """Open for writing, write once, close."""
    file = vfs_open(lookup(root, path), os.O_WRONLY | os.O_TRUNC)
    try:
        return vfs_write(file, data, 0)
    finally:
        file.f_op.release(file)


def walk_files(dentry: Dentry, prefix: str = "") -> list[str]:
    """Every file below ``dentry``, as sorted relative paths."""
    found = []
    for name, child in dentry.children.items():
        if child.is_dir:
            found.extend(walk_files(child, f"{prefix}{name}/"))
        else:
            found.append(prefix + name)
    return sorted(found)
