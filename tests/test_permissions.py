"""Permissions as generic_permission() gives them, checked by the server (another user reads with
--allow-other, gets EACCES without it), and a removed VM directory that is someone's cwd: `cd ..` works
there while the VM's name is gone at once (as on tmpfs)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

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


def _as_nobody(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` as nobody, in ``cwd`` (entered before dropping root: pytest's temporary directories are
    0700, so nobody reaches the mount only from inside it)."""

    def drop() -> None:
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd, preexec_fn=drop, check=False)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_reads_with_allow_other(shared_mount: Mount) -> None:
    """The root is 0755 like the kernel's kvm directory: with --allow-other another user lists it and reads a
    0644 stat, and may not write it."""
    assert oct(os.stat(shared_mount.path).st_mode & 0o777) == "0o755"
    expected = (shared_mount.path / "exits").read_text()
    assert _as_nobody("cat", "exits", cwd=shared_mount.path).stdout == expected
    assert "exits" in _as_nobody("ls", ".", cwd=shared_mount.path).stdout.split()
    result = _as_nobody("sh", "-c", "echo 0 > exits", cwd=shared_mount.path)
    assert result.returncode != 0 and "Permission denied" in result.stderr, result


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_gets_eacces_without_allow_other(mount: Mount) -> None:
    """Without --allow-other FUSE refuses every other user at the mountpoint, whatever the modes say."""
    result = _as_nobody("cat", "exits", cwd=mount.path)
    assert result.returncode == 1 and result.stderr == f"cat: exits: {os.strerror(errno.EACCES)}\n", result


def test_owner_modes_hold_for_writes(mount: Mount) -> None:
    """The owner (root in CI) may read and write a 0644 stat and search the root; access() agrees."""
    assert os.access(mount.path / "exits", os.R_OK | os.W_OK)
    assert os.access(mount.path, os.X_OK)
    assert not os.access(mount.path / "exits", os.X_OK)  # no x bit anywhere: not even root
