"""Where a mount's control socket lives, and how the CLI finds it from the mountpoint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def runtime_dir() -> Path:
    """Where sockets live: $XDG_RUNTIME_DIR/kvmdbgfs, else a private directory under /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "kvmdbgfs" if base else Path(f"/tmp/kvmdbgfs-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _mount_key(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]


def default_socket_path(mountpoint: str) -> Path:
    """The socket a mount listens on unless --control names one."""
    return runtime_dir() / f"{_mount_key(mountpoint)}.sock"


def pointer_path(mountpoint: str) -> Path:
    """A small file naming the socket of the mount at ``mountpoint``, so the CLI finds it from -m."""
    return runtime_dir() / f"{_mount_key(mountpoint)}.control"


def find_socket(mountpoint: str) -> Path:
    """The control socket of the mount at ``mountpoint``."""
    pointer = pointer_path(mountpoint)
    if pointer.exists():
        return Path(pointer.read_text().strip())
    return default_socket_path(mountpoint)
