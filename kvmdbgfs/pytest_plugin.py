"""The pytest plugin (entry point ``pytest11``, active once kvmdbgfs is installed).

Fixtures:

- ``kvm_debugfs``: a tree mounted with FUSE (manual clock, the scenario's guests booted), a
  kvmdbgfs.mounted.KvmDebugfs: ``.path``, ``create_vm``, ``destroy_vm``, ``run``, ``advance``, ``status``.
  The marker chooses it: ``@pytest.mark.kvm_debugfs(scenario="default", kernel="latest",
  snapshot_fallback=False)``.
- ``kvm_debugfs_factory``: call it (same keywords) for as many trees as a test needs.

Where FUSE is unavailable (no /dev/fuse, no fusermount3, mounting refused as in an unprivileged container)
the test is skipped with the reason in one line; with ``snapshot_fallback=True`` it gets the tree as a
snapshot directory instead (``is_snapshot``; rewritten after each command); with KVMDBGFS_REQUIRE_FUSE=1 in
the environment it fails instead. Every tree is unmounted and its server stopped at teardown, however the
test ended. Mountpoints live in pytest's temporary directories, so xdist workers never share one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

REQUIRE_FUSE_ENV = "KVMDBGFS_REQUIRE_FUSE"
MARKER = "kvm_debugfs"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(scenario='default', kernel='latest', snapshot_fallback=False): the tree the kvm_debugfs fixture "
        "mounts for this test",
    )


class KvmDebugfsFactory:
    """Makes trees for one test and takes every one of them down at its end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._trees = contextlib.ExitStack()

    def __call__(self, scenario: str = "default", kernel: str | None = None, snapshot_fallback: bool = False) -> Any:
        from kvmdbgfs.daemon import ServerFailed  # the emulator loads only in tests that use it
        from kvmdbgfs.kvm.profiles import DEFAULT_PROFILE
        from kvmdbgfs.mounted import FuseUnavailable, mounted, snapshot_tree

        kernel = kernel or DEFAULT_PROFILE
        base = self._tmp.mktemp("kvm_debugfs")
        try:
            return self._trees.enter_context(mounted(base / "mnt", scenario, kernel, log=base / "mount.log"))
        except FuseUnavailable as exc:
            reason = f"kvmdbgfs: FUSE is unavailable: {exc}"
        except ServerFailed as exc:
            pytest.fail(f"kvmdbgfs: the mount failed: {exc}", pytrace=False)
        if os.environ.get(REQUIRE_FUSE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_FUSE_ENV}=1)", pytrace=False)
        if not snapshot_fallback:
            pytest.skip(reason)
        return self._trees.enter_context(snapshot_tree(base / "snapshot", scenario, kernel))

    def close(self) -> None:
        self._trees.close()


@pytest.fixture
def kvm_debugfs_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvmDebugfsFactory]:
    """Call with (scenario=..., kernel=..., snapshot_fallback=...) for a tree; all are taken down afterwards."""
    factory = KvmDebugfsFactory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def kvm_debugfs(request: pytest.FixtureRequest, kvm_debugfs_factory: KvmDebugfsFactory) -> Any:
    """A mounted tree (manual clock, guests booted) as the test's kvm_debugfs marker describes it."""
    marker = request.node.get_closest_marker(MARKER)
    return kvm_debugfs_factory(**(marker.kwargs if marker else {}))
