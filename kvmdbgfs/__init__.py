"""kvmdbgfs: an emulated KVM host whose debugfs tree is served over FUSE.

``kvmdbgfs.mounted(path, scenario=..., kernel=...)`` mounts a tree for the duration of a ``with`` block
(kvmdbgfs/mounted.py); the pytest plugin (kvmdbgfs/pytest_plugin.py) gives tests the ``kvm_debugfs`` fixture.
"""

from typing import Any

from kvmdbgfs import native

native.install()  # the compiled modules, when built for these sources (kvmdbgfs/native.py)


def __getattr__(name: str) -> Any:
    """``kvmdbgfs.mounted``, imported when first used (it brings the emulator in)."""
    if name == "mounted":
        from kvmdbgfs.mounted import mounted

        return mounted
    raise AttributeError(f"module 'kvmdbgfs' has no attribute {name!r}")
