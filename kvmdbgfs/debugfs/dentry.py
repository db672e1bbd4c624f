"""Dentries: the directory tree of the in-memory debugfs (fs/debugfs/inode.c)."""

from __future__ import annotations

import stat
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmdbgfs.debugfs.errors import EEXIST, ENOENT, ENOTDIR, kernel_error

if TYPE_CHECKING:
    from kvmdbgfs.debugfs.file import FileOperations

# One lock for the shape of the tree, like the parent inode locks debugfs takes
# around creation and removal.
tree_lock = threading.RLock()

_next_ino = 1
_ino_lock = threading.Lock()


def _alloc_ino() -> int:
    global _next_ino
    with _ino_lock:
        _next_ino += 1
        return _next_ino


@dataclass(eq=False)
class Dentry:
    """A debugfs file or directory: name, mode, parent, and for files the ``i_private`` data and fops.

    ``nlink`` is the inode's link count as debugfs keeps it: 1 for a file; 2 for a directory, plus one per
    subdirectory (debugfs_create_dir() increments the parent's, removing a directory drops it).
    """

    name: str
    mode: int
    parent: Dentry | None
    data: Any = None
    fops: FileOperations | None = None
    children: dict[str, Dentry] = field(default_factory=dict)
    ino: int = field(default_factory=_alloc_ino)
    ctime: float = field(default_factory=time.time)
    removed: bool = False
    nlink: int = field(init=False)

    def __post_init__(self) -> None:
        self.nlink = 2 if self.is_dir else 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def path(self) -> str:
        parts: list[str] = []
        node: Dentry | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))


def new_root() -> Dentry:
    """The root of the tree: the `kvm` directory KVM makes with debugfs_create_dir(), 0755."""
    return Dentry(name="", mode=stat.S_IFDIR | 0o755, parent=None)


def _attach(dentry: Dentry) -> Dentry:
    parent = dentry.parent
    assert parent is not None
    with tree_lock:
        if not parent.is_dir or parent.removed:
            raise kernel_error(ENOTDIR if not parent.is_dir else ENOENT)
        if dentry.name in parent.children:
            raise kernel_error(EEXIST)
        parent.children[dentry.name] = dentry
        if dentry.is_dir:
            parent.nlink += 1
    return dentry


def create_dir(name: str, parent: Dentry) -> Dentry:
    """debugfs_create_dir(): a directory, mode 0755 as debugfs makes them."""
    return _attach(Dentry(name=name, mode=stat.S_IFDIR | 0o755, parent=parent))


def create_file(name: str, mode: int, parent: Dentry, data: Any, fops: FileOperations) -> Dentry:
    """debugfs_create_file(name, mode, parent, data, fops)."""
    return _attach(Dentry(name=name, mode=stat.S_IFREG | (mode & 0o7777), parent=parent, data=data, fops=fops))


def remove_recursive(dentry: Dentry) -> None:
    """debugfs_remove_recursive(): unlink the subtree. Files already open can still be released, but
    their reads and writes now fail with EIO (debugfs_file_get in the full proxy)."""
    with tree_lock:
        stack = [dentry]
        while stack:
            node = stack.pop()
            node.removed = True
            stack.extend(node.children.values())
        if dentry.parent is not None and dentry.parent.children.get(dentry.name) is dentry:
            del dentry.parent.children[dentry.name]
            if dentry.is_dir:
                dentry.parent.nlink -= 1


def dcache_readdir(dentry: Dentry) -> list[str]:
    """dcache_readdir(): the children newest first. A new dentry goes at the head of its parent's list
    (d_alloc: list_add to d_subdirs up to 6.7, hlist_add_head to d_children since 6.8), and the walk starts
    there, so ``ls -U`` shows the last file created first on every kernel."""
    with tree_lock:
        return list(reversed(dentry.children))


def lookup(root: Dentry, path: str) -> Dentry:
    """Walk ``path`` (absolute, '/'-separated) from ``root``; ENOENT/ENOTDIR as path walk gives them."""
    node = root
    for part in path.split("/"):
        if not part:
            continue
        if not node.is_dir:
            raise kernel_error(ENOTDIR)
        child = node.children.get(part)
        if child is None:
            raise kernel_error(ENOENT)
        node = child
    return node
