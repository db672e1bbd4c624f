"""The control socket: where it lives, who may use it, and how the CLI finds it from the mountpoint."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import MOUNT_PY, REPO, is_mounted, wait_until

from kvmdbgfs.control.client import request


def test_default_socket_is_private_and_found_from_the_mountpoint(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), PYTHONPATH=str(REPO))
    log = tmp_path / "mount.log"
    with log.open("w") as errors:  # the server writes to its own copy of the descriptor
        server = subprocess.Popen(
            [sys.executable, str(MOUNT_PY), str(mountpoint), "--scenario", "empty"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    try:
        # A server that exits ends the wait at once, and its output says why (it once ran out the 60 s under load).
        sockets = runtime / "kvmdbgfs"
        served = wait_until(
            lambda: server.poll() is not None or (is_mounted(mountpoint) and list(sockets.glob("*.sock"))), 60
        )
        assert served and server.poll() is None, f"mount.py: exit {server.poll()}: {log.read_text()[-2000:]}"
        (socket_path,) = (runtime / "kvmdbgfs").glob("*.sock")
        info = socket_path.stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_IMODE((runtime / "kvmdbgfs").stat().st_mode) == 0o700
        cli = [sys.executable, "-m", "kvmdbgfs.cli"]
        # From the mountpoint, also through a relative path and the environment variable.
        name = subprocess.run([*cli, "-m", str(mountpoint), "vm", "create", "--memory", "128M"],
                              env=env, capture_output=True, text=True, check=True).stdout.strip()
        listed = subprocess.run([*cli, "vm", "list", "--json"], cwd=tmp_path, capture_output=True, text=True,
                                env=dict(env, KVMDBGFS_MOUNT="mnt"), check=True).stdout
        assert name in listed and (mountpoint / name / "exits").read_text() == "0\n"
        assert request(socket_path, "status")["mountpoint"] == str(mountpoint.resolve())
    finally:
        server.terminate()
        assert server.wait(timeout=20) == 0
    assert not is_mounted(mountpoint)
    assert list((runtime / "kvmdbgfs").iterdir()) == []
