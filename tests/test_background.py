"""`kvmdbgfs mount --background` and `kvmdbgfs umount` refusing what they cannot do: one line, a non-zero status,
nothing left running or mounted; `kvmdbgfs.mounted` taking its tree down however its block ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_error_line, is_mounted, mount_env, wait_until


def kvmdbgfs(*args: str | Path, runtime: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kvmdbgfs", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=mount_env(runtime), timeout=60, check=False)


def test_a_server_that_fails_gives_its_one_line(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = kvmdbgfs("mount", mnt, "--scenario", "nope", "--background", runtime=tmp_path)
    message = "kvmdbgfs mount: error: scenario 'nope': no such file (built-in: default, empty)"
    assert_one_error_line(result, 2, message)
    log = tmp_path / "kvmdbgfs" / next(p.name for p in (tmp_path / "kvmdbgfs").glob("*.log"))
    assert log.read_text().strip() == message  # the line comes from the server's log
    assert not is_mounted(mnt)


def test_a_missing_mountpoint_is_refused(tmp_path: Path) -> None:
    result = kvmdbgfs("mount", tmp_path / "missing", "--background", runtime=tmp_path)
    assert_one_error_line(result, 2, f"kvmdbgfs mount: error: {tmp_path / 'missing'}: no such file or directory")


def test_umount_refuses_what_is_not_a_kvmdbgfs_mount(tmp_path: Path) -> None:
    assert_one_error_line(
        kvmdbgfs("umount", tmp_path, runtime=tmp_path), 1, f"kvmdbgfs: error: {tmp_path}: nothing is mounted there"
    )
    proc = kvmdbgfs("umount", "/proc", runtime=tmp_path)
    assert_one_error_line(proc, 1, "kvmdbgfs: error: /proc: not a kvmdbgfs mount (proc)")


def test_the_context_manager_takes_the_tree_down_even_when_the_block_fails(tmp_path: Path) -> None:
    import kvmdbgfs

    mnt = tmp_path / "mnt"
    with pytest.raises(RuntimeError, match="the block failed"), kvmdbgfs.mounted(mnt, scenario="empty") as tree:
        assert (tree.path / "exits").read_text() == "0\n" and is_mounted(mnt)
        assert tree.status()["clock"] == "manual"
        server = tree.status()["server_pid"]
        raise RuntimeError("the block failed")
    assert not is_mounted(mnt)
    assert not Path(f"/proc/{server}").exists()  # the server was our child, and was waited for


def test_no_wait_booted_returns_while_the_guests_boot(tmp_path: Path) -> None:
    scenario = tmp_path / "booting.toml"
    scenario.write_text(
        '[[vm]]\nmemory = "256M"\nvcpus = 1\nworkload = "idle"\nsettings = { uptime = 0, workers = 0, logins = 1 }\n'
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    started = kvmdbgfs("mount", mnt, "--scenario", scenario, "--background", "--no-wait-booted", runtime=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        assert "guests booting" in started.stderr and is_mounted(mnt)
        assert (mnt / "exits").exists()

        def booted() -> bool:
            return "booted: True" in kvmdbgfs("-m", mnt, "status", runtime=tmp_path).stdout

        assert wait_until(booted, timeout=120)
    finally:
        stopped = kvmdbgfs("umount", mnt, runtime=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
