"""Permissions as generic_permission() gives them, checked by the server, and a removed VM directory that
is someone's cwd: `cd ..` works there while the VM's name is gone at once (as on tmpfs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import Mount

NOBODY = 65534


@pytest.fixture
def mount(mount_factory) -> Mount:
    return mount_factory("--scenario", "empty")


@pytest.fixture
def shared_mount(mount_factory) -> Mount:
    """--allow-other: as a user other than root it would need user_allow_other in /etc/fuse.conf."""
    return mount_factory("--scenario", "empty", "--allow-other")


def test_cd_dotdot_from_a_removed_vm_directory(mount: Mount) -> None:
    name = mount.create_vm("--memory", "64M", "--vcpus", "1")
    cli = f"{sys.executable} -m kvmdbgfs.cli -m {mount.path}"
    script = (
        f"cd {mount.path}/{name} && {cli} vm destroy {name} && "
        f"{{ stat {name} 2>/dev/null && echo still-there; cd .. && pwd -P; "
        f"{sys.executable} -c 'import os; os.chdir(\"{mount.path}/{name}/..\")' 2>&1 | tail -1; "
        f"cd {mount.path}/{name} 2>&1; echo $?; }}"
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=mount.env)
    lines = result.stdout.splitlines()
    assert lines[0] == str(mount.path.resolve()), result
    assert "No such file or directory" in lines[1] and lines[-1] == "1", result
    assert "still-there" not in result.stdout


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    def drop() -> None:
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return subprocess.run(argv, capture_output=True, text=True, timeout=30, preexec_fn=drop, check=False)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_may_not_walk_the_0700_root(shared_mount: Mount) -> None:
    """debugfs's root is 0700: with --allow-other another user reaches the mount, but not past its root."""
    assert oct(os.stat(shared_mount.path).st_mode & 0o777) == "0o700"
    result = _as_nobody("cat", str(shared_mount.path / "exits"))
    assert result.returncode == 1 and "Permission denied" in result.stderr, result
    assert _as_nobody("ls", str(shared_mount.path)).returncode != 0


def test_owner_modes_hold_for_writes(mount: Mount) -> None:
    """The owner (root in CI) may read and write a 0644 stat and search the root; access() agrees."""
    assert os.access(mount.path / "exits", os.R_OK | os.W_OK)
    assert os.access(mount.path, os.X_OK)
    assert not os.access(mount.path / "exits", os.X_OK)  # no x bit anywhere: not even root
