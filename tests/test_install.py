"""`pip install` of the project gives a working `kvmdbgfs mount --background` / `umount`, from a fresh virtualenv.

The wheel is built once per run (pip wheel, build isolation as any user's pip); the virtualenv gets it and
its dependencies with an ordinary `pip install` and nothing of the checkout: the commands run from its bin/
in a directory outside the checkout, with no PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, is_mounted

ENV_KEYS_DROPPED = ("PYTHONPATH", "VIRTUAL_ENV")


def run(*command: str | Path, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [str(part) for part in command]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def exists(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has: no init may reap it in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once for the run: pure Python (the compiled one takes 100 s to build;
    tests/test_build_backend.py builds one with a single module compiled and installs it)."""
    out = tmp_path_factory.mktemp("wheel")
    env = {key: value for key, value in os.environ.items() if key not in ENV_KEYS_DROPPED}
    env["KVMDBGFS_PURE"] = "1"
    pip_wheel = (sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, REPO)
    result = run(*pip_wheel, cwd=out, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("kvmdbgfs-*.whl")
    return built


@pytest.fixture(scope="session")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with only the wheel installed (its dependencies from the package index, or pip's cache)."""
    venv = tmp_path_factory.mktemp("venv")
    base = getattr(sys, "_base_executable", sys.executable)
    env = {key: value for key, value in os.environ.items() if key not in ENV_KEYS_DROPPED}
    assert run(base, "-m", "venv", "--without-pip", venv, cwd=venv, env=env).returncode == 0
    pip_install = (sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", wheel)
    result = run(*pip_install, cwd=venv, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return venv


def test_background_mount_read_umount_from_a_fresh_virtualenv(fresh_venv: Path, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ENV_KEYS_DROPPED}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    kvmdbgfs = fresh_venv / "bin" / "kvmdbgfs"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    started = run(kvmdbgfs, "mount", mnt, "--scenario", "empty", "--background", cwd=tmp_path, env=env)
    try:
        assert started.returncode == 0, started.stderr
        assert "in the background" in started.stderr
        assert is_mounted(mnt)
        status = run(kvmdbgfs, "-m", mnt, "status", cwd=tmp_path, env=env)
        lines = dict(line.split(": ", 1) for line in status.stdout.splitlines())
        assert (lines["served"], lines["booted"], lines["clock"]) == ("True", "True", "realtime")
        log = Path(lines["log"])
        assert log.parent == tmp_path / "kvmdbgfs" and "serving" in log.read_text()
        # The server runs the fresh virtualenv's code, not the checkout's.
        cmdline = Path(f"/proc/{lines['server_pid']}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(str(fresh_venv)), cmdline
        assert run("cat", mnt / "exits", cwd=tmp_path, env=env).stdout == "0\n"
    finally:
        stopped = run(kvmdbgfs, "umount", mnt, cwd=tmp_path, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"{mnt}: unmounted; server {lines['server_pid']} has exited")
    assert not is_mounted(mnt)
    assert not exists(int(lines["server_pid"]))
    again = run(kvmdbgfs, "umount", mnt, cwd=tmp_path, env=env)
    assert (again.returncode, again.stderr) == (1, f"kvmdbgfs: error: {mnt}: nothing is mounted there\n")
